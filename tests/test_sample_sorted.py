"""Temperature / top-k / top-p sampling after torch.sort (sample_sorted, sampling.sample).

On the CPU: sampling.sample draws the same tokens for a seed as the torch composition it replaced (the same
sort order and noise stream). On the GPU: the kernel against the reference on the same sorted logits and
noise (equal tokens, or a decision within fp32 rounding of top-p's edge or of a tie in the race), the
sampled distribution against the exact one, edge cases (one token, chunk edges, top-k beyond V, top-p that
keeps only the best, temperature 0 and tiny), errors, opcheck and graph replay.
"""

from __future__ import annotations

import pytest
import torch
from op_utils import capture_graph, requires_cuda

from persimmon_rt import ops, reference
from persimmon_rt.sampling import sample


def composed_sample(logits, temperature, top_k, top_p, generator):
    """sampling.sample as torch ops, before sample_sorted: the regression baseline."""
    best = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp_min(1e-6)
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1])[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p) & (ranks > 0), 0.0)
    race = probs / torch.empty_like(probs).exponential_(1.0, generator=generator)
    drawn = order.gather(-1, race.argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature[:, 0] > 0, drawn, best)


def row_parameters(rows, device="cpu"):
    g = torch.Generator().manual_seed(rows)
    temperature = torch.rand(rows, 1, generator=g) * 1.5
    temperature[::4] = 0.0                                        # some greedy rows
    top_k = torch.randint(0, 80, (rows,), generator=g)
    top_k[::3] = 0
    top_p = torch.rand(rows, 1, generator=g) * 0.9 + 0.1
    top_p[1::3] = 1.0
    return temperature.to(device), top_k.to(device), top_p.to(device)


def test_same_tokens_for_a_seed_as_the_composition():
    logits = torch.randn(12, 3000) * 3
    params = row_parameters(12)
    for seed in range(5):
        want = composed_sample(logits, *params, torch.Generator().manual_seed(seed))
        got = sample(logits, *params, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, want), seed


def test_reference_keeps_the_best_token_under_any_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    tokens = torch.empty(1, dtype=torch.long)
    no_top_k = torch.zeros(1, dtype=torch.long)
    reference.sample_sorted(logits, sorted_logits, order, torch.ones(1, 4), torch.ones(1), no_top_k, torch.tensor([1e-6]),
                            tokens)
    assert tokens.item() == 1


# ---- the GPU kernel -----------------------------------------------------------------------------------

def sorted_case(logits, seed=0):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    noise = torch.empty_like(sorted_logits).exponential_(1.0, generator=generator)
    return sorted_logits, order, noise


def run_kernel(logits, sorted_logits, order, noise, temperature, top_k, top_p):
    tokens = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
    torch.ops.persimmon_rt.sample_sorted(logits, sorted_logits, order, noise, temperature, top_k, top_p, tokens)
    return tokens


def explained(row, token, logits, sorted_logits, order, noise, temperature, top_k, top_p, slack=1e-4):
    """Whether `token` is a correct draw for the row up to fp32 rounding: inside the kept set computed in
    fp64 with `slack` on top-p's edge, and within `slack` of the best race key of the surely kept ranks."""
    t = float(temperature.reshape(-1)[row])
    if t <= 0:
        x = logits[row].double()
        return bool(x[token] == x.max())
    s = sorted_logits[row].double() / max(t, 1e-6)
    vocab = s.numel()
    k = int(top_k[row]) if 0 < int(top_k[row]) <= vocab else vocab
    p = torch.exp(s - s[0])
    p[k:] = 0
    p /= p.sum()
    before = torch.cumsum(p, 0) - p
    edge = float(top_p.reshape(-1)[row])
    rank = int((order[row] == token).nonzero()[0])
    if rank >= k or (rank > 0 and before[rank] >= edge + slack):
        return False
    sure = (before < edge - slack)
    sure[0] = True
    sure[k:] = False
    keys = p / noise[row].double()
    return bool(keys[rank] >= keys[sure].max() * (1 - slack))


@requires_cuda
@pytest.mark.parametrize("vocab", [1, 3, 100, 4097, 262144])
def test_kernel_equals_the_reference(vocab):
    rows = 24
    logits = torch.randn(rows, vocab, device="cuda") * 4
    temperature, top_k, top_p = row_parameters(rows, "cuda")
    sorted_logits, order, noise = sorted_case(logits)
    got = run_kernel(logits, sorted_logits, order, noise, temperature, top_k, top_p)
    want = torch.empty_like(got)
    reference.sample_sorted(logits, sorted_logits, order, noise, temperature, top_k, top_p, want)
    assert ((got >= 0) & (got < vocab)).all()
    for r in (got != want).nonzero().flatten().tolist():
        assert explained(r, int(got[r]), logits, sorted_logits, order, noise, temperature, top_k, top_p), r
    assert (got == want).float().mean() >= 0.9


