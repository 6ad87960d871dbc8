"""Per-row state of the captured decode step, and the rows that join and leave it at step boundaries.

A `DecodeState` covers `rows` batch rows (cache rows [0, rows)); each row reads its token, position, cache
slot, key count and sampling parameters from static device tensors, which the captured graph reads and
the step itself advances. The invariants:

    active row r:   feeds tokens[r] at positions[r] (written to slot r * S + positions[r]), attends to
                    seq_lens[r] = positions[r] + 1 keys, samples with its own parameters; after the step
                    tokens[r] is the sampled token and positions, slots and seq_lens moved on by one.
    idle row r:     seq_lens[r] = 0 (attends to nothing), slot r * S + S - 1 (writes its ignored K/V at the
                    last position of its own cache row, which no sequence uses: prompt + new tokens <= S, and
                    the last new token is never fed back), does not advance. Its sampled token is
                    meaningless. So an idle row never disturbs a prompt being prefilled into it.

A row joins (after its prompt is in the cache) and leaves at any step boundary by host writes that the
stream orders after the steps already queued: nothing is re-captured.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops
from .sampling import MAX_LOGPROBS
from .transfer import upload, upload_split


class DecodeState:
    def __init__(self, rows: int, max_seq_len: int, device):
        self.rows, self.max_seq_len, self.device = rows, max_seq_len, torch.device(device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)          # input token per row
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = self._idle_slots(torch.arange(rows, device=device))        # flat r * S + position
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)       # keys after this step
        self.active = torch.zeros(rows, dtype=torch.int32, device=device)
        self.temperature = torch.ones(rows, 1, device=device)                      # 0 = greedy
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)           # 0 = off
        self.top_p = torch.ones(rows, 1, device=device)
        # Written by graphs that compute them: log-probabilities of the sampled tokens (which the step leaves
        # in `tokens`, the next step's input) and the most likely alternatives.
        self.logprobs = torch.zeros(rows, device=device)
        self.top_ids = torch.zeros(rows, MAX_LOGPROBS, dtype=torch.long, device=device)
        self.top_logprobs = torch.zeros(rows, MAX_LOGPROBS, device=device)

    def join(self, rows: Sequence[int], tokens: torch.Tensor, positions: Sequence[int],
             temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float]) -> None:
        """Rows enter the step from the next launch: row rows[i] feeds tokens[i] (a device tensor, so the
        first token sampled after a prefill needs no host round trip) at positions[i], its prompt length.
        Nothing here waits for the GPU (transfer.py)."""
        index, pos, top_k = upload_split([list(rows), list(positions), list(top_k)], torch.long, self.device)
        temperature, top_p = upload_split([list(temperature), list(top_p)], torch.float32, self.device)
        self.tokens.index_copy_(0, index, upload(tokens, torch.long, self.device))
        self.positions.index_copy_(0, index, pos)
        self.slots.index_copy_(0, index, index * self.max_seq_len + pos)
        self.seq_lens.index_copy_(0, index, (pos + 1).to(torch.int32))
        self.active.index_fill_(0, index, 1)
        self.temperature.index_copy_(0, index, temperature[:, None])
        self.top_k.index_copy_(0, index, top_k)
        self.top_p.index_copy_(0, index, top_p[:, None])

    def retire(self, rows: Sequence[int]) -> None:
        """Rows leave from the next launch: idle (see above)."""
        index = upload(list(rows), torch.long, self.device)
        self.active.index_fill_(0, index, 0)
        self.seq_lens.index_fill_(0, index, 0)
        self.slots.index_copy_(0, index, self._idle_slots(index))

    def _idle_slots(self, rows: torch.Tensor) -> torch.Tensor:
        return rows * self.max_seq_len + self.max_seq_len - 1

    def clear(self) -> None:
        """Every row idle."""
        self.retire(range(self.rows))

    def advance(self, next_tokens: torch.Tensor) -> None:
        """Inside the step, after sampling: every row's sampled token becomes its next input (the host reads
        the sampled tokens from `tokens`); active rows move one position on, idle rows stay put."""
        self.tokens.copy_(next_tokens)
        self.positions.add_(self.active)
        self.slots.add_(self.active)
        self.seq_lens.add_(self.active)

    def advance_greedy(self, logits: torch.Tensor) -> None:
        """advance(logits.argmax(-1)) for fp32 logits [rows, V], in two launches on the GPU
        (ops.greedy_advance) instead of six."""
        ops.greedy_advance(logits, self.tokens, self.positions, self.slots, self.seq_lens, self.active)
