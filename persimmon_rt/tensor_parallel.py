"""Tensor parallelism (Megatron-style) over torch.distributed: NCCL on GPUs, gloo on the CPU.

Each of N ranks holds 1/N of every layer and 1/N of the KV cache:

    QKV            column-parallel: rank r owns heads [r*H/N, (r+1)*H/N). The fused QKV weight is head-major
                   (head h owns rows [h*3D, (h+1)*3D)), so a rank's heads are one contiguous block of rows.
    dense          row-parallel: the input columns of the local heads; each rank's output is a partial sum,
                   all-reduced in place. Its bias is held by rank 0 only, so the sum adds it exactly once.
    MLP up         column-parallel: rows [r*F/N, (r+1)*F/N) and that slice of the bias (relu² is elementwise).
    MLP down       row-parallel: the columns of that slice; partial sums all-reduced; bias on rank 0 only.
    lm_head        vocabulary-parallel: rows [r*V/N, (r+1)*V/N); the fp32 logits are all-gathered (rank order
                   is vocabulary order) so every rank samples from the full distribution.
    the rest       replicated: embeddings, LayerNorms, QK-LayerNorms.
    KV cache       the local heads only.

Two collectives per layer plus one gather per step; every rank then holds bit-identical hidden states and
logits (all-reduce and all-gather hand every rank the same bytes), so greedy decoding agrees everywhere. For
sampling, every rank seeds its generator with one seed chosen by rank 0 (`TensorParallel.shared_seed`,
once per wave, outside the decode step): the draws inside the graph are then the same on every rank and
the step needs no extra collective.

The sharding rules live in sharding.py (pure functions, applied by loading.py while it reads a checkpoint,
so each rank reads only its slices).

NVLink multicast (NVLS) stays off: `init_from_env` sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1
and NVSHMEM_DISABLE_NVLS=1 before NCCL initialises.
"""

from __future__ import annotations

import datetime
import os
import weakref

import torch
import torch.distributed as dist

from . import ops
from .sharding import FIRST_RANK, REPLICATE, SPLIT_COLUMNS, SPLIT_ROWS, check_tp_config, shard_range, \
    shard_rule, take_shard

NVLS_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Set by `persimmon-rt generate|chat|serve --tp N` in the rank processes it starts (tp_launch.py).
TP_CHILD_ENV = "PERSIMMON_RT_TP_CHILD"
# How long a collective may wait for the other ranks before the group gives up (seconds): a rank that
# failed must not leave the others blocked forever.
TIMEOUT_ENV = "PERSIMMON_RT_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
# The decode's all-reduces take the fused all-reduce + LayerNorm kernel over peer-mapped buffers where it
# works (fast_all_reduce.py), with the protocol named here ("lamport", the default: 4.8 us against the
# flags' 5.8 on two H200s, benchmarks/RESULTS.md run I; or "flags"); "nccl" keeps every all-reduce on NCCL.
ALL_REDUCE_ENV = "PERSIMMON_RT_TP_ALL_REDUCE"
DEFAULT_ALL_REDUCE = "lamport"

