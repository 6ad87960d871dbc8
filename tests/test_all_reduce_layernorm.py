"""all_reduce_layernorm on one GPU: W "ranks" whose buffers are ordinary allocations of the same device,
each rank's kernel on its own stream, so the ranks really run concurrently and signal each other through
the flags, exactly as over NVLink (the kernel only sees addresses). Checked against
reference.all_reduce_layernorm, with both protocols (flags, lamport), eager and in CUDA graphs, over calls
of changing row counts (every data slot, every block's epoch); and a rank whose peer never comes fails
within its timeout instead of hanging.
The two-GPU run through torch.distributed is in test_tensor_parallel.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from op_utils import check_against_fp32, poisoned_like, requires_cuda
from persimmon_rt import ops, reference
from persimmon_rt.fast_all_reduce import SENTINEL

HIDDEN = 4096
EPS = 1e-5


def make_buffer(world, dtype, hidden) -> torch.Tensor:
    """One rank's buffer as fast_all_reduce.py lays it out and initialises it."""
    element = torch.empty((), dtype=dtype).element_size()
    data = ops.ALL_REDUCE_SLOTS * world * ops.ALL_REDUCE_MAX_ROWS * hidden * element
    buffer = torch.zeros(ops.ALL_REDUCE_FLAG_BYTES + data, dtype=torch.uint8, device="cuda")
    buffer[ops.ALL_REDUCE_FLAG_BYTES:].view(torch.int16).fill_(SENTINEL)
    return buffer


class FakeRanks:
    """W ranks on one GPU: a buffer and epoch counters each, a stream each."""

    def __init__(self, world: int, dtype: torch.dtype, hidden: int = HIDDEN, lamport: bool = False):
        self.world, self.lamport = world, lamport
        self.buffers = [make_buffer(world, dtype, hidden) for _ in range(world)]
        self.pointers = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64, device="cuda")
        self.epochs = [torch.zeros(ops.ALL_REDUCE_MAX_ROWS, dtype=torch.int32, device="cuda") for _ in range(world)]
        self.streams = [torch.cuda.Stream() for _ in range(world)]

    def call(self, rank, partial, weight, bias, out, residual, residual_out, timeout_s=30.0):
        ops.all_reduce_layernorm(partial, self.pointers, self.epochs[rank], rank, weight, bias, out, EPS, residual,
                                 residual_out, timeout_s, self.lamport)

    def run(self, args_per_rank) -> None:
        """Every rank's call, each on its own stream, all in flight at once."""
        torch.cuda.synchronize()
        for rank, args in enumerate(args_per_rank):
            with torch.cuda.stream(self.streams[rank]):
                self.call(rank, *args)
        torch.cuda.synchronize()


def make_inputs(world, rows, dtype, hidden=HIDDEN):
    partials = [torch.randn(rows, hidden, device="cuda").to(dtype) for _ in range(world)]
    residual = torch.randn(rows, hidden, device="cuda").to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    bias = (0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    return partials, residual, weight, bias


def check_rank(out, res_out, partials, residual, weight, bias):
    """residual_out is exact (two roundings, as the reference); out matches the LayerNorm kernel on it
    bit for bit and the fp32 reference within the derived bound."""
    dtype = partials[0].dtype
    want_out, want_res = torch.empty_like(out), torch.empty_like(out)
    reference.all_reduce_layernorm(partials, weight, bias, want_out, EPS, residual, want_res)
    assert torch.equal(res_out, want_res)
    ln_kernel = torch.empty_like(out)
    ops.layernorm(want_res, weight, bias, ln_kernel, EPS)
    assert torch.equal(out, ln_kernel)
    f32 = torch.empty_like(out, dtype=torch.float32)
    reference.layernorm(want_res.float(), weight.float(), bias.float(), f32, EPS)
    lowp = torch.nn.functional.layer_norm(want_res, (out.shape[-1],), weight, bias, EPS)
    check_against_fp32(out, f32, lowp, what=f"out ({dtype})")


PROTOCOLS = pytest.mark.parametrize("lamport", [False, True], ids=["flags", "lamport"])


@requires_cuda
@PROTOCOLS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_matches_reference_over_changing_row_counts(world, dtype, lamport):
    torch.manual_seed(world)
    ranks = FakeRanks(world, dtype, lamport=lamport)
    for rows in (1, 3, 1, 64, 2, 1, 1, 17):
        partials, residual, weight, bias = make_inputs(world, rows, dtype)
        partials[0][0, :16] = -0.0                     # the Lamport sentinel's bits, sent as +0.0
        outs = [poisoned_like(residual) for _ in range(world)]
        res_outs = [poisoned_like(residual) for _ in range(world)]
        ranks.run([(partials[r], weight, bias, outs[r], residual, res_outs[r]) for r in range(world)])
        for r in range(world):
            check_rank(outs[r], res_outs[r], partials, residual, weight, bias)
            assert torch.equal(outs[r], outs[0])            # every rank gets the same bits


@requires_cuda
@PROTOCOLS
def test_residual_in_place_and_out_aliasing_partial(lamport):
    """As the engine calls it: residual_out is the residual itself, out overwrites the partial."""
    world, rows, dtype = 2, 4, torch.float16
    torch.manual_seed(5)
    ranks = FakeRanks(world, dtype, lamport=lamport)
    partials, residual, weight, bias = make_inputs(world, rows, dtype)
    expected_out, expected_res = torch.empty_like(residual), torch.empty_like(residual)
    reference.all_reduce_layernorm(partials, weight, bias, expected_out, EPS, residual, expected_res)
    residuals = [residual.clone() for _ in range(world)]
    work = [p.clone() for p in partials]
    ranks.run([(work[r], weight, bias, work[r], residuals[r], residuals[r]) for r in range(world)])
    for r in range(world):
        assert torch.equal(residuals[r], expected_res)
        check_rank(work[r], residuals[r], partials, residual, weight, bias)


@requires_cuda
@PROTOCOLS
def test_graph_replays_advance_the_device_epochs(lamport):
    """Each rank's call captured in its own graph and replayed many times, concurrently, with fresh inputs
    copied in between: the epochs live on the device, so every replay is a new call."""
    world, rows, dtype = 2, 2, torch.float16
    torch.manual_seed(7)
    ranks = FakeRanks(world, dtype, lamport=lamport)
    partials, residual, weight, bias = make_inputs(world, rows, dtype)
    outs = [torch.empty_like(residual) for _ in range(world)]
    res_outs = [torch.empty_like(residual) for _ in range(world)]
    ranks.run([(partials[r], weight, bias, outs[r], residual, res_outs[r]) for r in range(world)])   # warm-up
    graphs = []
    for r in range(world):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=ranks.streams[r]):
            ranks.call(r, partials[r], weight, bias, outs[r], residual, res_outs[r])
        graphs.append(graph)
    for _ in range(20):
        fresh, new_residual, _, _ = make_inputs(world, rows, dtype)
        for r in range(world):
            partials[r].copy_(fresh[r])
        residual.copy_(new_residual)
        for o in outs + res_outs:
            o.fill_(float("nan"))
        torch.cuda.synchronize()
        for r in range(world):
            with torch.cuda.stream(ranks.streams[r]):
                graphs[r].replay()
        torch.cuda.synchronize()
        for r in range(world):
            check_rank(outs[r], res_outs[r], partials, residual, weight, bias)
    assert ranks.epochs[0][:rows].tolist() == [21] * rows        # the warm-up call and 20 replays (capture runs none)


