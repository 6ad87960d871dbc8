"""`persimmon-rt serve`: an OpenAI-compatible HTTP server with continuous batching (persimmon_rt.serving).

Needs the `serve` extra (`pip install -e ".[serve]"`); the demo model by default, so it runs on any machine.
With `--tp N` the command starts N ranks (tp_launch.py): rank 0 serves HTTP, the others follow its
scheduler (serving/replicated.py).
"""

from __future__ import annotations

import argparse
import os
import signal

import torch

from ._common import (add_model_arguments, add_tp_argument, init_rank, launch_ranks, load_engine, model_argv,
                      model_dir, options_argv, tp_requested)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one)")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                        help="sequences decoded together (rows of the KV cache)")
    parser.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="sequences that may wait for a row; beyond it requests get 429")
    parser.add_argument("--prefill-budget", type=int, default=192, metavar="TOKENS",
                        help="prompt tokens prefilled per step while other rows decode (0: no limit)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model name clients use (default: the model directory's name)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long requests in flight may go on before they are cancelled")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level")
    add_tp_argument(parser, "serves HTTP")


# The options of add_arguments after the model's, passed on to the ranks of a --tp run.
_SERVE_OPTIONS = ("host", "port", "max_batch_size", "max_queue", "prefill_budget", "served_model_name",
                  "shutdown_timeout", "log_level")


def _check(args: argparse.Namespace) -> None:
    if args.max_batch_size < 1 or args.max_queue < 1 or args.prefill_budget < 0:
        raise ValueError("--max-batch-size and --max-queue must be >= 1, --prefill-budget >= 0")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"serve needs the serve extra ({exc.name} is missing): pip install -e '.[serve]'") from None


def run(args: argparse.Namespace) -> int:
    _check(args)
    from ..tp_launch import in_launched_run

    if in_launched_run():
        return _run_rank(args)
    if tp_requested(args):
        return launch_ranks(args, ["serve", *model_argv(args), *options_argv(args, _SERVE_OPTIONS)])
    return _serve(args, load_engine(args, max_batch_size=args.max_batch_size))


def _serve(args: argparse.Namespace, engine, channel=None) -> int:
    """Serve HTTP until SIGTERM; 1 if the engine failed on the way."""
    from ..serving import create_app, default_model_name, make_server

    app = create_app(engine, args.served_model_name or default_model_name(model_dir(args)), args.max_queue,
                     prefill_budget=args.prefill_budget or None, drain_timeout=args.shutdown_timeout,
                     channel=channel)
    server = make_server(app, args.host, args.port, args.log_level)
    worker = app.state.serve.worker
    if channel is not None:             # a failed step ends a tensor-parallel server (serving/worker.py)
        worker.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if worker.error is not None else 0


def _run_rank(args: argparse.Namespace) -> int:
    """One rank of a tensor-parallel server."""
    from ..serving.replicated import Channel, follow
    from ..tensor_parallel import DEFAULT_TIMEOUT_S, TIMEOUT_ENV

    tp = init_rank(args)
    if tp.rank != 0:
        # A stop signal is rank 0's to handle (it drains); this rank ends when rank 0 says so.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    engine = load_engine(args, max_batch_size=args.max_batch_size, tp=tp)
    channel = Channel(tp, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    if tp.rank == 0:
        code = _serve(args, engine, channel)
    else:
        with engine.lock:
            scheduler = engine.scheduler(None, args.prefill_budget or None)
            torch.manual_seed(channel.seed)           # after capture, as on rank 0 (serving/worker.py)
            follow(scheduler, channel)
        code = 0
    if code == 0:       # a failed rank leaves the group up: the launcher stops the others
        tp.shutdown()
    return code
