#!/usr/bin/env bash
# Coverage-guided fuzzing of one parser for a while:  scripts/fuzz.sh TARGET SECONDS [libFuzzer options]
#   TARGET: unpickle (safe_unpickle.load/loads), safetensors (device_loader header and CPU load),
#           stream (tokenizer.StreamDecoder). Needs the `fuzz` extra (atheris): pip install -e '.[fuzz]'.
# The working corpus grows in $FUZZ_WORK/TARGET (default .fuzz/); each finding is written to its
# artifacts/ folder and fuzzing resumes until SECONDS have passed. A finding, once fixed, goes into
# tests/fuzz/corpus/TARGET/ so that the test suite replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,7p "$0"; exit 2; }
target=$1 seconds=$2
shift 2
work=${FUZZ_WORK:-.fuzz}
mkdir -p "$work/$target/corpus" "$work/$target/artifacts"
[ -d "$work/seeds/$target" ] || python tests/fuzz/seeds.py "$work/seeds"
end=$((SECONDS + seconds))
TIMEFORMAT="fuzz.sh $target: cpu %U user + %S sys seconds, %R wall"
time while [ $SECONDS -lt $end ]; do
    # libFuzzer stops at a finding; start again (the corpus so far is kept) until the time is up.
    FUZZ_TMP="$work/$target/tmp" python tests/fuzz/run_atheris.py "$target" -max_total_time=$((end - SECONDS)) \
        -timeout=10 -rss_limit_mb=4096 -max_len=20000 -print_final_stats=1 \
        -artifact_prefix="$work/$target/artifacts/" "$@" \
        "$work/$target/corpus" "tests/fuzz/corpus/$target" "$work/seeds/$target" || true
done
