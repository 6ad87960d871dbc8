"""HF-format checkpoints: config round trips, safetensors (single/sharded) and .bin loading, clear errors."""

import json
import os
import warnings

import pytest
import torch

import persimmon_rt as prt
from persimmon_rt import PersimmonConfig
from persimmon_rt.config import ConfigError
from persimmon_rt.weights import CheckpointError

from model_utils import random_model, rel_err, tiny_config

transformers = pytest.importorskip("transformers")


def test_transformers_checkpoint_loads_in_ours(tmp_path):
    hf_config = transformers.PersimmonConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 12000.0, "partial_rotary_factor": 0.25})
    torch.manual_seed(0)
    hf = transformers.PersimmonForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path)
    ours = prt.PersimmonForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_theta == 12000.0 and ours.config.rotary_dim == 4
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) <= 1e-5


def test_legacy_config_keys_are_read(tmp_path):
    legacy = {"model_type": "persimmon", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 25000.0,
              "partial_rotary_factor": 0.5, "rope_scaling": {"type": "dynamic", "factor": 2.0},
              "torch_dtype": "bfloat16", "architectures": ["PersimmonForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    config = PersimmonConfig.from_pretrained(tmp_path)
    assert config.rope_type == "dynamic" and config.rope_scaling["factor"] == 2.0
    assert config.dtype == torch.bfloat16
    saved = config.to_dict()
    assert saved["architectures"] == ["PersimmonForCausalLM"]          # unknown keys survive a round trip
    assert saved["rope_parameters"]["rope_type"] == "dynamic"
    assert PersimmonConfig.from_dict(saved) == config


def test_config_written_by_us_is_read_by_transformers(tmp_path):
    config = tiny_config(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=5000.0,
                         partial_rotary_factor=0.25, qk_layernorm=False)
    config.save_pretrained(tmp_path)
    hf = transformers.PersimmonConfig.from_pretrained(tmp_path)
    assert hf.rope_parameters["rope_theta"] == 5000.0
    assert hf.rope_parameters["rope_type"] == "linear" and hf.rope_parameters["factor"] == 4.0
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25
    assert hf.qk_layernorm is False and hf.num_labels == 3


def test_presets():
    eight_b = PersimmonConfig.preset("persimmon-8b")
    assert (eight_b.hidden_size, eight_b.num_hidden_layers, eight_b.head_dim, eight_b.rotary_dim) == (4096, 36, 64, 32)
    assert eight_b.vocab_size == 262144 and eight_b.rope_theta == 25000.0 and not eight_b.tie_word_embeddings
    with pytest.raises(KeyError):
        PersimmonConfig.preset("nope")


@pytest.mark.parametrize("bad, match", [
    ({"hidden_size": 65}, "divisible"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling type"),
    ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "factor"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"eos_token_id": 5000}, "eos_token_id"),
    ({"model_type": "llama"}, "model_type"),
])
def test_invalid_config_is_rejected_by_name(bad, match, tmp_path):
    data = tiny_config().to_dict()
    data.pop("rope_parameters")      # it would override the legacy rope keys under test
    data.update(bad)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match):
        PersimmonConfig.from_pretrained(tmp_path)


