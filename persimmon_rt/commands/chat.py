"""`persimmon-rt chat`: multi-turn chat in the format the chat checkpoint was trained on.

Each turn is rendered as `human: {prompt}\\n\\nadept: {reply}\\n\\n`; the reply stops at end-of-text or
when the model starts the next `human:` turn. `/reset` clears the history, `/quit` (or Ctrl-D) leaves,
`/help` lists the commands, Ctrl-C stops the reply being written without ending the session. Any other line
starting with `/` is taken for a mistyped command and not sent; `//` sends a message that starts with `/`.
"""

from __future__ import annotations

import argparse
import sys

from ._common import add_model_arguments, add_sampling_arguments, as_utf8, load_engine, sampling_kwargs

TURN_END = "\n\nhuman:"
COMMANDS = "/reset clears the history, /quit (or Ctrl-D) leaves, /help lists these, Ctrl-C stops a reply"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, temperature=0.7)


def run(args: argparse.Namespace) -> int:
    engine = load_engine(args)
    tokenizer = engine.tokenizer
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    print(f"persimmon-rt chat: {COMMANDS}.", file=sys.stderr)
    while True:
        try:
            line = as_utf8(input("human: " if interactive else ""), "that line").strip()
        except EOFError:
            if interactive:
                print()                       # Ctrl-D leaves the cursor after the prompt
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError:            # from input() itself when stdin decodes strictly
            print("persimmon-rt: that line is not valid UTF-8; not sent", file=sys.stderr)
            continue
        except ValueError as exc:             # from as_utf8, when stdin hands bad bytes over as surrogates
            print(f"persimmon-rt: {exc}; not sent", file=sys.stderr)
            continue
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if line == "/quit":
                return 0
            if line == "/reset":
                history.clear()
                print("(history cleared)", file=sys.stderr)
            elif line == "/help":
                print(f"{COMMANDS}; start a message with // to send one that begins with /", file=sys.stderr)
            else:
                print(f"unknown command {line.split()[0]} (not sent): {COMMANDS}; start a message with // to "
                      "send one that begins with /", file=sys.stderr)
            continue
        line = line[1:] if line.startswith("//") else line
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
