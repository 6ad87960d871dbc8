"""When a sequence stops, and the text it has produced so far.

One rule everywhere (streaming, `GenerationResult.texts`, the command line, the server): the text ends just
before the stop: a stop token contributes no text, and a stop string is cut off with everything after it,
as the OpenAI API does. While a stop string could still be starting at the end of the text, that tail is
held back, so streamed text never has to be taken back. The token ids keep every generated token,
including the one that stopped the sequence.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopTracker:
    def __init__(self, tokenizer, stop_ids: Iterable[int] = (), stop_strings: Iterable[str] = ()):
        self.stop_ids = frozenset(stop_ids)
        self.stop_strings = [s for s in stop_strings]
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty strings")
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer (tokenizer.model in the model directory)")
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True) if tokenizer is not None else None
        self._hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self._pending = ""                     # decoded, not yet released (a stop string may start in it)

    def push(self, token: int) -> tuple[str, str | None]:
        """Text released by this token, and "stop" if the sequence ends here."""
        if token in self.stop_ids:
            return self._flush(), "stop"
        if self._decoder is None:
            return "", None
        self._pending += self._decoder.push(token)
        cut = self._first_stop()
        if cut is not None:
            text, self._pending = self._pending[:cut], ""
            return text, "stop"
        keep = min(self._hold, len(self._pending))
        text, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return text, None

    def finish(self) -> str:
        """The rest of the text when the sequence ends for another reason (its length)."""
        return self._flush()

    def _flush(self) -> str:
        if self._decoder is not None:
            self._pending += self._decoder.flush()
        cut = self._first_stop()
        text, self._pending = self._pending[:cut], ""
        return text

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._pending.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None
