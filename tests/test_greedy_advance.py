"""The greedy decode step's tail (greedy_advance): argmax of each row's fp32 logits and the row's move to the
next position, against torch.argmax + DecodeState.advance. On the CPU: DecodeState.advance_greedy on the
reference path. On the GPU: bit-equal tokens and counters over vocabularies from 1 to 262144 (every chunking,
the 16-byte and the scalar load path), ties across chunks, NaN and infinities, idle rows, argument errors,
opcheck and graph replay.
"""

from __future__ import annotations

import pytest
import torch
from op_utils import capture_graph, requires_cuda

from persimmon_rt import reference
from persimmon_rt.decode_state import DecodeState


def make_state(rows, device, active=None):
    state = DecodeState(rows, 64, device)
    state.join(range(rows), torch.arange(rows), [3 + r for r in range(rows)], [0.0] * rows, [0] * rows, [1.0] * rows)
    if active is not None:
        state.active.copy_(torch.tensor(active, dtype=torch.int32))
    return state


def expected(state, logits):
    want = make_state(state.rows, "cpu")
    for name in ("tokens", "positions", "slots", "seq_lens", "active"):
        getattr(want, name).copy_(getattr(state, name).cpu())
    want.advance(logits.cpu().argmax(dim=-1))
    return want


def assert_same(state, want):
    for name in ("tokens", "positions", "slots", "seq_lens"):
        assert torch.equal(getattr(state, name).cpu(), getattr(want, name)), name


def test_advance_greedy_on_the_reference_path():
    state = make_state(3, "cpu", active=[1, 0, 1])
    logits = torch.randn(3, 50)
    want = expected(state, logits)
    state.advance_greedy(logits)
    assert_same(state, want)


def cases():
    yield "one", torch.randn(1, 1)
    yield "odd", torch.randn(3, 5)
    for V in (4096, 4097, 4100, 65536, 262144):
        yield f"random {V}", torch.randn(4, V)
    ties = torch.randn(3, 262144)
    ties[:, [9000, 100, 200000]] = 50.0                   # equal maxima in different chunks: the first wins
    yield "ties", ties
    nan = torch.randn(2, 40000)
    nan[0, 30000] = float("nan")
    nan[1, [7, 39000]] = float("nan")                     # NaN beats numbers; the first NaN wins
    nan[1, 5] = float("inf")
    yield "nan", nan
    yield "all -inf", torch.full((2, 9000), float("-inf"))
    inf = torch.randn(2, 9000)
    inf[:, 8999] = float("inf")
    yield "inf", inf
    yield "rows", torch.randn(33, 1000)


@requires_cuda
@pytest.mark.parametrize("name,logits", list(cases()), ids=[n for n, _ in cases()])
def test_equals_argmax_and_advance(name, logits):
    rows = logits.shape[0]
    state = make_state(rows, "cuda", active=[r % 3 != 1 for r in range(rows)])
    want = expected(state, logits)
    state.advance_greedy(logits.cuda())
    assert_same(state, want)


@requires_cuda
def test_unaligned_logits_take_the_scalar_path():
    buffer = torch.randn(3 * 4096 + 1, device="cuda")
    logits = buffer[1:].view(3, 4096)                     # contiguous, 4-byte aligned only
    state = make_state(3, "cuda")
    want = expected(state, logits)
    state.advance_greedy(logits)
    assert_same(state, want)


@requires_cuda
def test_graph_replay_follows_the_logits():
    state = make_state(4, "cuda", active=[1, 1, 0, 1])
    logits = torch.randn(4, 262144, device="cuda")
    graph = capture_graph(lambda: state.advance_greedy(logits))
    for _ in range(3):
        logits.copy_(torch.randn_like(logits))
        want = expected(state, logits)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(state, want)


@requires_cuda
@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "logits": a["logits"].half()}, "logits must be Float"),
    (lambda a: {**a, "tokens": a["tokens"][:1]}, r"tokens must have shape \[B\]"),
    (lambda a: {**a, "seq_lens": a["seq_lens"].long()}, "seq_lens must be Int"),
    (lambda a: {**a, "logits": a["logits"][:, :0]}, "vocabulary V must be in"),
])
def test_argument_errors_name_the_problem(change, message):
    state = make_state(2, "cuda")
    args = {"logits": torch.randn(2, 10, device="cuda"), "tokens": state.tokens, "positions": state.positions,
            "slots": state.slots, "seq_lens": state.seq_lens, "active": state.active}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.persimmon_rt.greedy_advance(**change(args))


@requires_cuda
def test_opcheck():
    state = make_state(2, "cuda")
    torch.library.opcheck(torch.ops.persimmon_rt.greedy_advance.default,
                          (torch.randn(2, 100, device="cuda"), state.tokens, state.positions, state.slots,
                           state.seq_lens, state.active))


def test_reference_is_argmax_then_advance():
    logits = torch.tensor([[0.0, 2.0, 2.0], [float("nan"), 1.0, float("nan")]])
    tokens, positions = torch.zeros(2, dtype=torch.long), torch.tensor([4, 9])
    slots, seq_lens, active = torch.tensor([4, 73]), torch.tensor([5, 10], dtype=torch.int32), torch.tensor(
        [1, 0], dtype=torch.int32)
    reference.greedy_advance(logits, tokens, positions, slots, seq_lens, active)
    assert tokens.tolist() == [1, 0]
    assert positions.tolist() == [5, 9] and slots.tolist() == [5, 73] and seq_lens.tolist() == [6, 10]
