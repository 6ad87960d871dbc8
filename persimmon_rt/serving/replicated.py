"""Serving under tensor parallelism: rank 0 runs the HTTP server and its scheduler; every other rank runs an
identical scheduler that rank 0 tells, at each step boundary, what changed.

Each rank holds a slice of every layer, so all of them must run the same prefills and decode steps in the
same order (the collectives inside pair them up). A scheduler's launches follow from what it was given
(requests submitted and cancelled before each boundary) and from the tokens it reads back, which are the
same on every rank: the logits are all-gathered, and every rank's generator starts from rank 0's seed. So
rank 0 wraps its scheduler in a `Leader` that records `submit` and `cancel` and, at each `step`, first
broadcasts them; the other ranks `follow`: make the same calls, step, and drop the events.

The messages go over their own gloo group (host memory: no GPU synchronisation in the way of the steps),
one broadcast per boundary: a `Boundary` (calls to replay, then a step if `step`), or None to end. While
nothing runs, rank 0 sends a Boundary without a step every `heartbeat` seconds, so the followers' wait never
reaches the group's timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scheduler import Request, Scheduler
from ..tensor_parallel import ControlChannel

# A request's fields that the other ranks need (the rest is output, or rank 0's own bookkeeping).
_REQUEST_FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "stop_ids", "stop_strings",
                   "logprobs", "patches")


@dataclass
class Boundary:
    ops: list[tuple]                      # ("submit", id, fields) or ("cancel", id), in call order
    step: bool


class Channel(ControlChannel):
    """The server's control channel: rank 0's boundaries, a heartbeat interval well inside the timeout,
    and rank 0's seed (every rank seeds its generator with it once its graphs exist)."""

    def __init__(self, tp, timeout_s: float):
        super().__init__(tp, timeout_s)
        self.heartbeat = max(min(timeout_s / 4, 30.0), 0.5)
        self.seed = tp.shared_seed()


def _holding(scheduler: Scheduler, request: Request) -> bool:
    return any(h is not None and h.request is request for h in scheduler.rows)


class Leader:
    """Rank 0's scheduler: a `Scheduler` whose submit/cancel calls are replayed on the other ranks before
    each step. Everything else is the wrapped scheduler's."""

    def __init__(self, scheduler: Scheduler, channel: Channel):
        self._scheduler, self._channel = scheduler, channel
        self._ops: list[tuple] = []
        self._ids: dict[Request, int] = {}        # requests the other ranks know, until they finish
        self._next_id = 0

    def __getattr__(self, name):
        return getattr(self._scheduler, name)

    def submit(self, request: Request) -> None:
        self._scheduler.submit(request)           # a refused request is not sent on
        self._ids[request] = self._next_id
        self._ops.append(("submit", self._next_id, {f: getattr(request, f) for f in _REQUEST_FIELDS}))
        self._next_id += 1

    def cancel(self, request: Request) -> None:
        self._scheduler.cancel(request)
        rid = self._ids.get(request)
        if rid is not None:
            self._ops.append(("cancel", rid))
            if not _holding(self._scheduler, request):      # no "cancelled" event will come for it
                del self._ids[request]

    def step(self):
        self._send(step=True)
        events = self._scheduler.step()
        for event in events:
            if event.finished:
                self._ids.pop(event.request, None)
        return events

    def heartbeat(self) -> None:
        self._send(step=False)

    def stop(self) -> None:
        """Let the other ranks end (their `follow` returns)."""
        self._channel.send(None)

    def _send(self, step: bool) -> None:
        ops, self._ops = self._ops, []
        self._channel.send(Boundary(ops, step))


def follow(scheduler: Scheduler, channel: Channel) -> int:
    """A rank other than 0: replay rank 0's boundaries on `scheduler` until it sends the end; returns the
    number of steps taken."""
    requests: dict[int, Request] = {}
    steps = 0
    with torch.no_grad():
        while (boundary := channel.recv()) is not None:
            for op in boundary.ops:
                if op[0] == "submit":
                    request = Request(**op[2], tag=op[1])
                    requests[op[1]] = request
                    scheduler.submit(request)
                elif (request := requests.get(op[1])) is not None:
                    scheduler.cancel(request)
                    if not _holding(scheduler, request):
                        del requests[op[1]]
            if boundary.step:
                for event in scheduler.step():
                    if event.finished:
                        requests.pop(event.request.tag, None)
                steps += 1
    return steps


__all__ = ["Boundary", "Channel", "Leader", "follow"]
