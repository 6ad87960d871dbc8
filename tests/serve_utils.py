"""Helpers of the server tests: a real server on 127.0.0.1 (in this process, or as `persimmon-rt serve` in a
child process) on a free port, and a server-sent-events reader."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import torch

from persimmon_rt.demo import demo_model_path
from persimmon_rt.engine import Engine

MODEL = "demo"
MAX_SEQ_LEN = 256


def demo_engine(max_batch_size: int = 8, max_seq_len: int = MAX_SEQ_LEN, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> Engine:
    return Engine.from_pretrained(demo_model_path(), dtype=dtype, device=device,
                                  max_batch_size=max_batch_size, max_seq_len=max_seq_len)


class StepGate:
    """Holds an engine's scheduler at step boundaries, so a test can make the server busy for as long as it
    needs instead of racing a generation that a fast machine finishes first. `allow(n)` lets n more steps
    run, `open()` lets every step run; the scheduler thread waits before any step beyond what was allowed."""

    def __init__(self, engine: Engine):
        self._cond = threading.Condition()
        self._left: int | None = None            # None: open
        build = engine.scheduler

        def gated_scheduler(*args, **kwargs):
            scheduler = build(*args, **kwargs)
            step = scheduler.step

            def gated_step():
                with self._cond:
                    self._cond.wait_for(lambda: self._left is None or self._left > 0)
                    if self._left is not None:
                        self._left -= 1
                return step()

            scheduler.step = gated_step
            return scheduler

        engine.scheduler = gated_scheduler

    def allow(self, steps: int) -> None:
        with self._cond:
            self._left = steps
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._left = None
            self._cond.notify_all()


class InProcessServer:
    """uvicorn serving the app in a thread, on a socket bound here (port 0: a free one)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def state(self):
        return self.app.state.serve


class ChildServer:
    """`python -m persimmon_rt serve --port 0 ...` in a child process; the port is read from its log."""

    def __init__(self, *args: str, env: dict | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "persimmon_rt", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.log: list[str] = []
        self.port_found = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            match = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
            if match:
                self.url = f"http://127.0.0.1:{match.group(1)}"
                self.port_found.set()

    def __enter__(self):
        if not self.port_found.wait(120):
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def sse_events(response: httpx.Response) -> list:
    """The payloads of a streamed response's `data:` lines, parsed ("[DONE]" stays a string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric_samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample, parsed by prometheus_client's text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(url: str, name: str, **labels) -> float:
    samples = metric_samples(httpx.get(url + "/metrics").text)
    return samples.get((name, frozenset(labels.items())), 0.0)
