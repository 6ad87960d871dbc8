"""`persimmon-rt serve`: an OpenAI-compatible HTTP server with continuous batching (persimmon_rt.serving).

Needs the `serve` extra (`pip install -e ".[serve]"`); the demo model by default, so it runs on any machine.
"""

from __future__ import annotations

import argparse

from ._common import add_model_arguments, load_engine, model_dir


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
    parser.add_argument("--tp", type=int, default=None, metavar="N", help="tensor parallelism (serve: 1 only)")


def _check(args: argparse.Namespace) -> None:
    if args.tp is not None and args.tp != 1:
        raise ValueError(f"--tp {args.tp}: serve runs on one device for now (tensor-parallel serving would need "
                         "one process per GPU under torchrun)")
    if args.max_batch_size < 1 or args.max_queue < 1 or args.prefill_budget < 0:
        raise ValueError("--max-batch-size and --max-queue must be >= 1, --prefill-budget >= 0")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"serve needs the serve extra ({exc.name} is missing): pip install -e '.[serve]'") from None


def run(args: argparse.Namespace) -> int:
    _check(args)
    from ..serving import create_app, default_model_name, make_server

    engine = load_engine(args, max_batch_size=args.max_batch_size)
    app = create_app(engine, args.served_model_name or default_model_name(model_dir(args)), args.max_queue,
                     prefill_budget=args.prefill_budget or None, drain_timeout=args.shutdown_timeout)
    make_server(app, args.host, args.port, args.log_level).run()
    return 0