@requires_cuda
@pytest.mark.parametrize("bad, message", [
    ("rows", "1 to 64 rows"),
    ("rank", "rank must be in"),
    ("buffers_dtype", "buffers must be"),
    ("width", "hidden size C"),
])
def test_bad_arguments_name_the_problem(bad, message):
    world, dtype = 2, torch.float16
    ranks = FakeRanks(world, dtype)
    rows = 65 if bad == "rows" else 1
    hidden = 12 if bad == "width" else HIDDEN
    partials, residual, weight, bias = make_inputs(world, rows, dtype, hidden)
    pointers = ranks.pointers.to(torch.int32) if bad == "buffers_dtype" else ranks.pointers
    rank = 2 if bad == "rank" else 0
    with pytest.raises(RuntimeError, match=message):
        ops.all_reduce_layernorm(partials[0], pointers, ranks.epochs[0], rank, weight, bias, torch.empty_like(residual),
                                 EPS, residual, torch.empty_like(residual), 1.0)


@requires_cuda
@PROTOCOLS
def test_a_missing_peer_fails_within_the_timeout(lamport):
    """Rank 0 of two calls alone: its kernel gives up after the timeout and the process reports a CUDA error
    (a trap) instead of spinning forever. In a subprocess: the error ends that process's CUDA context."""
    script = textwrap.dedent(f"""
        import torch
        from persimmon_rt import ops
        from persimmon_rt.fast_all_reduce import SENTINEL
        n = ops.ALL_REDUCE_FLAG_BYTES + ops.ALL_REDUCE_SLOTS * 2 * ops.ALL_REDUCE_MAX_ROWS * 64 * 2
        bufs = [torch.zeros(n, dtype=torch.uint8, device="cuda") for _ in range(2)]
        for b in bufs:
            b[ops.ALL_REDUCE_FLAG_BYTES:].view(torch.int16).fill_(SENTINEL)
        ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device="cuda")
        epochs = torch.zeros(ops.ALL_REDUCE_MAX_ROWS, dtype=torch.int32, device="cuda")
        x = torch.randn(1, 64, device="cuda", dtype=torch.float16)
        w, b = torch.ones(64, device="cuda", dtype=torch.float16), torch.zeros(64, device="cuda", dtype=torch.float16)
        ops.all_reduce_layernorm(x, ptrs, epochs, 0, w, b, torch.empty_like(x), 1e-5, x.clone(), torch.empty_like(x), 0.5,
                                 {lamport})
        torch.cuda.synchronize()
        print("RETURNED")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "RETURNED" not in proc.stdout, proc.stdout + proc.stderr
    assert "CUDA error" in proc.stderr or "AcceleratorError" in proc.stderr, proc.stderr[-2000:]
