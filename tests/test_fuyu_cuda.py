"""Fuyu on the GPU: the engine's greedy tokens against the fp32 module (reference) on a random tiny Fuyu
whose head_dim the CUDA kernels take; skipped without a GPU and the extension."""

import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("tokenizers")

from fuyu_utils import hf_config, random_image, write_tokenizer  # noqa: E402

from persimmon_rt import ops  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not (torch.cuda.is_available() and ops.HAVE_CUDA_EXT),
                                                   reason="needs a CUDA GPU and the built extension")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import FuyuForCausalLM as HFFuyu

    directory = str(tmp_path_factory.mktemp("fuyu_cuda"))
    write_tokenizer(directory)
    torch.manual_seed(0)
    # head_dim 64 (hidden 256, 4 heads): a shape the attention kernels support.
    model = HFFuyu(hf_config(hidden_size=256, intermediate_size=1024, num_attention_heads=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_engine_greedy_matches_fp32_reference(model_dir, dtype):
    from persimmon_rt.engine import Engine
    from persimmon_rt.fuyu import FuyuForCausalLM

    engine = Engine.from_pretrained(model_dir, dtype=dtype, device="cuda", max_batch_size=2, max_seq_len=128)
    prompts = ["Describe this picture.\n", "What is it"]
    images = [random_image(90, 120, seed=1), random_image(45, 200, seed=2)]
    result = engine.generate(prompts, images=images, max_new_tokens=12)
    reference = FuyuForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for prompt, image, ids in zip(prompts, images, result.token_ids):
        inputs = engine.images.processor(text=prompt, images=image)
        expected = reference.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        agree = 0
        while agree < min(len(ids), len(expected)) and ids[agree] == int(expected[agree]):
            agree += 1
        if agree < min(len(ids), len(expected)):
            # A divergence is allowed only at a near tie of the fp32 reference's logits.
            prefix = torch.cat([inputs["input_ids"], expected[None, :agree]], dim=1)
            embeds = reference.model.merge_image_patches(prefix, reference.get_input_embeddings()(prefix),
                                                         inputs["image_patches"])
            with torch.no_grad():
                logits = reference(inputs_embeds=embeds).logits[0, -1].float()
            top = logits.topk(2).values
            assert (top[0] - logits[ids[agree]]) < 1e-2 * top[0].abs().clamp(min=1), (prompt, agree)
