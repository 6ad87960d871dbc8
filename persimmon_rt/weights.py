"""HF-format weight files: read (safetensors single or sharded, pytorch_model*.bin) and write (safetensors).

Reading is lazy: safetensors tensors are views of the memory-mapped file, so an 8B checkpoint is paged in
once, straight into the parameters that `assign=True` hands them to, and never held twice in RAM.
Writing goes to a temporary directory that is renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch

from .config import PersimmonConfig

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
GENERATION_CONFIG = "generation_config.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not match the model it is loaded into."""


def weight_files(directory: str) -> list[str]:
    """The weight files of an HF-format directory, in the order an index lists them."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model directory {directory!r} does not exist")
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path} is not a valid weight index ({exc!r})") from exc
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
            if missing:
                raise CheckpointError(f"{index_path} lists shard(s) that do not exist: {', '.join(missing)}")
            return [os.path.join(directory, s) for s in shards]
    for single in (SAFE_WEIGHTS, BIN_WEIGHTS):
        path = os.path.join(directory, single)
        if os.path.isfile(path):
            return [path]
    raise FileNotFoundError(
        f"no weights in {directory!r}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}")


def iter_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file; safetensors tensors are mmap-backed views."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers / short files
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    else:
        yield from load_bin(path).items()


def load_bin(path: str) -> dict[str, torch.Tensor]:
    """A pytorch_model*.bin state dict, memory-mapped, unpickled with weights_only=True (no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} (loaded with weights_only=True): {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def open_checkpoint(directory: str, stack: contextlib.ExitStack) -> dict:
    """name -> lazy entry over every weight file of `directory`: a safetensors slice (`get_slice`, read only
    when indexed; its files stay open until `stack` closes) or a memory-mapped tensor from a .bin file.
    A name in more than one shard is refused."""
    sources: dict = {}
    for path in weight_files(directory):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                fh = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
                entries = {name: fh.get_slice(name) for name in fh.keys()}
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"cannot read {path}: {exc}") from exc
        else:
            entries = load_bin(path)
        for name, entry in entries.items():
            if name in sources:
                raise CheckpointError(f"tensor {name!r} appears in more than one shard ({path})")
            sources[name] = entry
    return sources


def load_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF-format directory (lazy, mmap-backed where the format allows)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        for name, tensor in iter_tensors(path):
            if name in state:
                raise CheckpointError(f"tensor {name!r} appears in more than one shard ({path})")
            state[name] = tensor
    return state


def shape_of(entry) -> tuple[int, ...]:
    """Shape of a tensor or of a lazy safetensors slice."""
    return tuple(entry.shape) if hasattr(entry, "shape") else tuple(entry.get_shape())


