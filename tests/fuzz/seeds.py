"""Writes the seed corpus of each fuzz target from real files:

    python tests/fuzz/seeds.py OUT_DIR      -> OUT_DIR/{unpickle,safetensors,stream}/...

unpickle: a synthetic adept checkpoint (args, tensors, RNG states, objects of a module that cannot be
imported) in the zip and the legacy container, variants (big-endian, compressed members), plain data
pickles of every protocol, and pickles that would run a payload creating `targets.CANARY`.
safetensors: the demo model's header over data cut down to fit a fuzz input, mixed-dtype files.
stream: the demo tokenizer's ids for hard texts, held-out text and raw byte pieces.
"""

import argparse
import collections
import io
import json
import os
import pickle
import random
import struct
import sys
import zipfile

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fuzz import targets  # noqa: E402


def adept_checkpoint() -> dict:
    g = torch.Generator().manual_seed(0)
    h, v = 8, 16
    layer = {f"layers.0.{k}": (0.2 * torch.randn(*s, generator=g)).bfloat16() for k, s in {
        "input_layernorm.weight": (h,), "self_attention.query_key_value.weight": (3 * h, h),
        "self_attention.dense.weight": (h, h), "mlp.dense_h_to_4h.weight": (2 * h, h)}.items()}
    args = argparse.Namespace(num_layers=1, hidden_size=h, num_attention_heads=2, padded_vocab_size=v,
                              qk_layernorm="weights_per_layer", params_dtype=torch.bfloat16, rotary_pct=0.5)
    embed = torch.randn(v, h, generator=g).bfloat16()
    rng = {"random_rng_state": random.Random(0).getstate(), "np_rng_state": np.random.RandomState(0).get_state(),
           "torch_rng_state": torch.arange(16, dtype=torch.uint8), "rng_tracker_states": {"x": torch.zeros(4)}}
    return {"args": args, "checkpoint_version": 3.0, "iteration": 7, "rng_state": [rng],
            "model": {"language_model": {"embedding": {"word_embeddings": {"weight": embed}},
                                         "encoder": collections.OrderedDict(layer)},
                      "word_embeddings_for_head": {"weight": embed[:, :4]}}}


def plain_data() -> dict:
    return {"i": 3, "f": 1.5, "s": "text", "b": b"\x00\xff", "l": [1, [2, (3,)]], "set": {1, 2},
            "fs": frozenset({3}), "c": complex(1, 2), "od": collections.OrderedDict(a=1),
            "dd": collections.defaultdict(list, x=[1]), "ns": argparse.Namespace(a=1), "none": None,
            "np": np.float64(1.5), "arr": np.arange(6, dtype=np.int16).reshape(2, 3), "dt": np.dtype("float32"),
            "big": 2**70, "range": range(3), "slice": slice(1, 2)}