# ---------------------------------------------------------------------------------------- process group
class TensorParallel:
    """This process's place in a tensor-parallel group: rank, world size, process group and device, with
    the two collectives the forward pass needs. Create with `init_from_env()` under torchrun, or wrap an
    existing group with `TensorParallel.from_group(group, device)`."""

    def __init__(self, rank: int, world_size: int, group=None, device=None):
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.group = group
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._owns_process_group = False
        # Objects holding CUDA graphs with captured collectives (engines): released before teardown.
        self._graph_owners: weakref.WeakSet = weakref.WeakSet()
        self._fast_all_reduce = None
        self.all_reduce_backend = "nccl" if self.device.type == "cuda" else "gloo"
        # all_gather_single is the newer name (torch >= 2.12); both take the concatenated-along-dim-0 output.
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    @classmethod
    def from_group(cls, group=None, device=None) -> "TensorParallel":
        """Wrap an initialised process group (default: the world)."""
        return cls(dist.get_rank(group), dist.get_world_size(group), group, device)

    @classmethod
    def init_from_env(cls, device_type: str | None = None) -> "TensorParallel":
        """Initialise torch.distributed from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
        MASTER_PORT): NCCL on cuda:LOCAL_RANK when device_type is "cuda" (the default when a GPU is
        visible), gloo on the CPU otherwise. NVLink multicast is switched off first."""
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"tensor parallelism needs torchrun's environment ({', '.join(missing)} not set): "
                               "launch with `torchrun --nproc-per-node N ...`")
        os.environ.update(NVLS_OFF_ENV)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend, kwargs = "nccl", {"device_id": device}     # device_id: the communicator is made now
        elif device_type == "cpu":
            device, backend, kwargs = torch.device("cpu"), "gloo", {}
        else:
            raise ValueError(f"tensor parallelism runs on cuda (NCCL) or cpu (gloo), not {device_type!r}")
        owns = not dist.is_initialized()
        if owns:
            timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
        tp = cls(dist.get_rank(), dist.get_world_size(), None, device)
        tp._owns_process_group = owns
        return tp

    def register_graph_owner(self, owner) -> None:
        """`owner.release_graphs()` will be called before the group is torn down. CUDA graphs that captured
        NCCL kernels keep the communicator's resources referenced: destroying the process group while such
        a graph is alive hangs (measured on two H200s: shutdown blocked past 25 s with the engine's graphs
        alive, 0.2 s once they were released)."""
        self._graph_owners.add(owner)

    def shutdown(self) -> None:
        """Release every registered owner's CUDA graphs, then destroy the process group if init_from_env
        created it, after a barrier: every rank's last collective has finished (and released its buffers)
        before any rank tears its group down."""
        for owner in list(self._graph_owners):
            owner.release_graphs()
        self._graph_owners = weakref.WeakSet()
        if self._owns_process_group and dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dist.barrier(group=self.group)
            dist.destroy_process_group()
            self._owns_process_group = False

    # ------------------------------------------------------------------------------------- collectives
    def enable_fast_all_reduce(self, dtype: torch.dtype, hidden: int) -> str:
        """On GPUs, let all_reduce_layernorm take the fused kernel for decode-sized messages of `dtype` and
        width `hidden` where it works (PERSIMMON_RT_TP_ALL_REDUCE: its protocol, or nccl to keep NCCL);
        returns the backend in use (with the reason when it is NCCL alone). Collective: every rank calls it,
        outside graph capture."""
        if self.device.type != "cuda" or self._fast_all_reduce is not None:
            return self.all_reduce_backend
        choice = os.environ.get(ALL_REDUCE_ENV) or DEFAULT_ALL_REDUCE
        if choice == "nccl":
            return self.all_reduce_backend
        from .fast_all_reduce import PROTOCOLS, FusedAllReduce

        if choice not in PROTOCOLS:
            raise ValueError(f"{ALL_REDUCE_ENV} must be nccl, {' or '.join(PROTOCOLS)}, got {choice!r}")
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        self._fast_all_reduce, why = FusedAllReduce.try_create(self.group, self.device, dtype, hidden, timeout,
                                                               choice)
        self.all_reduce_backend = (f"fused all-reduce + LayerNorm ({choice}) for decode, nccl" if why == ""
                                   else f"nccl ({why})")
        return self.all_reduce_backend

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place. CUDA-graph capturable."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_reduce_layernorm(self, partial, weight, bias, out, eps, residual, residual_out) -> None:
        """A row-parallel projection's partial sums [N, C], summed over the ranks, then the residual
        LayerNorm: out = LN(residual_out = residual + sum) (reference.all_reduce_layernorm). One fused
        kernel for decode-sized messages where enabled, NCCL + the LayerNorm kernel otherwise.
        CUDA-graph capturable; `partial` may be overwritten."""
        if self._fast_all_reduce is not None and self._fast_all_reduce.fits(partial):
            self._fast_all_reduce(partial, weight, bias, out, eps, residual, residual_out)
            return
        self.all_reduce_(partial)
        ops.layernorm(partial, weight, bias, out, eps, residual, residual_out)

    def gather_vocab(self, logits_local: torch.Tensor) -> torch.Tensor:
        """[..., V/N] logits of this rank's vocabulary slice -> [..., V] full logits, in vocabulary order."""
        local = logits_local.contiguous()
        lead, v = local.shape[:-1], local.shape[-1]
        rows = local.reshape(-1, v)
        out = torch.empty(self.world_size * rows.shape[0], v, dtype=local.dtype, device=local.device)
        self._all_gather(out, rows, group=self.group)                 # [N * rows, v], rank-major
        full = out.view(self.world_size, rows.shape[0], v).transpose(0, 1).reshape(rows.shape[0], -1)
        return full.view(*lead, self.world_size * v)

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (host-side; outside CUDA-graph capture)."""
        t = torch.tensor([int(value)], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def shared_seed(self, seed: int | None = None) -> int:
        """Rank 0's seed (its `seed`, or a draw from its generator when None), the same on every rank.
        A host-side broadcast: call it outside CUDA-graph capture."""
        value = int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)))
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(t, src=src, group=self.group)
        return int(t.item())


# ------------------------------------------------------------------------------------------ control channel
class ControlChannel:
    """Host-side messages from rank 0 to the other ranks of a group (what to run next: a server's step
    boundaries, a chat's turns), each a pickled object broadcast over a gloo group of the channel's own,
    so no GPU synchronisation stands in the way of the steps. Every rank builds it (a collective) and then
    rank 0 calls `send`, the others `recv`, once per message. A wait longer than `timeout_s` fails."""

    def __init__(self, tp: TensorParallel, timeout_s: float):
        ranks = list(range(tp.world_size)) if tp.group is None else dist.get_process_group_ranks(tp.group)
        self.rank = tp.rank
        self._src = ranks[0]
        self._group = dist.new_group(ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.timeout_s = timeout_s

    def send(self, message) -> None:
        dist.broadcast_object_list([message], src=self._src, group=self._group)

    def recv(self):
        box = [None]
        dist.broadcast_object_list(box, src=self._src, group=self._group)
        return box[0]


__all__ = ["TensorParallel", "ControlChannel", "shard_rule", "take_shard", "shard_range", "check_tp_config",
           "NVLS_OFF_ENV", "TP_CHILD_ENV", "TIMEOUT_ENV", "REPLICATE", "SPLIT_ROWS", "SPLIT_COLUMNS", "FIRST_RANK"]
