"""`persimmon-rt generate`: continue a prompt, streaming tokens to stdout as they are produced."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from ._common import (add_model_arguments, add_sampling_arguments, add_tp_argument, init_rank, launch_ranks,
                      load_engine, model_and_sampling_argv, read_prompt, sampling_kwargs, tp_requested)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read standard input)")
    add_model_arguments(parser)
    add_sampling_arguments(parser, temperature=0.8)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, token ids, finish reason, timings) instead of streaming")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="an image for the prompt (multimodal models: Fuyu); needs the fuyu extra")
    add_tp_argument(parser, "prints")


def run(args: argparse.Namespace) -> int:
    from ..tp_launch import in_launched_run

    prompt = read_prompt(args.prompt)
    if not prompt:
        raise ValueError("empty prompt: pass it as an argument or on standard input")
    if not in_launched_run():
        if tp_requested(args):      # re-run this command in N processes, the prompt as an argument
            if args.image is not None:
                raise ValueError("--image does not support --tp yet")
            flags = ["--json"] * args.json + ["--debug"] * bool(getattr(args, "debug", False))
            return launch_ranks(args, ["generate", *model_and_sampling_argv(args), *flags, "--", prompt])
        return _generate(args, prompt, load_engine(args), sys.stdout)
    tp = init_rank(args)
    engine = load_engine(args, tp=tp)
    with contextlib.nullcontext(sys.stdout) if tp.rank == 0 else open(os.devnull, "w") as out:
        code = _generate(args, prompt, engine, out)           # every rank generates; rank 0 prints
    # Only after success: shutdown's barrier would wait forever for a rank that failed. On an error the
    # process exits with the group still up and the launcher (or torchrun) stops the other ranks.
    tp.shutdown()
    return code


def _generate(args: argparse.Namespace, prompt: str, engine, stdout) -> int:
    image = getattr(args, "image", None)
    ids = engine.tokenizer.encode(prompt)
    # With an image the front end lays out the tokens itself (image rows, then the prompt).
    prompts, extra = ([prompt], {"images": [image]}) if image is not None else ([ids], {})
    start = time.perf_counter()
    first_token_at = None
    token_ids, reason, text = [], "length", ""
    for event in engine.generate(prompts, stream=True, **extra, **sampling_kwargs(args)):
        first_token_at = first_token_at or time.perf_counter()
        token_ids.append(event.token_id)
        text += event.text
        reason = event.finished or reason
        if not args.json:
            stdout.write(event.text)
            stdout.flush()
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"prompt": prompt, "text": text, "token_ids": token_ids, "finish_reason": reason,
                          "prompt_tokens": len(ids), "seconds": round(elapsed, 4),
                          "time_to_first_token": round((first_token_at or start) - start, 4)}), file=stdout)
    else:
        stdout.write("\n")
    return 0
