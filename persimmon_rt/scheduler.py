"""Continuous batching over one decode bucket: requests join free rows at step boundaries, leave when they
finish, and the GPU never waits for the host.

Each call of `Scheduler.step()` is one step boundary:

    admit     waiting requests take free rows: their prompts are prefilled (while other rows are decoding,
              at most `prefill_budget` tokens between two decode steps, so running streams keep flowing:
              a boundary that processes a prefill's result rather than a step's adds no second chunk),
              their first token sampled on the device, and the rows join the decode state.
    launch    decode steps are queued until `depth` of them are ahead of the host. A row whose budget
              (max_new_tokens) would be overrun leaves first, so no row ever writes past its cache row.
    process   the oldest queued result (a prefill's first tokens or a decode step) is read and turned into
              events; finished rows leave the decode state (from the next launch on) and are free again.
              First tokens are followed by the decode step behind them when that step has rows that were
              already running, so those rows get a token at every boundary that reads a result.

Results are processed in launch order, each against the rows it was launched with: a row that finished,
or was reused by a newer request, while later steps were already queued simply has those tokens dropped.
The one wait for the GPU is process's, on the oldest result: what admit, join and retire send to the device
goes through pinned memory without blocking (transfer.py), so a prefill chunk queues behind the steps
already running instead of waiting for them to finish.
Dynamic rotary scaling needs every step's lengths before launching it, so it runs with nothing queued ahead.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .decode_graphs import GREEDY, SAMPLED, SAMPLED_LOGPROBS, DecodeGraphs, StepVariant
from .forward import Forward
from .sampling import MAX_LOGPROBS, sample, token_logprobs
from .stopping import StopTracker
from .transfer import upload, upload_split

# Decode steps kept queued ahead of the host. With none, the GPU idled between steps for the host to wake
# from the previous step's event and launch the next (0.07-0.1 ms a step, measured on an H100).
PIPELINE_DEPTH = 2


@dataclass(eq=False)
class Request:
    """One sequence to generate. `prompt` is token ids [L] (int64) or input embeddings [L, hidden]; with
    `patches` (a multimodal model's image patches [P, patch_dim], host) token ids whose P image placeholders
    the patches fill, embedded by the scheduler's `embed_patches` when the request takes a row."""
    prompt: torch.Tensor
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    logprobs: int | None = None           # alternatives per token (0..5); None: no log-probabilities
    tag: object = None                    # the caller's
    output_ids: list[int] = field(default_factory=list)
    text: str = ""                        # released so far (ends before any stop)
    finish_reason: str | None = None      # "stop", "length" or "cancelled" once finished
    patches: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt.shape[0]


@dataclass
class TokenEvent:
    request: Request
    token_id: int | None                  # None on the last event of a cancelled request
    text: str                             # newly released text
    finished: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class _Row:
    """A request while it holds a row."""

    def __init__(self, request: Request, row: int, tracker: StopTracker, prompt: torch.Tensor):
        self.request, self.row, self.tracker = request, row, tracker
        self.prompt = prompt              # what is prefilled (the request's, or its embeddings); None once done
        self.prefilled = 0                # prompt tokens in the cache so far
        self.steps_left = request.max_new_tokens - 1      # decode steps it may still be launched in


@dataclass
class _Queued:
    """A result on its way to the host: members[row] = (its _Row at launch, its index in `tokens`)."""
    members: dict[int, tuple[_Row, int]]
    decode: bool                          # a decode step (else the first tokens after a prefill)
    tokens: torch.Tensor
    logprobs: tuple[torch.Tensor, ...] | None
    ready: torch.cuda.Event | None


class Scheduler:
    def __init__(self, forward: Forward, graphs: DecodeGraphs, rows: int, tokenizer=None,
                 prefill_chunk_tokens: int = 8192, prefill_budget: int | None = None,
                 depth: int = PIPELINE_DEPTH, embed_patches=None):
        self.forward, self.graphs, self.tokenizer = forward, graphs, tokenizer
        self.embed_patches = embed_patches        # (ids, patches) -> [L, hidden] on the device; None: text only
        self.state = graphs.state(rows)
        self.rows = [None] * rows                 # row -> _Row holding it
        self.waiting: collections.deque[Request] = collections.deque()
        self.queued: collections.deque[_Queued] = collections.deque()
        self.on_device: set[int] = set()          # rows the decode state has active
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_budget = prefill_budget      # per decode step while rows decode (None: no limit)
        self._prefilled_since_step = 0            # prompt tokens prefilled since the last decode launch
        self.depth = 0 if forward.dynamic_rope else depth
        self.decode_steps = 0                     # decode results processed
        self._gpu = forward.device.type == "cuda"
        self._trackers: dict[Request, StopTracker] = {}
        if prefill_budget:        # chunks that run between decode steps: no first-call cost in there
            forward.warm_prefill_shapes(min(prefill_budget, prefill_chunk_tokens))

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, request: Request) -> None:
        """Queue a request (checked by the caller: prompt + max_new_tokens fits a cache row)."""
        if request.patches is not None and self.embed_patches is None:
            raise ValueError("this scheduler has no image front end for a request with image patches")
        self._trackers[request] = StopTracker(self.tokenizer, request.stop_ids, request.stop_strings)
        self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Finish a request now (reason "cancelled"); its row leaves at the next step boundary."""
        if request.finish_reason is None:
            request.finish_reason = "cancelled"
            if request in self.waiting:
                self.waiting.remove(request)
                self._trackers.pop(request, None)

    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    def rows_in_use(self) -> int:
        return sum(r is not None for r in self.rows)

    # ----------------------------------------------------------------------------------------- boundary
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One step boundary; returns the events of the result it processed (possibly none)."""
        events = self._drop_cancelled()
        self._admit()
        self._launch()
        if self.queued:
            oldest = self.queued.popleft()
            events += self._process(oldest)
            # A prefill's first tokens are no decode step: where rows were already running, the step queued
            # behind them is read in the same boundary, so those rows get a token every boundary rather than
            # wait one out (with a prefill chunk launched in it, ~2x the step on the H200:
            # benchmarks/RESULTS.md, run S).
            behind = self.queued[0] if self.queued else None
            if not oldest.decode and behind is not None and behind.decode and \
                    any(r not in oldest.members for r in behind.members):
                events += self._process(self.queued.popleft())
        return events

    def _drop_cancelled(self) -> list[TokenEvent]:
        events, gone = [], []
        for holder in self.rows:
            if holder is not None and holder.request.finish_reason == "cancelled":
                events.append(TokenEvent(holder.request, None, "", "cancelled"))
                gone.append(holder.row)
        self._free(gone)
        return events

    def _free(self, rows: list[int]) -> None:
        for r in rows:
            self.rows[r] = None
        leaving = [r for r in rows if r in self.on_device]
        if leaving:
            self.state.retire(leaving)
            self.on_device.difference_update(leaving)

    # ------------------------------------------------------------------------------------------- admit
    def _admit(self) -> None:
        for r, holder in enumerate(self.rows):
            if holder is None and self.waiting:
                request = self.waiting.popleft()
                prompt = request.prompt if request.patches is None else self.embed_patches(request.prompt,
                                                                                           request.patches)
                self.rows[r] = _Row(request, r, self._trackers.pop(request), prompt)
        filling = [h for h in self.rows if h is not None and h.prefilled < len(h.request)]
        if not filling:
            return
        budget = (self.prefill_budget - self._prefilled_since_step
                  if self.on_device and self.prefill_budget else None)
        if self.forward.dynamic_rope:
            self.forward.set_rotary_length(max(len(h.request) for h in filling))
        done, done_logits = [], []
        while filling and (budget is None or budget > 0):
            pieces, room = [], min(self.prefill_chunk_tokens, budget or self.prefill_chunk_tokens)
            for h in filling:
                take = min(len(h.request) - h.prefilled, room)
                if take > 0:
                    pieces.append((h, take))
                    room -= take
            logits = self.forward.prefill([(h.row, h.prompt, h.prefilled, take) for h, take in pieces])
            for (h, take), row_logits in zip(pieces, logits):
                h.prefilled += take
                if h.prefilled == len(h.request):
                    h.prompt = None                   # embeddings of an image prompt are not needed any more
                    done.append(h)
                    done_logits.append(row_logits)
            taken = sum(take for _, take in pieces)
            self._prefilled_since_step += taken
            budget = None if budget is None else budget - taken
            filling = [h for h in filling if h.prefilled < len(h.request)]
        if done:
            self._join(done, torch.stack(done_logits))

    def _join(self, joining: list[_Row], logits: torch.Tensor) -> None:
        """Sample the first token of each row whose prompt is in the cache, and let it into the step."""
        dev, reqs = self.forward.device, [h.request for h in joining]
        temperature, top_p = upload_split([[r.temperature for r in reqs], [r.top_p for r in reqs]], torch.float32, dev)
        top_k = upload([r.top_k for r in reqs], torch.long, dev)
        first = sample(logits, temperature[:, None], top_k, top_p[:, None],
                       greedy=all(r.temperature == 0 for r in reqs))
        lp = token_logprobs(logits, first) if any(r.logprobs is not None for r in reqs) else None
        members = {h.row: (h, i) for i, h in enumerate(joining)}
        self.queued.append(self._to_host(members, False, first, lp))
        entering = [i for i, h in enumerate(joining) if h.steps_left > 0]
        if entering:
            tokens = first if len(entering) == len(joining) else first[upload(entering, torch.long, dev)]
            rows = [joining[i] for i in entering]
            self.state.join([h.row for h in rows], tokens, [len(h.request) for h in rows],
                            [h.request.temperature for h in rows], [h.request.top_k for h in rows],
                            [h.request.top_p for h in rows])
            self.on_device.update(h.row for h in rows)

    # ------------------------------------------------------------------------------------------ launch
    def _launch(self) -> None:
        while self.on_device and len(self.queued) <= self.depth:
            spent = [r for r in self.on_device if self.rows[r] is None or self.rows[r].steps_left <= 0]
            if spent:
                self.state.retire(spent)
                self.on_device.difference_update(spent)
            if not self.on_device:
                return
            holders = [self.rows[r] for r in sorted(self.on_device)]
            if self.forward.dynamic_rope:
                self.forward.set_rotary_length(max(len(h.request) + h.request.max_new_tokens - h.steps_left
                                                   for h in holders))
            variant = self._variant(holders)
            self.graphs.launch(self.state.rows, variant)
            self._prefilled_since_step = 0
            for h in holders:
                h.steps_left -= 1
            lp = (self.state.logprobs, self.state.top_ids, self.state.top_logprobs) if variant.logprobs else None
            self.queued.append(self._to_host({h.row: (h, h.row) for h in holders}, True, self.state.tokens, lp))

    @staticmethod
    def _variant(members) -> StepVariant:
        reqs = [h.request for h in members]
        if any(r.logprobs is not None for r in reqs):
            return SAMPLED_LOGPROBS
        return GREEDY if all(r.temperature == 0 for r in reqs) else SAMPLED

    def _to_host(self, members: dict[int, tuple[_Row, int]], decode: bool, tokens: torch.Tensor,
                 logprobs) -> _Queued:
        """Queue the copy of a result to the host (pinned memory, no wait) and note when it has landed."""
        def copy(t):
            return t.to("cpu", non_blocking=self._gpu) if self._gpu else t.clone()
        host = copy(tokens)
        lp = tuple(copy(t) for t in logprobs) if logprobs is not None else None
        ready = None
        if self._gpu:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.forward.device))
        return _Queued(members, decode, host, lp, ready)

    # ----------------------------------------------------------------------------------------- process
    def _process(self, queued: _Queued) -> list[TokenEvent]:
        if queued.ready is not None:
            queued.ready.synchronize()
        tokens = queued.tokens.tolist()
        events, finished = [], []
        for r, (h, index) in queued.members.items():
            if self.rows[r] is not h or h.request.finish_reason is not None:
                continue                          # finished (or replaced) while this result was queued
            event = self._event(h, tokens[index], queued.logprobs, index)
            events.append(event)
            if event.finished:
                finished.append(r)
        self.decode_steps += queued.decode
        self._free(finished)
        return events

    def _event(self, h: _Row, token: int, logprobs, index: int) -> TokenEvent:
        request = h.request
        request.output_ids.append(token)
        text, reason = h.tracker.push(token)
        if reason is None and len(request.output_ids) >= request.max_new_tokens:
            text, reason = text + h.tracker.finish(), "length"
        request.text += text
        request.finish_reason = reason
        event = TokenEvent(request, token, text, reason)
        if logprobs is not None and request.logprobs is not None:
            chosen, top_ids, top_lp = logprobs
            k = min(request.logprobs, MAX_LOGPROBS)
            event.logprob = float(chosen[index])
            event.top_logprobs = list(zip(top_ids[index, :k].tolist(), top_lp[index, :k].tolist()))
        return event
