#!/usr/bin/env bash
# One GPU session, run by the lead through the device tool (a lent H100/H200, ~15 minutes
# of device time in all). Each step has its own time limit and log; a failing step does
# not stop the next; the exit status is non-zero if any step failed.
#
#   OUT=DIR bash benchmarks/gpu_session.sh            # on the GPU machine
#   OUT=DIR SMOKE=1 bash benchmarks/gpu_session.sh    # CPU smoke run of the script itself
#
# Writes at most 8 files (the device tool's limit): session.json (each step's rc and
# seconds), env.txt, logs.txt, junit.xml, runner/gpu-results.json, memory-gpu.json,
# dist/gpu-dist.json, dist/gpu-dist-pytest.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT/runner"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# rouge-score (an sdist on PyPI) and nltk travel as wheels in .whl (carried).
if [ "$SMOKE" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

{ nvidia-smi 2>&1; $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" 2>&1; git log -1 --format='commit %H' 2>&1; } >"$OUT/env.txt"

status=0
steps=()
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name ($(date +%T))" >>"$OUT/logs.txt"
  timeout "$limit" "$@" >>"$OUT/logs.txt" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && status=1
  steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
  echo "=== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/logs.txt"
}

if [ "$SMOKE" = 1 ]; then
  KTESTS="tests/kernels/test_entry_scale.py"; STESTS="tests/sau/test_optim_checks.py"; TINY=--tiny
  export TRITON_INTERPRET=1
else
  KTESTS="tests/kernels"
  STESTS="tests/sau/test_optim.py tests/sau/test_optim_in_backward.py tests/sau/test_optim_checks.py tests/sau/test_plan.py"
  TINY=
fi
PYTEST="$PY -m pytest -q -p no:cacheprovider --tb=short -o addopts="

# 1. Every kernel test compiled (CUDA tensors: the backend fixture runs Triton vs torch),
#    and the optimizer and plan tests on CUDA tensors, in one pytest (one junit file).
step pytest-gpu 240 $PYTEST $KTESTS $STESTS --junitxml="$OUT/junit.xml"
# 2. Distributed selection with a 1-rank NCCL group and the compiled kernels.
[ "$SMOKE" = 0 ] && step nccl-dist 60 $PY benchmarks/gpu_dist_check.py --out "$OUT/dist"
# 3. Full-size correctness and timings against torch.
step gpu-runner 120 $PY benchmarks/gpu_runner.py --skip-pytest $TINY --out "$OUT/runner"
# 4. Peak memory of one unlearning step, Llama-3.1-8B dims in bf16.
step memory-gpu 170 $PY benchmarks/memory.py --gpu $TINY --out "$OUT/memory-gpu.json"

printf '{"steps": [%s]}\n' "$(IFS=,; echo "${steps[*]}")" >"$OUT/session.json"
cat "$OUT/session.json"
exit $status
