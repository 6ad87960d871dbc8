"""Long runs, threads and failures mid-request on the engine (CPU, embedded demo model)."""

import gc
import threading
import tracemalloc

import pytest
import torch

from persimmon_rt import ops
from persimmon_rt.demo import demo_model_path
from persimmon_rt.engine import Engine


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(demo_model_path(), device="cpu", max_batch_size=2, max_seq_len=128)


def test_thousand_generate_calls_neither_grow_memory_nor_drift(engine):
    prompt = engine.tokenizer.encode("BRUTUS:\n")
    first = engine.generate([prompt], max_new_tokens=3, temperature=0.8, seed=11).token_ids
    gc.collect()
    tracemalloc.start()
    for i in range(1000):
        out = engine.generate([prompt], max_new_tokens=3, temperature=0.8, seed=11).token_ids
        assert out == first, f"call {i} differs"
        if i == 99:
            gc.collect()
            warm, _ = tracemalloc.get_traced_memory()
    gc.collect()
    end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert end - warm < 256 * 1024, f"host memory grew by {(end - warm) / 1024:.0f} KiB over 900 calls"


def test_concurrent_calls_are_serialised_and_correct(engine):
    prompts = [engine.tokenizer.encode(p) for p in ("CASSIUS:\n", "PORTIA:\n", "ANTONY:\n", "CAESAR:\n")]
    expected = [engine.generate([p], max_new_tokens=6, stop_token_ids=[]).token_ids[0] for p in prompts]
    results, errors = {}, []

    def worker(i):
        try:
            for _ in range(5):
                results.setdefault(i, []).append(
                    engine.generate([prompts[i]], max_new_tokens=6, stop_token_ids=[]).token_ids[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        assert results[i] == [expected[i]] * 5


def test_a_failure_during_prefill_does_not_poison_the_engine(engine, monkeypatch):
    prompt = engine.tokenizer.encode("LUCIUS:\n")
    before = engine.generate([prompt], max_new_tokens=5, stop_token_ids=[]).token_ids
    calls = {"n": 0}
    real = ops.attention_prefill

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:                      # midway through the layers of the prefill
            raise torch.cuda.OutOfMemoryError("simulated out of memory during prefill")
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "attention_prefill", failing)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.generate([prompt], max_new_tokens=5, stop_token_ids=[])
    monkeypatch.setattr(ops, "attention_prefill", real)
    assert engine.generate([prompt], max_new_tokens=5, stop_token_ids=[]).token_ids == before


def test_abandoned_stream_releases_the_engine(engine):
    prompt = engine.tokenizer.encode("TITINIUS:\n")
    stream = engine.generate([prompt], max_new_tokens=50, stop_token_ids=[], stream=True)
    next(stream)
    stream.close()                               # the caller stops reading half-way
    done = []
    t = threading.Thread(target=lambda: done.append(engine.generate([prompt], max_new_tokens=2)))
    t.start()
    t.join(timeout=30)
    assert done, "the engine stayed locked after an abandoned stream"
