#!/usr/bin/env bash
# Every row of docs/speed.md's speed table for this machine, one process per row (peak memory is per
# process), as JSON lines in $1 (default speed_table.jsonl). On CPU: 64x64 and 128x128, light batch 1
# and 8 and full batch 1, float32 and bfloat16, the PyTorch reference beside each float32 row;
# on a GPU/TPU: 256x256, the rows behind the targets first.
#   bash benchmarks/speed_table.sh [out.jsonl]
# Environment: SPEED_TABLE_BUDGET_S=N starts no row with less than SPEED_TABLE_MIN_ROW_S (default 60)
# seconds of the N left and stops a row that runs past them (for a leased accelerator's time limit);
# SPEED_TABLE_ROWS picks the rows on any backend (cpu, accelerator, options: remat, steps per
# dispatch and prefetch, each against the same row without it, or cpu_paths: each CPU convolution path
# switched off against all of them on), SPEED_TABLE_ARGS is appended to
# every row and SPEED_TABLE_PROFILE_DIR=D also writes a jax.profiler trace of the two target rows
# under D/<row>, e.g. to try the accelerator rows on a CPU:
#   SPEED_TABLE_ROWS=accelerator SPEED_TABLE_ARGS="--img_size=64 --ch=8 --n_res=1 --steps=2" \
#     bash benchmarks/speed_table.sh /tmp/rows.jsonl
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-speed_table.jsonl}"
: > "$out"
deadline=$(( $(date +%s) + ${SPEED_TABLE_BUDGET_S:-1000000} ))
extra=(${SPEED_TABLE_ARGS:-})
profile() {  # profile NAME: the --profile flag of a row, when SPEED_TABLE_PROFILE_DIR is set
  [ -z "${SPEED_TABLE_PROFILE_DIR:-}" ] || echo "--profile=$SPEED_TABLE_PROFILE_DIR/$1"
}
row() {
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt "${SPEED_TABLE_MIN_ROW_S:-60}" ]; then echo "skipped, ${left}s left: $*" >&2; return 0; fi
  echo "row ($(date +%T), ${left}s left): $*" >&2
  timeout "$left" python -m benchmarks.speed --json "$@" "${extra[@]}" >> "$out" || echo "failed: $*" >&2
}
alternately() {  # alternately BASE WITHOUT WITH: the rows BASE WITHOUT and BASE WITH, in turn, twice
  local base=($1) without=($2) with=($3)
  for _ in 1 2; do
    row "${base[@]}" "${without[@]}"
    row "${base[@]}" "${with[@]}"
  done
}
backend=$(python -c "import jax; print(jax.default_backend())")
rows="${SPEED_TABLE_ROWS:-}"
[ -n "$rows" ] || rows=$([ "$backend" = "cpu" ] && echo cpu || echo accelerator)
case "$rows" in
cpu)
  for size in 64 128; do
    row --img_size=$size --batch=1 --steps=5 --torch
    row --img_size=$size --batch=1 --steps=5 --dtype=bfloat16
    row --img_size=$size --batch=8 --steps=3 --torch --torch_steps=2
    row --img_size=$size --batch=8 --steps=3 --dtype=bfloat16 --no_translate
    row --img_size=$size --batch=1 --steps=5 --full --torch
    row --img_size=$size --batch=1 --steps=5 --full --dtype=bfloat16 --no_translate
  done
  ;;
accelerator)
  # The two targets (bfloat16 at batch 1: iterations/s; at batch 8: fraction of peak), then float32,
  # then the options, then float16. Translation speed on the first two batch-1 rows only (it compiles
  # two programs).
  row --img_size=256 --batch=1 --steps=50 --dtype=bfloat16 $(profile light256_b1_bf16)
  row --img_size=256 --batch=8 --steps=20 --dtype=bfloat16 --no_translate $(profile light256_b8_bf16)
  row --img_size=256 --batch=1 --steps=50 --dtype=float32
  row --img_size=256 --batch=8 --steps=20 --dtype=float32 --no_translate
  row --img_size=256 --batch=1 --steps=50 --dtype=bfloat16 --steps_per_dispatch=10 --no_translate
  row --img_size=256 --batch=1 --steps=20 --dtype=bfloat16 --full --no_translate
  row --img_size=256 --batch=1 --steps=20 --dtype=float32 --full --no_translate
  row --img_size=256 --batch=8 --steps=20 --dtype=bfloat16 --remat --no_translate
  row --img_size=256 --batch=1 --steps=50 --dtype=bfloat16 --steps_per_dispatch=10 --remat --no_translate
  row --img_size=256 --batch=8 --steps=20 --dtype=float16 --no_translate
  ;;
options)
  # Each option against the same row without it, alternately, twice: remat (memory at batch 8), ten
  # steps per dispatch (host overhead at batch 1, on the benchmark's ch 32 model), and prefetch (main.py's
  # training loop with its input pipeline, against the same step fed one fixed batch).
  alternately "--img_size=64 --batch=8 --steps=3 --no_translate" "" "--remat"
  alternately "--img_size=64 --ch=32 --n_res=4 --batch=1 --no_translate" \
    "--steps=30" "--steps=3 --steps_per_dispatch=10"
  alternately "--img_size=64 --ch=32 --n_res=4 --batch=1 --steps=10 --no_translate --loop=250" \
    "--prefetch=0" "--prefetch=2"
  ;;
cpu_paths)
  # What each CPU convolution path gains today: the CPU convolutions with every path on (first and last,
  # for the noise between them), XLA's own convolutions, and each path switched off alone, at 64x64
  # (ch 64, n_res 6), batch 1 and 8.
  for batch in 1 8; do
    base=(--img_size=64 --batch=$batch --steps=$([ "$batch" = 1 ] && echo 5 || echo 3) --no_translate)
    row "${base[@]}"
    row "${base[@]}" --conv_impl=xla
    for path in weight_grad_taps input_grad_taps forward_taps padded output_taps winograd; do
      row "${base[@]}" --without=$path
    done
    row "${base[@]}"
  done
  ;;
*)
  echo "SPEED_TABLE_ROWS=$rows: use cpu, accelerator, options or cpu_paths" >&2
  exit 2
  ;;
esac
cat "$out"
