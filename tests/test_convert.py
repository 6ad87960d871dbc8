"""Original adept checkpoint -> HF-format directory: safe unpickling, config from args, bitwise weights,
model-level parity (ours and transformers), malicious pickles, atomic output, errors and the CLI."""

import argparse
import collections
import importlib
import io
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import uuid
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import persimmon_rt.convert as convert_mod
from persimmon_rt import safe_unpickle
from persimmon_rt.convert import convert_adept_checkpoint
from persimmon_rt.safe_unpickle import GlobalRef, Placeholder, UnsafeCheckpointError
from persimmon_rt.tokenizer import PersimmonTokenizer
from persimmon_rt.weights import CheckpointError, load_state_dict

ROOT = Path(__file__).resolve().parents[1]
H, HEADS, LAYERS, FFN, VOCAB, SEQ = 64, 4, 2, 96, 384, 64


# ------------------------------------------------------------------------------------------------ builders
def make_args(**overrides) -> argparse.Namespace:
    fields = dict(num_layers=LAYERS, hidden_size=H, ffn_hidden_size=FFN, num_attention_heads=HEADS,
                  kv_channels=H // HEADS, seq_length=SEQ, max_position_embeddings=SEQ, rotary_pct=0.5,
                  rotary_emb_base=25000, layernorm_epsilon=1e-5, padded_vocab_size=VOCAB,
                  qk_layernorm="weights_per_layer", untie_embeddings=True, sq_relu=True, bf16=True, fp16=False,
                  pos_emb="rotary", tokenizer_type="SentencePiece", sp_model_file="/ckpt/adept_vocab.model",
                  make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, params_dtype=torch.bfloat16)
    fields.update(overrides)
    return argparse.Namespace(**{k: v for k, v in fields.items() if v is not ...})


def make_model(args, dtype=torch.bfloat16, tp=1, seed=0):
    """(nested megatron `model` dict, expected HF state dict holding the very same tensors)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, base=0.0):
        return (base + 0.2 * torch.randn(*shape, generator=g)).to(dtype)

    h, f, v = args.hidden_size, args.ffn_hidden_size, args.padded_vocab_size
    d = h // args.num_attention_heads
    encoder, expected = collections.OrderedDict(), {}

    def put(meg, hf, tensor):
        encoder[meg] = tensor
        expected[hf] = tensor

    for i in range(args.num_layers):
        m, p = f"layers.{i}.", f"model.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            put(f"{m}{ln}.weight", f"{p}{ln}.weight", rnd(h, base=1.0))
            put(f"{m}{ln}.bias", f"{p}{ln}.bias", rnd(h))
        put(f"{m}self_attention.query_key_value.weight", f"{p}self_attn.query_key_value.weight", rnd(3 * h // tp, h))
        put(f"{m}self_attention.query_key_value.bias", f"{p}self_attn.query_key_value.bias", rnd(3 * h // tp))
        if args.qk_layernorm not in ("none", False):
            for qk in ("q_layernorm", "k_layernorm"):
                put(f"{m}self_attention.{qk}.weight", f"{p}self_attn.{qk}.weight", rnd(d, base=1.0))
                put(f"{m}self_attention.{qk}.bias", f"{p}self_attn.{qk}.bias", rnd(d))
        put(f"{m}self_attention.dense.weight", f"{p}self_attn.dense.weight", rnd(h, h // tp))
        put(f"{m}self_attention.dense.bias", f"{p}self_attn.dense.bias", rnd(h))
        rot = int(d * args.rotary_pct)
        encoder[f"{m}self_attention.rotary_emb.inv_freq"] = \
            (1.0 / 25000 ** (torch.arange(0, rot, 2).float() / rot)).to(dtype)
        put(f"{m}mlp.dense_h_to_4h.weight", f"{p}mlp.dense_h_to_4h.weight", rnd(f // tp, h))
        put(f"{m}mlp.dense_h_to_4h.bias", f"{p}mlp.dense_h_to_4h.bias", rnd(f // tp))
        put(f"{m}mlp.dense_4h_to_h.weight", f"{p}mlp.dense_4h_to_h.weight", rnd(h, f // tp))
        put(f"{m}mlp.dense_4h_to_h.bias", f"{p}mlp.dense_4h_to_h.bias", rnd(h))
    put("final_layernorm.weight", "model.final_layernorm.weight", rnd(h, base=1.0))
    put("final_layernorm.bias", "model.final_layernorm.bias", rnd(h))
    embed = rnd(v // tp, h)
    expected["model.embed_tokens.weight"] = embed
    model = {"language_model": {"embedding": {"word_embeddings": {"weight": embed}}, "encoder": encoder}}
    if args.untie_embeddings:
        model["word_embeddings_for_head"] = {"weight": rnd(v // tp, h)}
        expected["lm_head.weight"] = model["word_embeddings_for_head"]["weight"]
    return model, expected


def rng_states():
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.arange(16, dtype=torch.uint8),
            "rng_tracker_states": {"model-parallel-rng": torch.arange(8, dtype=torch.uint8)}}


def write_release(root: Path, args, model, vocab: bytes | None, extra=None, legacy=False) -> Path:
    release = root / "release"
    rank_dir = release / "iter_0000007" / "mp_rank_00"
    rank_dir.mkdir(parents=True)
    (release / "latest_checkpointed_iteration.txt").write_text("7")
    checkpoint = {"args": args, "checkpoint_version": 3.0, "iteration": 7, "model": model,
                  "rng_state": [rng_states()], **(extra or {})}
    torch.save(checkpoint, rank_dir / "model_optim_rng.pt", _use_new_zipfile_serialization=not legacy)
    if vocab is not None:
        (release / "adept_vocab.model").write_bytes(vocab)
    return release


def pt_file(release: Path) -> Path:
    return release / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"


THROWAWAY = """
import enum

