"""The engine against the reference model's generate: CPU always; the CUDA path where a GPU exists."""

import pytest
import torch

import persimmon_rt as prt
from persimmon_rt.engine import Engine
from persimmon_rt.sampling import filter_logits, sample

from model_utils import random_model, tiny_config

transformers = pytest.importorskip("transformers")


def lively_model(dtype=torch.float32, **overrides):
    """Large init so greedy decoding does not collapse onto one token (a stronger equality check)."""
    config = tiny_config(eos_token_id=None, initializer_range=0.25, **overrides)
    return random_model(prt.PersimmonForCausalLM, config, dtype)


def reference_continuation(model, prompt, n):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])[0, len(prompt):].tolist()


@pytest.mark.parametrize("overrides", [{}, {"qk_layernorm": False, "partial_rotary_factor": 0.25},
                                       {"rope_scaling": {"type": "linear", "factor": 2.0}}])
def test_greedy_batch_with_chunked_prefill_equals_reference(overrides):
    model = lively_model(**overrides)
    engine = Engine(model, model.config, max_batch_size=4, max_seq_len=64, prefill_chunk_tokens=7)
    prompts = [torch.randint(1, 97, (n,)).tolist() for n in (3, 11, 6)]
    result = engine.generate(prompts, max_new_tokens=20, stop_token_ids=[])
    for prompt, ids in zip(prompts, result.token_ids):
        assert ids == reference_continuation(model, prompt, 20)
    assert result.finish_reasons == ["length"] * 3


def test_dynamic_rotary_past_the_trained_length_equals_reference():
    """Dynamic NTK scaling re-bases the rotary frequencies as the sequence grows past the trained length:
    the engine recomputes them before every step (so it does not run ahead of the host)."""
    torch.manual_seed(0)
    model = lively_model(rope_scaling={"type": "dynamic", "factor": 3.0}, max_position_embeddings=16)
    engine = Engine(model, model.config, max_batch_size=1, max_seq_len=48)
    prompt = torch.randint(1, 97, (10,)).tolist()
    ids = engine.generate([prompt], max_new_tokens=24, stop_token_ids=[]).token_ids[0]
    expected = reference_continuation(model, prompt, 24)
    assert ids == expected
    plain = lively_model(max_position_embeddings=64)
    plain.load_state_dict(model.state_dict())
    assert reference_continuation(plain, prompt, 24) != expected      # the re-basing changes these tokens


def test_batches_larger_than_the_engine_run_in_waves():
    model = lively_model()
    engine = Engine(model, model.config, max_batch_size=2, max_seq_len=32)
    prompts = [torch.randint(1, 97, (n,)).tolist() for n in (2, 5, 4, 7, 3)]
    result = engine.generate(prompts, max_new_tokens=6, stop_token_ids=[])
    assert [len(ids) for ids in result.token_ids] == [6] * 5
    for prompt, ids in zip(prompts, result.token_ids):
        assert ids == reference_continuation(model, prompt, 6)


def test_stop_tokens_finish_rows_independently():
    model = lively_model()
    engine = Engine(model, model.config, max_batch_size=2, max_seq_len=32)
    prompts = [torch.randint(1, 97, (4,)).tolist() for _ in range(2)]
    free = engine.generate(prompts, max_new_tokens=8, stop_token_ids=[]).token_ids
    stop = free[0][2]
    result = engine.generate(prompts, max_new_tokens=8, stop_token_ids=[stop])
    first = free[0].index(stop)
    assert result.token_ids[0] == free[0][:first + 1] and result.finish_reasons[0] == "stop"
    other = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert result.token_ids[1] == other


def test_streaming_yields_the_same_tokens():
    model = lively_model()
    engine = Engine(model, model.config, max_batch_size=2, max_seq_len=32)
    prompts = [[5, 6, 7], [8, 9]]
    whole = engine.generate(prompts, max_new_tokens=5, stop_token_ids=[])
    streamed = [[], []]
    reasons = [None, None]
    for event in engine.generate(prompts, max_new_tokens=5, stop_token_ids=[], stream=True):
        streamed[event.index].append(event.token_id)
        reasons[event.index] = event.finished or reasons[event.index]
    assert streamed == whole.token_ids and reasons == ["length", "length"]


def test_seeded_sampling_is_reproducible_and_respects_top_k():
    model = lively_model()
    engine = Engine(model, model.config, max_batch_size=2, max_seq_len=32)
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_k=3, top_p=0.95, seed=7, stop_token_ids=[])
    a = engine.generate([[1, 2, 3], [4, 5]], **kwargs).token_ids
    b = engine.generate([[1, 2, 3], [4, 5]], **kwargs).token_ids
    assert a == b


def test_in_graph_sampler_draws_only_from_the_filtered_set():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    temperature = torch.full((4, 1), 0.7)
    for top_k, top_p in [(5, 1.0), (0, 0.6), (8, 0.8)]:
        allowed = torch.isfinite(filter_logits(logits, 0.7, top_k, top_p))
        k = torch.full((4,), top_k)
        p = torch.full((4, 1), top_p)
        for _ in range(200):
            tokens = sample(logits, temperature, k, p, greedy=False)
            assert allowed[torch.arange(4), tokens].all()
    assert torch.equal(sample(logits, temperature, k, p, greedy=True), logits.argmax(-1))


