"""`persimmon-rt generate`: continue a prompt, streaming tokens to stdout as they are produced."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ._common import add_model_arguments, add_sampling_arguments, load_engine, sampling_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read standard input)")
    add_model_arguments(parser)
    add_sampling_arguments(parser, temperature=0.8)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, token ids, finish reason, timings) instead of streaming")


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ValueError("empty prompt: pass it as an argument or on standard input")
    engine = load_engine(args)
    ids = engine.tokenizer.encode(prompt)
    start = time.perf_counter()
    first_token_at = None
    pieces, token_ids, reason = [], [], "length"
    for event in engine.generate([ids], stream=True, **sampling_kwargs(args)):
        first_token_at = first_token_at or time.perf_counter()
        token_ids.append(event.token_id)
        pieces.append(event.text)
        reason = event.finished or reason
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    text = engine._final_text(token_ids, args.stop)
    if args.json:
        print(json.dumps({"prompt": prompt, "text": text, "token_ids": token_ids, "finish_reason": reason,
                          "prompt_tokens": len(ids), "seconds": round(elapsed, 4),
                          "time_to_first_token": round((first_token_at or start) - start, 4)}))
    else:
        sys.stdout.write("\n")
    return 0
