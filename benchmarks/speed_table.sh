#!/usr/bin/env bash
# Every row of the README's speed table for this machine, one process per row (peak memory is per
# process), as JSON lines in $1 (default speed_table.jsonl). On CPU: 64x64 and 128x128 with the PyTorch
# reference beside each row; on a GPU/TPU: 256x256.
#   bash benchmarks/speed_table.sh [out.jsonl]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-speed_table.jsonl}"
: > "$out"
backend=$(python -c "import jax; print(jax.default_backend())")
row() { python -m benchmarks.speed --json "$@" >> "$out" || echo "failed: $*" >&2; }
if [ "$backend" = "cpu" ]; then
  for size in 64 128; do
    row --img_size=$size --batch=1 --steps=5 --torch
    row --img_size=$size --batch=1 --steps=5 --dtype=bfloat16
    row --img_size=$size --batch=8 --steps=3 --torch --torch_steps=2
    row --img_size=$size --batch=1 --steps=5 --full
  done
else
  for dtype in float32 bfloat16; do
    row --img_size=256 --batch=1 --steps=50 --dtype=$dtype
    row --img_size=256 --batch=1 --steps=50 --dtype=$dtype --steps_per_dispatch=10
    row --img_size=256 --batch=8 --steps=20 --dtype=$dtype
    row --img_size=256 --batch=1 --steps=20 --dtype=$dtype --full
    row --img_size=256 --batch=8 --steps=20 --dtype=$dtype --remat
  done
fi
cat "$out"