@requires_cuda
def test_sampled_distribution_is_the_exact_one():
    """40000 draws from one row: temperature 0.7, top-k 5, top-p 0.9 over 8 tokens."""
    base = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.2, -0.5, 1.45, -3.0], device="cuda")
    rows = 40000
    logits = base.expand(rows, -1).contiguous()
    temperature = torch.full((rows, 1), 0.7, device="cuda")
    top_k = torch.full((rows,), 5, dtype=torch.long, device="cuda")
    top_p = torch.full((rows, 1), 0.9, device="cuda")
    tokens = sample(logits, temperature, top_k, top_p, generator=torch.Generator(device="cuda").manual_seed(3))
    s, order = torch.sort(base.double() / 0.7, descending=True)
    p = torch.exp(s - s[0])
    p[5:] = 0
    p /= p.sum()
    before = torch.cumsum(p, 0) - p
    p[1:][before[1:] >= 0.9] = 0
    p /= p.sum()
    want = torch.zeros(8, dtype=torch.float64, device="cuda")
    want[order] = p
    seen = torch.bincount(tokens, minlength=8).double() / rows
    assert (seen[want == 0] == 0).all(), seen
    assert (seen - want).abs().max() < 0.01, (seen, want)


@requires_cuda
def test_edge_rows():
    vocab = 9000
    logits = torch.randn(6, vocab, device="cuda")
    logits[3, [17, 4000]] = 9.0                       # a tie for the max: temperature 0 takes the first
    temperature = torch.tensor([1.0, 1.0, 1e-8, 0.0, 2.0, 1.0], device="cuda")
    top_k = torch.tensor([1, vocab + 5, 0, 0, 0, 0], device="cuda")
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e-7, 1.0], device="cuda")
    sorted_logits, order, noise = sorted_case(logits, seed=1)
    got = run_kernel(logits, sorted_logits, order, noise, temperature, top_k, top_p)
    best = logits.argmax(dim=-1)
    assert got[0] == best[0] and got[2] == best[2] and got[3] == 17 and got[4] == best[4]   # only the best kept
    want = torch.empty_like(got)
    reference.sample_sorted(logits, sorted_logits, order, noise, temperature, top_k, top_p, want)
    assert got[1] == want[1] and got[5] == want[5]


@requires_cuda
def test_graph_replay_follows_the_inputs():
    rows, vocab = 4, 262144
    logits = torch.randn(rows, vocab, device="cuda")
    temperature, top_k, top_p = row_parameters(rows, "cuda")
    sorted_logits, order, noise = sorted_case(logits)
    tokens = torch.empty(rows, dtype=torch.long, device="cuda")
    graph = capture_graph(lambda: ops.sample_sorted(logits, sorted_logits, order, noise, temperature, top_k, top_p,
                                                    tokens))
    for seed in range(3):
        logits.copy_(torch.randn_like(logits) * 3)
        s, o, n = sorted_case(logits, seed)
        sorted_logits.copy_(s)
        order.copy_(o)
        noise.copy_(n)
        graph.replay()
        torch.cuda.synchronize()
        want = torch.empty_like(tokens)
        reference.sample_sorted(logits, sorted_logits, order, noise, temperature, top_k, top_p, want)
        for r in (tokens != want).nonzero().flatten().tolist():
            assert explained(r, int(tokens[r]), logits, sorted_logits, order, noise, temperature, top_k, top_p), r


@requires_cuda
@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "noise": a["noise"][:, :5].contiguous()}, r"noise must have shape \[B, V\]"),
    (lambda a: {**a, "order": a["order"].int()}, "order must be Long"),
    (lambda a: {**a, "temperature": a["temperature"][:1]}, r"temperature must have shape \[B\] or \[B, 1\]"),
    (lambda a: {**a, "logits": a["logits"].half()}, "logits must be Float"),
])
def test_argument_errors_name_the_problem(change, message):
    logits = torch.randn(2, 10, device="cuda")
    sorted_logits, order, noise = sorted_case(logits)
    temperature, top_k, top_p = row_parameters(2, "cuda")
    args = {"logits": logits, "sorted_logits": sorted_logits, "order": order, "noise": noise,
            "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "tokens": torch.empty(2, dtype=torch.long, device="cuda")}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.persimmon_rt.sample_sorted(**change(args))


@requires_cuda
def test_opcheck():
    logits = torch.randn(3, 100, device="cuda")
    sorted_logits, order, noise = sorted_case(logits)
    torch.library.opcheck(torch.ops.persimmon_rt.sample_sorted.default,
                          (logits, sorted_logits, order, noise, *row_parameters(3, "cuda"),
                           torch.empty(3, dtype=torch.long, device="cuda")))
