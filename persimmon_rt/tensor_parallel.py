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

The sharding rules are pure functions of (name, tensor or safetensors slice, rank, world) so they can be
tested without a process group; `load_shard` reads only the rank's slices of an HF-format checkpoint.

NVLink multicast (NVLS) stays off: `init_from_env` sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1
and NVSHMEM_DISABLE_NVLS=1 before NCCL initialises.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .config import PersimmonConfig
from .weights import CheckpointError, expected_shapes, load_bin, weight_files

NVLS_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Set by `persimmon-rt generate --tp N` in the processes it launches under torchrun.
TP_CHILD_ENV = "PERSIMMON_RT_TP_CHILD"

# ------------------------------------------------------------------------------------------- sharding rules
REPLICATE = "replicate"          # every rank holds the whole tensor
SPLIT_ROWS = "rows"              # dim 0 split in N contiguous blocks (column-parallel output, vocab slice)
SPLIT_COLUMNS = "columns"        # dim 1 split in N contiguous blocks (row-parallel input)
FIRST_RANK = "first_rank"        # bias of a row-parallel projection: rank 0 holds it, the others None

_RULES = (
    ("self_attn.query_key_value.weight", SPLIT_ROWS),
    ("self_attn.query_key_value.bias", SPLIT_ROWS),
    ("self_attn.dense.weight", SPLIT_COLUMNS),
    ("self_attn.dense.bias", FIRST_RANK),
    ("mlp.dense_h_to_4h.weight", SPLIT_ROWS),
    ("mlp.dense_h_to_4h.bias", SPLIT_ROWS),
    ("mlp.dense_4h_to_h.weight", SPLIT_COLUMNS),
    ("mlp.dense_4h_to_h.bias", FIRST_RANK),
)


def shard_rule(name: str) -> str:
    """How the parameter `name` (HF name, with or without the "model." prefix) is split across ranks."""
    if name == "lm_head.weight":
        return SPLIT_ROWS
    for suffix, rule in _RULES:
        if name.endswith(suffix):
            return rule
    return REPLICATE


def check_tp_config(config: PersimmonConfig, world_size: int) -> None:
    """Raise ValueError unless heads, intermediate size and vocabulary all split evenly over world_size."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer, got {world_size!r}")
    for field, what in (("num_attention_heads", "attention heads"), ("intermediate_size", "MLP columns"),
                        ("vocab_size", "vocabulary rows of lm_head")):
        value = getattr(config, field)
        if value % world_size:
            raise ValueError(f"tensor parallelism over {world_size} ranks needs {field} divisible by "
                             f"{world_size}, but the model has {value} {what}")


def shard_range(size: int, rank: int, world_size: int, name: str = "tensor") -> tuple[int, int]:
    """[start, stop) of rank's block when `size` is split in world_size equal contiguous blocks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if size % world_size:
        raise ValueError(f"{name}: dimension of size {size} does not split over {world_size} ranks")
    step = size // world_size
    return rank * step, (rank + 1) * step


def _shape(tensor) -> tuple[int, ...]:
    return tuple(tensor.shape) if hasattr(tensor, "shape") else tuple(tensor.get_shape())


def take_shard(name: str, tensor, rank: int, world_size: int) -> torch.Tensor | None:
    """Rank's part of parameter `name`. `tensor` is anything indexed like a tensor: a torch.Tensor (the
    result is a view where the slice is contiguous) or a safetensors slice from `safe_open(...).get_slice`
    (only the rank's part is read from the file). Returns None for a row-parallel bias on ranks > 0."""
    rule = shard_rule(name)
    shape = _shape(tensor)
    if rule == SPLIT_ROWS:
        start, stop = shard_range(shape[0], rank, world_size, name)
        return tensor[start:stop]
    if rule == SPLIT_COLUMNS:
        start, stop = shard_range(shape[1], rank, world_size, name)
        return tensor[:, start:stop]
    if rule == FIRST_RANK:
        return tensor[:] if rank == 0 else None
    return tensor[:]


# ------------------------------------------------------------------------------------------------ weights
def weights_from_module(model: torch.nn.Module, config: PersimmonConfig, rank: int, world_size: int):
    """The engine's Weights for one rank, sliced from a loaded full model (row splits are views of its
    parameters, column splits contiguous copies). For tests and small models: the whole model is in memory."""
    from .engine import Weights

    check_tp_config(config, world_size)
    p = {name: t.detach() for name, t in model.named_parameters()}
    p.update({name: t.detach() for name, t in model.named_buffers()})
    prefix = "model." if "model.embed_tokens.weight" in p else ""

    def get(name: str, optional: bool = False):
        if name == "lm_head.weight":
            source = p.get(name, p[f"{prefix}embed_tokens.weight"])
        elif name in p:
            source = p[name]
        elif optional:
            return None
        else:
            raise KeyError(f"the model has no parameter {name!r}")
        part = take_shard(name, source, rank, world_size)
        return None if part is None else part.contiguous()

    return Weights.assemble(get, config, prefix)


