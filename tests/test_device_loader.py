"""device_loader: safetensors streamed block by block into device memory; byte-exact, and refusing bad files."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import persimmon_rt as prt
from persimmon_rt import device_loader
from persimmon_rt.weights import CheckpointError

from model_utils import random_model, tiny_config

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def mixed_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.f16": torch.randn(37, 29, generator=g).half(),
        "b.bf16": torch.randn(1000, generator=g).bfloat16(),
        "c.f32": torch.randn(3, 5, 7, generator=g),
        "d.i64": torch.randint(-2**40, 2**40, (17,), generator=g),
        "e.bool": torch.rand(9, generator=g) > 0.5,
        "f.scalar": torch.tensor(3.25),
        "g.empty": torch.empty(0, 4),
        "h.u8": torch.randint(0, 255, (333,), generator=g, dtype=torch.uint8),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [64, 1000, 2**26])
def test_tensors_arrive_byte_exact_across_block_boundaries(tmp_path, monkeypatch, device, block):
    monkeypatch.setattr(device_loader, "BLOCK_BYTES", block)   # 64 bytes: most tensors span several blocks
    tensors = mixed_tensors()
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    loaded = device_loader.load_file(path, device)
    assert set(loaded) == set(tensors)
    for name, want in tensors.items():
        got = loaded[name]
        assert got.device.type == device and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.cpu(), want), name


def test_directory_load_converts_and_filters(tmp_path):
    save_file({"x": torch.randn(4, 4), "n": torch.arange(3), "skip": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    state = device_loader.load_state_dict(str(tmp_path), "cpu", torch.float16, names={"x", "n"})
    assert set(state) == {"x", "n"} and state["x"].dtype == torch.float16 and state["n"].dtype == torch.int64


def _write(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


@pytest.mark.parametrize("case,match", [
    ("short", "shorter than a safetensors header"),
    ("huge_length", "header length"),
    ("bad_json", "not valid JSON"),
    ("not_object", "not a JSON object"),
    ("bad_dtype", "invalid entry"),
    ("size_mismatch", "invalid entry"),
    ("past_the_end", "invalid entry"),
    ("negative_dim", "invalid entry"),
])
def test_malformed_files_are_refused_before_reading_data(tmp_path, case, match):
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    good_data = bytes(16)
    path = tmp_path / "model.safetensors"
    if case == "short":
        path.write_bytes(b"\x01\x02")
        p = str(path)
    elif case == "huge_length":
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
        p = str(path)
    elif case == "bad_json":
        p = _write(path, b"{not json", good_data)
    elif case == "not_object":
        p = _write(path, b"[1, 2]", good_data)
    else:
        entry = {**entry, **{"bad_dtype": {"dtype": "F99"}, "size_mismatch": {"shape": [3, 2]},
                             "past_the_end": {"data_offsets": [8, 24]}, "negative_dim": {"shape": [-2, -2]}}[case]}
        p = _write(path, json.dumps({"w": entry}).encode(), good_data)
    with pytest.raises(CheckpointError, match=match):
        device_loader.load_file(p, "cpu")


def test_a_truncated_file_is_refused(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.randn(64, 64)}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    with pytest.raises(CheckpointError, match="tensor 'w' has an invalid entry"):
        device_loader.load_file(path, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_from_pretrained_on_the_gpu_streams_the_same_weights(tmp_path):
    model = random_model(prt.PersimmonForCausalLM, tiny_config())
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)           # several shards
    on_gpu = prt.PersimmonForCausalLM.from_pretrained(tmp_path, dtype=torch.float16, device="cuda")
    for (name, want), (_, got) in zip(model.state_dict().items(), on_gpu.state_dict().items()):
        assert got.is_cuda and torch.equal(got.cpu(), want.half()), name
    base = prt.PersimmonModel.from_pretrained(tmp_path, device="cuda")   # drops the "model." prefix
    assert torch.equal(base.embed_tokens.weight.cpu(), model.model.embed_tokens.weight)
