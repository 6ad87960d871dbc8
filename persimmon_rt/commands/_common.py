"""Arguments and engine construction shared by the text-generating subcommands."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..dtypes import DTYPES, default_dtype, parse_dtype


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="HF-format model directory (default: the embedded demo model)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights and activations (default: float16 on a GPU, float32 on the CPU)")
    parser.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                        help="KV cache length (default: the model's max_position_embeddings)")
    add_quantize_argument(parser)


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="quantize the weights while loading: int8 (weight-only, per output channel; "
                             "default: off; a quantized checkpoint loads quantized without it)")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=temperature, metavar="T", help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest tokens; 0 = off")
    parser.add_argument("--top-p", type=float, default=0.95, metavar="P",
                        help="sample from the likeliest tokens whose probabilities sum to P; 1 = off")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one each run)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when the reply contains TEXT (repeatable)")


def model_dir(args: argparse.Namespace) -> str:
    if args.model:
        return check_model_dir(args.model)
    from ..demo import demo_model_path

    return demo_model_path()


def check_model_dir(path: str) -> str:
    """`path` if it is a directory; a file or a missing path gets a message that says what --model expects."""
    if os.path.isfile(path):
        hint = f" (--model {os.path.dirname(path) or '.'})" if os.path.basename(path) == "config.json" else ""
        raise ValueError(f"--model {path} is a file; expected the model directory that holds config.json{hint}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path}: no such directory (expected a model directory holding "
                                "config.json and the weights)")
    return path


def read_prompt(prompt: str | None) -> str:
    """The prompt argument, or all of standard input (announced on a terminal, where it waits for Ctrl-D)."""
    if prompt is not None:
        return as_utf8(prompt, "the prompt argument")
    if sys.stdin.isatty():
        print("persimmon-rt: reading the prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
    stream = getattr(sys.stdin, "buffer", sys.stdin)    # bytes, so the decoding below is ours
    return as_utf8(stream.read(), "standard input")


def as_utf8(text: str | bytes, source: str) -> str:
    """`text` as a str, or a ValueError naming the first byte that is not UTF-8. Python hands over invalid
    bytes in argv (and in stdin under a C locale) as lone surrogates, which the tokenizer cannot encode."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "re-encode it as UTF-8 first") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_engine(args: argparse.Namespace, max_batch_size: int = 1, tp=None):
    """The engine for these arguments; with `tp` (tensor parallelism) this rank's share of it, on tp.device."""
    from ..engine import Engine

    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch build sees no CUDA GPU")
    if tp is not None:
        device = tp.device                    # one GPU per rank (cuda:LOCAL_RANK), or the CPU under gloo
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    engine = Engine.from_pretrained(model_dir(args), dtype=dtype, device=device, max_batch_size=max_batch_size,
                                    max_seq_len=args.max_seq_len, tp=tp, quantize=getattr(args, "quantize", None))
    if engine.tokenizer is None:
        raise ValueError(f"{model_dir(args)} has no tokenizer.model; text generation needs one")
    return engine


# ------------------------------------------------------------------------------------- tensor parallelism
def add_tp_argument(parser: argparse.ArgumentParser, what_rank_0_does: str) -> None:
    parser.add_argument("--tp", type=int, default=None, metavar="N",
                        help=f"tensor parallelism over N GPUs (one process per GPU; rank 0 {what_rank_0_does})")


def tp_requested(args: argparse.Namespace) -> bool:
    """Whether --tp asks for more than one rank (checked: --tp must be >= 1)."""
    if args.tp is not None and args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    return args.tp is not None and args.tp > 1


def launch_ranks(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run the command as args.tp ranks (tp_launch.launch) once the model is known to split that way."""
    from ..config import PersimmonConfig
    from ..tensor_parallel import check_tp_config
    from ..tp_launch import launch

    check_tp_config(PersimmonConfig.from_pretrained(model_dir(args)), args.tp)
    return launch(args.tp, argv)


def init_rank(args: argparse.Namespace):
    """This process's TensorParallel in a launched run (gloo for --device cpu, NCCL on its GPU otherwise)."""
    from ..tensor_parallel import TensorParallel

    tp = TensorParallel.init_from_env("cpu" if args.device == "cpu" else None)
    if args.tp is not None and args.tp != tp.world_size:
        raise ValueError(f"--tp {args.tp} but the run has {tp.world_size} processes")
    return tp


def options_argv(args: argparse.Namespace, names) -> list[str]:
    """The options `names` (attribute names) that reproduce `args`, those set (for re-launching a command in
    other processes). Values go as --opt=value so ones starting with '-' survive."""
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names
            if getattr(args, name, None) is not None]


def model_argv(args: argparse.Namespace) -> list[str]:
    """The options of add_model_arguments that reproduce `args`."""
    return options_argv(args, ("model", "device", "dtype", "max_seq_len", "quantize"))


def model_and_sampling_argv(args: argparse.Namespace) -> list[str]:
    """model_argv, and the options of add_sampling_arguments that reproduce `args`."""
    argv = model_argv(args)
    argv += [f"--max-new-tokens={args.max_new_tokens}", f"--temperature={args.temperature!r}",
             f"--top-k={args.top_k}", f"--top-p={args.top_p!r}"]
    if args.seed is not None:
        argv.append(f"--seed={args.seed}")
    return argv + [f"--stop={s}" for s in args.stop]


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop_strings=args.stop)