def expected_shapes(config: PersimmonConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of a PersimmonForCausalLM checkpoint for `config` (no lm_head when
    the embeddings are tied). Written out from the config, not read off a model, so it needs no torch module."""
    h, f, v, d = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (v, h), "model.final_layernorm.weight": (h,),
              "model.final_layernorm.bias": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {"input_layernorm": [(h,), (h,)], "post_attention_layernorm": [(h,), (h,)],
                 "self_attn.query_key_value": [(3 * h, h), (3 * h,)], "self_attn.dense": [(h, h), (h,)],
                 "mlp.dense_h_to_4h": [(f, h), (f,)], "mlp.dense_4h_to_h": [(h, f), (h,)]}
        if config.qk_layernorm:
            layer.update({"self_attn.q_layernorm": [(d,), (d,)], "self_attn.k_layernorm": [(d,), (d,)]})
        for module, (weight, bias) in layer.items():
            shapes[f"{p}{module}.weight"], shapes[f"{p}{module}.bias"] = weight, bias
    return shapes


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict, ignore: tuple[str, ...] = (),
                  allow_unexpected: bool = False, where: str = "") -> None:
    """Raise CheckpointError naming the missing, unexpected and mis-shaped tensors of `found` (name -> tensor
    or lazy slice) against `expected` (name -> shape): the first few of each kind and how many in all."""
    missing = sorted(k for k in expected if found.get(k) is None)
    unexpected = [] if allow_unexpected else sorted(
        k for k in found if k not in expected and not any(p in k for p in ignore))
    wrong = [f"{k}: checkpoint {shape_of(found[k])}, model {tuple(shape)}" for k, shape in expected.items()
             if found.get(k) is not None and shape_of(found[k]) != tuple(shape)]
    not_float = [k for k in expected if isinstance(found.get(k), torch.Tensor) and not found[k].is_floating_point()]
    problems = [_listing(what, items) for what, items in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong), ("not floating point", not_float))
        if items]
    if problems:
        raise CheckpointError(f"{where + ': ' if where else ''}checkpoint does not match the model: "
                              + " | ".join(problems))


def _listing(what: str, items: list[str], shown: int = 3) -> str:
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    return f"{len(items)} {what} ({'; '.join(items[:shown])}{more})"


def find_non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of tensors holding NaN or Inf (reads every tensor once; opt-in because it touches all pages)."""
    return [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def read_generation_config(directory: str) -> dict:
    """generation_config.json of an HF-format directory ({} when it has none)."""
    path = os.path.join(directory, GENERATION_CONFIG)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


@contextlib.contextmanager
def _staging(parent: str, prefix: str) -> Iterator[str]:
    """A temporary directory inside `parent`, removed on the way out whatever happened."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(directory: str) -> Iterator[str]:
    """Yield a staging directory inside `directory`; if the block succeeds, move its files into `directory`
    (replacing same-named files and weights of an earlier save in the other layout), leaving other files
    (a tokenizer, say) alone. A failure leaves `directory` as it was."""
    os.makedirs(directory, exist_ok=True)
    with _staging(directory, ".save-") as tmp:
        yield tmp
        for stale in os.listdir(directory):
            if stale.startswith("model") and stale.endswith((".safetensors", ".safetensors.index.json")):
                os.remove(os.path.join(directory, stale))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))


@contextlib.contextmanager
def atomic_directory(final: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside `final`; rename it to `final` only if the block succeeds."""
    final = os.path.abspath(final)
    if os.path.exists(final) and not overwrite and os.listdir(final):
        raise FileExistsError(f"output directory {final!r} exists and is not empty")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    with _staging(parent, f".{os.path.basename(final)}.partial-") as tmp:
        yield tmp
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)


def save_state_dict(state: dict[str, torch.Tensor], directory: str,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
                    dtype: torch.dtype | None = None, on_shard=None) -> list[str]:
    """Write `state` as model.safetensors, or as shards plus model.safetensors.index.json when larger
    than `max_shard_bytes`. Tensors are converted to `dtype` (if given) one shard at a time, so at most one
    converted shard is in memory; `on_shard(tensors_written, bytes_written)` reports progress after each
    shard. Tensors sharing storage are written as independent copies. Returns the files written."""
    from safetensors.torch import save_file

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * (dtype.itemsize if dtype is not None else t.element_size())

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        if shards[-1] and size + nbytes(tensor) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes(tensor)
    meta = {"format": "pt", **(metadata or {})}
    os.makedirs(directory, exist_ok=True)
    if len(shards) == 1:
        names = [SAFE_WEIGHTS]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written_tensors = written_bytes = 0
    for name, shard in zip(names, shards):
        save_file({k: v.detach().to(dtype=dtype or v.dtype, device="cpu").contiguous() for k, v in shard.items()},
                  os.path.join(directory, name), metadata=meta)
        written_tensors += len(shard)
        written_bytes += sum(nbytes(t) for t in shard.values())
        if on_shard is not None:
            on_shard(written_tensors, written_bytes)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes(t) for t in state.values())},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        with open(os.path.join(directory, SAFE_INDEX), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2, sort_keys=True)
    return [os.path.join(directory, n) for n in names]
