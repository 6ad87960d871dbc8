#!/usr/bin/env bash
# One GPU session's worth of checks: build the extension, run the engine's CUDA tests, the generation
# benchmark, then every test. Logs go to $OUT (or ./gpu-logs). Usage: scripts/gpu_check.sh [tests|full]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# A compiler that links libstdc++ statically into the extension turns every error an op raises into a
# process abort (the exception cannot cross into torch's libstdc++): prefer the system g++.
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"

python3 -m pytest -q -rs -p no:cacheprovider tests/test_engine.py tests/test_demo_model.py \
  -k "cuda or rejects" > "$out/engine_tests.log" 2>&1
tail -5 "$out/engine_tests.log"
if [ "${1:-tests}" = "full" ]; then
  python3 benchmarks/bench_generate.py --hf "${HF_BACKENDS:-eager,sdpa}" --new-tokens "${NEW_TOKENS:-128}" \
    --json "$out/generate.json" > "$out/generate.log" 2>&1
  tail -20 "$out/generate.log"
fi
python3 -m pytest -q -rs -p no:cacheprovider tests > "$out/tests.log" 2>&1
tail -15 "$out/tests.log"
