"""The decode all-reduce of tensor parallelism, fused with the residual LayerNorm that follows it.

Decode under tensor parallelism all-reduces two [batch, hidden] partial sums per layer (8 KB a row at
hidden 4096, fp16): pure latency, and each is followed by a residual add + LayerNorm. NCCL's ring took
13.3 us per 8 KB all-reduce inside a CUDA graph on two H200s (benchmarks/RESULTS.md), plus the LayerNorm
kernel. `all_reduce_layernorm` (csrc/kernels/all_reduce_layernorm.cuh) does both in one kernel: each rank
pushes its partial rows into every peer's buffer over NVLink, raises a flag there, waits for the peers'
flags in its own memory, then sums in rank order (every rank gets the same bits), adds the residual and
normalises. Two ways to know a peer's row has arrived (the protocol, chosen per reducer): "flags" (a flag
raised with a release store after the row, waited on with acquire loads) and "lamport" (the row is its own
flag: unused slots hold a sentinel that no pushed element equals, and the receiver polls until none is
left; no release, so no round trip over the link).

Each rank owns one buffer that every rank maps: PyTorch's symmetric memory (`torch.distributed.
_symmetric_memory`) allocates it and exchanges the peers' addresses; the kernel needs nothing else from it
(no multicast: NVLink multicast stays off). Layout of each buffer:

    [ flags: uint32 [ALL_REDUCE_MAX_ROWS][ALL_REDUCE_MAX_RANKS] | data: [ALL_REDUCE_SLOTS][W][ALL_REDUCE_MAX_ROWS][hidden] ]

Set up once per engine, outside graph capture, for one dtype and hidden size; if anything fails (an old
torch, no peer access) or a probe disagrees with NCCL + LayerNorm, `try_create` returns None with the
reason and NCCL stays in use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import ops


PROTOCOLS = ("flags", "lamport")
SENTINEL = -32768        # int16 view of 0x8000: -0.0 in fp16 and bf16, the "not yet written" mark


class FusedAllReduce:
    def __init__(self, group, device: torch.device, dtype: torch.dtype, hidden: int, timeout_s: float,
                 protocol: str = "lamport"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"all-reduce protocol must be one of {PROTOCOLS}, got {protocol!r}")
        import torch.distributed._symmetric_memory as symm_mem

        group = group or dist.group.WORLD
        if hasattr(symm_mem, "enable_symm_mem_for_group"):           # required by older torch releases
            symm_mem.enable_symm_mem_for_group(group.group_name)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if self.world > ops.ALL_REDUCE_MAX_RANKS:
            raise ValueError(f"{self.world} ranks; the fused all-reduce takes at most {ops.ALL_REDUCE_MAX_RANKS}")
        self.dtype, self.hidden, self.timeout_s = dtype, int(hidden), float(timeout_s)
        self.protocol = protocol
        element = torch.empty((), dtype=dtype).element_size()
        data = ops.ALL_REDUCE_SLOTS * self.world * ops.ALL_REDUCE_MAX_ROWS * self.hidden * element
        self._buffer = symm_mem.empty(ops.ALL_REDUCE_FLAG_BYTES + data, dtype=torch.uint8, device=device)
        self._handle = symm_mem.rendezvous(self._buffer, group.group_name)
        self._buffer[:ops.ALL_REDUCE_FLAG_BYTES].zero_()
        self._buffer[ops.ALL_REDUCE_FLAG_BYTES:].view(torch.int16).fill_(SENTINEL)
        self.buffers = torch.tensor(list(self._handle.buffer_ptrs), dtype=torch.int64, device=device)
        self.epochs = torch.zeros(ops.ALL_REDUCE_MAX_ROWS, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)      # every buffer is initialised before any rank writes into it

    def fits(self, partial: torch.Tensor) -> bool:
        return (partial.dtype == self.dtype and partial.is_cuda and partial.dim() == 2
                and 1 <= partial.shape[0] <= ops.ALL_REDUCE_MAX_ROWS and partial.shape[1] == self.hidden
                and partial.is_contiguous())

    def __call__(self, partial, weight, bias, out, eps, residual, residual_out) -> None:
        """reference.all_reduce_layernorm over every rank's `partial`. Capturable; every rank calls it
        with the same shapes in the same order."""
        ops.all_reduce_layernorm(partial, self.buffers, self.epochs, self.rank, weight, bias, out, eps, residual,
                                 residual_out, self.timeout_s, self.protocol == "lamport")

    @classmethod
    def try_create(cls, group, device: torch.device, dtype: torch.dtype, hidden: int, timeout_s: float,
                   protocol: str = "lamport") -> tuple["FusedAllReduce | None", str]:
        """(the reducer, "") when it works here, else (None, why not). Every rank must call it together."""
        try:
            reducer = cls(group, device, dtype, hidden, timeout_s, protocol)
            ok = reducer._agrees_with_nccl(group, device)
        except Exception as exc:  # noqa: BLE001 - any failure means: keep NCCL, and say why
            reducer, ok, why = None, False, f"{type(exc).__name__}: {exc}".splitlines()[0]
        else:
            why = "" if ok else "its probe disagreed with NCCL + LayerNorm"
        # Every rank must take the same path, or their collectives would not pair up.
        agreed = torch.tensor([int(ok)], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        if not int(agreed):
            return None, why or "it failed on another rank"
        return reducer, ""

    def _agrees_with_nccl(self, group, device) -> bool:
        """A few calls of different row counts (both data slots, several blocks) against NCCL's all-reduce
        followed by the LayerNorm kernel."""
        gen = torch.Generator(device=device).manual_seed(1234 + self.rank)
        C = self.hidden
        weight = torch.rand(C, generator=gen, device=device).to(self.dtype)
        bias = torch.rand(C, generator=gen, device=device).to(self.dtype)
        for rows in (1, 3, 1, ops.ALL_REDUCE_MAX_ROWS):
            partial = torch.randn(rows, C, generator=gen, device=device).to(self.dtype)
            residual = torch.randn(rows, C, generator=gen, device=device).to(self.dtype)
            summed = partial.clone()
            dist.all_reduce(summed, group=group)
            want_out, want_res = torch.empty_like(partial), torch.empty_like(partial)
            ops.layernorm(summed, weight, bias, want_out, 1e-5, residual, want_res)
            out, res = torch.empty_like(partial), torch.empty_like(partial)
            self(partial, weight, bias, out, 1e-5, residual, res)
            # NCCL may sum more than two ranks in another order: allow a rounding step.
            if not (torch.allclose(out.float(), want_out.float(), rtol=2e-2, atol=2e-2)
                    and torch.allclose(res.float(), want_res.float(), rtol=2e-2, atol=2e-2)):
                return False
        torch.cuda.synchronize(device)
        return True
