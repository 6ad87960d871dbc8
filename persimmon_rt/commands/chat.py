"""`persimmon-rt chat`: multi-turn chat in the format the chat checkpoint was trained on.

Each turn is rendered as `human: {prompt}\\n\\nadept: {reply}\\n\\n`; the reply stops at end-of-text or
when the model starts the next `human:` turn. `/reset` clears the history, `/quit` (or Ctrl-D) leaves,
`/help` lists the commands, Ctrl-C stops the reply being written without ending the session. Any other line
starting with `/` is taken for a mistyped command and not sent; `//` sends a message that starts with `/`.

With `--tp N` the command runs as N ranks (tp_launch.py): rank 0 reads, writes and keeps the history, and
sends each turn's token ids to the other ranks (a tensor_parallel.ControlChannel), which generate along.
There Ctrl-C stops the reply being written while the ranks finish its tokens together (they cannot leave a
generation one by one), so the session goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

from ._common import (add_model_arguments, add_sampling_arguments, add_tp_argument, as_utf8, init_rank,
                      launch_ranks, load_engine, model_and_sampling_argv, sampling_kwargs, tp_requested)

TURN_END = "\n\nhuman:"
COMMANDS = "/reset clears the history, /quit (or Ctrl-D) leaves, /help lists these, Ctrl-C stops a reply"
# Under --tp the other ranks wait for rank 0's next turn for as long as the person at the keyboard takes.
TURN_WAIT_S = 30 * 24 * 3600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, temperature=0.7)
    add_tp_argument(parser, "talks to you")


def run(args: argparse.Namespace) -> int:
    from ..tensor_parallel import ControlChannel
    from ..tp_launch import in_launched_run

    if not in_launched_run():
        if tp_requested(args):
            return launch_ranks(args, ["chat", *model_and_sampling_argv(args)])
        return _chat(args, load_engine(args))
    tp = init_rank(args)
    if tp.rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is rank 0's to act on
    engine = load_engine(args, tp=tp)
    channel = ControlChannel(tp, TURN_WAIT_S)
    if tp.rank == 0:
        # After an error rank 0 just exits: the other ranks may be inside a generation, and the launcher
        # (or torchrun) stops them.
        code = _chat(args, engine, channel)
        channel.send(None)                              # the other ranks leave with rank 0
    else:
        while (ids := channel.recv()) is not None:
            for _ in engine.generate([ids], stream=True, **_turn_kwargs(args)):
                pass
        code = 0
    tp.shutdown()
    return code


def _turn_kwargs(args: argparse.Namespace) -> dict:
    kwargs = sampling_kwargs(args)
    kwargs["stop_strings"] = list(kwargs["stop_strings"]) + [TURN_END]
    return kwargs


class _CtrlC:
    """While active, SIGINT sets `pressed` instead of raising (a rank may not leave a generation alone)."""

    def __init__(self):
        self.pressed = False

    @contextlib.contextmanager
    def active(self):
        def handler(signum, frame):
            self.pressed = True
        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _chat(args: argparse.Namespace, engine, channel=None) -> int:
    """The conversation loop; with `channel` (rank 0 under --tp) each turn's ids go to the other ranks."""
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
        ctrl_c = _CtrlC()
        if channel is not None:
            channel.send(ids)
        try:
            with ctrl_c.active() if channel is not None else contextlib.nullcontext():
                for event in engine.generate([ids], stream=True, **_turn_kwargs(args)):
                    if ctrl_c.pressed:
                        continue                    # the other ranks generate on: finish together, silently
                    reply += event.text
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            ctrl_c.pressed = True
        if ctrl_c.pressed:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply.strip()})
