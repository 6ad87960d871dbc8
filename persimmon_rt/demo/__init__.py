"""The embedded demo model: a few-million-parameter Persimmon trained on Shakespeare's plays.

It lets a machine without the 8B checkpoint generate real text and lets tests catch a broken op through
the model's held-out perplexity. The directory holds an HF-format model (config.json, model.safetensors,
generation_config.json), its SentencePiece tokenizer (tokenizer.model, with tokenizer_config.json and
tokenizer.json for transformers' AutoTokenizer) and PERPLEXITY.json, the held-out perplexity recorded when
the model was saved. ``scripts/train_demo_model.py`` rebuilds all of it.

    from persimmon_rt import PersimmonForCausalLM
    from persimmon_rt.demo import demo_model_path
    model = PersimmonForCausalLM.from_pretrained(demo_model_path())
"""

from __future__ import annotations

import json
import math
import os

PERPLEXITY_FILE = "PERPLEXITY.json"


def demo_model_path() -> str:
    """The directory of the embedded demo model (pass it to ``from_pretrained``)."""
    return os.path.dirname(os.path.abspath(__file__))


def recorded_perplexity(path: str | None = None) -> dict:
    """PERPLEXITY.json of a demo model directory: heldout_perplexity, dtype, tokens, window."""
    with open(os.path.join(path or demo_model_path(), PERPLEXITY_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def heldout_perplexity(model, token_ids, window: int, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of `token_ids` under `model`, over non-overlapping windows of `window` tokens.

    Each window is scored on its own (no context carried over): its first token is context only and every
    later token is predicted from the tokens before it in the window. A final partial window of at least
    two tokens is scored too. Logits are cast to fp32 before the log-softmax; the model runs in its own
    dtype on its own device.
    """
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if ids.numel() < 2:
        raise ValueError("need at least two tokens to measure perplexity")
    device = next(model.parameters()).device
    n_full = ids.numel() // window
    chunks = [ids[: n_full * window].view(n_full, window)[i:i + batch_size] for i in range(0, n_full, batch_size)]
    tail = ids[n_full * window:]
    if tail.numel() >= 2:
        chunks.append(tail[None])
    total_nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in chunks:
                chunk = chunk.to(device)
                logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                      reduction="sum")
                total_nll += float(nll)
                count += chunk[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / count)
