"""The decode step's CUDA graphs: one `DecodeState` per batch bucket, and per bucket one graph for each
step variant (greedy; sampled, where rows with temperature 0 still take the argmax; sampled with
log-probabilities). All variants of a bucket read the same state, so the scheduler may switch between them
at any step boundary.

A graph is captured only while its bucket has no row in use: the capture's warm-up steps run the real step,
which would advance active rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode_state import DecodeState
from .forward import Forward

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class StepVariant:
    greedy: bool = True
    logprobs: bool = False


GREEDY, SAMPLED, SAMPLED_LOGPROBS = StepVariant(True), StepVariant(False), StepVariant(False, True)


def bucket_for(batch: int, max_batch: int) -> int:
    """The smallest captured batch size that holds `batch` rows."""
    return next((b for b in BATCH_BUCKETS if batch <= b <= max_batch), max_batch)


class DecodeGraphs:
    def __init__(self, forward: Forward, max_seq_len: int, use_cuda_graphs: bool, thread_local_capture: bool):
        self.forward = forward
        self.max_seq_len = max_seq_len
        self.use_cuda_graphs = use_cuda_graphs and forward.device.type == "cuda"
        # Under tensor parallelism other threads (NCCL's, the process group's watchdog) make CUDA calls while
        # this one captures; "thread_local" keeps those from invalidating the capture.
        self.capture_mode = "thread_local" if thread_local_capture else "global"
        self.states: dict[int, DecodeState] = {}
        self.graphs: dict[tuple[int, StepVariant], torch.cuda.CUDAGraph] = {}
        self._pool = None

    def state(self, rows: int) -> DecodeState:
        if rows not in self.states:
            self.states[rows] = DecodeState(rows, self.max_seq_len, self.forward.device)
        return self.states[rows]

    def captured(self, rows: int, variant: StepVariant) -> bool:
        return (rows, variant) in self.graphs

    def capture(self, rows: int, variant: StepVariant) -> None:
        """Capture the variant's step for this bucket now (a no-op without CUDA graphs or when captured).
        Every row of the bucket must be idle."""
        if not self.use_cuda_graphs or (rows, variant) in self.graphs:
            return
        state = self.state(rows)
        if bool(state.active.any()):
            raise RuntimeError(f"cannot capture the decode step of bucket {rows} while rows are in use")
        dev = self.forward.device
        # Warm up on a side stream (allocator and kernel handles), then capture one step. Idle rows attend to
        # nothing, so the capture reads no cache; replays read the real lengths.
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward.decode(state, variant.greedy, variant.logprobs)
        torch.cuda.current_stream(dev).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode=self.capture_mode):
            self.forward.decode(state, variant.greedy, variant.logprobs)
        self.graphs[(rows, variant)] = graph

    def launch(self, rows: int, variant: StepVariant) -> None:
        """Queue one step of the bucket: its graph if captured, else the same step run eagerly."""
        graph = self.graphs.get((rows, variant))
        if graph is not None:
            graph.replay()
        else:
            self.forward.decode(self.state(rows), variant.greedy, variant.logprobs)

    def release(self) -> None:
        """Drop every graph (and its memory pool); the states stay. Graphs are captured again on demand."""
        if self.graphs and self.forward.device.type == "cuda":
            torch.cuda.synchronize(self.forward.device)
        self.graphs.clear()
        self._pool = None
