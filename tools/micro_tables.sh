#!/usr/bin/env bash
# The paper's Tables 1 and 4 at micro scale: every method on the micro world's test split
# (world:test:100, both domains), written to docs/micro-tables.md by `ldznet eval --merge`.
#
#   tools/micro_tables.sh [RUN_DIR]    (default runs/tables; results and the ablation head go there)
#
# Table 1 rows: zero-shot, RGBNet, ZNet, LD-ZNet (the embedded models). Table 4 compares the
# shipped LD-ZNet (SD features through the attention pool and attn3) with an LD-ZNet whose SD
# features are concatenated instead (`--sd-fusion concat`), trained here by the embedded heads'
# recipe (tools/train_micro_world.sh) on the embedded SD model, unless RUN_DIR already holds it.
# Results already in RUN_DIR are reused (delete RUN_DIR/NAME.json to redo one).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/tables}
python=${PYTHON:-.venv/bin/python}
weights=ldznet_ext/world/weights
data=world:test:100
out=docs/micro-tables.md
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p "$run"
if [ ! -f "$run/ldznet-concat/head.safetensors" ]; then
  source tools/micro_head_args.sh
  $python -m ldznet_ext.cli train --arch ldznet --sd-fusion concat --model "$weights/micro-sd-v1.safetensors" \
    "${micro_head_args[@]}" "${micro_latent_head_args[@]}" -o "$run/ldznet-concat" > "$run/ldznet-concat.log" 2>&1
fi

evaluate() {  # evaluate NAME [eval arguments]: one method's result as $run/NAME.json
  local name=$1
  shift
  [ -f "$run/$name.json" ] || $python -m ldznet_ext.cli eval --data "$data" --name "$name" --json "$run/$name.json" "$@" > "$run/$name.txt"
}
evaluate zero-shot --zero-shot
evaluate RGBNet --head "$weights/micro-rgbnet.safetensors"
evaluate ZNet --head "$weights/micro-znet.safetensors"
evaluate LD-ZNet --head "$weights/micro-ldznet.safetensors"
evaluate "cross-attention (LD-ZNet)" --head "$weights/micro-ldznet.safetensors"
evaluate concatenation --head "$run/ldznet-concat/head.safetensors"

{
  echo "# The paper's tables on the micro world"
  echo
  echo "Produced by \`tools/micro_tables.sh\` ($data: 100 unseen scenes, both rendering domains; CLIPSeg"
  echo "methodology, x 100; edge refinement on, as by default). The titles are the paper's; the data"
  echo "here is the micro world, not PhraseCut."
  echo
  $python -m ldznet_ext.cli eval --merge "$run"/{zero-shot,RGBNet,ZNet,LD-ZNet}.json --table 1 --markdown "$run/table1.md" > /dev/null
  cat "$run/table1.md"
  echo
  $python -m ldznet_ext.cli eval --merge "$run/cross-attention (LD-ZNet).json" "$run/concatenation.json" --table 4 \
    --markdown "$run/table4.md" > /dev/null
  cat "$run/table4.md"
} > "$out"
echo "wrote $out"
