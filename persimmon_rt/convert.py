"""Convert an original Persimmon release (adept-inference / Megatron ``model_optim_rng.pt``) to an HF-format
directory: safetensors weights, config.json, generation_config.json, and the tokenizer (tokenizer.model with
tokenizer_config.json and tokenizer.json, which transformers' AutoTokenizer reads).

The checkpoint is read with `safe_unpickle` (nothing in it is executed and the adept-inference code need
not be installed); the architecture comes from the checkpoint's own ``args`` namespace, and every tensor is
checked against the shapes that config implies. Keys are renamed the way transformers' converter does
(flatten with '.', then ``self_attention``→``self_attn``, ``language_model.encoder``→``model``,
``word_embeddings_for_head``→``lm_head``, ``language_model.embedding.word_embeddings``→``model.embed_tokens``;
``rotary_emb.inv_freq`` buffers are dropped). Output is written to a temporary directory renamed into place,
so an interrupted conversion leaves nothing behind.

Command line: ``python -m persimmon_rt convert --adept PATH --out DIR [--dtype ...] [--overwrite]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Mapping

import torch

from .config import ConfigError, PersimmonConfig
from .dtypes import DTYPES, dtype_name, parse_dtype
from .quantization import check_scheme
from .quantize_checkpoint import mark_quantized, quantize_state_dict
from .safe_unpickle import Placeholder, load as safe_load
from .tokenizer import PersimmonTokenizer
from .weights import (DEFAULT_SHARD_BYTES, CheckpointError, atomic_directory, check_tensors, expected_shapes,
                      save_state_dict)

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_NAMES = ("model_optim_rng.pt", "model_rng.pt")
VOCAB = "adept_vocab.model"
EOD_PIECE = "|ENDOFTEXT|"
RENAMES = (("self_attention", "self_attn"), ("language_model.encoder", "model"),
           ("word_embeddings_for_head", "lm_head"), ("language_model.embedding.word_embeddings", "model.embed_tokens"))
QK_SHARED_MODES = ("weights_per_layer", "weights_per_tensor_parallel_rank_and_layer")


# ------------------------------------------------------------------------------------------------ locating
def locate_checkpoint(path: str | os.PathLike) -> tuple[str, str | None]:
    """(model_optim_rng.pt, adept_vocab.model or None) for a release directory or a .pt file."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        checkpoint, search = path, [os.path.dirname(path)]
        for _ in range(3):
            search.append(os.path.dirname(search[-1]))
    elif os.path.isdir(path):
        checkpoint, search = _checkpoint_in(path), [path, os.path.dirname(path)]
    else:
        raise FileNotFoundError(f"adept checkpoint {path!r} does not exist")
    _check_single_rank(os.path.dirname(checkpoint))
    vocab = next((os.path.join(d, VOCAB) for d in search if os.path.isfile(os.path.join(d, VOCAB))), None)
    return checkpoint, vocab


def _checkpoint_in(directory: str) -> str:
    tracker = os.path.join(directory, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as fh:
            text = fh.read().strip()
        if text == "release":
            iteration_dir = "release"
        elif text.isdigit():
            iteration_dir = f"iter_{int(text):07d}"
        else:
            raise CheckpointError(f"{tracker} holds {text!r}, expected an iteration number or 'release'")
        candidates = [os.path.join(directory, iteration_dir)]
    else:
        candidates = [directory]
    for base in candidates:
        _check_single_rank(os.path.join(base, "mp_rank_00"))
        for sub in ("mp_rank_00", ""):
            for name in CHECKPOINT_NAMES:
                if os.path.isfile(os.path.join(base, sub, name)):
                    return os.path.join(base, sub, name)
    raise FileNotFoundError(
        f"no adept checkpoint in {directory!r}: expected {TRACKER} pointing at "
        f"iter_XXXXXXX/mp_rank_00/{CHECKPOINT_NAMES[0]}, or that file itself")


def _check_single_rank(rank_dir: str) -> None:
    parent = os.path.dirname(rank_dir)
    if not os.path.basename(rank_dir).startswith("mp_rank_") or not os.path.isdir(parent):
        return
    ranks = sorted(n for n in os.listdir(parent) if n.startswith("mp_rank_"))
    if ranks and ranks != ["mp_rank_00"]:
        raise CheckpointError(
            f"{parent} holds a tensor/pipeline-parallel checkpoint ({', '.join(ranks)}); only single-rank "
            "(TP=1, PP=1) releases are supported: merge the shards into one with Megatron's checkpoint tools first")


# --------------------------------------------------------------------------------------------------- config
def _fields(args) -> dict:
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, Placeholder) and isinstance(args.state, dict):
        return args.state
    raise CheckpointError(f"checkpoint 'args' is a {type(args).__name__}, expected an argparse.Namespace")


