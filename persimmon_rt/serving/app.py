"""The HTTP application: OpenAI-compatible routes over one scheduler thread (worker.py).

    POST /v1/completions        prompt: a string, strings, token ids, or lists of token ids
    POST /v1/chat/completions   messages rendered as `human: ...\\n\\nadept:` (the chat model's format);
                                a Fuyu model: one user message, its text and at most one base64 image
    GET  /v1/models, /health, /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .metrics import CONTENT_TYPE, Metrics
from .openai_format import Choice, Formatter, usage
from .prompts import build_requests
from .protocol import APIError, bad, parse_chat, parse_completion
from .worker import QueueFull, StepFailed, Stream, Unavailable, Worker


class ServeState:
    """What the routes share: the engine (read-only here), its worker, the metrics."""

    def __init__(self, engine, model_name: str, max_queue: int, rows: int | None, prefill_budget: int | None,
                 drain_timeout: float, channel=None):
        self.engine, self.model_name, self.max_queue = engine, model_name, max_queue
        self.drain_timeout = drain_timeout
        self.metrics = Metrics(rows or engine.max_batch_size)
        self.worker = Worker(engine, self.metrics, max_queue, rows, prefill_budget, channel)
        self.created = int(time.time())

    def drain(self) -> None:
        """Stop admitting; what still runs after drain_timeout seconds is cancelled (SIGTERM)."""
        self.worker.drain(self.drain_timeout)


def create_app(engine, model_name: str | None = None, max_queue: int = 256, rows: int | None = None,
               prefill_budget: int | None = None, drain_timeout: float = 30.0, channel=None) -> Starlette:
    """The server's ASGI app. `engine` needs a tokenizer; its worker thread starts with the app (lifespan)
    and owns the engine until the app shuts down. Under tensor parallelism, on rank 0: `channel`
    (replicated.Channel) to the other ranks, which run `replicated.follow`."""
    if engine.tokenizer is None:
        raise ValueError("serving needs a tokenizer (tokenizer.model in the model directory)")
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    state = ServeState(engine, model_name or "persimmon", max_queue, rows, prefill_budget, drain_timeout, channel)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(state.worker.start)
        yield
        await asyncio.to_thread(state.worker.close)

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.serve = state
    app.add_middleware(CountRequests, metrics=state.metrics, paths={r.path for r in routes})
    return app


def default_model_name(model_dir: str) -> str:
    return os.path.basename(os.path.normpath(model_dir)) or "persimmon"


# ------------------------------------------------------------------------------------------------ errors
async def _api_error(request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return await _api_error(request, APIError(exc.status_code, message, kind, headers=exc.headers))


async def _internal_error(request, exc: Exception) -> Response:
    return await _api_error(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))


class CountRequests:
    """ASGI middleware: counts every HTTP answer by route and the status code sent."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            endpoint = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.http_requests.labels(endpoint, str(status[0])).inc()


# ------------------------------------------------------------------------------------------ small routes
async def models(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "persimmon_rt",
         "max_model_len": state.engine.max_seq_len}]})


async def health(request: Request) -> Response:
    worker = request.app.state.serve.worker
    if worker.healthy:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable" if worker.error is None else f"failed: {worker.error}"},
                        status_code=503)


async def metrics(request: Request) -> Response:
    return Response(request.app.state.serve.metrics.render(), media_type=CONTENT_TYPE)


# ----------------------------------------------------------------------------------------- completions
async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


async def _complete(request: Request, chat: bool) -> Response:
    arrived = time.perf_counter()
    state: ServeState = request.app.state.serve
    body = await _read_json(request)
    parsed = parse_chat(body) if chat else parse_completion(body)
    if parsed.model != state.model_name:
        raise APIError(404, f"the model '{parsed.model}' does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")
    requests = await asyncio.to_thread(build_requests, state.engine, parsed, state.max_queue, state.model_name)
    stream = Stream(requests, asyncio.get_running_loop(), arrived)
    _submit(state, stream)
    formatter = Formatter(chat, state.model_name, state.engine.tokenizer, parsed.sampling.logprobs is not None)
    if parsed.sampling.stream:
        return _EventStream(_sse(stream, formatter, parsed.sampling.include_usage),
                            lambda: state.worker.cancel(stream.unfinished()))
    return await _whole(request, state, stream, formatter)


class _EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (a client that leaves before the first
    event included, when the event generator never starts)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _read_json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(None, f"the request body is not valid JSON: {exc}") from None


def _submit(state: ServeState, stream: Stream) -> None:
    try:
        state.worker.submit(stream)
    except QueueFull as exc:
        raise APIError(429, f"{exc}; retry later", "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except Unavailable as exc:
        raise APIError(503, str(exc), "server_error", code="unavailable") from None


def _usage(stream: Stream, choices: list[Choice]) -> dict:
    return usage(sum(len(r) for r in stream.requests), sum(len(c.token_ids) for c in choices))


async def _collect(stream: Stream, choices: list[Choice]) -> None:
    async for event in stream.events():
        choices[event.request.tag.index].add(event, event.request.stop_ids)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _whole(request: Request, state: ServeState, stream: Stream, formatter: Formatter) -> Response:
    choices = [Choice(i) for i in range(len(stream.requests))]
    collect = asyncio.ensure_future(_collect(stream, choices))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
        state.worker.cancel(stream.unfinished())
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)                 # nobody is there to read it
    if isinstance(collect.exception(), StepFailed):
        exc = collect.exception()
        raise APIError(exc.status, str(exc), "server_error")
    collect.result()
    return JSONResponse(formatter.whole(choices, _usage(stream, choices)))


def _sse_data(payload) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _sse(stream: Stream, formatter: Formatter, include_usage: bool):
    """Server-sent events: one chunk per token that releases text (or log-probabilities), the finish
    reasons, usage (on the last chunk, or in a chunk of its own with stream_options.include_usage), then
    `data: [DONE]`."""
    choices = [Choice(i) for i in range(len(stream.requests))]
    try:
        if formatter.chat:
            for c in choices:
                yield _sse_data(formatter.chunk(c.index, "", role=True))
        async for ev in stream.events():
            choice = choices[ev.request.tag.index]
            entries = choice.add(ev, ev.request.stop_ids)
            if not (ev.text or ev.finished or entries):
                continue
            chunk = formatter.chunk(choice.index, ev.text, ev.finished, entries, len(choice.text) - len(ev.text))
            if ev.finished and not include_usage and not stream.unfinished():
                chunk["usage"] = _usage(stream, choices)
            yield _sse_data(chunk)
        if include_usage:
            yield _sse_data(formatter.usage_chunk(_usage(stream, choices)))
    except StepFailed as exc:
        yield _sse_data(APIError(exc.status, str(exc), "server_error").body())
    yield "data: [DONE]\n\n"
