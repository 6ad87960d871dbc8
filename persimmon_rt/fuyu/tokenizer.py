"""The tokenizer of a Fuyu directory.

The published adept/fuyu-8b ships only `tokenizer.json`, which is what transformers' FuyuProcessor reads;
we read the same file with the `tokenizers` library (the `fuyu` extra) so that token ids agree exactly.
A directory with a `tokenizer.model` and no `tokenizer.json` falls back to PersimmonTokenizer.
"""

from __future__ import annotations

import json
import os


class JsonTokenizer:
    """The subset of PersimmonTokenizer the engine and the processor use, over a `tokenizer.json`."""

    def __init__(self, path: str, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError("reading tokenizer.json needs the tokenizers package: "
                              "pip install 'persimmon_rt[fuyu]'") from exc
        self._tok = Tokenizer.from_file(path)
        self.eos_token = eos_token
        self.eos_token_id = self._tok.token_to_id(eos_token) if eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        """The vocabulary piece of one id (the server's log-probabilities spell tokens with it)."""
        return self._tok.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = False) -> "_StreamDecoder":
        return _StreamDecoder(self, skip_special_tokens)


class _StreamDecoder:
    """Incremental text: decodes the ids so far and releases what is new, holding back an incomplete
    character (a trailing U+FFFD from a partial UTF-8 sequence)."""

    def __init__(self, tokenizer: JsonTokenizer, skip_special_tokens: bool):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._released = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self._tokenizer.decode(self._ids, skip_special_tokens=self._skip))

    def _take(self, text: str) -> str:
        new, self._released = text[self._released:], max(self._released, len(text))
        return new


def load_tokenizer(path: str):
    """JsonTokenizer for `path/tokenizer.json`, else PersimmonTokenizer for `path/tokenizer.model`, else None."""
    json_file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(json_file):
        return JsonTokenizer(json_file, _eos_token(path))
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        from ..tokenizer import PersimmonTokenizer

        return PersimmonTokenizer.from_pretrained(path)
    return None


def _eos_token(path: str) -> str | None:
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as fh:
        eos = json.load(fh).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos
