"""Parity of the reference model classes with transformers' Persimmon (a test dependency only)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import persimmon_rt as prt  # noqa: E402
from model_utils import hf_twin, random_model, rel_err, tiny_config  # noqa: E402

CONFIGS = {
    "base": dict(),
    "no_qk_layernorm": dict(qk_layernorm=False),
    "quarter_rotary": dict(partial_rotary_factor=0.25),
    "full_rotary": dict(partial_rotary_factor=1.0),
    "linear_rope": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "dynamic_rope": dict(rope_scaling={"type": "dynamic", "factor": 3.0}, max_position_embeddings=16),
    "odd_sizes": dict(hidden_size=80, num_attention_heads=5, intermediate_size=72, vocab_size=101,
                      num_hidden_layers=3, rope_theta=10000.0),
}


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_lm_logits_hidden_states_and_loss(name, dtype, tmp_path):
    config = tiny_config(**CONFIGS[name])
    ours = random_model(prt.PersimmonForCausalLM, config, dtype)
    theirs = hf_twin(ours, tmp_path, transformers.PersimmonForCausalLM, dtype)
    seq = 24 if name == "dynamic_rope" else 13            # dynamic scaling only acts beyond max positions
    ids = torch.randint(1, config.vocab_size, (2, seq))
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        a = ours(ids, labels=labels, output_hidden_states=True)
        b = theirs(ids, labels=labels, output_hidden_states=True)
    assert a.logits.dtype == b.logits.dtype == dtype
    assert rel_err(a.logits, b.logits) <= TOL[dtype]
    assert abs(a.loss.item() - b.loss.item()) <= TOL[dtype] * abs(b.loss.item())
    assert len(a.hidden_states) == len(b.hidden_states) == config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert rel_err(x, y) <= TOL[dtype]


@pytest.mark.parametrize("name", ["base", "quarter_rotary", "dynamic_rope"])
def test_incremental_decoding_matches_full_forward_and_transformers(name, tmp_path):
    config = tiny_config(**CONFIGS[name])
    ours = random_model(prt.PersimmonForCausalLM, config)
    theirs = hf_twin(ours, tmp_path, transformers.PersimmonForCausalLM)
    ids = torch.randint(1, config.vocab_size, (2, 22))
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :10], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        hf_out = theirs(ids[:, :10], use_cache=True)
        hf_cache = hf_out.past_key_values
        for t in range(10, 22):
            out = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            hf_out = theirs(ids[:, t:t + 1], past_key_values=hf_cache, use_cache=True)
            cache, hf_cache = out.past_key_values, hf_out.past_key_values
            assert rel_err(out.logits, hf_out.logits) <= 1e-5
            steps.append(out.logits)
    if name != "dynamic_rope":  # dynamic NTK re-bases as the sequence grows: cached keys keep older bases
        assert rel_err(torch.cat(steps, 1), full) <= 1e-5


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("problem", ["single_label_classification", "regression", "multi_label_classification"])
def test_sequence_classification(padding_side, problem, tmp_path):
    num_labels = 1 if problem == "regression" else 3
    config = tiny_config(num_labels=num_labels, problem_type=problem)
    ours = random_model(prt.PersimmonForSequenceClassification, config)
    theirs = hf_twin(ours, tmp_path, transformers.PersimmonForSequenceClassification)
    ids = torch.randint(1, config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate([0, 2, 5]):
        if n_pad:
            sl = slice(0, n_pad) if padding_side == "left" else slice(9 - n_pad, 9)
            ids[row, sl] = config.pad_token_id
            mask[row, sl] = 0
    if problem == "single_label_classification":
        labels = torch.randint(0, num_labels, (3,))
    elif problem == "regression":
        labels = torch.randn(3)
    else:
        labels = torch.randint(0, 2, (3, num_labels)).float()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=labels)
        b = theirs(ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == b.logits.shape == (3, num_labels)
    assert rel_err(a.logits, b.logits) <= 1e-5
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5 * max(1.0, abs(b.loss.item()))


def test_sequence_classification_without_pad_token_rejects_batches():
    config = tiny_config(pad_token_id=None)
    model = random_model(prt.PersimmonForSequenceClassification, config)
    with pytest.raises(ValueError, match="no padding token"):
        model(torch.randint(1, 97, (2, 5)))


def test_token_classification(tmp_path):
    config = tiny_config(num_labels=4)
    ours = random_model(prt.PersimmonForTokenClassification, config)
    theirs = hf_twin(ours, tmp_path, transformers.PersimmonForTokenClassification)
    ids = torch.randint(1, config.vocab_size, (2, 7))
    labels = torch.randint(0, 4, (2, 7))
    labels[0, 0] = -100
    with torch.no_grad():
        a, b = ours(ids, labels=labels), theirs(ids, labels=labels)
    assert rel_err(a.logits, b.logits) <= 1e-5
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5 * b.loss.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_transformers(dtype, tmp_path):
    config = tiny_config()
    ours = random_model(prt.PersimmonForCausalLM, config, dtype).train()
    theirs = hf_twin(ours, tmp_path, transformers.PersimmonForCausalLM, dtype).train()
    ids = torch.randint(1, config.vocab_size, (2, 12))
    ours(ids, labels=ids).loss.backward()
    theirs(ids, labels=ids).loss.backward()
    hf_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, hf_params[name].grad) <= (1e-4 if dtype == torch.float32 else 5e-2), name


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config()
    model = random_model(prt.PersimmonForCausalLM, config).train()
    ids = torch.randint(1, config.vocab_size, (2, 12))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], rtol=1e-5, atol=1e-7), n


def test_left_padded_batch_generates_what_each_row_generates_alone(tmp_path):
    config = tiny_config(eos_token_id=None)
    ours = random_model(prt.PersimmonForCausalLM, config)
    theirs = hf_twin(ours, tmp_path, transformers.PersimmonForCausalLM)
    prompts = [torch.randint(1, config.vocab_size, (n,)) for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), config.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    hf_batch = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=config.pad_token_id)
    assert torch.equal(batch, hf_batch)
    for row, p in enumerate(prompts):
        alone = ours.generate(p[None], max_new_tokens=12)
        assert torch.equal(batch[row, width:], alone[0, len(p):])


def test_generation_stops_at_eos_and_pads(tmp_path):
    config = tiny_config()
    model = random_model(prt.PersimmonForCausalLM, config)
    ids = torch.randint(1, config.vocab_size, (1, 6))
    free = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    stop = int(free[0, 8])                                  # the third generated token
    out = model.generate(ids, max_new_tokens=10, eos_token_id=stop)
    first = (free[0, 6:] == stop).nonzero()[0].item()
    assert out.shape[1] == 6 + first + 1 and int(out[0, -1]) == stop


def test_seeded_sampling_is_reproducible():
    model = random_model(prt.PersimmonForCausalLM, tiny_config(eos_token_id=None))
    ids = torch.randint(1, 97, (2, 4))
    a = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    b = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    assert torch.equal(a, b)


def test_inputs_embeds_equals_input_ids():
    model = random_model(prt.PersimmonForCausalLM, tiny_config())
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        a = model(ids).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert torch.equal(a, b)


def test_logits_to_keep():
    model = random_model(prt.PersimmonForCausalLM, tiny_config())
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        # Same values up to matmul rounding (a different GEMM shape may sum in another order).
        assert rel_err(model(ids, logits_to_keep=1).logits, full[:, -1:]) <= 1e-6
        idx = torch.tensor([0, 4])
        assert rel_err(model(ids, logits_to_keep=idx).logits, full[:, idx]) <= 1e-6


def test_bad_inputs_are_rejected_clearly():
    model = random_model(prt.PersimmonForCausalLM, tiny_config())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="exactly one of"):
        model()
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(inputs_embeds=torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.ones(1, 3, dtype=torch.long), do_sample=True, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.ones(1, 3, dtype=torch.long), do_sample=True, top_p=0.0)