def test_sampler_frequencies_follow_the_distribution():
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    tokens = sample(logits, torch.ones(20000, 1), torch.zeros(20000, dtype=torch.long),
                              torch.ones(20000, 1), greedy=False)
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.015)


def test_inputs_embeds_prompt_equals_token_prompt():
    model = lively_model()
    engine = Engine(model, model.config, max_batch_size=1, max_seq_len=32)
    prompt = [3, 14, 15, 92]
    embeds = model.get_input_embeddings().weight[prompt].detach().clone()
    by_ids = engine.generate([prompt], max_new_tokens=6, stop_token_ids=[]).token_ids
    by_embeds = engine.generate(None, inputs_embeds=[embeds], max_new_tokens=6, stop_token_ids=[]).token_ids
    assert by_ids == by_embeds
    assert torch.equal(embeds, model.get_input_embeddings().weight[prompt])    # caller's tensor untouched


def test_from_transformers_uses_the_weights_in_place(tmp_path):
    model = lively_model()
    model.save_pretrained(tmp_path)
    hf = transformers.PersimmonForCausalLM.from_pretrained(tmp_path).eval()
    engine = Engine.from_transformers(hf, max_batch_size=1, max_seq_len=32)
    assert engine.weights.lm_head.data_ptr() == hf.lm_head.weight.data_ptr()
    prompt = [7, 8, 9]
    assert engine.generate([prompt], max_new_tokens=8, stop_token_ids=[]).token_ids[0] == \
        reference_continuation(model, prompt, 8)


def test_engine_from_pretrained_on_cpu(tmp_path):
    model = lively_model()
    model.save_pretrained(tmp_path)
    engine = Engine.from_pretrained(tmp_path, device="cpu", max_batch_size=1, max_seq_len=32)
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    assert engine.generate([[1, 2]], max_new_tokens=4, stop_token_ids=[]).token_ids[0] == \
        reference_continuation(model, [1, 2], 4)


def test_bad_requests_are_rejected_clearly():
    model = lively_model()
    engine = Engine(model, model.config, max_batch_size=1, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the engine's max_seq_len"):
        engine.generate([[1] * 10], max_new_tokens=10)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        engine.generate([[1, 97]], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1]], temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1]], top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        engine.generate([[1]], top_k=-1)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        engine.generate(["hello"])
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[len >= 1, 64\]"):
        engine.generate(None, inputs_embeds=[torch.randn(3, 65)])
    with pytest.raises(ValueError, match="max_seq_len .* exceeds max_position_embeddings"):
        Engine(model, model.config, max_seq_len=1000)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_engine_greedy_equals_reference_for_64_steps(dtype):
    """The engine in fp16/bf16 on the GPU (CUDA kernels, graphs) against the fp32 reference model on the CPU
    holding the same (rounded) weights. Greedy tokens must agree up to the first step where the reference's
    two best logits are closer than the low-precision logit error could separate (a near tie); usually
    there is none within the 64 steps."""
    shape = dict(max_position_embeddings=128, hidden_size=256, num_attention_heads=4)   # head_dim 64
    gpu_model = lively_model(**shape).to(dtype).to("cuda")
    reference_model = lively_model(**shape)
    reference_model.load_state_dict({k: v.float().cpu() for k, v in gpu_model.state_dict().items()})
    engine = Engine(gpu_model, gpu_model.config, max_batch_size=8, max_seq_len=128)   # 3 rows: bucket 4 of 8
    prompts = [torch.randint(1, 97, (n,)).tolist() for n in (5, 17, 9)]
    result = engine.generate(prompts, max_new_tokens=64, stop_token_ids=[])
    assert engine.graphs.graphs
    alone = engine.generate(prompts[1:2], max_new_tokens=64, stop_token_ids=[]).token_ids   # bucket 1
    tie_margin = {torch.float16: 0.05, torch.bfloat16: 0.4}[dtype]     # ~4x the logit error measured per dtype
    for prompt, ids in zip(prompts + prompts[1:2], result.token_ids + alone):
        expected = reference_continuation(reference_model, prompt, 64)
        with torch.no_grad():
            logits = reference_model(torch.tensor([prompt + expected])).logits[0, len(prompt) - 1:-1]
        top2 = logits.topk(2).values
        near_ties = ((top2[:, 0] - top2[:, 1]) < tie_margin).nonzero()
        must_agree = int(near_ties[0]) if len(near_ties) else 64
        assert ids[:must_agree] == expected[:must_agree]


def test_model_generate_through_the_engine_equals_the_module_path():
    model = lively_model(pad_token_id=0)
    prompts = [torch.randint(1, 97, (n,)) for n in (3, 8, 5)]
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, 8 - len(p):], mask[r, 8 - len(p):] = p, 1
    by_modules = model.generate(ids, attention_mask=mask, max_new_tokens=10, use_engine=False)
    by_engine = model.generate(ids, attention_mask=mask, max_new_tokens=10, use_engine=True)
    assert torch.equal(by_engine, by_modules)
    assert model._engine.max_batch_size == 3           # cached for the next call