class AttnMaskType(enum.Enum):
    padding = 1
    causal = 2

class OptimizerState:
    def __init__(self, lr):
        self.lr = lr
        self.steps = [1, 2]

def scheduler_factory():
    raise AssertionError("must never be called")
"""


@pytest.fixture(scope="module")
def vocab_bytes():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=300,
                                   model_type="unigram", user_defined_symbols=["|ENDOFTEXT|"], minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def release(tmp_path_factory, vocab_bytes):
    """A bf16 release whose pickle also holds RNG states and objects of a module the loader cannot import."""
    root = tmp_path_factory.mktemp("adept")
    module_dir = root / "throwaway"
    module_dir.mkdir()
    name = f"adept_throwaway_{uuid.uuid4().hex[:8]}"
    (module_dir / f"{name}.py").write_text(THROWAWAY)
    sys.path.insert(0, str(module_dir))
    try:
        mod = importlib.import_module(name)
        args = make_args(attn_mask_type=mod.AttnMaskType.causal)
        model, expected = make_model(args)
        extra = {"optimizer": mod.OptimizerState(0.25), "opt_param_scheduler": {"factory": mod.scheduler_factory}}
        rng = rng_states()
        path = write_release(root, args, model, vocab_bytes, extra)
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(module_dir))
        shutil.rmtree(module_dir)
        importlib.invalidate_caches()
    return {"path": path, "args": args, "expected": expected, "module": name, "rng": rng}


def converted_state(out: Path) -> dict[str, torch.Tensor]:
    return dict(load_state_dict(str(out)))


# ------------------------------------------------------------------------------------------ safe unpickle
def test_safe_load_rebuilds_everything_without_importing(release):
    ckpt = safe_unpickle.load(pt_file(release["path"]))
    assert release["module"] not in sys.modules
    args = ckpt["args"]
    assert isinstance(args, argparse.Namespace) and args.hidden_size == H and args.params_dtype is torch.bfloat16
    enum_value = args.attn_mask_type
    assert isinstance(enum_value, Placeholder) and (enum_value.module, enum_value.name, enum_value.args) == \
        (release["module"], "AttnMaskType", (2,))
    optimizer = ckpt["optimizer"]
    assert isinstance(optimizer, Placeholder) and optimizer.name == "OptimizerState"
    assert optimizer.state == {"lr": 0.25, "steps": [1, 2]}
    factory = ckpt["opt_param_scheduler"]["factory"]
    assert isinstance(factory, GlobalRef) and repr(factory) == f"{release['module']}.scheduler_factory"
    rng, want = ckpt["rng_state"][0], release["rng"]
    assert rng["random_rng_state"] == want["random_rng_state"]
    np_state = rng["np_rng_state"]
    assert np_state[0] == "MT19937" and np.array_equal(np_state[1], want["np_rng_state"][1])
    assert np_state[1].dtype == want["np_rng_state"][1].dtype and np_state[2:] == want["np_rng_state"][2:]
    assert torch.equal(rng["torch_rng_state"], want["torch_rng_state"])
    embed = ckpt["model"]["language_model"]["embedding"]["word_embeddings"]["weight"]
    assert embed.dtype == torch.bfloat16 and torch.equal(embed, release["expected"]["model.embed_tokens.weight"])


def test_safe_load_matches_torch_load_on_plain_data(tmp_path):
    data = {"t": torch.arange(12, dtype=torch.float32).view(3, 4)[:, 1:3], "b": torch.tensor([True, False]),
            "i": torch.arange(5), "h": torch.ones(3, dtype=torch.float16), "p": torch.nn.Parameter(torch.ones(2)),
            "size": torch.Size([2, 3]), "set": {1, 2}, "bytes": b"\x00\xff", "empty": b"", "c": complex(1, 2),
            "od": collections.OrderedDict(a=1), "dd": collections.defaultdict(list, x=[1]), "np": np.float64(1.5),
            "arr": np.arange(6, dtype=np.int16).reshape(2, 3), "dtype": np.dtype("float32")}
    for legacy in (False, True):
        path = tmp_path / f"d{legacy}.pt"
        torch.save(data, path, _use_new_zipfile_serialization=not legacy)
        got, ref = safe_unpickle.load(path), torch.load(path, weights_only=False)  # our own file
        assert got.keys() == ref.keys()
        for key in data:
            if isinstance(ref[key], torch.Tensor):
                assert torch.equal(got[key], ref[key]) and got[key].stride() == ref[key].stride(), key
            elif isinstance(ref[key], np.ndarray):
                assert np.array_equal(got[key], ref[key]) and got[key].dtype == ref[key].dtype
            else:
                assert got[key] == ref[key] and type(got[key]) is type(ref[key]), key


def reduce_pickle(module: str, name: str, args: tuple) -> bytes:
    """A protocol-2 pickle of {'args': module.name(*args)} (REDUCE), written by hand."""
    body = pickle.dumps(args, protocol=2)[2:-1]
    return (b"\x80\x02}X" + struct.pack("<I", 4) + b"args" + f"c{module}\n{name}\n".encode() + body + b"Rs.")


def torch_zip(path: Path, data_pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", b"\x00" * 16)
        zf.writestr("archive/version", "3\n")
    return path


def payloads(marker: Path):
    shell = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    return {"os.system": ("os", "system", (shell,)), "posix.system": ("posix", "system", (shell,)),
            "builtins.exec": ("builtins", "exec", (code,)), "builtins.eval": ("__builtin__", "eval", (code,)),
            "subprocess.Popen": ("subprocess", "Popen", (["touch", str(marker)],)),
            "builtins.getattr": ("builtins", "getattr", (0, "real")),
            "importlib.import_module": ("importlib", "import_module", ("this_module_does_not_exist",)),
            "evil_pkg.run_payload": ("evil_pkg", "run_payload", (shell,))}


@pytest.mark.parametrize("target", ["os.system", "posix.system", "builtins.exec", "builtins.eval",
                                    "subprocess.Popen", "builtins.getattr", "importlib.import_module",
                                    "evil_pkg.run_payload"])
@pytest.mark.parametrize("container", ["zip", "raw"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, target, container):
    marker = tmp_path / "pwned"
    module, name, call_args = payloads(marker)[target]
    data = reduce_pickle(module, name, call_args)
    path = tmp_path / "model_optim_rng.pt"
    if container == "zip":
        torch_zip(path, data)
    else:
        path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match=name):
        safe_unpickle.load(path)
    with pytest.raises(UnsafeCheckpointError):
        safe_unpickle.loads(data)
    assert not marker.exists()
    assert "this_module_does_not_exist" not in sys.modules and "evil_pkg" not in sys.modules


def test_malicious_release_refused_by_converter(tmp_path, vocab_bytes):
    marker = tmp_path / "pwned"
    release = write_release(tmp_path, make_args(), {}, vocab_bytes)
    torch_zip(pt_file(release), reduce_pickle("os", "system", (f"touch {marker}",)))
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        convert_adept_checkpoint(release, tmp_path / "out", progress=False)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unknown_objects_cannot_reach_code(tmp_path):
    # BUILD on an allowed type with a dunder key, and NEWOBJ of a non-allowed stdlib type, are refused.
    bad_state = b"\x80\x02cargparse\nNamespace\n)\x81}X\x09\x00\x00\x00__class__K\x01sb."
    with pytest.raises(UnsafeCheckpointError):
        safe_unpickle.loads(bad_state)
    with pytest.raises(UnsafeCheckpointError, match="types.FunctionType"):
        safe_unpickle.loads(b"\x80\x02ctypes\nFunctionType\n)\x81.")
    # A CamelCase global of an unknown module is only ever a placeholder, whatever it is called with.
    obj = safe_unpickle.loads(b"\x80\x02cevil_pkg\nPayload\nX\x02\x00\x00\x00hi\x85R.")
    assert isinstance(obj, Placeholder) and obj.args == ("hi",) and "evil_pkg" not in sys.modules


# ------------------------------------------------------------------------------------------------- convert
def assert_auto_tokenizer_agrees(out: Path, eod: int) -> None:
    """transformers' AutoTokenizer reads the converted directory with the model's special tokens."""
    transformers = pytest.importorskip("transformers")
    hf, ours = transformers.AutoTokenizer.from_pretrained(out), PersimmonTokenizer.from_pretrained(out)
    assert hf.eos_token == ours.eos_token == "|ENDOFTEXT|" and hf.eos_token_id == ours.eos_token_id == eod
    assert hf.bos_token_id == ours.bos_token_id == eod and hf.unk_token_id == ours.unk_token_id
    text = "abc defg hijk lmnop"
    assert hf.encode(text) == ours.encode(text) and hf.decode(ours.encode(text)) == ours.decode(ours.encode(text))


def test_convert_release_directory(release, tmp_path, vocab_bytes):
    out = tmp_path / "hf"
    config = convert_adept_checkpoint(release["path"], out, progress=False)
    assert release["module"] not in sys.modules
    args = release["args"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads) == \
        (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads)
    assert config.head_dim == args.kv_channels and config.vocab_size == args.padded_vocab_size
    assert config.max_position_embeddings == args.max_position_embeddings
    assert config.partial_rotary_factor == args.rotary_pct and config.rope_theta == args.rotary_emb_base
    assert config.layer_norm_eps == args.layernorm_epsilon and config.qk_layernorm is True
    assert config.tie_word_embeddings is False and config.hidden_act == "relu2"
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["PersimmonForCausalLM"] and saved["torch_dtype"] == "bfloat16"
    assert saved["num_hidden_layers"] == LAYERS and saved["vocab_size"] == VOCAB

    state, expected = converted_state(out), release["expected"]
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and state[name].shape == tensor.shape, name
        assert torch.equal(state[name].view(torch.int16), tensor.view(torch.int16)), name  # bitwise

    assert (out / "tokenizer.model").read_bytes() == vocab_bytes
    eod = spm.SentencePieceProcessor(model_proto=vocab_bytes).piece_to_id("|ENDOFTEXT|")
    assert_auto_tokenizer_agrees(out, eod)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod}
    assert config.bos_token_id == config.eos_token_id == eod
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.partial")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, "bfloat16"])
def test_convert_dtype(release, tmp_path, dtype):
    out = tmp_path / "hf"
    config = convert_adept_checkpoint(release["path"], out, dtype=dtype, progress=False)
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert config.torch_dtype == str(want).removeprefix("torch.")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == config.torch_dtype
    state = converted_state(out)
    for name, tensor in release["expected"].items():
        assert state[name].dtype == want and torch.equal(state[name], tensor.to(want)), name


def test_convert_bad_dtype(release, tmp_path):
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        convert_adept_checkpoint(release["path"], tmp_path / "hf", dtype=torch.int8, progress=False)


def test_pt_path_finds_vocab_in_parents_and_sharding(release, tmp_path):
    out = tmp_path / "hf"
    convert_adept_checkpoint(pt_file(release["path"]), out, max_shard_bytes=20_000, progress=False)
    assert (out / "tokenizer.model").exists()
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    state = converted_state(out)
    assert all(torch.equal(state[k], v) for k, v in release["expected"].items())


def test_no_tokenizer_warns(tmp_path):
    args = make_args()
    release = write_release(tmp_path / "ckpt", args, make_model(args)[0], vocab=None)
    out = tmp_path / "hf"
    with pytest.warns(UserWarning, match="adept_vocab.model"):
        config = convert_adept_checkpoint(release, out, progress=False)
    assert not (out / "tokenizer.model").exists()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                          "pad_token_id": config.eos_token_id}


@pytest.mark.parametrize("qk", ["none", False, True, "weights_per_tensor_parallel_rank_and_layer"])
def test_qk_layernorm_modes_and_tied_embeddings(tmp_path, vocab_bytes, qk):
    args = make_args(qk_layernorm=qk, untie_embeddings=False, bf16=False, fp16=True)
    model, expected = make_model(args, dtype=torch.float16)
    release = write_release(tmp_path, args, model, vocab_bytes)
    config = convert_adept_checkpoint(release, tmp_path / "hf", progress=False)
    assert config.qk_layernorm is (qk not in ("none", False))
    assert config.tie_word_embeddings is True and config.torch_dtype == "float16"
    state = converted_state(tmp_path / "hf")
    assert "lm_head.weight" not in state and sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_legacy_torch_format(tmp_path, vocab_bytes):
    args = make_args()
    model, expected = make_model(args)
    release = write_release(tmp_path, args, model, vocab_bytes, legacy=True)
    assert not zipfile.is_zipfile(pt_file(release))
    convert_adept_checkpoint(release, tmp_path / "hf", progress=False)
    state = converted_state(tmp_path / "hf")
    assert sorted(state) == sorted(expected) and all(torch.equal(state[k], v) for k, v in expected.items())


def test_progress_output(release, tmp_path, capsys):
    convert_adept_checkpoint(release["path"], tmp_path / "a", progress=False)
    assert capsys.readouterr().err == ""
    convert_adept_checkpoint(release["path"], tmp_path / "b", progress=True)
    err = capsys.readouterr().err.strip().splitlines()  # stderr is not a TTY here: just the summary
    assert len(err) == 1 and err[0].startswith("converted ") and "tensors" in err[0]


# ------------------------------------------------------------------------------------------ model parity
def logits_inputs():
    return torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))


def hf_reference(expected, tie=False):
    transformers = pytest.importorskip("transformers")
    config = transformers.PersimmonConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN,
                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          max_position_embeddings=SEQ, qk_layernorm=True, tie_word_embeddings=tie,
                                          rope_parameters={"rope_type": "default", "rope_theta": 25000.0,
                                                           "partial_rotary_factor": 0.5})
    config._attn_implementation = "eager"
    model = transformers.PersimmonForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in expected.items()}, strict=False)
    assert not unexpected and all("inv_freq" in k or (tie and k == "lm_head.weight") for k in missing)
    if tie:
        model.tie_weights()
    return model


def test_transformers_loads_converted_dir(release, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    convert_adept_checkpoint(release["path"], out, dtype=torch.float32, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.PersimmonForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    ids = logits_inputs()
    with torch.no_grad():
        got = loaded(ids).logits
        want = hf_reference(release["expected"])(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_runtime_model_loads_converted_dir(release, tmp_path):
    import persimmon_rt

    out = tmp_path / "hf"
    convert_adept_checkpoint(release["path"], out, dtype=torch.float32, progress=False)
    loaded = persimmon_rt.PersimmonForCausalLM.from_pretrained(out)
    config = persimmon_rt.PersimmonConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN,
                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          max_position_embeddings=SEQ, partial_rotary_factor=0.5,
                                          rope_theta=25000.0, qk_layernorm=True, tie_word_embeddings=False)
    direct = persimmon_rt.PersimmonForCausalLM(config)
    missing, unexpected = direct.load_state_dict({k: v.float() for k, v in release["expected"].items()},
                                                 strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing)
    ids = logits_inputs()
    with torch.no_grad():
        got, want = loaded(ids).logits, direct.eval()(ids).logits
        hf = hf_reference(release["expected"])(ids).logits
    assert torch.equal(got, want)
    torch.testing.assert_close(got, hf, atol=1e-5, rtol=0)


def test_tied_checkpoint_parity(tmp_path, vocab_bytes):
    import persimmon_rt

    args = make_args(untie_embeddings=False, bf16=False)
    model, expected = make_model(args, dtype=torch.float32)
    release = write_release(tmp_path, args, model, vocab_bytes)
    convert_adept_checkpoint(release, tmp_path / "hf", progress=False)
    ours = persimmon_rt.PersimmonForCausalLM.from_pretrained(tmp_path / "hf")
    ids = logits_inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_reference(expected, tie=True)(ids).logits,
                                   atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- atomic output
def test_interrupted_conversion_leaves_nothing(release, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    real_save = convert_mod.save_state_dict

    def crash_midway(state, directory, **kwargs):
        real_save(dict(list(state.items())[:3]), directory, **kwargs)  # something is on disk already
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(convert_mod, "save_state_dict", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_adept_checkpoint(release["path"], out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    convert_adept_checkpoint(release["path"], out, progress=False)
    assert sorted(converted_state(out)) == sorted(release["expected"])


def test_existing_output_dir(release, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_adept_checkpoint(release["path"], out, progress=False)
    assert (out / "keep.txt").exists()
    convert_adept_checkpoint(release["path"], out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("overrides, match", [
    ({"hidden_size": ...}, "'hidden_size'"),
    ({"padded_vocab_size": ...}, "'padded_vocab_size'"),
    ({"rotary_emb_base": "big"}, "'rotary_emb_base'"),
    ({"qk_layernorm": "weights_per_attention_head_and_layer"}, "weights_per_attention_head_and_layer"),
    ({"qk_layernorm": "sometimes"}, "qk_layernorm='sometimes'"),
    ({"sq_relu": False}, "sq_relu"),
    ({"kv_channels": 8}, "kv_channels"),
])
def test_bad_args(tmp_path, vocab_bytes, overrides, match):
    model, _ = make_model(make_args())
    release = write_release(tmp_path, make_args(**overrides), model, vocab_bytes)
    with pytest.raises(CheckpointError, match=match):
        convert_adept_checkpoint(release, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_tensor_parallel_rank_directories(tmp_path, vocab_bytes):
    args = make_args(tensor_model_parallel_size=2)
    release = write_release(tmp_path, args, make_model(args, tp=2)[0], vocab_bytes)
    shutil.copytree(pt_file(release).parent, pt_file(release).parent.with_name("mp_rank_01"))
    with pytest.raises(CheckpointError, match="tensor/pipeline-parallel.*mp_rank_01"):
        convert_adept_checkpoint(release, tmp_path / "hf", progress=False)


def test_tensor_parallel_shard_shapes(tmp_path, vocab_bytes):
    args = make_args(tensor_model_parallel_size=2)
    release = write_release(tmp_path, args, make_model(args, tp=2)[0], vocab_bytes)
    with pytest.raises(CheckpointError, match="tensor-parallel shard \\(TP=2\\)"):
        convert_adept_checkpoint(pt_file(release), tmp_path / "hf", progress=False)


def test_wrong_shapes_and_missing_tensors(tmp_path, vocab_bytes):
    args = make_args()
    model, _ = make_model(args)
    del model["language_model"]["encoder"]["layers.1.mlp.dense_4h_to_h.bias"]
    model["language_model"]["encoder"]["final_layernorm.weight"] = torch.ones(H + 1, dtype=torch.bfloat16)
    release = write_release(tmp_path, args, model, vocab_bytes)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.dense_4h_to_h.bias.*model.final_layernorm.weight"):
        convert_adept_checkpoint(release, tmp_path / "hf", progress=False)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_adept_checkpoint(tmp_path / "nope", tmp_path / "hf", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="latest_checkpointed_iteration.txt"):
        convert_adept_checkpoint(tmp_path / "empty", tmp_path / "hf", progress=False)


# ------------------------------------------------------------------------------------------------- CLI
def run_cli(*argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "persimmon_rt", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_cli_convert(release, tmp_path):
    out = tmp_path / "hf"
    result = run_cli("convert", "--adept", str(release["path"]), "--out", str(out), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert "converted" in result.stderr
    state = converted_state(out)
    assert all(torch.equal(state[k], v.float()) for k, v in release["expected"].items())


def test_cli_errors(tmp_path):
    result = run_cli("convert", "--adept", str(tmp_path / "missing"), "--out", str(tmp_path / "hf"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("persimmon-rt: error:") and "missing" in lines[0]
    usage = run_cli("convert", "--adept", str(tmp_path))
    lines = usage.stderr.strip().splitlines()
    assert usage.returncode == 2 and len(lines) == 1 and lines[0].startswith("persimmon-rt: error:")
    debug = run_cli("--debug", "convert", "--adept", str(tmp_path / "missing"), "--out", str(tmp_path / "hf"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_convert_quantize_int8_writes_a_checkpoint_that_loads_without_requantizing(release, tmp_path):
    from persimmon_rt.engine import Engine
    from persimmon_rt.quantization import quantize_int8

    out = tmp_path / "int8"
    config = convert_adept_checkpoint(release["path"], out, dtype="float16", progress=False, quantize="int8")
    assert config.extra["quantization_config"]["scheme"] == "int8" and config.torch_dtype == "float16"
    state = converted_state(out)
    name = "model.layers.0.mlp.dense_h_to_4h.weight"
    q, s = quantize_int8(release["expected"][name])
    assert torch.equal(state[name], q) and torch.equal(state[name + "_scale"], s)
    engine = Engine.from_pretrained(out, device="cpu", max_seq_len=32)
    assert engine.weights.scheme == "int8" and torch.equal(engine.weights.layers[0].up_w.qweight, q)
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        convert_adept_checkpoint(release["path"], tmp_path / "bad", progress=False, quantize="int2")
    assert not (tmp_path / "bad").exists()
