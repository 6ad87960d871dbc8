"""Small-message all-reduce over NVLink peer-to-peer reads: PyTorch's symmetric-memory one-shot all-reduce.

Decode under tensor parallelism all-reduces two [batch, hidden] partial sums per layer (8 KB at batch 1):
pure latency. NCCL's ring spends ~15 us on each inside a CUDA graph (benchmarks/RESULTS.md); the one-shot
algorithm has every rank read every peer's buffer directly and sum, in one kernel. It needs its input in
symmetric memory (allocated once, mapped by every rank): each call copies the partial sum into one of two
such buffers, alternating, so a rank never overwrites a buffer a slower peer may still be reading (each
call starts with a barrier, so the call two back has finished everywhere). NVLink multicast stays off
(TORCH_SYMM_MEM_DISABLE_MULTICAST=1): this path does not use it.

Set up once, outside graph capture; if anything is missing (an old torch, no peer access) or the first
reduction disagrees with NCCL's, `try_create` returns None with the reason, and NCCL stays in use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MAX_BYTES = 256 * 1024          # larger messages (prefill) are bandwidth-bound: NCCL's ring does them well


class OneShotAllReduce:
    def __init__(self, group, device: torch.device, max_bytes: int = MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        group = group or dist.group.WORLD
        self.group_name = group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):           # required by older torch releases
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.max_bytes = max_bytes
        self.buffers = [symm_mem.empty(max_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        for buf in self.buffers:
            symm_mem.rendezvous(buf, self.group_name)
        self._turn = 0

    def fits(self, t: torch.Tensor) -> bool:
        return t.is_cuda and t.is_contiguous() and t.numel() * t.element_size() <= self.max_bytes

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place."""
        buf = self.buffers[self._turn]
        self._turn ^= 1
        staged = buf[:t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        staged.copy_(t)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, t)
        return t

    @classmethod
    def try_create(cls, group, device: torch.device, rank: int) -> tuple["OneShotAllReduce | None", str]:
        """(the reducer, "") when it works here, else (None, why not). Every rank must call it together."""
        try:
            reducer = cls(group, device)
            probe = torch.arange(1024, dtype=torch.float32, device=device) * (rank + 1)
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
