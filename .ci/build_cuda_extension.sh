#!/usr/bin/env bash
# Build the CUDA extension against the CUDA torch (2.14.1+cu130, on this machine's disk) without a GPU, and
# check that every op registers: catches build breaks before they reach a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "CUDA extension build: skipped (no /usr/local/cuda/bin/nvcc)"
  exit 0
fi
python3 -m venv .venv-cuda
. .venv-cuda/bin/activate
python -m pip install -q torch==2.14.1 numpy setuptools wheel ninja
site=$(python -c "import site; print(site.getsitepackages()[0])")
# CUDA_HOME must be given: autodetection picks /usr/local and the link fails (cannot find -lcudart);
# ATen's CUDA headers need the CUDA runtime headers that ship inside the nvidia wheels.
export CUDA_HOME=/usr/local/cuda CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}" MAX_JOBS=2
build_dir=$(mktemp -d)
# Built in place for the import check, then removed so the CPU test run never sees this binary.
trap 'rm -f persimmon_rt/_C*.so' EXIT
python setup.py build_ext --inplace --build-temp "$build_dir" > "$build_dir/build.log" 2>&1 \
  || { tail -40 "$build_dir/build.log"; exit 1; }
python - <<'PY'
import torch
import persimmon_rt.ops as ops
assert ops.HAVE_CUDA_EXT, "persimmon_rt._C did not import"
ops_expected = ["qk_norm_rope_cache", "layernorm", "bias_relu2", "all_reduce_layernorm", "attention_prefill",
                "attention_decode", "qkv_attention_decode", "decode_linear", "decode_linear_folded_ln",
                "decode_linear_int8", "decode_linear_int8_folded_ln", "dequantize_int8",
                "greedy_advance", "sample_sorted"]
missing = [n for n in ops_expected if not ops.has_op(n)]
assert not missing, f"ops not registered: {missing}"
assert ops.CUDA_ARCHS == ("90a",), f"built for {ops.CUDA_ARCHS!r}, expected the default 90a"
# The limits ops.py reads from the extension (csrc/ states them once).
assert ops.DECODE_LINEAR_MAX_ROWS >= 1 and ops.LAYERNORM_MAX_HIDDEN >= 4096, (ops.DECODE_LINEAR_MAX_ROWS,
                                                                              ops.LAYERNORM_MAX_HIDDEN)
assert ops.kernels_support(64) and not ops.kernels_support(96), ops.ATTENTION_HEAD_DIMS
# The folded LayerNorm takes as many rows of Persimmon-8B's hidden size as the engine folds.
from persimmon_rt.forward import FOLDED_LN_INT8_MAX_ROWS, FOLDED_LN_MAX_ROWS
fold_rows = max(FOLDED_LN_MAX_ROWS, FOLDED_LN_INT8_MAX_ROWS)
assert 4096 % ops.FOLDED_LN_K_MULTIPLE == 0 and fold_rows * (4096 + 8) * 2 <= ops.FOLDED_LN_MAX_STAGE_BYTES, (
    fold_rows, ops.FOLDED_LN_K_MULTIPLE, ops.FOLDED_LN_MAX_STAGE_BYTES)
# The int8 GEMV's per-shape choice (plain and folded) is host code: it answers without a GPU.
assert all(0 <= ops.decode_linear_int8_config(m, 4096, 4096, folded) < len(ops.DECODE_LINEAR_INT8_CONFIGS)
           for m in (1, 8, 16) for folded in (False, True)), ops.DECODE_LINEAR_INT8_CONFIGS
print(f"CUDA extension build: ok against torch {torch.__version__} ({len(ops_expected)} ops registered, "
      f"sm_{','.join(ops.CUDA_ARCHS)}; GEMV rows <= {ops.DECODE_LINEAR_MAX_ROWS}, "
      f"head dims {ops.ATTENTION_HEAD_DIMS})")
PY
deactivate
