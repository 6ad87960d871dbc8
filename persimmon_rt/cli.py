"""The ``persimmon-rt`` command (also ``python -m persimmon_rt``): a small dispatcher over subcommands.

A subcommand lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``
(and usually a standalone ``main(argv)``); register it in COMMANDS. Errors print one line
``persimmon-rt: error: ...`` (exit 2 for usage errors, 1 otherwise); ``--debug`` shows the traceback. A reader
that closes the pipe early (``| head``) ends the command quietly with 141, the status a shell reports for a
tool stopped by SIGPIPE.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from importlib import import_module

from . import __version__

PROG = "persimmon-rt"
COMMANDS = {
    "generate": ("persimmon_rt.commands.generate", "continue a prompt, streaming the text"),
    "chat": ("persimmon_rt.commands.chat", "interactive multi-turn chat (human: ...\\n\\nadept: format)"),
    "convert": ("persimmon_rt.convert", "convert an original adept checkpoint to an HF-format directory"),
    "quantize": ("persimmon_rt.quantize_checkpoint", "write a weight-only int8 copy of an HF-format directory"),
    "bench": ("persimmon_rt.commands.bench", "the generation benchmark, as a table (optionally a PNG)"),
    "serve": ("persimmon_rt.commands.serve", "an OpenAI-compatible HTTP server with continuous batching"),
    "info": ("persimmon_rt.commands.info", "the installed build, the GPU, and a model's size and memory needs"),
}


EXIT_BROKEN_PIPE = 128 + 13     # 128 + SIGPIPE


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, unless the help already states it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS or default in ([], "")):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Fast, faithful inference for the Persimmon decoder family.",
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        import_module(module).add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def _warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _warning
        try:
            return import_module(args._module).run(args) or 0
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted{_rank_label()}", file=sys.stderr)
            return 130
        except BrokenPipeError:
            _discard_stdout()
            return EXIT_BROKEN_PIPE
        except Exception as exc:
            if args.debug:
                raise
            message = " ".join(str(exc).split("\n")) or type(exc).__name__
            if not isinstance(exc, (OSError, ValueError)):  # CheckpointError and ConfigError are ValueErrors
                message = f"{type(exc).__name__}: {message}"
            print(f"{PROG}: error{_rank_label()}: {message}", file=sys.stderr)
            return 1


def _rank_label() -> str:
    """" (rank R of N)" in a process of a tensor-parallel run, so the failing rank is named."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit does not raise again on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):    # stdout replaced by an object without a file descriptor
        pass
