#!/usr/bin/env bash
# GPU checks, one mode per call; logs go to $OUT (or ./gpu-logs). Usage: scripts/gpu_check.sh MODE...
#   build     build the extension in place (with the system g++, see below)
#   tests     the whole test suite
#   kernels   the decode GEMV, engine and GPU reliability tests, then the GEMV benchmark (1 / 16 / 32 rows)
#   generate  the end-to-end benchmark against transformers eager and sdpa, 16K decode, profile, cold start
#   compile   the end-to-end benchmark against transformers with a static cache + torch.compile (b=1, ctx 128)
#   sanitize  sanitize-generate, then sanitize-ops:
#   sanitize-generate  compute-sanitizer memcheck / racecheck / synccheck over an end-to-end generation (fp16,
#             bf16, int8 weights)
#   sanitize-ops  the same three tools over the small-shape op tests (every single-GPU op, both prefill
#             kernels); each tool's run is limited to SANITIZE_TIMEOUT seconds (default 400), and
#             SANITIZE_TOOLS picks the tools of both modes (default "memcheck racecheck synccheck")
#   prefill   the prefill attention kernels: a first small wgmma case (a hang shows here, under a timeout),
#             tests/test_attention_prefill.py on both kernels, memcheck over small wgmma cases, the engine
#             tests with the wgmma kernel, the variants harness and bench_attention.py --only prefill
#   int8      the int8 and fp16 GEMV tests
#   int8-bench     the int8 sweep (every configuration on every shape, 1 and 8 rows), then the end-to-end
#                  int8 decode with the compiled table and with the sweep's picks
#   int8-sanitize  compute-sanitizer racecheck / memcheck over every int8 configuration's test (fp16)
#   tune      tuning the wgmma prefill kernel (after build, within 10 minutes): its tests while the variants
#             harness compiles, the harness's whole prefill table, bench_attention.py --only prefill, then
#             memcheck over the harness's new softmax options at 1024 tokens
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
pytest=(python3 -m pytest -q -rs -p no:cacheprovider)
sanitize_limit=${SANITIZE_TIMEOUT:-400}
sanitize_tools=${SANITIZE_TOOLS:-memcheck racecheck synccheck}

# sanitize LOG TOOL COMMAND...: COMMAND under compute-sanitizer's TOOL, within sanitize_limit seconds, into
# $out/LOG_TOOL.log; prints its exit status, its last lines and what it reported outside cuBLAS. racecheck
# does not set the exit status: it reports hazards inside cuBLAS's own GEMMs (nvjet_*, which the tests call
# for their low-precision baselines), which are not ours.
sanitize() {
  local log="$out/$1_$2.log" tool=$2 flags=(--error-exitcode 1)
  shift 2
  [ "$tool" = racecheck ] && flags=()
  timeout "$sanitize_limit" compute-sanitizer --tool "$tool" "${flags[@]}" "$@" > "$log" 2>&1
  local rc=$?
  echo "$(basename "$log" .log): exit $rc"; tail -3 "$log"
  grep -E "Race reported|Error:" "$log" | grep -v nvjet_ | sort | uniq -c | head -20
}

