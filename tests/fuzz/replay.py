"""Replays inputs through a fuzz target, one JSON line per input (what the test suite runs in a child
process, so that a crash or a hang is reported against the input that caused it):

    python tests/fuzz/replay.py TARGET FILE...
"""

import json
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, ".."), os.path.join(_HERE, "..", "..")]  # tests/ and this checkout

from fuzz import targets  # noqa: E402


def main(target: str, paths: list[str]) -> None:
    check = targets.CHECKS[target]
    if target == "stream":
        targets.stream_tokenizer()
    with tempfile.TemporaryDirectory(prefix=f"replay-{target}-") as workdir:
        for path in paths:
            with open(path, "rb") as fh:
                data = fh.read()
            print(json.dumps({"start": os.path.basename(path)}), flush=True)
            t0 = time.perf_counter()
            try:
                result = {"outcome": check(data, workdir)}
            except targets.Finding as exc:
                result = {"finding": str(exc)[:2000]}
            result.update(name=os.path.basename(path), size=len(data), seconds=time.perf_counter() - t0)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
