"""Responses in the OpenAI format: whole completions, streamed chunks, usage and log-probabilities."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for: its piece with SentencePiece's space mark as a space, or the byte of a
    byte-fallback piece (which may be part of a character)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    byte = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()


@dataclass
class Choice:
    """One generated sequence as it accumulates: its text, tokens and log-probabilities."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event, stop_ids) -> list:
        """Take one token event; returns the log-probability entries it added (a stop token adds none: its
        text is not part of the output)."""
        self.text += event.text
        self.finish_reason = event.finished or self.finish_reason
        if event.token_id is None:
            return []
        self.token_ids.append(event.token_id)
        if event.logprob is None or (event.finished == "stop" and event.token_id in stop_ids):
            return []
        entry = (event.token_id, event.logprob, event.top_logprobs or [])
        self.logprobs.append(entry)
        return [entry]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokenizer, entries, offset: int = 0) -> dict:
    """The completions API's log-probabilities; text_offset counts characters of the tokens' own texts."""
    tokens = [token_bytes(tokenizer, t).decode(errors="replace") for t, _, _ in entries]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    top = [{token_bytes(tokenizer, t).decode(errors="replace"): lp for t, lp in alternatives}
           for _, _, alternatives in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tokenizer, entries) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        raw = token_bytes(tokenizer, token_id)
        return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in alternatives]}
                        for t, lp, alternatives in entries]}


class Formatter:
    """Builds one HTTP request's response bodies (its id, creation time and model are shared by all)."""

    def __init__(self, chat: bool, model: str, tokenizer, want_logprobs: bool):
        self.chat, self.model, self.tokenizer, self.want_logprobs = chat, model, tokenizer, want_logprobs
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, entries, offset: int = 0):
        if not self.want_logprobs:
            return None
        return chat_logprobs(self.tokenizer, entries) if self.chat else \
            completion_logprobs(self.tokenizer, entries, offset)

    def whole(self, choices: list[Choice], used: dict) -> dict:
        out = []
        for c in choices:
            body = {"index": c.index, "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason}
            if self.chat:
                body["message"] = {"role": "assistant", "content": c.text}
            else:
                body["text"] = c.text
            out.append(body)
        return {**self._envelope(False), "choices": out, "usage": used}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, entries=(),
              offset: int = 0, role: bool = False) -> dict:
        """One choice's chunk; for chat, `text` None with role=True is the opening delta."""
        choice = {"index": index}
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self._logprobs(list(entries), offset) if entries else None
        choice["finish_reason"] = finish_reason
        return {**self._envelope(True), "choices": [choice]}

    def usage_chunk(self, used: dict) -> dict:
        return {**self._envelope(True), "choices": [], "usage": used}
