"""Small-message all-reduce over NVLink peer-to-peer reads: PyTorch's symmetric-memory one-shot all-reduce.

Decode under tensor parallelism all-reduces two [batch, hidden] partial sums per layer (8 KB at batch 1):
pure latency. NCCL's ring spends ~15 us on each inside a CUDA graph (benchmarks/RESULTS.md); the one-shot
algorithm has every rank read every peer's buffer directly and sum, in one kernel. It needs its input in
symmetric memory (allocated once, mapped by every rank): each call copies the partial sum into one of two
such buffers, alternating, so a rank never overwrites a buffer a slower peer may still be reading (each
call starts with a barrier, so the call two back has finished everywhere). NVLink multicast stays off
(TORCH_SYMM_MEM_DISABLE_MULTICAST=1): this path does not use it.

Set up once, outside graph capture, for one dtype; if anything is missing (an old torch, no peer access,
a dtype the kernel lacks: torch 2.11's takes float32 and bfloat16, not float16) or the first reduction
disagrees with NCCL's, `try_create` returns None with the reason, and NCCL stays in use. Opt-in
(PERSIMMON_RT_TP_ALL_REDUCE=symm_mem): on two H200s NCCL took 13.3 us per 8 KB all-reduce inside a graph,
and this path has not been measured yet.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MAX_BYTES = 256 * 1024          # larger messages (prefill) are bandwidth-bound: NCCL's ring does them well


class OneShotAllReduce:
    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int = MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        group = group or dist.group.WORLD
        self.group_name = group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):           # required by older torch releases
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.max_bytes, self.dtype = max_bytes, dtype
        self.buffers = [symm_mem.empty(max_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        for buf in self.buffers:
            symm_mem.rendezvous(buf, self.group_name)
        self._turn = 0

    def fits(self, t: torch.Tensor) -> bool:
        return (t.dtype == self.dtype and t.is_cuda and t.is_contiguous()
                and t.numel() * t.element_size() <= self.max_bytes)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place."""
        buf = self.buffers[self._turn]
        self._turn ^= 1
        staged = buf[:t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        staged.copy_(t)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, t)
        return t

    @classmethod
    def try_create(cls, group, device: torch.device, rank: int,
                   dtype: torch.dtype) -> tuple["OneShotAllReduce | None", str]:
        """(the reducer, "") when it works here for `dtype`, else (None, why not). Every rank must call it
        together."""
        try:
            reducer = cls(group, device, dtype)
            probe = (torch.arange(1024, device=device) % 7 * (rank + 1)).to(dtype)
            expected = probe.clone()
            dist.all_reduce(expected, group=group)
            reducer(probe)
            torch.cuda.synchronize(device)
            ok = torch.equal(probe, expected)
        except Exception as exc:  # noqa: BLE001 - any failure means: keep NCCL, and say why
            reducer, ok, why = None, False, f"{type(exc).__name__}: {exc}".splitlines()[0]
        else:
            why = "" if ok else "its first reduction disagreed with NCCL's"
        # Every rank must take the same path, or their collectives would not pair up.
        agreed = torch.tensor([int(ok)], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        if not int(agreed):
            return None, why or "it failed on another rank"
        return reducer, ""