def torch_bytes(obj, legacy=False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def rezip(data: bytes, compression=zipfile.ZIP_DEFLATED, byteorder=None) -> bytes:
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as dst:
        for info in src.infolist():
            body = src.read(info)
            if byteorder and info.filename.endswith("/byteorder"):
                body = byteorder.encode()
            dst.writestr(info.filename, body)
    return out.getvalue()


def payload_pickles() -> dict[str, bytes]:
    shell, code = f"touch {targets.CANARY}", f"open({targets.CANARY!r}, 'w').close()"
    calls = {"os_system": ("os", "system", (shell,)), "posix_system": ("posix", "system", (shell,)),
             "exec": ("builtins", "exec", (code,)), "eval": ("__builtin__", "eval", (code,)),
             "popen": ("subprocess", "Popen", (["touch", targets.CANARY],)),
             "import": ("importlib", "import_module", ("antigravity",)),
             "pkg_fn": ("evil_pkg", "run_payload", (shell,)), "pkg_cls": ("evil_pkg", "Payload", (shell,))}
    out = {}
    for name, (module, fn, args) in calls.items():
        body = pickle.dumps(args, protocol=2)[2:-1]
        out[f"payload_{name}_reduce"] = b"\x80\x02}X\x04\x00\x00\x00args" + f"c{module}\n{fn}\n".encode() + body + b"Rs."
        out[f"payload_{name}_inst"] = f"(S'{shell}'\ni{module}\n{fn}\n.".encode()
        out[f"payload_{name}_stack_global"] = (b"\x80\x04\x8c" + bytes([len(module)]) + module.encode() + b"\x8c"
                                               + bytes([len(fn)]) + fn.encode() + b"\x93" + body + b"R.")
    # The builtins getattr chain a pickle needs to reach os.system through an allowed type.
    out["payload_getattr_chain"] = (b"\x80\x02cbuiltins\ngetattr\ncbuiltins\nobject\nX\x0e\x00\x00\x00__subclasses__"
                                    b"\x86R)R.")
    return out


class _Call:
    """Pickles as a call of `fn(*args)`: reaches the allow-listed callables that plain data does not."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def allowed_calls() -> dict:
    return {"dict": _Call(dict, [(1, 2)]), "od": _Call(collections.OrderedDict, [("a", 1)]),
            "dd": _Call(collections.defaultdict, list, {"k": [1]}), "ba": _Call(bytearray, b"xy"),
            "bytes": _Call(bytes, [1, 2]), "set": _Call(set, [1, (2, "x")]), "fs": _Call(frozenset, ("a",)),
            "list": _Call(list, (1, 2)), "tuple": _Call(tuple, [1]), "slice": _Call(slice, 1, 5, 2),
            "range": _Call(range, 1, 9, 3), "complex": _Call(complex, "1+2j"), "dev": torch.device("cpu", 0),
            "size": torch.Size([2, 3]), "dt": torch.float16}


def unpickle_seeds() -> dict[str, bytes]:
    ckpt = adept_checkpoint()
    zip_bytes = torch_bytes(ckpt)
    seeds = {"adept_zip.pt": zip_bytes, "adept_legacy.pt": torch_bytes(ckpt, legacy=True),
             "adept_zip_deflated.pt": rezip(zip_bytes), "adept_zip_bigendian.pt": rezip(zip_bytes, zipfile.ZIP_STORED, "big"),
             "tensors_zip.pt": torch_bytes({"t": torch.arange(12.0).view(3, 4)[:, 1:3], "p": torch.nn.Parameter(torch.ones(2)),
                                            "h": torch.ones(3, dtype=torch.float16), "b": torch.tensor([True]), "s": torch.Size([2, 3])}),
             "tensors_legacy.pt": torch_bytes({"t": torch.arange(6).view(2, 3).t(), "e": torch.empty(0)}, legacy=True)}
    data = plain_data()
    for proto in range(6):
        seeds[f"plain_protocol{proto}.pkl"] = pickle.dumps(data, protocol=proto)
    seeds.update({f"{k}.pkl": v for k, v in payload_pickles().items()})
    for proto in (0, 2, 4):
        seeds[f"calls_protocol{proto}.pkl"] = pickle.dumps(allowed_calls(), protocol=proto)
    sub = torch.arange(4.0).as_subclass(torch.nn.Buffer) if hasattr(torch.nn, "Buffer") else torch.arange(4.0)
    seeds["tensor_kinds_zip.pt"] = torch_bytes({"u16": torch.tensor([1, 2, 3], dtype=torch.uint16), "sub": sub,
                                                "q": torch.nn.Parameter(torch.ones(2), requires_grad=False)})
    seeds["tensor_kinds_legacy.pt"] = torch_bytes({"u16": torch.tensor([1, 2, 3], dtype=torch.uint16), "dev": torch.device("cpu")},
                                                  legacy=True)
    return seeds


def safetensors_bytes(tensors: dict, metadata=None) -> bytes:
    buf = io.BytesIO()
    from safetensors.torch import save
    buf.write(save(tensors, metadata=metadata))
    return buf.getvalue()


def safetensors_seeds() -> dict[str, bytes]:
    from persimmon_rt.demo import demo_model_path

    with open(os.path.join(demo_model_path(), "model.safetensors"), "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = fh.read(n)
        first = fh.read(4096)
    table = json.loads(header)
    # The demo header as it is, over the first 4 KiB of its data (a truncated download), and the same
    # tensors with every dimension cut to at most 2 so that the whole file fits a fuzz input.
    seeds = {"demo_truncated.safetensors": struct.pack("<Q", n) + header + first}
    small, pos = {}, 0
    for name, entry in table.items():
        if name == "__metadata__":
            small[name] = entry
            continue
        shape = [min(d, 2) for d in entry["shape"]]
        nbytes = int(np.prod(shape)) * {"BF16": 2, "F16": 2, "F32": 4}[entry["dtype"]]
        small[name] = {"dtype": entry["dtype"], "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    head = json.dumps(small, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    seeds["demo_small.safetensors"] = struct.pack("<Q", len(head)) + head + (first * (pos // len(first) + 1))[:pos]
    g = torch.Generator().manual_seed(0)
    seeds["mixed.safetensors"] = safetensors_bytes({
        "a.f16": torch.randn(3, 2, generator=g).half(), "b.bf16": torch.randn(5, generator=g).bfloat16(),
        "c.f32": torch.randn(2, 1, 2, generator=g), "d.i64": torch.arange(3), "e.bool": torch.tensor([True, False]),
        "f.scalar": torch.tensor(3.25), "g.empty": torch.empty(0, 4), "h.u8": torch.arange(7, dtype=torch.uint8),
        "i.f64": torch.ones(2, dtype=torch.float64), "j.i32": torch.arange(2, dtype=torch.int32),
        "k.i16": torch.arange(2, dtype=torch.int16), "l.i8": torch.arange(2, dtype=torch.int8)},
        metadata={"format": "pt"})
    seeds["empty.safetensors"] = safetensors_bytes({})
    return seeds


def stream_seeds() -> dict[str, bytes]:
    tok = targets.stream_tokenizer()
    hard = ["hello world", " leading space", "  multiple   inner    spaces  ", "tab\there\n\nline",
            "emoji 😀👍🏽 and a flag 🇯🇵", "日本語のテキスト", "combining e\u0301", "\x00nul \x7f del", "|ENDOFTEXT|x"]
    with open(os.path.join(ROOT, "tests", "data", "heldout.txt"), encoding="utf-8") as fh:
        hard.append(fh.read()[:600])

    def pack(ids, skip=False):
        return bytes([int(skip)]) + struct.pack(f"<{len(ids)}H", *ids)

    seeds = {f"text{i}": pack(tok.encode(t), skip=i % 2 == 1) for i, t in enumerate(hard)}
    byte_id = {b: tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    seeds["bytes_emoji"] = pack([byte_id[b] for b in "x😀é".encode()])
    seeds["bytes_invalid"] = pack([byte_id[b] for b in b"\xf0\x9f\xc3\x80\x80\xe2\x82\xff\xf8A"])
    seeds["controls"] = pack([1, 2, 1, tok.convert_tokens_to_ids("\u2581")] + tok.encode("end") + [2, 0], skip=True)
    return seeds


def main(out: str) -> None:
    for target, seeds in (("unpickle", unpickle_seeds()), ("safetensors", safetensors_seeds()), ("stream", stream_seeds())):
        os.makedirs(os.path.join(out, target), exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(out, target, name), "wb") as fh:
                fh.write(data)
        print(target, len(seeds), "seeds,", max(map(len, seeds.values())), "bytes at most")


if __name__ == "__main__":
    main(sys.argv[1])
