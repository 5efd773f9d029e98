#!/usr/bin/env bash
# Issue 16's GPU check: at most 8 minutes on one GPU. From the repository root (or anywhere):
#   benchmarks/gpu_check.sh                       # on the GPU: CUDA tests, step cost, a 2-peer swarm, the planner
#   MURMUR_GPU_CHECK_DEVICE=cpu benchmarks/gpu_check.sh    # the CPU dry run: the same code paths, tiny presets
# Results: benchmarks/results/gpu_check.json (the dry run: gpu_check_dryrun.json, or $MURMUR_GPU_CHECK_OUT), and
# Markdown tables on stdout. Exit status: 0 when everything passed, 1 when a check failed, 2 without a GPU when one
# was asked for. Budgets: tests 60 s; step cost 240 s and swarm 150 s inside benchmarks/gpu_check.py (410 s): 470 s in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${MURMUR_GPU_CHECK_DEVICE:-cuda}
OUT=${MURMUR_GPU_CHECK_OUT:-}
DRY=()
if [ "$DEVICE" = "cpu" ]; then
  DRY=(--dry-run)
elif ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device; for the CPU dry run: MURMUR_GPU_CHECK_DEVICE=cpu $0" >&2
  exit 2
fi
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
  "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' >&2

# 1. The CUDA tests: every test file with a CUDA-only test, its CUDA tests (they skip on a CPU; the dry run
#    collects them all the same, which proves they skip cleanly).
mapfile -t CUDA_FILES < <(grep -l "torch.cuda.is_available()" tests/test_*.py)
# A failure here does not stop the rest: a GPU is lent for minutes, so one run should bring back everything it can.
tests=0
timeout 60 "$PYTHON" -m pytest -q -rs -p no:cacheprovider -k cuda "${CUDA_FILES[@]}" || tests=$?

# 2-4. Step cost, the swarm, the planner against the measured peaks.
check=0
timeout 410 "$PYTHON" -m benchmarks.gpu_check --device "$DEVICE" "${DRY[@]}" ${OUT:+--out "$OUT"} || check=$?
if [ "$tests" -ne 0 ] || [ "$check" -ne 0 ]; then
  echo "gpu_check: FAILED (CUDA tests exit $tests, checks exit $check)" >&2
  exit 1
fi
echo "gpu_check: all passed" >&2
