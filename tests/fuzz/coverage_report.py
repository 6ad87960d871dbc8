"""Line coverage of the code under test by a set of inputs (the fuzzer's working corpus, say):

    python tests/fuzz/coverage_report.py TARGET FILE...

Prints covered/total statements of each function the target exercises (needs `coverage`, in the fuzz extra).
"""

import inspect
import os
import sys
import tempfile

import coverage

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, ".."), os.path.join(_HERE, "..", "..")]


def functions(target):
    from persimmon_rt import device_loader, safe_unpickle, tokenizer

    if target == "unpickle":
        return safe_unpickle, None  # the whole module
    if target == "safetensors":
        return device_loader, [device_loader.read_header, device_loader.load_file, device_loader._read_exactly]
    t = tokenizer.PersimmonTokenizer
    return tokenizer, [*(f for f in vars(tokenizer.StreamDecoder).values() if inspect.isfunction(f)),
                       t._incomplete_utf8, t._byte, t._decode_continuation, t._is_anchor, t._check_ids]


def main(target, paths):
    cov = coverage.Coverage(branch=False, data_file=None)
    cov.start()
    from fuzz import targets

    module, funcs = functions(target)
    with tempfile.TemporaryDirectory() as workdir:
        for path in paths:
            with open(path, "rb") as fh:
                try:
                    targets.CHECKS[target](fh.read(), workdir)
                except targets.Finding as exc:
                    print("FINDING", os.path.basename(path), exc)
    cov.stop()
    _, statements, _, missing, _ = cov.analysis2(module.__file__)
    spans = [(1, 10**9)] if funcs is None else \
        [(f.__code__.co_firstlineno, f.__code__.co_firstlineno + len(inspect.getsourcelines(f)[0])) for f in funcs]
    inside = [line for line in statements if any(a <= line < b for a, b in spans)]
    hit = [line for line in inside if line not in set(missing)]
    print(f"{target}: {len(paths)} inputs, {len(hit)}/{len(inside)} statements ({100 * len(hit) / len(inside):.0f}%) "
          f"of {os.path.basename(module.__file__)}{'' if funcs is None else ' (' + ', '.join(f.__name__ for f in funcs) + ')'}")
    print("missed lines:", sorted(set(inside) - set(hit)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
