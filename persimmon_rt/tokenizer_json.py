"""``tokenizer.json`` (the Hugging Face ``tokenizers`` format) for a SentencePiece Unigram model.

transformers loads a SentencePiece ``tokenizer.model`` only through protobuf (and, failing that, tries to read it
as a tiktoken file); with a ``tokenizer.json`` beside it, ``AutoTokenizer`` needs neither. This module reads the
model file itself (the protobuf wire format is simple enough to walk by hand) and writes the equivalent
``tokenizers`` pipeline, so neither protobuf nor ``tokenizers`` is needed to produce it:

* normalizer: SentencePiece's precompiled character map (NFKC for ``nmt_nfkc`` models, nothing for
  ``identity``), its extra-whitespace removal when enabled, and spaces escaped as U+2581;
* pre-tokenizer: the dummy prefix (a U+2581 before the text) when the model adds one;
* model: the Unigram pieces with their scores, byte fallback as in the model;
* added tokens: control and unknown pieces (special) and user-defined pieces (matched in the text, as
  SentencePiece does); the tokenizer's bos / eos / pad / unk are marked special;
* decoder: byte pieces fused into UTF-8, U+2581 back to spaces, the dummy prefix dropped.

Token ids equal ``SentencePieceProcessor.encode`` for text that holds no control-piece strings (``<s>``,
``</s>``, ``<unk>``, which transformers matches as special tokens), with two known differences: with a dummy
prefix, text that *starts* with a user-defined piece is ``[▁, piece, ...]`` in SentencePiece and ``[piece, ...]``
here (``tokenizers`` prefixes the first stretch of ordinary text only); with a character map or whitespace
removal, a space just before a user-defined piece is dropped. Decoding agrees.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM = 1


@dataclass
class SentencePieceModel:
    """The parts of a SentencePiece ModelProto that decide how text becomes pieces."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)      # (piece, score, type)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    denormalizer_charsmap: bytes = b""


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def read_sentencepiece_model(path: str) -> SentencePieceModel:
    """Parse a SentencePiece ``.model`` file (field numbers from sentencepiece_model.proto)."""
    with open(path, "rb") as fh:
        data = fh.read()
    model = SentencePieceModel()
    try:
        for number, value in _fields(data):
            if number == 1:                                   # SentencePiece {piece, score, type}
                piece, score, kind = "", 0.0, NORMAL
                for n, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                model.pieces.append((piece, score, kind))
            elif number == 2:                                 # TrainerSpec
                for n, v in _fields(value):
                    if n == 3:
                        model.model_type = v
                    elif n == 24:
                        model.treat_whitespace_as_suffix = bool(v)
                    elif n == 35:
                        model.byte_fallback = bool(v)
            elif number == 3:                                 # NormalizerSpec
                for n, v in _fields(value):
                    if n == 1:
                        model.normalizer_name = v.decode("utf-8")
                    elif n == 2:
                        model.precompiled_charsmap = v
                    elif n == 3:
                        model.add_dummy_prefix = bool(v)
                    elif n == 4:
                        model.remove_extra_whitespaces = bool(v)
                    elif n == 5:
                        model.escape_whitespaces = bool(v)
            elif number == 5:                                 # denormalizer NormalizerSpec
                model.denormalizer_charsmap = dict(_fields(value)).get(2, b"")
    except (IndexError, UnicodeDecodeError, struct.error, ValueError) as exc:
        raise ValueError(f"{path} is not a SentencePiece model ({exc})") from None
    if not model.pieces:
        raise ValueError(f"{path} is not a SentencePiece model (no pieces)")
    return model


def tokenizer_json(model_file: str, special_tokens: list[str] = (), bos_token: str | None = None,
                   eos_token: str | None = None, add_bos_token: bool = False,
                   add_eos_token: bool = False) -> dict:
    """The ``tokenizer.json`` document for ``model_file``; `special_tokens` are the pieces to mark special
    (the tokenizer's bos, eos, pad and unk), and the bos/eos settings give the post-processor."""
    sp = read_sentencepiece_model(model_file)
    unsupported = [what for what, bad in (
        ("a model type other than Unigram", sp.model_type != UNIGRAM),
        ("treat_whitespace_as_suffix", sp.treat_whitespace_as_suffix),
        ("escape_whitespaces=false", not sp.escape_whitespaces),
        ("a denormalizer", bool(sp.denormalizer_charsmap))) if bad]
    if unsupported:
        raise ValueError(f"{model_file}: cannot express {', '.join(unsupported)} as a tokenizer.json")
    special = set(special_tokens)
    # SentencePiece matches user-defined pieces in the raw text and normalizes the rest of the text as a
    # whole. Matching them in the normalized text (normalized=True) does the same as long as normalizing
    # leaves them alone, which holds without a character map or whitespace removal; otherwise they are
    # matched in the raw text and the pieces between them are normalized one by one.
    whole_text = not sp.precompiled_charsmap and not sp.remove_extra_whitespaces
    unk_id = next((i for i, (_, _, kind) in enumerate(sp.pieces) if kind == UNKNOWN), None)
    added = [{"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": kind == USER_DEFINED and whole_text, "special": kind != USER_DEFINED or piece in special}
             for i, (piece, _, kind) in enumerate(sp.pieces)
             if kind in (CONTROL, UNKNOWN, USER_DEFINED) or piece in special]

    normalizers = []
    if sp.precompiled_charsmap:
        normalizers.append({"type": "Precompiled",
                            "precompiled_charsmap": base64.b64encode(sp.precompiled_charsmap).decode("ascii")})
    # The pre-tokenizer adds the dummy prefix only where the text does not start with U+2581 already, where
    # SentencePiece adds it always (after removing leading spaces, when it removes extra whitespace): the
    # leading spaces are adjusted so that both come out the same.
    if sp.remove_extra_whitespaces:
        normalizers += [_replace(r"\A +\z", ""), _replace(r"\A +", " " if sp.add_dummy_prefix else ""),
                        _replace(r" +\z", ""), _replace(" {2,}", " ")]
    elif sp.add_dummy_prefix:
        normalizers.append(_replace(r"\A ", "  "))
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
    prepend = "first" if sp.add_dummy_prefix else "never"

    template = None
    if add_bos_token or add_eos_token:
        ids = {p: i for i, (p, _, _) in enumerate(sp.pieces) if p in (bos_token, eos_token)}
        template = {"type": "TemplateProcessing",
                    "single": _sequence("A", 0, bos_token, eos_token, add_bos_token, add_eos_token),
                    "pair": _sequence("A", 0, bos_token, eos_token, add_bos_token, add_eos_token)
                    + _sequence("B", 1, bos_token, eos_token, add_bos_token, add_eos_token),
                    "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in ids.items()}}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": prepend, "split": False},
        "post_processor": template,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"},
            {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": prepend, "split": False}]},
        "model": {"type": "Unigram", "unk_id": unk_id, "vocab": [[p, s] for p, s, _ in sp.pieces],
                  "byte_fallback": sp.byte_fallback},
    }


def _replace(regex: str, content: str) -> dict:
    return {"type": "Replace", "pattern": {"Regex": regex}, "content": content}


def _sequence(name: str, type_id: int, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> list:
    """One sequence of a TemplateProcessing post-processor: [bos] $name [eos]."""
    return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] * add_bos
            + [{"Sequence": {"id": name, "type_id": type_id}}]
            + [{"SpecialToken": {"id": eos, "type_id": type_id}}] * add_eos)
