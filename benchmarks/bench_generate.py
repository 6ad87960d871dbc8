"""End-to-end generation on Persimmon-8B shapes (random fp16 weights): persimmon_rt's engine against
transformers in the same process, on the same weights (the engine wraps transformers' parameters).

    python benchmarks/bench_generate.py [--cases all] [--hf eager,sdpa] [--with-compile] [--json out.json]

Reports ms per generated token, tokens/s, % of the bandwidth floor (bytes a decode step must read over the
measured device-to-device copy bandwidth), prefill time, peak GPU memory and graph-capture time.
Speed does not depend on weight values, so no checkpoint download is needed.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from persimmon_rt.engine import Engine

KV_BYTES_PER_TOKEN_8B = 36 * 2 * 64 * 64 * 2            # layers x (K, V) x heads x head_dim x fp16


def copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[5:])


def build_hf_model(layers: int):
    import transformers

    config = transformers.PersimmonConfig(num_hidden_layers=layers, rope_parameters={
        "rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = transformers.PersimmonForCausalLM(config)   # random init on the GPU, directly in fp16
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def decode_bytes(model, batch: int, context: int) -> int:
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return weights + batch * context * KV_BYTES_PER_TOKEN_8B


def engine_decode(engine: Engine, batch: int, context: int, new_tokens: int, vocab: int) -> dict:
    prompts = torch.randint(0, vocab, (batch, context)).tolist()
    engine.generate(prompts, max_new_tokens=8, stop_token_ids=[])            # warm-up (graph capture)
    engine.generate(prompts, max_new_tokens=new_tokens + 1, stop_token_ids=[])
    stats = dict(engine.last_stats)
    # The captured step alone (no host work between steps): replay the graph back to back.
    graph = engine._graphs[(_bucket_of(engine, batch), True)].graph
    replay_ms = float("nan")
    if graph is not None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        replay_ms = start.elapsed_time(end) / 20
    return {"ms_per_step": 1e3 * stats["decode_s"] / stats["decode_steps"], "graph_replay_ms": replay_ms}


def _bucket_of(engine: Engine, batch: int) -> int:
    from persimmon_rt.engine import _bucket
    return _bucket(batch, engine.max_batch_size)


def engine_prefill(engine: Engine, tokens: int, vocab: int) -> float:
    prompt = [torch.randint(0, vocab, (tokens,)).tolist()]
    times = []
    for _ in range(3):
        engine.generate(prompt, max_new_tokens=1, stop_token_ids=[])
        times.append(engine.last_stats["prefill_s"])
    return 1e3 * min(times[1:])


@torch.no_grad()
def hf_decode_ms(model, batch: int, context: int, new_tokens: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (batch, context), device="cuda")
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(4)
    return 1e3 * (timed(new_tokens + 1) - timed(1)) / new_tokens


@torch.no_grad()
def hf_prefill_ms(model, tokens: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, tokens), device="cuda")
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=36, help="36 = Persimmon-8B")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf", default="eager,sdpa", help="transformers attention backends to compare ('' = none)")
    parser.add_argument("--with-compile", action="store_true",
                        help="also transformers with a static cache + torch.compile (slow to compile)")
    parser.add_argument("--long", action="store_true", help="also decode at 16K context (needs ~10 GB more)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()

    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    model = build_hf_model(args.layers)
    vocab = model.config.vocab_size
    rows: list[dict] = []

    def record(system, case, **numbers):
        rows.append({"system": system, "case": case, **numbers})
        print(f"[{gpu}] {system:28s} {case:22s} " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else
                                                              f"{k}={v}" for k, v in numbers.items()), flush=True)

    decode_cases = [(1, 128), (1, 2048), (8, 128), (32, 128)] + ([(1, 16384 - 256)] if args.long else [])
    for batch, context in decode_cases:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        engine = Engine.from_transformers(model, max_batch_size=batch, max_seq_len=context + args.new_tokens + 8)
        engine.capture([batch])
        capture_s = time.perf_counter() - t
        result = engine_decode(engine, batch, context, args.new_tokens, vocab)
        floor_ms = 1e3 * decode_bytes(model, batch, context) / bw
        record("persimmon_rt", f"decode b={batch} ctx={context}", ms_per_token_step=result["ms_per_step"],
               graph_replay_ms=result["graph_replay_ms"], tokens_per_s=1e3 * batch / result["ms_per_step"],
               pct_of_floor=100 * floor_ms / result["ms_per_step"], floor_ms=floor_ms,
               peak_extra_gib=(torch.cuda.max_memory_allocated() - base) / 2**30, capture_s=capture_s)
        del engine
        gc.collect()
        torch.cuda.empty_cache()

    for tokens in (2048, 8192):
        engine = Engine.from_transformers(model, max_batch_size=1, max_seq_len=tokens + 8)
        ms = engine_prefill(engine, tokens, vocab)
        layer_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
        flops = 2 * tokens * layer_params + 2 * args.layers * tokens * tokens * model.config.hidden_size
        record("persimmon_rt", f"prefill {tokens}", ms=ms, tflops=flops / ms / 1e9)
        del engine
        gc.collect()
        torch.cuda.empty_cache()

    for backend in [b for b in args.hf.split(",") if b]:
        model.set_attn_implementation(backend)
        for batch, context in [(1, 128), (1, 2048), (8, 128)]:
            ms = hf_decode_ms(model, batch, context, args.new_tokens // 4, vocab)
            record(f"transformers {backend}", f"decode b={batch} ctx={context}", ms_per_token_step=ms)
        for tokens in (2048, 8192):
            if backend == "eager" and tokens > 2048:
                continue                      # eager materialises [64, T, T] fp32 scores: 17 GB at 8192
            record(f"transformers {backend}", f"prefill {tokens}", ms=hf_prefill_ms(model, tokens, vocab))

    if args.with_compile:
        model.set_attn_implementation("sdpa")
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        t = time.perf_counter()
        hf_decode_ms(model, 1, 128, 4, vocab)
        record("transformers sdpa+static+compile", "compile", seconds=time.perf_counter() - t)
        for batch, context in [(1, 128), (1, 2048), (8, 128)]:
            ms = hf_decode_ms(model, batch, context, args.new_tokens, vocab)
            record("transformers sdpa+static+compile", f"decode b={batch} ctx={context}", ms_per_token_step=ms)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": gpu, "copy_bandwidth_tb_s": bw / 1e12, "rows": rows}, fh, indent=1)
    print(f"[{gpu}] copy bandwidth {bw / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
