"""`persimmon-rt chat`: multi-turn chat in the format the chat checkpoint was trained on.

Each turn is rendered as `human: {prompt}\\n\\nadept: {reply}\\n\\n`; the reply stops at end-of-text or
when the model starts the next `human:` turn. `/reset` clears the history, `/quit` (or Ctrl-D) leaves,
Ctrl-C stops the reply being written without ending the session.
"""

from __future__ import annotations

import argparse
import sys

from ._common import add_model_arguments, add_sampling_arguments, load_engine, sampling_kwargs

TURN_END = "\n\nhuman:"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, temperature=0.7)


def run(args: argparse.Namespace) -> int:
    engine = load_engine(args)
    tokenizer = engine.tokenizer
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    print("persimmon-rt chat: /reset clears the history, /quit leaves, Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("human: " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            return 0
        if line == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(history, tokenize=True)
        budget = engine.max_seq_len - args.max_new_tokens
        while len(ids) > budget and len(history) > 1:    # forget the oldest turns first
            history.pop(0)
            ids = tokenizer.apply_chat_template(history, tokenize=True)
        if len(ids) > budget:
            print(f"persimmon-rt: that message alone exceeds the context ({engine.max_seq_len} tokens)",
                  file=sys.stderr)
            history.pop()
            continue
        sys.stdout.write("adept:")
        sys.stdout.flush()
        reply = ""
        kwargs = sampling_kwargs(args)
        kwargs["stop_strings"] = list(kwargs["stop_strings"]) + [TURN_END]
        try:
            for event in engine.generate([ids], stream=True, **kwargs):
                reply += event.text
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply.strip()})
