"""The three fuzz targets as plain functions: each takes one input's bytes, runs the parser and checks the
properties every input must keep. A violated property raises `Finding`; anything the parser is allowed to
do (load cleanly, or refuse with a documented exception and a message) returns normally.

Used by the coverage-guided fuzzer (run_atheris.py) and by the corpus replay in the test suite, so the
two check exactly the same thing.
"""

from __future__ import annotations

import codecs
import os
import struct
import sys
import tempfile
import tracemalloc

import torch

from persimmon_rt import device_loader, safe_unpickle
from persimmon_rt.weights import CheckpointError

TARGETS = ("unpickle", "safetensors", "stream")
# A file the malicious seeds would create (and a payload mutated from them might): it must never appear.
CANARY = os.path.join(tempfile.gettempdir(), "persimmon_rt_fuzz_canary")
# Memory bound: Python objects unpickled from n bytes of pickle take at most a fixed multiple of n (an
# empty set, one opcode byte, is a 216-byte object), plus a constant for the loader itself.
MEM_PER_BYTE, MEM_BASE = 256, 32 * 2**20
_STREAM_VOCAB = None


class Finding(AssertionError):
    """An input broke one of the promised properties."""


# ------------------------------------------------------------------------------------------ guards
_guard = {"on": False, "events": []}
# Audit events that mean code is being run, a process started, a module imported or a file written.
_FORBIDDEN = ("exec", "compile", "import", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
              "os.remove", "os.rename", "os.mkdir", "os.chmod", "shutil.", "subprocess.", "ctypes.",
              "socket.", "code.__new__", "builtins.input", "pty.", "webbrowser.")


def _audit(event, args):
    if _guard["on"] and event.startswith(_FORBIDDEN):
        _guard["events"].append(f"{event}({str(args[0])[:60]})" if event in ("import", "exec") else event)
    elif _guard["on"] and event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax+"):
        _guard["events"].append(f"open({args[0]!r}, {args[1]!r})")


sys.addaudithook(_audit)
# Codecs the parsers look up by fixed names (zip member names, protocol-0 strings); imported here so
# that their first, lazy import does not count against the input that happens to need them.
for _codec in ("cp437", "raw_unicode_escape", "unicode_escape", "latin_1", "ascii", "utf_8", "utf_16_le",
               "utf_16_be", "utf_32_le", "utf_32_be", "utf_16", "utf_32"):
    codecs.lookup(_codec)


class _Watch:
    """Memory peak (tracemalloc) and forbidden audit events while a parser runs."""

    def __init__(self, bound: int):
        self.bound = bound

    def __enter__(self):
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        self.base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        _guard["events"].clear()
        _guard["on"] = True
        return self

    def __exit__(self, *exc):
        _guard["on"] = False
        self.peak = tracemalloc.get_traced_memory()[1] - self.base
        if _guard["events"]:
            raise Finding(f"the parser triggered {sorted(set(_guard['events']))}")
        if self.peak > self.bound:
            raise Finding(f"peak memory {self.peak} bytes exceeds the bound {self.bound}")
        return False


def _documented(exc: BaseException, types) -> None:
    if not isinstance(exc, types):
        raise Finding(f"undocumented exception {type(exc).__name__}: {exc}") from exc
    if not str(exc).strip():
        raise Finding(f"{type(exc).__name__} without a message") from exc


# ------------------------------------------------------------------------------------------ unpickle
def check_unpickle(data: bytes, workdir: str) -> str:
    """`safe_unpickle.load` of the bytes as a file (zip, legacy or plain pickle), and `loads` of them."""
    if os.path.exists(CANARY):
        os.remove(CANARY)
    path = os.path.join(workdir, "model_optim_rng.pt")
    with open(path, "wb") as fh:
        fh.write(data)
    outcome = []
    for fn, arg in ((safe_unpickle.load, path), (safe_unpickle.loads, data)):
        try:
            with _Watch(MEM_BASE + MEM_PER_BYTE * len(data)):
                fn(arg)
            outcome.append("ok")
        except Finding:
            raise
        except BaseException as exc:  # noqa: B036 - a SystemExit or KeyboardInterrupt from a payload counts too
            _documented(exc, CheckpointError)
            outcome.append(type(exc).__name__)
        if os.path.exists(CANARY):
            raise Finding("the payload's canary file was created")
    return "/".join(outcome)


