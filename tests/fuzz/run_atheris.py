"""Coverage-guided fuzzing of one target with atheris (libFuzzer):

    python tests/fuzz/run_atheris.py TARGET [libFuzzer options] CORPUS_DIR [SEED_DIR ...]

TARGET is unpickle, safetensors or stream. Only the parser's own Python (and the pure-Python pickle and
zipfile modules it drives) is instrumented, so coverage counts edges of the code under test.
scripts/fuzz.sh wraps this with the usual options.
"""

import gc
import os
import sys
import tempfile
import types

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fuzz import targets  # noqa: E402  (after the path set-up)

INSTRUMENT = {
    "unpickle": ("persimmon_rt.safe_unpickle", "pickle", "zipfile", "_compat_pickle"),
    "safetensors": ("persimmon_rt.device_loader", "json", "json.decoder"),
    "stream": ("persimmon_rt.tokenizer",),
}


def instrument(modules) -> int:
    funcs = [f for f in gc.get_objects() if isinstance(f, types.FunctionType) and f.__module__ in modules]
    for f in funcs:
        atheris.instrument_func(f)
    return len(funcs)


def main():
    if len(sys.argv) > 1 and sys.argv[1] in targets.CHECKS:  # fork-mode workers re-run argv: keep it in the env
        os.environ["FUZZ_TARGET"] = sys.argv.pop(1)
    target = os.environ["FUZZ_TARGET"]
    check = targets.CHECKS[target]
    if target == "stream":
        targets.stream_tokenizer()
    workdir = os.environ.get("FUZZ_TMP") or tempfile.mkdtemp(prefix=f"fuzz-{target}-")
    os.makedirs(workdir, exist_ok=True)
    print(f"INFO: instrumented {instrument(INSTRUMENT[target])} functions", file=sys.stderr)

    def one_input(data: bytes):
        check(data, workdir)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