for mode in "$@"; do
  start=$(date +%s)
  case "$mode" in
    build)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
      # A compiler that links libstdc++ statically into the extension turns every error an op raises into
      # a process abort (the exception cannot cross into torch's libstdc++): prefer the system g++.
      [ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
      MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 \
        || { tail -50 "$out/build.log"; exit 1; } ;;
    tests)
      "${pytest[@]}" tests > "$out/tests.log" 2>&1; tail -15 "$out/tests.log" ;;
    kernels)
      "${pytest[@]}" tests/test_decode_linear.py tests/test_folded_layernorm.py tests/test_engine.py \
        tests/test_reliability_gpu.py tests/test_demo_model.py > "$out/kernel_tests.log" 2>&1
      tail -8 "$out/kernel_tests.log"
      python3 benchmarks/bench_decode_linear.py --rows 1 16 32 > "$out/decode_linear.log" 2>&1
      tail -20 "$out/decode_linear.log" ;;
    generate)
      python3 benchmarks/bench_generate.py --batch 1,8,32 --context 128,2048 --prefill 2048,8192 \
        --transformers eager,sdpa --profile --cold-start --json "$out/generate.json" > "$out/generate.log" 2>&1
      python3 benchmarks/bench_generate.py --batch 1 --context 16128 --prefill "" --transformers "" \
        --json "$out/generate_16k.json" > "$out/generate_16k.log" 2>&1
      tail -60 "$out/generate.log"; tail -3 "$out/generate_16k.log" ;;
    compile)
      python3 benchmarks/bench_generate.py --batch 1 --context 128 --prefill "" --transformers compile,sdpa \
        --json "$out/generate_compile.json" > "$out/generate_compile.log" 2>&1
      tail -6 "$out/generate_compile.log" ;;
    sanitize)
      "$0" sanitize-generate sanitize-ops ;;
    sanitize-generate)
      for tool in $sanitize_tools; do sanitize sanitize_generate "$tool" python3 scripts/sanitize_generate.py; done ;;
    sanitize-ops)
      # The attention and GEMV kernels first, in case the time limit stops a slow tool.
      ops=(tests/test_attention_decode.py tests/test_qkv_attention_decode.py tests/test_attention_prefill.py
           tests/test_decode_linear.py tests/test_folded_layernorm.py tests/test_int8_cuda.py tests/test_layernorm.py
           tests/test_bias_relu2.py tests/test_qk_norm_rope_cache.py)
      small="awkward_shape_every_epilogue or packed_sequences or chunked_prefill or mixed_lengths or single_split
             or batch8_with_idle_rows or all_rows_idle or (dequantize_kernel and 83) or kernel_matches_reference"
      # racecheck runs the shared-memory kernels tens of times slower: fp16 and one epilogue of each GEMV.
      race="(awkward_shape_every_epilogue and bias1 and res1 and dtype0) or (packed_sequences and fp16)
            or (chunked_prefill and fp16) or mixed_lengths or single_split or batch8_with_idle_rows or all_rows_idle
            or (kernel_matches_reference and float16) or (folded_layernorm and awkward_shape_every_epilogue and dtype0
            and 83)"
      for tool in $sanitize_tools; do
        filter=$small; [ "$tool" = racecheck ] && filter=$race
        sanitize sanitize_ops "$tool" "${pytest[@]}" "${ops[@]}" -k "$(echo $filter)"
      done ;;
    prefill)
      export PERSIMMON_RT_PREFILL_ATTENTION=wgmma
      timeout 120 "${pytest[@]}" -x tests/test_attention_prefill.py -k "test_single_sequence and wgmma-83-hd64-fp16" \
        > "$out/prefill_smoke.log" 2>&1; echo "smoke: exit $?"; tail -3 "$out/prefill_smoke.log"
      timeout 900 "${pytest[@]}" tests/test_attention_prefill.py tests/test_ops_limits.py \
        > "$out/prefill_tests.log" 2>&1; echo "tests: exit $?"; tail -8 "$out/prefill_tests.log"
      timeout 400 compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest[@]}" tests/test_attention_prefill.py \
        -k "wgmma and (packed_sequences or chunked_prefill or without_padding or 83-hd64)" \
        > "$out/prefill_memcheck.log" 2>&1; echo "memcheck: exit $?"; tail -3 "$out/prefill_memcheck.log"
      timeout 600 "${pytest[@]}" tests/test_engine.py tests/test_demo_model.py > "$out/prefill_engine.log" 2>&1
      echo "engine tests (wgmma): exit $?"; tail -3 "$out/prefill_engine.log"
      unset PERSIMMON_RT_PREFILL_ATTENTION
      nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a -Icsrc \
        benchmarks/attention_variants.cu -o /tmp/attention_variants \
        && timeout 300 /tmp/attention_variants prefill > "$out/prefill_variants.log" 2>&1
      cat "$out/prefill_variants.log"
      timeout 300 python3 benchmarks/bench_attention.py --only prefill > "$out/prefill_bench.log" 2>&1
      cat "$out/prefill_bench.log" ;;
    int8)
      "${pytest[@]}" tests/test_int8_cuda.py tests/test_int8.py tests/test_decode_linear.py \
        > "$out/int8_tests.log" 2>&1; tail -8 "$out/int8_tests.log" ;;
    int8-bench)
      python3 benchmarks/bench_int8.py --rows 1 8 --sweep --end-to-end > "$out/bench_int8.log" 2>&1
      tail -60 "$out/bench_int8.log" ;;
    int8-sanitize)
      for tool in racecheck memcheck; do
        timeout 500 compute-sanitizer --tool "$tool" --error-exitcode 1 "${pytest[@]}" tests/test_int8_cuda.py \
          -k "test_every_config and fp16 and not graph" > "$out/sanitize_int8_$tool.log" 2>&1
        echo "sanitize int8 $tool: exit $?"; tail -3 "$out/sanitize_int8_$tool.log"
      done ;;
    tune)
      nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a -Icsrc \
        benchmarks/attention_variants.cu -o /tmp/attention_variants > "$out/tune_variants.log" 2>&1 &
      nvcc_pid=$!
      timeout 300 "${pytest[@]}" tests/test_attention_prefill.py tests/test_ops_limits.py \
        > "$out/tune_tests.log" 2>&1; echo "tests: exit $?"; tail -8 "$out/tune_tests.log"
      wait "$nvcc_pid" && timeout 240 /tmp/attention_variants prefill >> "$out/tune_variants.log" 2>&1
      echo "variants: exit $?"; cat "$out/tune_variants.log"
      timeout 200 python3 benchmarks/bench_attention.py --only prefill > "$out/tune_bench.log" 2>&1
      cat "$out/tune_bench.log"
      timeout 150 compute-sanitizer --tool memcheck --error-exitcode 1 /tmp/attention_variants prefill 1024 \
        rowsum > "$out/tune_memcheck.log" 2>&1; echo "memcheck: exit $?"; tail -25 "$out/tune_memcheck.log" ;;
    *) echo "unknown mode $mode"; exit 2 ;;
  esac
  echo "$mode: $(( $(date +%s) - start )) s"
done
