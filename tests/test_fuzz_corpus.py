"""Replays the fuzzing regression corpus (tests/fuzz/corpus/TARGET/): every input must load cleanly or be
refused with a documented exception, within a time bound and a memory bound set from its size, without
running anything it names (see tests/fuzz/targets.py for the properties, docs/RELIABILITY.md for the
findings). Each target replays in a child process, so a crash or a hang fails the input that caused it
instead of the test run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
TARGETS = ("unpickle", "safetensors", "stream")
WALL_LIMIT_S = 300  # for a whole target's replay: only a hang comes near it


def time_bound(size: int) -> float:
    """Seconds one input may take (under tracemalloc, on a slow CI machine)."""
    return 3.0 + size / 20_000


def _inputs(target):
    return sorted(p for p in (CORPUS / target).iterdir() if p.is_file() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def replayed():
    """{target: (results by input name, the input running when the child stopped, exit status, stderr)};
    the three targets replay in parallel child processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = {t: subprocess.Popen([sys.executable, str(ROOT / "tests" / "fuzz" / "replay.py"), t, *map(str, _inputs(t))],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for t in TARGETS}
    results = {}
    for target, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=WALL_LIMIT_S)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            rc = "timeout"
        done, running = {}, None
        for line in out.splitlines():
            record = json.loads(line)
            if "start" in record:
                running = record["start"]
            else:
                done[record["name"]] = record
                running = None
        results[target] = (done, running, rc, err[-3000:])
    return results


CASES = [(t, p.name) for t in TARGETS for p in _inputs(t)]


@pytest.mark.parametrize("target,name", CASES, ids=[f"{t}/{n}" for t, n in CASES])
def test_corpus_input(replayed, target, name):
    done, running, rc, err = replayed[target]
    assert running != name, f"{target}/{name}: the replay died on this input (exit {rc}): {err}"
    assert name in done, f"{target}/{name} was not replayed (exit {rc}): {err}"
    record = done[name]
    assert "finding" not in record, f"{target}/{name}: {record['finding']}"
    assert record["seconds"] <= time_bound(record["size"]), \
        f"{target}/{name}: {record['seconds']:.2f} s for {record['size']} bytes"


def test_every_target_has_a_corpus():
    for target in TARGETS:
        assert len(_inputs(target)) >= 3, target
