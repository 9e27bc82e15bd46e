#!/usr/bin/env bash
# One GPU session, run by the lead through the device tool (a lent H100/H200, ~15 minutes
# of device time in all). Each step has its own time limit (520 s in all, under 9 minutes
# with the start) and log; a failing step does not stop the next; the exit status is
# non-zero if any step failed. The README's GPU table is printed at the end (logs.txt):
# `python benchmarks/gpu_table.py DIR/runner/gpu-results.json --readme README.md`.
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
  # Two configurations prove the memory step's GPU path (tests/benchmarks/test_memory.py
  # runs every configuration in GPU mode at the tiny size).
  MEMCONFIGS="--configs sau-in-backward-ckpt e2e-bf16"
  export TRITON_INTERPRET=1
else
  KTESTS="tests/kernels"
  STESTS="tests/sau/test_optim.py tests/sau/test_optim_in_backward.py tests/sau/test_optim_checks.py tests/sau/test_optim_launches.py tests/sau/test_plan.py"
  TINY=; MEMCONFIGS=
fi
PYTEST="$PY -m pytest -q -p no:cacheprovider --tb=short -o addopts="

# 1. Every kernel test compiled (CUDA tensors: the backend fixture runs Triton vs torch),
#    and the optimizer and plan tests on CUDA tensors, in one pytest (one junit file).
step pytest-gpu 170 $PYTEST $KTESTS $STESTS --junitxml="$OUT/junit.xml"
# 2. Distributed selection with a 1-rank NCCL group and the compiled kernels.
[ "$SMOKE" = 0 ] && step nccl-dist 40 $PY benchmarks/gpu_dist_check.py --out "$OUT/dist"
# 3. Full-size correctness and timings against torch: select at 4.2M, 16.8M and 58.7M
#    entries; the step (multi-tensor vs one launch per layer and expert vs torch's fused
#    AdamW vs its own bytes floor) on 2 Llama-3.1-8B layers and a 60-expert MoE layer,
#    fp32 and bf16. The JSON is rewritten after every section, so a timeout keeps the rest.
step gpu-runner 170 $PY benchmarks/gpu_runner.py --skip-pytest $TINY --out "$OUT/runner"
# 4. Peak memory of one unlearning step, Llama-3.1-8B dims in bf16.
step memory-gpu 140 $PY benchmarks/memory.py --gpu $TINY $MEMCONFIGS --out "$OUT/memory-gpu.json"
# 5. The README's table from this run's JSON (printed; the lead commits it).
RUNNER_JSON=$(ls "$OUT"/runner/gpu-results.json "$OUT"/runner/runner-smoke.json 2>/dev/null | head -1)
step gpu-table 20 $PY benchmarks/gpu_table.py "${RUNNER_JSON:-$OUT/runner/gpu-results.json}"

printf '{"steps": [%s]}\n' "$(IFS=,; echo "${steps[*]}")" >"$OUT/session.json"
cat "$OUT/session.json"
exit $status
