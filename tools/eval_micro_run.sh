#!/usr/bin/env bash
# Score what tools/train_micro_world.sh produced in RUN_DIR, to compare a regeneration with the
# embedded models (README, "The micro world"): Table 1 of the run's own SD model and heads on
# world:test:100 (both domains), and the cartoon-only heads on photos (cross-domain).
#
#   tools/eval_micro_run.sh [RUN_DIR] [DATA]    (defaults runs/micro, world:test:100; writes RUN_DIR/report.md)
#
# Evaluations run two at a time, one thread each. Results already in RUN_DIR/eval are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/micro}
python=${PYTHON:-.venv/bin/python}
sd="$run/sd/micro-sd-v1.safetensors"
data=${2:-world:test:100}
out="$run/eval"
export OMP_NUM_THREADS=1

for file in "$sd" "$run"/{ldznet,znet,rgbnet,ldznet-cartoon,znet-cartoon,rgbnet-cartoon}/head.safetensors; do
  [ -f "$file" ] || { echo "missing $file: run tools/train_micro_world.sh $run first" >&2; exit 2; }
done
mkdir -p "$out"

evaluate() {  # evaluate NAME [eval arguments]: one result as $out/NAME.json
  local name=$1
  shift
  [ -f "$out/$name.json" ] || $python -m ldznet_ext.cli eval --model "$sd" --data "$data" --name "$name" \
    --json "$out/$name.json" "$@" > "$out/$name.txt"
}
# two at a time; `wait PID` returns the job's status, so a failed evaluation stops the script
evaluate zero-shot --zero-shot & first=$!
evaluate RGBNet --head "$run/rgbnet/head.safetensors" & second=$!
wait $first; wait $second
evaluate ZNet --head "$run/znet/head.safetensors" & first=$!
evaluate LD-ZNet --head "$run/ldznet/head.safetensors" & second=$!
wait $first; wait $second
evaluate "LD-ZNet, cartoon -> photo" --domain photo --head "$run/ldznet-cartoon/head.safetensors" & first=$!
evaluate "ZNet, cartoon -> photo" --domain photo --head "$run/znet-cartoon/head.safetensors" & second=$!
wait $first; wait $second
evaluate "RGBNet, cartoon -> photo" --domain photo --head "$run/rgbnet-cartoon/head.safetensors"

{
  echo "# Micro-world run $run on $data (x 100)"
  echo
  $python -m ldznet_ext.cli eval --merge "$out"/{zero-shot,RGBNet,ZNet,LD-ZNet}.json --table 1 \
    --markdown "$out/table1.md" > /dev/null
  tail -n +3 "$out/table1.md"  # without the paper's title: this is not PhraseCut
  echo
  echo "Trained on cartoons only, tested on photos:"
  echo
  $python -m ldznet_ext.cli eval --merge "$out"/*", cartoon -> photo.json" --table 1 \
    --markdown "$out/cross-domain.md" > /dev/null
  tail -n +3 "$out/cross-domain.md"
} > "$run/report.md"
cat "$run/report.md"
