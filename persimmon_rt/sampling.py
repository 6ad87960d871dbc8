"""Token sampling: one sampler for the module-level `generate` and the engine (inside its CUDA graphs).

Every parameter is a per-row tensor, so one call serves a batch whose rows sample differently (a server's
requests) and nothing syncs with the host. The rule follows transformers' warpers: temperature, top-k
(0 = off), then top-p over what is left (the best token always survives). The draw is an exponential race
(argmax p / E with E ~ Exp(1)), which samples from p with a fixed number of random numbers per row. After
torch.sort, the filters, the softmax and the race are one op (`ops.sample_sorted`: three launches on the GPU,
the torch composition in reference.py elsewhere).
"""

from __future__ import annotations

import torch

from . import ops

MAX_LOGPROBS = 5            # alternatives a caller may ask for per token (the OpenAI API's limit)


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature is None or temperature < 0 or temperature != temperature:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer (0 disables it), got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def row_parameters(rows: int, temperature: float, top_k: int | None, top_p: float | None, device):
    """The per-row tensors `sample` takes, every row alike: temperature [rows, 1] fp32 (0 = greedy),
    top_k [rows] int64 (0 = off), top_p [rows, 1] fp32."""
    return (torch.full((rows, 1), float(temperature), device=device),
            torch.full((rows,), int(top_k or 0), dtype=torch.long, device=device),
            torch.full((rows, 1), float(1.0 if top_p is None else top_p), device=device))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           greedy: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token of each row of [B, V] logits (fp32). Rows with temperature 0 take the argmax; with
    greedy=True every row does and nothing random is drawn. CUDA-graph safe (no host sync)."""
    logits = logits.float()
    if greedy:
        return logits.argmax(dim=-1)
    # Dividing by a positive temperature keeps the order, so the sort needs no scaled copy.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    noise = torch.empty_like(sorted_logits).exponential_(1.0, generator=generator)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    ops.sample_sorted(logits, sorted_logits, order, noise, temperature, top_k, top_p, tokens)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int = MAX_LOGPROBS):
    """Log-probabilities under the model's distribution (fp32, before any sampling warper): of each row's
    chosen token [B], and the k most likely tokens' ids [B, k] and log-probabilities [B, k]."""
    logits = logits.float()
    lse = logits.logsumexp(dim=-1, keepdim=True)
    chosen = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse[:, 0]
    top_values, top_ids = logits.topk(k, dim=-1)
    return chosen, top_ids, top_values - lse


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """[B, V] logits -> scaled logits with the tokens the warpers remove at -inf: the rule `sample` draws
    within, written the plain way (tests check the sampler against it)."""
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False                     # the most likely token always survives
        logits = logits.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))
    return logits
