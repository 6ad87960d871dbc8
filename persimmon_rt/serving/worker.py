"""The scheduler thread: the engine's one owner while the server runs.

The event loop hands it a `Stream` (one HTTP request's sequences) through a bounded inbox and reads the
stream's token events from an asyncio queue that this thread fills with `call_soon_threadsafe`. The thread
holds `engine.lock` for its whole life, loops `Scheduler.step()` while anything is queued or running, and
sleeps on a condition otherwise. Cancellations (a client gone) are applied at the next step boundary.
A step that raises fails the sequences holding rows (the requests answer 500), the scheduler is rebuilt,
and the ones still waiting for a row go on in the new one.

Under tensor parallelism (`channel`, replicated.py) the scheduler is a `Leader` that replays each boundary on
the other ranks, which idle boundaries keep alive with a heartbeat. There a step that raises ends the
server: the ranks may have stopped in different collectives, so no rank can go on; every request fails,
`on_fatal` is called (the command stops the server and exits non-zero) and the process supervisor restarts
it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..scheduler import Request, Scheduler, TokenEvent
from .replicated import Leader

log = logging.getLogger("persimmon_rt.serve")


class QueueFull(Exception):
    """The inbox has no room for these sequences now."""


class Unavailable(Exception):
    """The server no longer admits requests (shutting down, or the engine failed)."""


class StepFailed(Exception):
    """The step this stream's sequences were in raised; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Stream:
    """One HTTP request's sequences; their events arrive on `loop`, in order, as lists per step."""
    requests: list[Request]
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: set = field(default_factory=set)       # indices whose last event the reader has seen

    def __post_init__(self):
        for i, r in enumerate(self.requests):
            r.tag = _Tag(self, i)

    async def events(self):
        """Token events until every sequence has finished; raises StepFailed if the server failed them."""
        while len(self.finished) < len(self.requests):
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            for event in item:
                if event.finished:
                    self.finished.add(event.request.tag.index)
                yield event

    def unfinished(self) -> list[Request]:
        return [r for i, r in enumerate(self.requests) if i not in self.finished]

    def deliver(self, item) -> None:
        """From the scheduler thread: a list of events, or an exception to raise in the reader."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:              # the event loop is gone (server stopped): nobody is reading
            pass


@dataclass(eq=False)
class _Tag:
    stream: Stream
    index: int
    last: float | None = None             # when its latest token left the scheduler


class Worker:
    def __init__(self, engine, metrics, max_queue: int = 256, rows: int | None = None,
                 prefill_budget: int | None = None, channel=None, on_fatal=None):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.rows, self.prefill_budget = rows, prefill_budget
        self.channel, self.on_fatal = channel, on_fatal      # tensor parallelism: see the module's docstring
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: list[Request] = []
        self._waiting = 0                 # sequences in the scheduler's queue at the last boundary
        self._admitting = True
        self._stop = False
        self._deadline: float | None = None       # draining: past it, cancel whatever still runs
        self.error: BaseException | None = None   # set when the engine cannot serve any more
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="persimmon-rt-scheduler", daemon=True)

    # ------------------------------------------------------------------------------------ event loop side
    def start(self, timeout: float | None = None) -> None:
        """Start the thread and wait until its scheduler is built (graphs captured)."""
        self._thread.start()
        self._ready.wait(timeout)
        if self.error is not None:
            raise self.error

    @property
    def healthy(self) -> bool:
        return self._admitting and self.error is None and self._thread.is_alive()

    def submit(self, stream: Stream) -> None:
        with self._cond:
            if not self.healthy:
                raise Unavailable("the server is shutting down" if self.error is None
                                  else f"the engine failed: {self.error}")
            if len(self._inbox) + self._waiting + len(stream.requests) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} sequences waiting)")
            self._inbox.extend(stream.requests)
            self._cond.notify()
        self.metrics.prompt_tokens.inc(sum(len(r) for r in stream.requests))

    def cancel(self, requests: list[Request]) -> None:
        if requests:
            with self._cond:
                self._cancels.extend(requests)
                self._cond.notify()

    def drain(self, timeout: float) -> None:
        """Stop admitting; sequences still running `timeout` seconds from now are cancelled."""
        with self._cond:
            self._admitting = False
            self._deadline = time.monotonic() + timeout
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the thread."""
        with self._cond:
            self._admitting, self._stop = False, True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def queue_depth(self) -> int:
        return len(self._inbox) + self._waiting

    # -------------------------------------------------------------------------------- scheduler thread
    def _run(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)    # a new thread starts on device 0
        with self.engine.lock:
            try:
                scheduler = self.engine.scheduler(self.rows, self.prefill_budget)
                if self.channel is not None:
                    torch.manual_seed(self.channel.seed)      # after capture, as on the other ranks
                    scheduler = Leader(scheduler, self.channel)
            except Exception as exc:
                self.error = exc
                return
            finally:
                self._ready.set()
            current = scheduler
            try:
                while scheduler is not None:
                    current = scheduler
                    scheduler = self._boundary(current)
                if self.channel is not None and self.error is None:
                    current.stop()
            except Exception as exc:     # a fault outside the step itself: nothing can be served any more
                log.error("the scheduler thread failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
                self.error = exc
                self._fail(current, self._all(current) + self._take_inbox(),
                           StepFailed(f"the scheduler thread failed: {exc}"), "error")
            if self.error is not None and self.on_fatal is not None:
                self.on_fatal()

    def _boundary(self, scheduler: Scheduler) -> Scheduler | None:
        """Take what the event loop sent, run one step, publish its events; the scheduler to go on with."""
        if not self._take(scheduler):
            self._fail(scheduler, self._all(scheduler) + self._take_inbox(), StepFailed("the server stopped", 503),
                       "cancelled")
            return None
        try:
            events = scheduler.step()
        except Exception as exc:
            if self.channel is not None:
                raise
            return self._recover(scheduler, exc)
        with self._cond:                 # before the events go out: a reader acting on them sees these
            self._waiting = len(scheduler.waiting)
        self.metrics.queue_depth.set(self.queue_depth())
        self.metrics.rows_in_use.set(scheduler.rows_in_use())
        self._publish(events, time.perf_counter())
        return scheduler

    def _take(self, scheduler: Scheduler) -> bool:
        """Wait for work; move new sequences and cancellations into the scheduler. False: stop now."""
        with self._cond:
            while not (self._inbox or self._cancels or self._stop or scheduler.busy()):
                if not self._cond.wait(self.channel.heartbeat if self.channel is not None else None):
                    scheduler.heartbeat()         # idle under tensor parallelism: the other ranks wait on it
            if self._stop:
                return False
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
            self._waiting += len(inbox)          # still counted against the queue bound once taken
            expired = self._deadline is not None and time.monotonic() > self._deadline
        for r in inbox:
            scheduler.submit(r)
        for r in cancels:
            if r.finish_reason is None:
                self.metrics.sequences.labels("cancelled").inc()
            scheduler.cancel(r)
        if expired:
            self._fail(scheduler, self._all(scheduler), StepFailed("the server is shutting down", 503), "cancelled")
        return True

    def _take_inbox(self) -> list[Request]:
        with self._cond:
            inbox, self._inbox = self._inbox, []
        return inbox

    @staticmethod
    def _all(scheduler: Scheduler) -> list[Request]:
        holding = [h.request for h in scheduler.rows if h is not None]
        return [r for r in holding + list(scheduler.waiting) if r.finish_reason is None]

    def _fail(self, scheduler: Scheduler, requests: list[Request], error: StepFailed, reason: str) -> None:
        """End these sequences: each stream that had one among them raises `error` in its reader."""
        streams = {}
        for r in requests:
            if r.finish_reason is None:
                self.metrics.sequences.labels(reason).inc()
            scheduler.cancel(r)
            streams[r.tag.stream] = None
        for stream in streams:
            stream.deliver(error)

    def _recover(self, scheduler: Scheduler, exc: Exception) -> Scheduler | None:
        """A step raised: fail the sequences in rows, build a fresh scheduler, move the waiting ones to it."""
        log.error("a scheduler step failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        self.metrics.step_failures.inc()
        waiting = [r for r in scheduler.waiting if r.finish_reason is None]
        holding = [h.request for h in scheduler.rows if h is not None and h.request.finish_reason is None]
        self._fail(scheduler, holding, StepFailed(f"generation failed: {type(exc).__name__}: {exc}"), "error")
        try:
            fresh = self.engine.scheduler(self.rows, self.prefill_budget)
        except Exception as again:       # the engine cannot go on (a broken device): stop serving
            self.error = again
            self._fail(scheduler, waiting + self._take_inbox(), StepFailed(f"the engine failed: {again}", 503),
                       "error")
            return None
        for r in waiting:
            fresh.submit(r)
        return fresh

    def _publish(self, events: list[TokenEvent], now: float) -> None:
        """Hand each stream its events of this step (one call into the event loop per stream) and record
        the token timings."""
        m, by_stream = self.metrics, {}
        for ev in events:
            tag = ev.request.tag
            if ev.token_id is not None:
                m.generation_tokens.inc()
                if tag.last is None:
                    m.time_to_first_token.observe(now - tag.stream.arrived)
                else:
                    m.inter_token_latency.observe(now - tag.last)
                tag.last = now
            if ev.finished and ev.finished != "cancelled":       # cancellations are counted when made
                m.sequences.labels(ev.finished).inc()
                m.request_duration.observe(now - tag.stream.arrived)
            by_stream.setdefault(tag.stream, []).append(ev)
        for stream, stream_events in by_stream.items():
            stream.deliver(stream_events)
