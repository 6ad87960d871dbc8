"""Weight-only int8 (CPU): the quantize / dequantize references, the int8 GEMV reference, quantized
checkpoints (written, loaded without re-quantizing, validated), one-line errors, every int8 GEMV
configuration compiled without spills for sm_90a and sm_80 (nvcc), and quality on the demo model
(held-out perplexity with dequantized weights within 1 % of full precision; greedy output equal to full
precision for 32 tokens, or a divergence at a near tie).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from persimmon_rt import PersimmonForCausalLM, cli, ops, reference
from persimmon_rt.demo import demo_model_path, heldout_perplexity, recorded_perplexity
from persimmon_rt.engine import Engine
from persimmon_rt.quantization import QuantizedWeight, quantize_int8
from persimmon_rt.quantize_checkpoint import quantize_checkpoint
from persimmon_rt.weights import CheckpointError

HELDOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "heldout.txt")
PROMPTS = ["ROMEO:\n", "JULIET:\nO", "First Citizen:\n", "BRUTUS:\nI"]
NEAR_TIE = 0.3     # logit gap (full precision) under which a greedy divergence counts as a near tie


# ---- references --------------------------------------------------------------------------------------

def test_quantize_int8_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(37, 48) * torch.rand(37, 1) * 3
    w[5] = 0                                          # a zero row: scale 1, all zeros
    q, s = quantize_int8(w, chunk_rows=8)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (37,)
    assert q.abs().max() <= 127 and (q[5] == 0).all() and s[5] == 1
    assert (q.abs().amax(dim=1)[torch.arange(37) != 5] == 127).all()   # each row's largest |w| maps to 127
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-6)).all()
    q2, s2 = quantize_int8(w, chunk_rows=1000)        # chunking changes nothing
    assert torch.equal(q, q2) and torch.equal(s, s2)


def test_quantize_int8_from_bf16_and_refuses_bad_input():
    w = torch.randn(8, 16)
    q, _ = quantize_int8(w.bfloat16())
    assert torch.equal(q, quantize_int8(w.bfloat16().float())[0])
    with pytest.raises(ValueError, match="floating-point"):
        quantize_int8(torch.zeros(4, 16, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_rounds_the_fp32_product_once(dtype):
    q, s = quantize_int8(torch.randn(20, 32))
    out = torch.empty(20, 32, dtype=dtype)
    ops.dequantize_int8(q, s, out)
    assert torch.equal(out, (q.float() * s[:, None]).to(dtype))
    assert torch.equal(QuantizedWeight(q, s, dtype).dequantize(), out)


@pytest.mark.parametrize("relu2,residual", [(False, False), (True, False), (False, True)])
def test_decode_linear_int8_reference_is_decode_linear_on_dequantized_weights(relu2, residual):
    x, b = torch.randn(5, 64), torch.randn(24)
    q, s = quantize_int8(torch.randn(24, 64) / 8)
    r = torch.randn(5, 24) if residual else None
    got, want = torch.full((5, 24), float("nan")), torch.empty(5, 24)
    ops.decode_linear_int8(x, q, s, b, r, got, relu2)
    reference.decode_linear(x, q.float() * s[:, None], b, r, want, relu2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_embedding_rows_are_dequantized_rows():
    qw = QuantizedWeight(*quantize_int8(torch.randn(10, 16)), torch.bfloat16)
    idx = torch.tensor([3, 0, 3])
    assert torch.equal(qw.rows(idx), qw.dequantize()[idx])


# ---- checkpoints -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "demo-int8"
    quantize_checkpoint(demo_model_path(), out)
    return out


def test_quantized_checkpoint_format(quantized_dir):
    config = json.loads((quantized_dir / "config.json").read_text())
    assert config["quantization_config"]["scheme"] == "int8"
    state = load_file(quantized_dir / "model.safetensors")
    qkv = "model.layers.0.self_attn.query_key_value.weight"
    assert state[qkv].dtype == torch.int8 and state[qkv + "_scale"].dtype == torch.float32
    assert state["lm_head.weight"].dtype == torch.int8 and state["model.embed_tokens.weight"].dtype == torch.int8
    assert state["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert (quantized_dir / "tokenizer.model").is_file()


def test_quantized_checkpoint_loads_as_stored_equal_to_quantizing_while_loading(quantized_dir):
    stored = Engine.from_pretrained(quantized_dir, device="cpu", max_seq_len=64)
    fresh = Engine.from_pretrained(demo_model_path(), device="cpu", max_seq_len=64, quantize="int8")
    assert stored.weights.scheme == fresh.weights.scheme == "int8"
    for a, b in zip(stored.weights.tensors(), fresh.weights.tensors()):
        assert torch.equal(a, b.to(a.dtype))
    again = Engine.from_pretrained(quantized_dir, device="cpu", max_seq_len=64, quantize="int8")
    assert torch.equal(again.weights.lm_head.qweight, stored.weights.lm_head.qweight)
    prompt = [stored.tokenizer.encode("ROMEO:\n")]
    assert stored.generate(prompt, max_new_tokens=8).token_ids == fresh.generate(prompt, max_new_tokens=8).token_ids


def _rewrite(directory, edit):
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("model.layers.2.mlp.dense_4h_to_h.weight_scale"), "dense_4h_to_h.weight_scale is missing"),
    (lambda s: s.update({"lm_head.weight_scale": torch.ones(7)}), r"scales must have shape \[N\] = \[4096\]"),
    (lambda s: s.update({"model.layers.0.self_attn.dense.weight":
                         s["model.layers.0.self_attn.dense.weight"].float()}), "must be int8"),
])
def test_broken_quantized_checkpoint_is_one_line_error(quantized_dir, tmp_path, edit, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(quantized_dir, broken)
    _rewrite(broken, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        Engine.from_pretrained(broken, device="cpu", max_seq_len=64)
    assert "\n" not in str(info.value)


def test_unknown_scheme_and_foreign_config_are_errors(quantized_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'"):
        Engine.from_pretrained(demo_model_path(), device="cpu", quantize="int4")
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(quantized_dir, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="method 'gptq' is not supported"):
        Engine.from_pretrained(foreign, device="cpu")
    config.pop("quantization_config")
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        Engine.from_pretrained(foreign, device="cpu")


def test_quantize_refuses_tensor_parallel_and_leaves_nothing_on_failure(tmp_path):
    from persimmon_rt.config import PersimmonConfig
    from persimmon_rt.loading import load_weights

    config = PersimmonConfig.from_pretrained(demo_model_path())
    with pytest.raises(ValueError, match="do not support tensor parallelism"):
        load_weights(demo_model_path(), config, torch.float32, "cpu", shard=(0, 2), quantize="int8")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize_checkpoint(demo_model_path(), tmp_path / "out", scheme="fp4")
    assert not (tmp_path / "out").exists()


def test_cli_quantize_then_generate_and_errors(tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", demo_model_path(), "--out", str(out), "--quiet"]) == 0
    argv = ["generate", "ROMEO:", "--json", "--temperature", "0", "--max-new-tokens", "6"]
    assert cli.main(argv + ["--model", str(out)]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert cli.main(argv + ["--quantize", "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == stored["token_ids"]
    assert cli.main(argv + ["--quantize", "int3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown quantization scheme 'int3'" in err
    assert cli.main(["info", "--model", str(out)]) == 0
    assert "weights quantized int8" in capsys.readouterr().out


# ---- the int8 GEMV's configurations, compiled (nvcc, no GPU) -------------------------------------------

def _nvcc():
    from persimmon_rt import _build

    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return _build.find_nvcc(home) or shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.parametrize("arch", ["90a", "80"])
def test_every_int8_gemv_configuration_compiles_without_spills(arch, tmp_path):
    """Every instance of every int8 GEMV configuration (the sweep's candidates) keeps its registers within
    its launch bounds for both targets, with the extension's own flags: no stack frame, no spills. The
    folded-LayerNorm instances may spill one or two registers (at most 8 bytes): their prologue stages x
    while the first weight steps are in flight, and at 80 registers (three blocks of 256 threads an SM)
    ptxas keeps a word or two on the stack in some configurations (sm_80 c0, bf16 c3 on sm_90a). The build
    also checks the per-shape table (a static_assert in csrc/int8_linear.cu)."""
    from persimmon_rt import _build

    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    flags = _build.compile_flags([arch], debug=False, shell_quote=False)["nvcc"]
    command = [_nvcc(), *flags, f"-I{csrc}", "-Xptxas", "-v", "-c", os.path.join(csrc, "int8_linear.cu"),
               "-o", str(tmp_path / "int8_linear.o")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    kernels = [k for k in re.split(r"Compiling entry function ", done.stderr)[1:]
               if "decode_linear_int8_kernel" in k.split("\n")[0]]
    # fp16 / bf16 x fp16-or-bf16 / fp32 output x plain / folded LayerNorm, per configuration; the folded
    # instance's mangled name ends in its template flag (Lb1E).
    assert len(kernels) == 8 * len(_int8_configs(csrc))
    folded = [k for k in kernels if k.split("'")[1].endswith("ELb1EEEvNS0_22DecodeLinearInt8ParamsE")]
    assert len(folded) == 4 * len(_int8_configs(csrc))
    bad = []
    for k in kernels:
        used = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", k)
        limit = 8 if k in folded else 0
        if used is None or max(map(int, used.groups())) > limit:
            bad.append(k.split("'")[1])
    assert not bad, f"sm_{arch}: stack frame or spills in {bad}"


def _int8_configs(csrc: str) -> list[str]:
    """The Int8GemvConfig<...> entries of the Configs tuple in csrc/int8_linear.cu."""
    with open(os.path.join(csrc, "int8_linear.cu"), encoding="utf-8") as fh:
        return re.findall(r"^\s*Int8GemvConfig<[^>]*>", fh.read(), flags=re.MULTILINE)


# ---- quality on the demo model -----------------------------------------------------------------------

def test_demo_heldout_perplexity_int8_within_one_percent():
    import sentencepiece as spm

    record = recorded_perplexity()
    sp = spm.SentencePieceProcessor(model_file=os.path.join(demo_model_path(), "tokenizer.model"))
    with open(HELDOUT, encoding="utf-8", newline="") as fh:
        ids = sp.encode(fh.read())
    full = heldout_perplexity(PersimmonForCausalLM.from_pretrained(demo_model_path()), ids, record["window"])
    model = PersimmonForCausalLM.from_pretrained(demo_model_path(), quantize="int8")   # dequantized per call
    assert type(model.model.layers[0].mlp.dense_h_to_4h).__name__ == "QuantizedLinear"
    int8 = heldout_perplexity(model, ids, record["window"])
    assert abs(int8 - full) <= 0.01 * full, f"held-out perplexity int8 {int8:.4f}, full precision {full:.4f}"


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def check_greedy_agreement(full: Engine, int8: Engine, n: int = 32) -> list[str]:
    """Greedy continuations of PROMPTS agree for n tokens, or diverge where full precision's two best
    logits are within NEAR_TIE; returns a description of each divergence."""
    model = PersimmonForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    notes = []
    for prompt in PROMPTS:
        ids = full.tokenizer.encode(prompt)
        a = full.generate([ids], max_new_tokens=n, stop_token_ids=[]).token_ids[0]
        b = int8.generate([ids], max_new_tokens=n, stop_token_ids=[]).token_ids[0]
        i = first_divergence(a, b)
        if i is None:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids + a[:i]])).logits[0, -1].float()
        top = logits.topk(2).values
        gap = (top[0] - top[1]).item()
        notes.append(f"{prompt!r}: diverges at token {i}, full-precision top-2 gap {gap:.3f}")
        assert gap <= NEAR_TIE, notes[-1]
    return notes


def test_demo_greedy_int8_equals_full_precision_or_near_tie():
    full = Engine.from_pretrained(demo_model_path(), device="cpu", max_seq_len=128)
    int8 = Engine.from_pretrained(demo_model_path(), device="cpu", max_seq_len=128, quantize="int8")
    notes = check_greedy_agreement(full, int8)
    print("\n".join(notes))
