"""The embedded demo model: its held-out perplexity matches the value recorded when it was saved.

A broken op (attention, rotary, QK-LayerNorm, squared ReLU, a loader bug) shows up as a jump in perplexity.
PERPLEXITY.json and tests/data/heldout.txt are written by scripts/train_demo_model.py.
"""

import os

import pytest
import sentencepiece as spm
import torch

from persimmon_rt import PersimmonForCausalLM
from persimmon_rt.demo import demo_model_path, heldout_perplexity, recorded_perplexity

HELDOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "heldout.txt")
REL_TOL = 0.01


def _tokenizer():
    return spm.SentencePieceProcessor(model_file=os.path.join(demo_model_path(), "tokenizer.model"))


@pytest.fixture(scope="module")
def heldout_ids():
    with open(HELDOUT, encoding="utf-8", newline="") as fh:
        ids = _tokenizer().encode(fh.read())
    assert len(ids) == recorded_perplexity()["tokens"]
    return ids


def _check(device, heldout_ids):
    record = recorded_perplexity()
    model = PersimmonForCausalLM.from_pretrained(demo_model_path(), device=device)
    assert str(model.dtype) == f"torch.{record['dtype']}"
    ppl = heldout_perplexity(model, heldout_ids, record["window"])
    expected = record["heldout_perplexity"]
    assert abs(ppl - expected) <= REL_TOL * expected, f"held-out perplexity {ppl:.4f}, recorded {expected:.4f}"


def test_demo_heldout_perplexity_cpu(heldout_ids):
    _check("cpu", heldout_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_demo_heldout_perplexity_cuda(heldout_ids):
    _check("cuda", heldout_ids)


def test_demo_generates_text():
    sp = _tokenizer()
    model = PersimmonForCausalLM.from_pretrained(demo_model_path())
    prompt = torch.tensor([sp.encode("ROMEO:\n")])
    out = model.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    assert out.shape[1] > prompt.shape[1]
    text = sp.decode(out[0, prompt.shape[1]:].tolist())
    assert sum(c.isalpha() for c in text) >= 10, text
    again = model.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(out, again)