def test_config_json_errors(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PersimmonConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        PersimmonConfig.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_save_load_round_trip_keeps_dtype_and_values(dtype, tmp_path):
    model = random_model(prt.PersimmonForCausalLM, tiny_config(), dtype)
    model.save_pretrained(tmp_path)
    loaded = prt.PersimmonForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == dtype
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    as_fp32 = prt.PersimmonForCausalLM.from_pretrained(tmp_path, dtype="float32")
    assert as_fp32.dtype == torch.float32


def test_sharded_safetensors_and_bin_checkpoints(tmp_path):
    model = random_model(prt.PersimmonForCausalLM, tiny_config())
    ids = torch.randint(1, 97, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_bytes=60_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    with torch.no_grad():
        assert torch.equal(prt.PersimmonForCausalLM.from_pretrained(sharded)(ids).logits, expected)

    binary = tmp_path / "bin"
    binary.mkdir()
    model.config.save_pretrained(binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    with torch.no_grad():
        assert torch.equal(prt.PersimmonForCausalLM.from_pretrained(binary)(ids).logits, expected)


def test_base_model_and_heads_load_each_others_checkpoints(tmp_path):
    lm = random_model(prt.PersimmonForCausalLM, tiny_config())
    lm.save_pretrained(tmp_path / "lm")
    base = prt.PersimmonModel.from_pretrained(tmp_path / "lm")
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, lm.model(ids).last_hidden_state)
    with pytest.warns(UserWarning, match="score.weight"):
        clf = prt.PersimmonForSequenceClassification.from_pretrained(tmp_path / "lm")
    assert clf.score.weight.device.type == "cpu" and torch.isfinite(clf.score.weight).all()


def test_tied_embeddings_round_trip(tmp_path):
    model = random_model(prt.PersimmonForCausalLM, tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = prt.PersimmonForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.PersimmonForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, hf(ids).logits) <= 1e-5


def _save_state(tmp_path, state, config):
    from safetensors.torch import save_file
    config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    config = tiny_config()
    state = {k: v.contiguous() for k, v in random_model(prt.PersimmonForCausalLM, config).state_dict().items()}
    del state["model.layers.1.mlp.dense_h_to_4h.bias"]
    state["model.layers.0.extra.weight"] = torch.zeros(3)
    state["model.layers.0.self_attn.dense.weight"] = torch.zeros(64, 63)
    _save_state(tmp_path, state, config)
    with pytest.raises(CheckpointError) as err:
        prt.PersimmonForCausalLM.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "model.layers.1.mlp.dense_h_to_4h.bias" in msg and "model.layers.0.extra.weight" in msg
    assert "model.layers.0.self_attn.dense.weight: checkpoint (64, 63), model (64, 64)" in msg


def test_corrupt_and_incomplete_checkpoints(tmp_path):
    config = tiny_config()
    model = random_model(prt.PersimmonForCausalLM, config)
    model.save_pretrained(tmp_path / "ok")
    weights = (tmp_path / "ok" / "model.safetensors").read_bytes()

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    config.save_pretrained(truncated)
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        prt.PersimmonForCausalLM.from_pretrained(truncated)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    config.save_pretrained(garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        prt.PersimmonForCausalLM.from_pretrained(garbage)

    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_bytes=60_000)
    shard = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))[-1]
    os.remove(sharded / shard)
    with pytest.raises(CheckpointError, match=shard):
        prt.PersimmonForCausalLM.from_pretrained(sharded)

    empty = tmp_path / "empty"
    empty.mkdir()
    config.save_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="no weights"):
        prt.PersimmonForCausalLM.from_pretrained(empty)


def test_non_finite_weights_detected_on_request(tmp_path):
    config = tiny_config()
    state = {k: v.clone() for k, v in random_model(prt.PersimmonForCausalLM, config).state_dict().items()}
    state["model.layers.0.mlp.dense_4h_to_h.weight"][0, 0] = float("nan")
    _save_state(tmp_path, state, config)
    prt.PersimmonForCausalLM.from_pretrained(tmp_path)  # not scanned unless asked
    with pytest.raises(CheckpointError, match="dense_4h_to_h.weight"):
        prt.PersimmonForCausalLM.from_pretrained(tmp_path, check_finite=True)


def test_unsupported_dtype_is_rejected(tmp_path):
    random_model(prt.PersimmonForCausalLM, tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported dtype"):
        prt.PersimmonForCausalLM.from_pretrained(tmp_path, dtype=torch.int8)


def test_weights_are_memory_mapped_not_copied(tmp_path):
    model = random_model(prt.PersimmonForCausalLM, tiny_config())
    model.save_pretrained(tmp_path)
    loaded = prt.PersimmonForCausalLM.from_pretrained(tmp_path)   # same dtype: tensors are file-backed views
    path = str(tmp_path / "model.safetensors")
    with open("/proc/self/maps") as fh:
        assert any(path in line for line in fh), "checkpoint file is not memory-mapped"
    assert loaded.lm_head.weight.shape == (97, 64)
