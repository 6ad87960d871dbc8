"""`persimmon-rt serve`: an OpenAI-compatible HTTP server with continuous batching (the `serve` extra).

    from persimmon_rt.serving import create_app, make_server
    make_server(create_app(engine, model_name="persimmon-8b-chat"), port=8000).run()

app.py holds the routes, protocol.py checks request bodies, prompts.py turns them into the engine's requests
(images included), openai_format.py writes responses, worker.py is the scheduler thread that owns the
engine, metrics.py the Prometheus metrics, server.py runs uvicorn, replicated.py keeps the other ranks'
schedulers in step under tensor parallelism.
Only app.py and server.py need the HTTP stack, so worker.py can be used (benchmarks/bench_serve.py) where
it is not installed.
"""

__all__ = ["create_app", "default_model_name", "make_server"]


def __getattr__(name: str):
    if name in ("create_app", "default_model_name"):
        from . import app

        return getattr(app, name)
    if name == "make_server":
        from .server import make_server

        return make_server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
