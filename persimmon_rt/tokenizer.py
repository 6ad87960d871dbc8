"""PersimmonTokenizer: the Persimmon SentencePiece model behind a transformers-style API.

Persimmon's vocabulary is a SentencePiece Unigram model with byte fallback (262144 pieces). Encoding without
special tokens is exactly ``SentencePieceProcessor.encode`` and decoding is SentencePiece's own detokenizer, so
ids and text agree with SentencePiece for every input; ``transformers`` is not needed.

Special-token policy
--------------------
The defaults follow the original Adept release, not transformers' ``PersimmonConfig``:

* End of text is the ``|ENDOFTEXT|`` piece (id 71013 in the released vocabulary), or SentencePiece's own eos
  piece when a vocabulary has no ``|ENDOFTEXT|``. The original server stops generating on it.
* No BOS is added (``add_bos_token=False``), which was the original server's default. A user who turns
  ``add_bos_token`` on gets ``|ENDOFTEXT|`` as BOS, because that is what the original server prepended.
* transformers' ``PersimmonConfig`` says ``bos_token_id=1, eos_token_id=2``: SentencePiece's default
  ``<s>``/``</s>`` slots, the Llama convention. The original server used neither, so prepending ``<s>`` or
  stopping on ``</s>`` would depart from how the model was served (it would, for one, not stop where the
  original stopped).

Precedence: constructor keyword arguments, then ``tokenizer_config.json`` (``from_pretrained`` only), then the
defaults above. A ``null`` token in ``tokenizer_config.json`` means "not set": the published chat tokenizer
config is reported to carry ``eos_token: null``, which must not switch off the stop token. A token named in
``tokenizer_config.json`` that is not a piece of the vocabulary is ignored with a warning, because
transformers' conversion script writes a misspelt ``|ENDOFTEXT``; the same mistake in a keyword argument
raises.

Padding is on the left by default: a decoder-only model appends new tokens on the right, so left padding
keeps the last prompt token of every row in the final column. No pad token is defined by default; padded
positions then hold the eos id (as the original server did) and ``attention_mask`` is 0 there.

Text must be ``str``: ``bytes`` raise ``TypeError`` rather than being decoded with a guessed codec, because a
silent replacement would hide corrupted input. Tokenising two strings separately and concatenating the ids
is not the same as tokenising their concatenation: the vocabulary has long multi-word pieces.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import warnings
from typing import Any, Iterable, Sequence

import sentencepiece as spm

MODEL_NAME = "tokenizer.model"
CONFIG_NAME = "tokenizer_config.json"
JSON_NAME = "tokenizer.json"
END_OF_TEXT = "|ENDOFTEXT|"
CHAT_ROLES = {"user": "human", "assistant": "adept"}

_DEFAULT = object()
# apply_chat_template's format as a Jinja template, for transformers' apply_chat_template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'human: ' + message['content'] | trim }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'adept: ' + message['content'] | trim }}"
    "{%- else -%}{{ raise_exception(\"Persimmon's chat format has only 'user' and 'assistant' turns\") }}"
    "{%- endif -%}{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] == 'user' -%}{{ '\\n\\nadept:' }}{%- endif -%}")


class _FromConfig(str):
    """A token read from tokenizer_config.json; an unknown one falls back to the default instead of raising."""


class BatchEncoding(dict):
    """``input_ids`` and ``attention_mask``, readable as keys or attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class PersimmonTokenizer:
    """SentencePiece tokenizer with the original Persimmon special-token policy (see the module docstring)."""

    def __init__(self, vocab_file: str | os.PathLike, *, bos_token: str | None = _DEFAULT,
                 eos_token: str | None = _DEFAULT, pad_token: str | None = None, add_bos_token: bool = False,
                 add_eos_token: bool = False, padding_side: str = "left"):
        self.vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(self.vocab_file):
            raise FileNotFoundError(f"SentencePiece model not found: {self.vocab_file}")
        self._sp = spm.SentencePieceProcessor(model_file=self.vocab_file)
        eod = END_OF_TEXT if self._has_piece(END_OF_TEXT) else None
        if eod is None and self._sp.eos_id() >= 0:
            eod = self._sp.id_to_piece(self._sp.eos_id())
        self._bos_token = self._resolve("bos_token", bos_token, eod)
        self._eos_token = self._resolve("eos_token", eos_token, eod)
        self._pad_token = self._resolve("pad_token", pad_token, None)
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        if self.add_bos_token and self._bos_token is None:
            raise ValueError("add_bos_token=True needs a bos_token")
        if self.add_eos_token and self._eos_token is None:
            raise ValueError("add_eos_token=True needs an eos_token")
        self.padding_side = _check_side(padding_side)
        self._anchor: int | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "PersimmonTokenizer":
        """Load ``path/tokenizer.model`` and, when present, the settings in ``path/tokenizer_config.json``."""
        path = os.fspath(path)
        model_file = os.path.join(path, MODEL_NAME)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        settings: dict[str, Any] = {}
        config_file = os.path.join(path, CONFIG_NAME)
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as fh:
                config = json.load(fh)
            for key in ("bos_token", "eos_token", "pad_token"):
                value = config.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    settings[key] = _FromConfig(value)
            for key in ("add_bos_token", "add_eos_token", "padding_side"):
                if config.get(key) is not None:
                    settings[key] = config[key]
        return cls(model_file, **{**settings, **kwargs})

    def save_pretrained(self, path: str | os.PathLike) -> tuple[str, ...]:
        """Write ``tokenizer.model``, ``tokenizer_config.json`` and ``tokenizer.json`` into ``path``.

        The config carries this tokenizer's special tokens and chat template in the form transformers reads,
        and ``tokenizer.json`` is the same tokenizer in the ``tokenizers`` format, so that
        ``AutoTokenizer.from_pretrained(path)`` gives the same ids without protobuf. Returns the paths written.
        """
        from .tokenizer_json import tokenizer_json

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        model_file = os.path.join(path, MODEL_NAME)
        if not (os.path.exists(model_file) and os.path.samefile(model_file, self.vocab_file)):
            shutil.copyfile(self.vocab_file, model_file)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": self.unk_token,
                  "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                  "padding_side": self.padding_side, "clean_up_tokenization_spaces": False,
                  "chat_template": CHAT_TEMPLATE}
        written = [model_file, _write_json(os.path.join(path, CONFIG_NAME), config)]
        special = [t for t in (self.bos_token, self.eos_token, self.pad_token, self.unk_token) if t is not None]
        try:
            document = tokenizer_json(model_file, special, self.bos_token, self.eos_token, self.add_bos_token,
                                      self.add_eos_token)
        except ValueError as exc:
            warnings.warn(f"{JSON_NAME} not written ({exc}); transformers will need protobuf to read "
                          f"{MODEL_NAME}", stacklevel=2)
        else:
            written.append(_write_json(os.path.join(path, JSON_NAME), document, indent=None))
        return tuple(written)

    # -------------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def pad_token(self) -> str | None:
        """The pad token, or the eos token when none is configured (padding then writes the eos id)."""
        return self._pad_token if self._pad_token is not None else self._eos_token

    @property
    def unk_token(self) -> str | None:
        unk = self._sp.unk_id()
        return self._sp.id_to_piece(unk) if unk >= 0 else None

    @property
    def bos_token_id(self) -> int | None:
        return self._piece_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._piece_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """The id written into padded positions: the pad token's id, else the eos id."""
        return self._piece_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._piece_id(self.unk_token)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids dropped by ``skip_special_tokens``: bos, eos, pad and unk."""
        ids = (self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id)
        return sorted({i for i in ids if i is not None})

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Piece ids; a string that is not a piece maps to the unk id, as in transformers."""
        if isinstance(tokens, str):
            return self._sp.piece_to_id(tokens)
        return [self._sp.piece_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int):
            return self._sp.id_to_piece(self._check_ids([ids])[0])
        ids = self._check_ids(ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return [self._sp.id_to_piece(i) for i in ids]

    # --------------------------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; without special tokens, exactly ``SentencePieceProcessor.encode(text)``."""
        return self._with_special(self._encode([text])[0], add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """SentencePiece's detokenisation of ``ids`` (a list, 1-D tensor or array).

        Control pieces such as ``<s>`` render as nothing and ``|ENDOFTEXT|`` renders as its text, exactly as
        SentencePiece does; ``skip_special_tokens`` drops the bos, eos, pad and unk ids first. The input
        character U+2581 decodes as a space, since SentencePiece uses it to mark spaces.
        """
        ids = self._check_ids(ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return self._sp.decode(ids)

    def batch_decode(self, sequences: Iterable[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str | Sequence[str], padding: bool | str = False, max_length: int | None = None,
                 truncation: bool | str = False, return_tensors: str | None = None,
                 padding_side: str | None = None, add_special_tokens: bool = True) -> BatchEncoding:
        """Encode one text or a batch into ``input_ids`` and ``attention_mask``.

        ``padding``: False (none), True/"longest" (to the longest row) or "max_length". ``truncation`` keeps
        the start of each text, cut so that it fits ``max_length`` together with its special tokens.
        ``padding_side`` defaults to ``self.padding_side`` ("left", for generation). A single string gives
        flat lists, or a ``[1, L]`` tensor with ``return_tensors="pt"``.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"expected a str or a list of str, got {type(text).__name__}")
        if not texts:
            raise ValueError("cannot encode an empty batch")
        if padding not in (False, True, "do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        truncation = truncation not in (False, None, "do_not_truncate")
        if (truncation or padding == "max_length") and max_length is None:
            raise ValueError("truncation and padding='max_length' need max_length")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        side = _check_side(padding_side or self.padding_side)

        n_special = (self.add_bos_token + self.add_eos_token) if add_special_tokens else 0
        rows = self._encode(texts)
        if truncation:
            rows = [ids[:max(max_length - n_special, 0)] for ids in rows]
        rows = [self._with_special(ids, add_special_tokens) for ids in rows]
        masks = [[1] * len(ids) for ids in rows]
        if padding in (True, "longest", "max_length"):
            target = max_length if padding == "max_length" else max(map(len, rows))
            if any(len(ids) < target for ids in rows) and self.pad_token_id is None:
                raise ValueError("padding needs a pad_token or an eos_token")
            for ids, mask in zip(rows, masks):
                fill = max(target - len(ids), 0)
                if side == "left":
                    ids[:0], mask[:0] = [self.pad_token_id] * fill, [0] * fill
                else:
                    ids += [self.pad_token_id] * fill
                    mask += [0] * fill
        if return_tensors == "pt":
            import torch

            if len(set(map(len, rows))) > 1:
                raise ValueError("rows have different lengths; pass padding=True to return tensors")
            return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long),
                                 attention_mask=torch.tensor(masks, dtype=torch.long))
        return BatchEncoding(input_ids=rows[0] if single else rows, attention_mask=masks[0] if single else masks)

    def apply_chat_template(self, messages: Sequence[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str | list[int]:
        """Render a conversation in Persimmon's chat format.

        ``[{"role": "user", "content": p}]`` becomes ``"human: p\\n\\nadept:"``; turns are joined by a blank
        line. Contents are stripped, as the original server stripped prompts. The ``adept:`` generation prompt
        follows only a final user turn. With ``tokenize=True`` the ids carry a BOS only if ``add_bos_token``
        and never an EOS, so they can be fed straight to generation.
        """
        turns = []
        for message in messages:
            role, content = message.get("role"), message.get("content")
            if role not in CHAT_ROLES:
                raise ValueError(f"unsupported chat role {role!r}: Persimmon's chat format has only 'user' and "
                                 "'assistant' turns (fold system text into the first user message)")
            if not isinstance(content, str):
                raise TypeError(f"message content must be a str, got {type(content).__name__}")
            turns.append(f"{CHAT_ROLES[role]}: {content.strip()}")
        if not turns:
            raise ValueError("apply_chat_template needs at least one message")
        if add_generation_prompt and messages[-1]["role"] == "user":
            turns.append("adept:")
        prompt = "\n\n".join(turns)
        if not tokenize:
            return prompt
        ids = self.encode(prompt, add_special_tokens=False)
        return [self.bos_token_id] + ids if self.add_bos_token else ids

    # ------------------------------------------------------------------------------------------ helpers
    def _encode(self, texts: list) -> list[list[int]]:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"text must be a str, got {type(text).__name__}; decode bytes explicitly "
                                "first, e.g. data.decode('utf-8', errors='replace')")
        try:
            return self._sp.encode(texts)
        except (RuntimeError, TypeError):
            for text in texts:
                text.encode("utf-8")
            raise

    def _with_special(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if not add_special_tokens:
            return ids
        return [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token

    def _check_ids(self, ids) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = list(ids)
        size = self.vocab_size
        for i in ids:
            if not isinstance(i, int):
                raise TypeError(f"token ids must be integers, got {type(i).__name__}")
            if not 0 <= i < size:
                raise ValueError(f"token id {i} is out of range for vocab size {size}")
        return ids

    def _has_piece(self, piece: str) -> bool:
        return self._sp.id_to_piece(self._sp.piece_to_id(piece)) == piece

    def _piece_id(self, piece: str | None) -> int | None:
        return None if piece is None else self._sp.piece_to_id(piece)

    def _resolve(self, name: str, value, default: str | None) -> str | None:
        if value is _DEFAULT:
            return default
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
        if value is None or self._has_piece(value):
            return None if value is None else str(value)
        if isinstance(value, _FromConfig):
            warnings.warn(f"{CONFIG_NAME}: {name} {str(value)!r} is not in the vocabulary; using "
                          f"{default!r}", stacklevel=4)
            return default
        raise ValueError(f"{name} {value!r} is not a piece of {self.vocab_file}")

    def _byte(self, token_id: int) -> int | None:
        return int(self._sp.id_to_piece(token_id)[3:5], 16) if self._sp.is_byte(token_id) else None

    def _incomplete_utf8(self, ids: list[int]) -> bool:
        """Whether ``ids`` end in byte pieces that begin a UTF-8 character but do not finish it yet."""
        continuation = 0
        for token_id in reversed(ids[-4:]):
            byte = self._byte(token_id)
            if byte is None:
                return False
            if 0x80 <= byte < 0xC0:
                continuation += 1
                continue
            length = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if 0xF0 <= byte < 0xF8 else 1
            return continuation + 1 < length
        return False

    def _decode_continuation(self, ids: list[int]) -> str:
        """Decode ``ids`` as they render after non-empty text, i.e. without the start-of-text space strip.

        SentencePiece drops the leading space marker only at the start of a decode, so a window taken from
        the middle of a stream is decoded behind an anchor piece whose text is then cut off.
        """
        if self._anchor is None:
            self._anchor = next((i for i in itertools.chain([self._sp.piece_to_id("<0x41>")], range(len(self)))
                                 if self._is_anchor(i)), None)
            if self._anchor is None:
                raise ValueError("the vocabulary has no piece that can anchor incremental decoding")
        anchor_text = self._sp.decode([self._anchor])
        return self._sp.decode([self._anchor] + ids)[len(anchor_text):]

    def _is_anchor(self, i: int) -> bool:
        sp = self._sp
        return not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)) and bool(sp.decode([i])) \
            and not sp.id_to_piece(i).startswith("\u2581")


class StreamDecoder:
    """Incremental detokeniser for streaming generation.

    ``push(token_id)`` returns the text completed by that token (possibly ""), never half a UTF-8 character:
    byte-fallback pieces are held back until they finish a character. ``flush()`` returns whatever is held
    (an unfinished character decodes to U+FFFD, as in ``decode``) and resets the decoder for a new stream.
    All pushes plus the flush concatenate to ``tokenizer.decode(ids)``. Each push decodes only the tokens
    not yet emitted, so a long stream costs linear time.
    """

    def __init__(self, tokenizer: PersimmonTokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self._skip = set(tokenizer.all_special_ids) if skip_special_tokens else set()
        self._pending: list[int] = []
        self._started = False

    def push(self, token_id: int) -> str:
        token_id = self.tokenizer._check_ids([token_id])[0]
        if token_id in self._skip:
            return ""
        self._pending.append(token_id)
        if self.tokenizer._incomplete_utf8(self._pending):
            return ""
        return self._drain()

    def flush(self) -> str:
        text = self._drain()
        self._pending, self._started = [], False
        return text

    def _drain(self) -> str:
        """Decode the held tokens. Until some text has come out, the stream is decoded from its start, since
        SentencePiece's leading-space strip depends on everything before the first visible character."""
        if self._started:
            text = self.tokenizer._decode_continuation(self._pending)
        else:
            text = self.tokenizer._sp.decode(self._pending)
            self._started = bool(text)
            if not text:
                # Held tokens that rendered nothing hold no bytes (a byte always renders); control pieces
                # among them change nothing that follows, so they are dropped: held, every push would
                # re-decode them all (quadratic time). Between byte pieces they do matter, and stay.
                sp = self.tokenizer._sp
                self._pending = [i for i in self._pending if not sp.is_control(i)]
        if self._started:
            self._pending = []
        return text


def _write_json(path: str, document: dict, indent: int | None = 2) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")
    return path


def _check_side(side: str) -> str:
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    return side