def _value(v):
    """Unwrap an Enum the loader could not import (a Placeholder built from a single value)."""
    return v.args[0] if isinstance(v, Placeholder) and len(v.args) == 1 else v


def config_from_args(args) -> PersimmonConfig:
    """PersimmonConfig from a checkpoint's ``args`` namespace (names the field that is missing or invalid)."""
    a = _fields(args)

    def get(name, kind, optional=False, default=None):
        value = _value(a.get(name))
        if value is None:
            if optional:
                return default
            raise CheckpointError(f"checkpoint args lack the field {name!r}, needed to build the config")
        if kind is bool:
            ok, want = isinstance(value, bool), "true or false"
        else:
            number = (int, float) if kind is float else int
            ok = isinstance(value, number) and not isinstance(value, bool) and value > 0
            want = f"a positive {kind.__name__}"
        if not ok:
            raise CheckpointError(f"checkpoint args field {name!r} = {value!r} is invalid (expected {want})")
        return value

    layers, hidden, heads = get("num_layers", int), get("hidden_size", int), get("num_attention_heads", int)
    vocab = get("padded_vocab_size", int)
    ffn = get("ffn_hidden_size", int, optional=True, default=4 * hidden)
    kv_channels = get("kv_channels", int, optional=True)
    if hidden % heads or (kv_channels is not None and kv_channels * heads != hidden):
        raise CheckpointError(f"checkpoint args: kv_channels={kv_channels} with num_attention_heads={heads} and "
                              f"hidden_size={hidden} is unsupported (head_dim must equal hidden_size / heads)")
    max_positions = get("max_position_embeddings", int, optional=True) or get("seq_length", int, optional=True)
    if max_positions is None:
        raise CheckpointError("checkpoint args lack both 'max_position_embeddings' and 'seq_length'")
    rotary_pct, rope_base = get("rotary_pct", float), get("rotary_emb_base", float)
    eps = get("layernorm_epsilon", float)
    pos_emb = _value(a.get("pos_emb", "rotary"))
    if pos_emb not in (None, "rotary"):
        raise CheckpointError(f"checkpoint args: pos_emb={pos_emb!r} is unsupported (Persimmon uses 'rotary')")
    if not get("sq_relu", bool):
        raise CheckpointError("checkpoint args: sq_relu is false; only squared-ReLU MLPs (Persimmon) are supported")
    if a.get("apply_residual_connection_post_layernorm"):
        raise CheckpointError("checkpoint args: apply_residual_connection_post_layernorm=True is unsupported")
    untie = get("untie_embeddings", bool)
    qk = _value(a.get("qk_layernorm"))
    if qk is None:
        raise CheckpointError("checkpoint args lack the field 'qk_layernorm', needed to build the config")
    if qk == "weights_per_attention_head_and_layer":
        raise CheckpointError("checkpoint args: qk_layernorm='weights_per_attention_head_and_layer' (separate "
                              "weights per head) is unsupported; Persimmon shares one [head_dim] QK-LayerNorm")
    if isinstance(qk, bool) or qk in QK_SHARED_MODES or qk == "none":
        qk_layernorm = qk if isinstance(qk, bool) else qk != "none"
    else:
        raise CheckpointError(f"checkpoint args: qk_layernorm={qk!r} is invalid (expected one of 'none', "
                              f"{', '.join(repr(m) for m in QK_SHARED_MODES)}, or a bool)")
    dtype = "bfloat16" if a.get("bf16") else "float16" if a.get("fp16") else "float32"
    try:
        return PersimmonConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=max_positions, layer_norm_eps=float(eps),
            rope_theta=float(rope_base), partial_rotary_factor=float(rotary_pct), qk_layernorm=qk_layernorm,
            tie_word_embeddings=not untie, torch_dtype=dtype, extra={"architectures": ["PersimmonForCausalLM"]})
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint args describe an invalid model: {exc}") from exc


