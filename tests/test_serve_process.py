"""`persimmon-rt serve` as its own process: SIGTERM under load stops admitting, lets short requests finish,
cancels the rest within the bound, and the process exits cleanly."""

import signal
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_utils import MODEL, ChildServer, sse_events  # noqa: E402

BOUND = 1.5


def test_sigterm_under_load_drains_within_the_bound_and_exits():
    args = ("--max-batch-size", "2", "--shutdown-timeout", str(BOUND), "--served-model-name", MODEL,
            "--log-level", "info")
    with ChildServer(*args) as server:
        results, started = {}, threading.Barrier(3)

        def stream(name: str, max_tokens: int):
            body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0, "stream": True}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
                lines = response.iter_lines()
                first = next(lines)
                started.wait()
                rest = sse_events(_Replay(first, lines))
            results[name] = rest

        short = threading.Thread(target=stream, args=("short", 20))
        long = threading.Thread(target=stream, args=("long", 1000))
        short.start(), long.start()
        started.wait()
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):        # the listening socket is closed: no new requests
            httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=5) \
                .raise_for_status()
        short.join(30), long.join(30)
        assert server.proc.wait(BOUND + 20) == 0
        took = time.monotonic() - sent
    log = "".join(server.log)
    assert results["short"][-1] == "[DONE]" and results["short"][-2]["choices"][0]["finish_reason"] == "length"
    assert results["long"][-1] == "[DONE]", log
    assert "shutting down" in results["long"][-2]["error"]["message"], log
    assert took < BOUND + 10, log


class _Replay:
    """An httpx response's remaining lines with the first one put back (for sse_events)."""

    def __init__(self, first, lines):
        self.first, self.lines = first, lines

    def iter_lines(self):
        yield self.first
        yield from self.lines