def load_shard(path: str | os.PathLike, config: PersimmonConfig, rank: int, world_size: int,
               dtype: torch.dtype | None = None, device=None):
    """The engine's Weights for one rank, read slice by slice from an HF-format directory: from safetensors
    through `get_slice`, so only this rank's part of a split tensor is read; from pytorch_model*.bin through
    a memory map. Each tensor is converted to `dtype` (default: the checkpoint's) on its way to `device`, so
    no rank ever holds the whole model."""
    from .engine import Weights

    check_tp_config(config, world_size)
    path = os.fspath(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype if dtype is not None else config.dtype
    with contextlib.ExitStack() as stack:
        sources = _open_sources(path, stack)
        if not any(name.startswith("model.") for name in sources):     # a base-model checkpoint
            sources = {f"model.{name}": s for name, s in sources.items()}
        if config.tie_word_embeddings or "lm_head.weight" not in sources:
            sources["lm_head.weight"] = sources.get("model.embed_tokens.weight")
        _check_shapes(path, config, sources)

        def get(name: str, optional: bool = False):
            source = sources.get(name)
            if source is None:
                if optional:
                    return None
                raise CheckpointError(f"{path}: no tensor {name!r}")
            try:
                part = take_shard(name, source, rank, world_size)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot read {name!r}: {exc}") from exc
            if part is None:
                return None
            return part.to(device=device, dtype=dtype or part.dtype).contiguous()

        return Weights.assemble(get, config, "model.")


def _open_sources(path: str, stack: contextlib.ExitStack) -> dict:
    """name -> safetensors slice (lazy) or memory-mapped tensor, over every weight file of `path`."""
    sources: dict = {}
    for file in weight_files(path):
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                fh = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                entries = {name: fh.get_slice(name) for name in fh.keys()}
            except Exception as exc:
                raise CheckpointError(f"cannot read {file}: {exc}") from exc
        else:
            entries = load_bin(file)
        for name, entry in entries.items():
            if name in sources:
                raise CheckpointError(f"tensor {name!r} appears in more than one shard ({file})")
            sources[name] = entry
    return sources


def _check_shapes(path: str, config: PersimmonConfig, sources: dict) -> None:
    """Every tensor the engine needs is present with the shape the config implies (before reading any)."""
    expected = expected_shapes(config)
    missing = sorted(k for k in expected if sources.get(k) is None)
    wrong = [f"{k}: checkpoint {_shape(sources[k])}, model {shape}" for k, shape in expected.items()
             if sources.get(k) is not None and _shape(sources[k]) != shape]
    problems = ([f"missing tensors: {', '.join(missing)}"] if missing else []) + \
               ([f"wrong shapes: {'; '.join(wrong)}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match the model: " + " | ".join(problems))


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
            dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
        tp = cls(dist.get_rank(), dist.get_world_size(), None, device)
        tp._owns_process_group = owns
        return tp

    def shutdown(self) -> None:
        """Destroy the process group if init_from_env created it, after a barrier: every rank's last
        collective has finished (and released its buffers) before any rank tears its group down."""
        if self._owns_process_group and dist.is_initialized():
            dist.barrier(group=self.group)
            dist.destroy_process_group()
            self._owns_process_group = False

    # ------------------------------------------------------------------------------------- collectives
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (a row-parallel projection's partial sums). CUDA-graph capturable
        on NCCL."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

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


# ----------------------------------------------------------------------------------------------- launching
def in_launched_run() -> bool:
    """True in a process started by `persimmon-rt ... --tp N` (or by torchrun with more than one process)."""
    return os.environ.get(TP_CHILD_ENV) == "1" or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m persimmon_rt <argv>` in nproc processes under torchrun (standalone: a free local port)
    with the child marker and NVLink multicast off; returns torchrun's exit status."""
    env = {**os.environ, **NVLS_OFF_ENV, TP_CHILD_ENV: "1"}
    env.setdefault("OMP_NUM_THREADS", "1")           # torchrun's own default, without its warning
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(int(nproc)),
           "-m", "persimmon_rt", *argv]
    return subprocess.run(cmd, env=env).returncode


__all__ = ["TensorParallel", "shard_rule", "take_shard", "shard_range", "check_tp_config", "weights_from_module",
           "load_shard", "launch", "in_launched_run", "NVLS_OFF_ENV", "TP_CHILD_ENV",
           "REPLICATE", "SPLIT_ROWS", "SPLIT_COLUMNS", "FIRST_RANK"]
