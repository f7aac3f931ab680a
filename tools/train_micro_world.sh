#!/usr/bin/env bash
# The whole micro-world recipe, seeds fixed: the micro SD v1 (VAE, text encoder, UNet), the
# LD-ZNet, ZNet and RGBNet heads on both domains, then the same heads on the cartoon domain only
# (for the cross-domain report). With --install, the SD model and the three both-domain heads
# (fp16) are copied to ldznet_ext/world/weights/, the embedded default, with the SD stage's log.
#
#   tools/train_micro_world.sh [RUN_DIR] [DEVICE] [--install]    (defaults: runs/micro, cpu)
#
# On the CPU the SD stage uses every core and the heads train two at a time, one thread each
# (small convolutions gain little from a second thread; two processes use both cores fully).
# LDZNET_COLLECT=DIR copies each product there as soon as it exists (used on a lent GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/micro}
device=${2:-cpu}
install=${3:-}
python=${PYTHON:-.venv/bin/python}
collect=${LDZNET_COLLECT:-}
weights=ldznet_ext/world/weights
source tools/micro_head_args.sh
head_args=("${micro_head_args[@]}" --device "$device")

keep() {  # keep FILE NAME: copy a product to the collect folder
  [ -z "$collect" ] || cp "$1" "$collect/$2"
}

train_head() {  # train_head ARCH [DOMAIN]: one head into $run/ARCH[-DOMAIN]
  local arch=$1 domain=${2:-} name=$1${2:+-$2}
  # The latent heads add a per-sample Dice loss to the BCE (+4 mIoU); an RGBNet trained with it stays
  # a constant map, so RGBNet keeps the BCE alone (README, "The micro world").
  local dice=()
  [ "$arch" = rgbnet ] || dice=("${micro_latent_head_args[@]}")
  OMP_NUM_THREADS=1 $python -m ldznet_ext.cli train --arch "$arch" --model "$sd" "${head_args[@]}" "${dice[@]}" \
    ${domain:+--domain "$domain"} -o "$run/$name" > "$run/$name.log" 2>&1
  keep "$run/$name/head.safetensors" "micro-$name.safetensors"
}

mkdir -p "$run"
$python -m ldznet_ext.cli world train-sd -o "$run/sd" --recipe full --device "$device" --quiet
sd="$run/sd/micro-sd-v1.safetensors"
keep "$sd" micro-sd-v1.safetensors
pairs=("rgbnet rgbnet:cartoon" "ldznet znet" "ldznet:cartoon znet:cartoon")  # like with like: neither waits long
[ "$device" = cpu ] || pairs=("ldznet" "znet" "rgbnet" "ldznet:cartoon" "znet:cartoon" "rgbnet:cartoon")
for pair in "${pairs[@]}"; do
  pids=()
  for job in $pair; do  # ARCH or ARCH:DOMAIN
    train_head "${job%%:*}" "$([ "$job" = "${job#*:}" ] || echo "${job#*:}")" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # a failed head stops the recipe (set -e)
done

if [ "$install" = "--install" ]; then
  cp "$sd" "$weights/micro-sd-v1.safetensors"
  cp "$run/sd/train_sd_log.json" "$weights/micro-sd-v1.train_log.json"
  for arch in ldznet znet rgbnet; do
    $python - "$run/$arch/head.safetensors" "$weights/micro-$arch.safetensors" <<'PY'
import sys, torch
from ldznet_ext.checkpoint_io import read_metadata
from ldznet_ext.heads import load_head, save_head
head, config = load_head(sys.argv[1])
save_head(head, config, sys.argv[2], read_metadata(sys.argv[1]).get("training"), dtype=torch.float16)
PY
  done
fi