# ---------------------------------------------------------------------------------------------- state dict
def _flatten(tree: Mapping, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def hf_name(key: str) -> str:
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


def renamed_state_dict(model: Mapping) -> dict[str, torch.Tensor]:
    """Flatten the nested ``model`` dict and rename to HF keys (inv_freq buffers dropped)."""
    state = {}
    for key, value in _flatten(model):
        if "rotary_emb.inv_freq" in key or value is None or key.endswith("_extra_state"):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint model entry {key!r} is a {type(value).__name__}, not a tensor")
        state[hf_name(key)] = value
    return state


def _check_tensor_parallel(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    for name in ("model.layers.0.self_attn.query_key_value.weight", "model.layers.0.mlp.dense_h_to_4h.weight",
                 "model.embed_tokens.weight"):
        if name in state and name in expected and state[name].dim() == 2:
            rows, want = state[name].shape[0], expected[name][0]
            if 0 < rows < want and want % rows == 0:
                raise CheckpointError(
                    f"this looks like one tensor-parallel shard (TP={want // rows}): {name} has shape "
                    f"{tuple(state[name].shape)}, a TP=1 checkpoint has {expected[name]}; merge the shards first")


def _eod_token(vocab: str, vocab_size: int) -> int | None:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=vocab)
    except Exception as exc:
        raise CheckpointError(f"cannot read the sentencepiece model {vocab}: {exc}") from exc
    if sp.get_piece_size() > vocab_size:
        raise CheckpointError(f"{vocab} has {sp.get_piece_size()} pieces, more than the model's vocab_size "
                              f"{vocab_size}: tokenizer and checkpoint do not belong together")
    token = sp.piece_to_id(EOD_PIECE)
    return token if sp.id_to_piece(token) == EOD_PIECE else None


def check_output_dir(out_dir: str, overwrite: bool, switch: str = "overwrite=True") -> None:
    """Refuse a file, or a non-empty directory unless `overwrite`; `switch` is how the caller turns it on."""
    if os.path.isfile(out_dir):
        raise FileExistsError(f"output {out_dir!r} is a file, not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"output directory {out_dir!r} exists and is not empty (pass {switch} to replace it)")


def _human(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class _Progress:
    def __init__(self, enabled: bool, total: int, nbytes: int):
        self.live = enabled and sys.stderr.isatty()
        self.total, self.nbytes, self.start = total, nbytes, time.monotonic()

    def update(self, done: int, nbytes: int, what: str = "converting") -> None:
        if self.live:
            print(f"\r{what}: {done}/{self.total} tensors, {_human(nbytes)} / {_human(self.nbytes)}",
                  end="", file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        if self.live:
            print(f"\r{text}\033[K", end="", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- convert
def convert_adept_checkpoint(adept_path: str | os.PathLike, out_dir: str | os.PathLike, dtype=None,
                             max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                             progress: bool = True, quantize: str | None = None) -> PersimmonConfig:
    """Convert an adept release (directory or ``model_optim_rng.pt``) into an HF-format directory.

    dtype: None keeps the checkpoint's dtype; torch.float16 / bfloat16 / float32 (or their names) convert.
    quantize: "int8" writes weight-only int8 weights with their scales (quantization.py); dtype is then
    the activation dtype recorded in config.json.
    Returns the config written to ``out_dir/config.json``.
    """
    dtype = None if dtype is None else parse_dtype(dtype)
    check_scheme(quantize)
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_output_dir(out_dir, overwrite)
    checkpoint_path, vocab = locate_checkpoint(adept_path)
    start = time.monotonic()
    config, state = _read_release(checkpoint_path)
    source_dtypes = {t.dtype for t in state.values()}
    if dtype is None:
        only = next(iter(source_dtypes)) if len(source_dtypes) == 1 else None
        dtype = only if only in DTYPES.values() else config.dtype
    config.torch_dtype = dtype_name(dtype)
    if quantize is not None:
        state = quantize_state_dict(state, quantize, dtype)
        mark_quantized(config, quantize, dtype)
    _set_special_tokens(config, vocab, checkpoint_path)
    total = sum(t.nbytes if quantize is not None else t.numel() * dtype.itemsize for t in state.values())
    bar = _Progress(progress, len(state), total)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        # Converted one shard at a time: a dtype change never holds a second copy of the model in memory.
        files = save_state_dict(state, tmp, max_shard_bytes=max_shard_bytes, dtype=None if quantize else dtype,
                                on_shard=lambda n, nbytes: bar.update(n, nbytes, "writing"))
        _write_metadata(tmp, config, vocab)
    if progress:
        bar.line("")
        params = sum(t.numel() for t in state.values())
        form = f"{config.torch_dtype}" + (f", {quantize} weights" if quantize else "")
        print(f"converted {len(state)} tensors, {params / 1e9:.2f} B parameters ({_human(total)} on disk, "
              f"{form}, {len(files)} file(s)) "
              f"from {checkpoint_path} to {out_dir} in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return config


def _read_release(checkpoint_path: str) -> tuple[PersimmonConfig, dict[str, torch.Tensor]]:
    """The config (from the checkpoint's own args) and the HF-named, checked state of a release."""
    checkpoint = safe_load(checkpoint_path)
    if not isinstance(checkpoint, Mapping) or "args" not in checkpoint or "model" not in checkpoint:
        keys = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        hint = " (virtual-pipeline checkpoints are unsupported)" if isinstance(keys, list) and "model0" in keys else ""
        raise CheckpointError(f"{checkpoint_path} is not an adept/Megatron checkpoint: expected 'args' and "
                              f"'model' entries, found {keys}{hint}")
    config = config_from_args(checkpoint["args"])
    if not isinstance(checkpoint["model"], Mapping):
        raise CheckpointError(f"{checkpoint_path}: 'model' is a {type(checkpoint['model']).__name__}, not a dict")
    state = renamed_state_dict(checkpoint["model"])
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = expected_shapes(config)
    _check_tensor_parallel(state, expected)
    try:
        check_tensors(expected, state)
    except CheckpointError as exc:
        raise CheckpointError(f"{checkpoint_path}: {exc}") from None
    return config, {name: state[name] for name in expected}  # canonical order: embeddings, layers, head


def _set_special_tokens(config: PersimmonConfig, vocab: str | None, checkpoint_path: str) -> None:
    """BOS and EOS are the vocabulary's end-of-text piece, as the original release uses them."""
    if vocab is None:
        warnings.warn(f"no {VOCAB} found next to {checkpoint_path} (or up to 3 parents); converting without a "
                      "tokenizer (copy it to tokenizer.model in the output yourself)", stacklevel=3)
        return
    eod = _eod_token(vocab, config.vocab_size)
    if eod is not None:
        config.bos_token_id = config.eos_token_id = eod


def _write_metadata(directory: str, config: PersimmonConfig, vocab: str | None) -> None:
    """config.json, generation_config.json and the tokenizer files beside the weights."""
    config.save_pretrained(directory)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.eos_token_id}
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as fh:
        json.dump(generation, fh, indent=2, sort_keys=True)
        fh.write("\n")
    if vocab is not None:
        shutil.copyfile(vocab, os.path.join(directory, "tokenizer.model"))
        # tokenizer_config.json and tokenizer.json too: transformers' AutoTokenizer then loads the directory
        # without protobuf, with this tokenizer's special tokens (|ENDOFTEXT|, not <s> / </s>)
        PersimmonTokenizer(os.path.join(directory, "tokenizer.model")).save_pretrained(directory)


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adept", required=True, metavar="PATH",
                        help=f"release directory (with {TRACKER}) or a {CHECKPOINT_NAMES[0]} file")
    parser.add_argument("--out", required=True, metavar="DIR", help="output HF-format directory")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="output dtype (default: keep the checkpoint's)")
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="write quantized weights: int8 (weight-only, per output channel; default: off)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress or summary output")


def run(args: argparse.Namespace) -> int:
    check_scheme(args.quantize)
    check_output_dir(os.path.abspath(args.out), args.overwrite, "--overwrite")
    convert_adept_checkpoint(args.adept, args.out, dtype=args.dtype, overwrite=args.overwrite,
                             progress=not args.quiet, quantize=args.quantize)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``persimmon-rt convert`` on its own: parse `argv` and convert (errors propagate)."""
    parser = argparse.ArgumentParser(prog="persimmon-rt convert",
                                     description="Convert an original adept Persimmon checkpoint to HF format.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