# ------------------------------------------------------------------------------------------ safetensors
def check_safetensors(data: bytes, workdir: str) -> str:
    """`device_loader.read_header`, then (on success) `load_file` to the CPU in small blocks, byte-exact."""
    path = os.path.join(workdir, "model.safetensors")
    with open(path, "wb") as fh:
        fh.write(data)
    try:
        with _Watch(MEM_BASE + 64 * len(data)):
            start, entries = device_loader.read_header(path)
    except Finding:
        raise
    except BaseException as exc:  # noqa: B036
        _documented(exc, CheckpointError)
        return type(exc).__name__
    claimed = sum(end - begin for _, _, begin, end in entries.values())
    if claimed > len(data) - start:
        raise Finding(f"tensors claim {claimed} bytes of {len(data) - start} data bytes (overlapping ranges)")
    old = device_loader.BLOCK_BYTES
    device_loader.BLOCK_BYTES = 61  # odd-sized blocks: most tensors straddle a boundary
    try:
        with _Watch(MEM_BASE + 64 * len(data)):
            tensors = device_loader.load_file(path, "cpu")
    except Finding:
        raise
    except BaseException as exc:  # noqa: B036
        _documented(exc, CheckpointError)
        return "load:" + type(exc).__name__
    finally:
        device_loader.BLOCK_BYTES = old
    if set(tensors) != set(entries):
        raise Finding("load_file returned other tensors than the header lists")
    for name, (dtype, shape, begin, end) in entries.items():
        t = tensors[name]
        if t.dtype != dtype or list(t.shape) != shape:
            raise Finding(f"{name}: {t.dtype} {list(t.shape)} instead of {dtype} {shape}")
        got = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        if got != data[start + begin:start + end]:
            raise Finding(f"{name}: bytes differ from the file's")
    return "ok"


# ------------------------------------------------------------------------------------------ stream
def stream_tokenizer():
    global _STREAM_VOCAB
    if _STREAM_VOCAB is None:
        from persimmon_rt.demo import demo_model_path
        from persimmon_rt.tokenizer import PersimmonTokenizer

        _STREAM_VOCAB = PersimmonTokenizer.from_pretrained(demo_model_path())
    return _STREAM_VOCAB


def stream_ids(data: bytes, vocab: int) -> tuple[bool, list[int]]:
    """First byte: bit 0 = skip_special_tokens. Then one id per 2 bytes (little-endian): values below
    0xFF00 are taken modulo the vocabulary; the rest are ids just outside it (vocab .. vocab+254, or -1)."""
    flags, body = (data[0], data[1:]) if data else (0, b"")
    ids = []
    for (v,) in struct.iter_unpack("<H", body[:len(body) // 2 * 2]):
        ids.append(v % vocab if v < 0xFF00 else -1 if v == 0xFFFF else vocab + (v & 0xFF))
    return bool(flags & 1), ids


class _CountingSP:
    """Counts the ids SentencePiece is asked to decode (the stream's work), otherwise the real processor."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, ids):
        self.decoded += len(ids)
        return self.inner.decode(ids)


def check_stream(data: bytes, workdir: str | None = None) -> str:
    """`StreamDecoder` over the ids: every push is text; pushes + flush == decode(ids); linear work."""
    tok = stream_tokenizer()
    skip, ids = stream_ids(data, tok.vocab_size)
    valid = [i for i in ids if 0 <= i < tok.vocab_size]
    want = tok.decode(valid, skip_special_tokens=skip)
    counter = _CountingSP(tok._sp)
    real, tok._sp = tok._sp, counter
    try:
        with _Watch(MEM_BASE + 64 * len(data)):
            pieces = _stream(tok, ids, valid, skip)
    finally:
        tok._sp = real
    for piece in pieces:
        if not isinstance(piece, str):
            raise Finding(f"push returned a {type(piece).__name__}")
        try:
            piece.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Finding(f"output is not valid UTF-8: {piece!r}") from exc
    if "".join(pieces) != want:
        raise Finding(f"stream {''.join(pieces)!r} != decode {want!r} for ids {valid}")
    if "\ufffd" not in want and any("\ufffd" in p for p in pieces):
        raise Finding("a push emitted half a character")
    if counter.decoded > 8 * len(valid) + 16:
        raise Finding(f"decoding {len(valid)} ids took {counter.decoded} id-decodes (not linear)")
    return "ok"


def _stream(tok, ids, valid, skip) -> list[str]:
    from persimmon_rt.tokenizer import StreamDecoder

    decoder = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = []
    for i in ids:
        try:
            pieces.append(decoder.push(i))
        except ValueError as exc:
            if i in valid:
                raise Finding(f"push({i}) of a valid id raised {exc}") from exc
            _documented(exc, ValueError)
        else:
            if i not in valid:
                raise Finding(f"push({i}) of an id outside the vocabulary was accepted")
    pieces.append(decoder.flush())
    return pieces


CHECKS = {"unpickle": check_unpickle, "safetensors": check_safetensors, "stream": check_stream}
