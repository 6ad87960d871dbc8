"""`persimmon-rt serve`: an OpenAI-compatible HTTP server with continuous batching (the `serve` extra).

    from persimmon_rt.serving import create_app, make_server
    make_server(create_app(engine, model_name="persimmon-8b-chat"), port=8000).run()

app.py holds the routes, protocol.py checks request bodies, openai_format.py writes responses, worker.py
is the scheduler thread that owns the engine, metrics.py the Prometheus metrics, server.py runs uvicorn.
"""

from .app import create_app, default_model_name

__all__ = ["create_app", "default_model_name", "make_server"]


def make_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    from .server import make_server as make

    return make(app, host, port, log_level)
