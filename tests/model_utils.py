"""Tiny random Persimmon models for tests, and their transformers twins."""

import warnings

import torch

from persimmon_rt import PersimmonConfig


def tiny_config(**overrides) -> PersimmonConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=0, num_labels=3)
    return PersimmonConfig(**{**base, **overrides})


def random_model(cls, config, dtype=torch.float32):
    """A model with every parameter random, LayerNorm weights and biases included (not left at 1/0)."""
    model = cls.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    return model.to(dtype).eval()


def hf_twin(model, tmp_path, hf_cls, dtype=torch.float32):
    """The same weights loaded by transformers from our save_pretrained output (eager attention)."""
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_cls.from_pretrained(tmp_path, attn_implementation="eager", dtype=dtype)
    return hf.eval()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
