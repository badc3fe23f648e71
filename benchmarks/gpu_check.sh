#!/usr/bin/env bash
# Every GPU test and GPU benchmark of the project, in one run on a CUDA machine.
#
#   bash benchmarks/gpu_check.sh            # all steps
#   bash benchmarks/gpu_check.sh bench_contrast_softmax   # only the named steps
#
# Each step's output goes to the console and to $OUT/<step>.log (OUT defaults to
# benchmarks/out); benchmarks also leave $OUT/*.json and a few-line $OUT/*.summary. A failing
# step does not stop the others. At the end the summaries are printed, then a table of the
# steps: the last lines of the run. Exit status 1 if any step failed.
#
# Adding a GPU test or benchmark: append one "name|command" line to STEPS below. Commands run
# from the repository root with bash; $OUT is exported. Kernel tests run compiled, not
# through the interpreter: TRITON_INTERPRET=0 overrides the default that tests/conftest.py sets.
# What a first run on a card checks (benchmarks/RESULTS.md, "GPU readiness"): the kernel against
# float64 and its speed against eager and torch.compile; generate eager vs compiled decode step
# (expected ≈ 4x at batch 1 on a 7B model, as gpt-fast reports) and against transformers.
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-benchmarks/out}"
STEP_TIMEOUT="${STEP_TIMEOUT:-1800}"  # seconds per step

STEPS=(
  "environment|nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'"
  "test_contrast_softmax|TRITON_INTERPRET=0 python -m pytest -q -rs tests/test_contrast_softmax.py tests/test_kernel_compile.py"
  "test_generate|python -m pytest -q -rs tests/test_generate.py"
  "bench_contrast_softmax|python benchmarks/bench_contrast_softmax.py --out \"\$OUT\""
  "bench_generate|set -o pipefail; python benchmarks/bench_generate.py --device cuda --batch 1 8 --compile | tee \"\$OUT/bench_generate.summary\""
  "bench_hscr|python benchmarks/bench_hscr.py --device cuda --entries 8 --batch-size 8 --max-new-tokens 32 --out \"\$OUT\""
  "bench_train|python benchmarks/bench_train.py --size 7b --device cuda --gradient-checkpointing --out \"\$OUT\""
)

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: torch sees no CUDA device; this script is for a GPU machine" >&2
  exit 2
fi
mkdir -p "$OUT"

# Summaries older than this marker come from earlier runs and are not printed.
marker="$OUT/.gpu_check_start"
touch "$marker"
sleep 1  # file times have 1 s resolution on some file systems

names=() status=() seconds=() results=()
for step in "${STEPS[@]}"; do
  name="${step%%|*}"
  cmd="${step#*|}"
  # Only the steps named on the command line, when some are.
  if [ "$#" -gt 0 ] && [[ " $* " != *" $name "* ]]; then
    continue
  fi
  echo "=== $name: $cmd"
  start=$(date +%s)
  timeout "$STEP_TIMEOUT" bash -c "$cmd" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  names+=("$name")
  seconds+=("$(( $(date +%s) - start ))")
  # The step's last non-empty output line (pytest's counts, a benchmark's last figure).
  results+=("$(grep -v '^[[:space:]]*$' "$OUT/$name.log" | tail -n 1 | cut -c 1-70)")
  if [ "$rc" -eq 0 ]; then status+=("ok"); elif [ "$rc" -eq 124 ]; then status+=("TIMEOUT"); else status+=("FAIL($rc)"); fi
done

echo
for summary in "$OUT"/*.summary; do
  if [ -e "$summary" ] && [ "$summary" -nt "$marker" ]; then cat "$summary"; fi
done
echo
printf '%-24s %-9s %7s  %s\n' step status seconds "last line of $OUT/<step>.log"
failed=0
for i in "${!names[@]}"; do
  printf '%-24s %-9s %7s  %s\n' "${names[$i]}" "${status[$i]}" "${seconds[$i]}" "${results[$i]}"
  [ "${status[$i]}" = ok ] || failed=1
done
exit "$failed"
