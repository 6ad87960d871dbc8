"""The generation benchmark behind `persimmon-rt bench` and benchmarks/bench_generate.py.

Measures the engine's decode (ms per step, tokens/s, % of the bandwidth floor) and prefill on a model
directory or on random weights of a preset's shapes, and optionally transformers on the same weights in
the same process. The floor is the bytes a decode step must read (every weight but the input embedding,
plus the KV cache) over the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from .config import PersimmonConfig
from .engine import Engine, _bucket


def copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy on the current GPU, bytes read + written per second (median of 20)."""
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
    return 2 * nbytes / statistics.median(times[5:])


def random_transformers_model(config: PersimmonConfig, dtype: torch.dtype, device):
    """transformers' PersimmonForCausalLM with random weights made directly on `device` in `dtype`."""
    import transformers

    hf_config = transformers.PersimmonConfig.from_dict(config.to_dict())
    return _random(lambda: transformers.PersimmonForCausalLM(hf_config), dtype, device)


def random_model(config: PersimmonConfig, dtype: torch.dtype, device):
    """Our PersimmonForCausalLM with random weights made directly on `device` in `dtype`."""
    from .model import PersimmonForCausalLM

    return _random(lambda: PersimmonForCausalLM.from_config(config), dtype, device)


def _random(build, dtype, device):
    # Build in the target dtype on the target device: an 8B model never exists in fp32 or on the host.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build()
    finally:
        torch.set_default_dtype(previous)
    _randomise_norms(model)
    return model.eval()


@torch.no_grad()
def _randomise_norms(model) -> None:
    for name, p in model.named_parameters():
        if "layernorm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.normal_(0, 0.02)


def decode_bytes(model, config: PersimmonConfig, batch: int, context: int, dtype: torch.dtype) -> int:
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv = 2 * config.num_hidden_layers * config.hidden_size * torch.finfo(dtype).bits // 8
    return weights + batch * context * kv


def measure_decode(engine: Engine, batch: int, context: int, new_tokens: int) -> dict:
    prompts = torch.randint(0, engine.config.vocab_size, (batch, context)).tolist()
    engine.generate(prompts, max_new_tokens=4, stop_token_ids=[])             # warm-up, graph capture
    engine.generate(prompts, max_new_tokens=new_tokens + 1, stop_token_ids=[])
    stats = dict(engine.last_stats)
    result = {"ms_per_step": 1e3 * stats["decode_s"] / max(stats["decode_steps"], 1)}
    graph = engine._graphs[(_bucket(batch, engine.max_batch_size), True)].graph
    if graph is not None:                     # the captured step alone, without the host loop around it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        result["graph_step_ms"] = start.elapsed_time(end) / 20
    return result


def measure_prefill(engine: Engine, tokens: int) -> float:
    prompt = [torch.randint(0, engine.config.vocab_size, (tokens,)).tolist()]
    times = []
    for _ in range(3):
        engine.generate(prompt, max_new_tokens=1, stop_token_ids=[])
        times.append(engine.last_stats["prefill_s"])
    return 1e3 * min(times[1:])


@torch.no_grad()
def transformers_decode_ms(model, batch: int, context: int, new_tokens: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=model.device)

    def timed(n):
        _sync(model.device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                       eos_token_id=None)
        _sync(model.device)
        return time.perf_counter() - t

    timed(2)
    return 1e3 * (timed(new_tokens + 1) - timed(1)) / new_tokens


@torch.no_grad()
def transformers_prefill_ms(model, tokens: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=model.device)
    times = []
    for _ in range(3):
        _sync(model.device)
        t = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        _sync(model.device)
        times.append(time.perf_counter() - t)
    return 1e3 * min(times[1:])


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype or ("float16" if device.type == "cuda" else "float32")]
    backends = [b for b in (args.transformers or "").split(",") if b]
    if args.model:
        from .model import PersimmonForCausalLM

        model = PersimmonForCausalLM.from_pretrained(args.model, dtype=dtype, device=device)
        config = model.config
        if backends:
            raise ValueError("--transformers compares on random weights: use --preset instead of --model")
    else:
        config = PersimmonConfig.preset(args.preset)
        if args.layers:
            config = PersimmonConfig.from_dict({**config.to_dict(), "num_hidden_layers": args.layers})
        model = (random_transformers_model if backends else random_model)(config, dtype, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bandwidth = copy_bandwidth() if device.type == "cuda" else None
    rows: list[dict] = []

    def record(system: str, case: str, **numbers) -> None:
        rows.append({"system": system, "case": case, **numbers})
        if args.verbose:
            print(f"[{gpu}] {system} {case} {numbers}", flush=True)

    for batch in args.batch:
        for context in args.context:
            if context + args.new_tokens > config.max_position_embeddings:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            t = time.perf_counter()
            engine = Engine.from_transformers(model, max_batch_size=batch,
                                              max_seq_len=context + args.new_tokens + 8) if backends else \
                Engine(model, config, max_batch_size=batch, max_seq_len=context + args.new_tokens + 8)
            engine.capture([batch])
            numbers = {"capture_s": time.perf_counter() - t, **measure_decode(engine, batch, context, args.new_tokens)}
            numbers["tokens_per_s"] = 1e3 * batch / numbers["ms_per_step"]
            if bandwidth:
                floor = 1e3 * decode_bytes(model, config, batch, context, dtype) / bandwidth
                numbers.update(floor_ms=floor, pct_of_floor=100 * floor / numbers["ms_per_step"],
                               peak_extra_gib=(torch.cuda.max_memory_allocated(device) - base) / 2**30)
            record("persimmon_rt", f"decode b={batch} ctx={context}", **numbers)
            del engine
            _free()
    for tokens in args.prefill:
        if tokens + 8 > config.max_position_embeddings:
            continue
        engine = Engine(model, config, max_batch_size=1, max_seq_len=tokens + 8)
        record("persimmon_rt", f"prefill {tokens}", ms=measure_prefill(engine, tokens))
        del engine
        _free()
    for backend in backends:
        model.set_attn_implementation(backend)
        for batch in args.batch:
            for context in args.context:
                if batch * context <= 8 * 2048:
                    ms = transformers_decode_ms(model, batch, context, max(args.new_tokens // 4, 4))
                    record(f"transformers {backend}", f"decode b={batch} ctx={context}", ms_per_step=ms)
        for tokens in args.prefill:
            if tokens > config.max_position_embeddings:
                continue
            if backend != "eager" or tokens <= 2048:  # eager materialises [H, T, T] fp32 scores
                record(f"transformers {backend}", f"prefill {tokens}", ms=transformers_prefill_ms(model, tokens))
    return {"gpu": gpu, "dtype": str(dtype).replace("torch.", ""),
            "copy_bandwidth_tb_s": bandwidth / 1e12 if bandwidth else None, "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"{result['gpu']}, {result['dtype']}" + (f", copy {result['copy_bandwidth_tb_s']:.2f} TB/s"
                                                      if result["copy_bandwidth_tb_s"] else ""),
             f"{'system':26s} {'case':22s} {'ms':>9s} {'tok/s':>9s} {'% floor':>8s}"]
    for r in result["rows"]:
        ms = r.get("ms_per_step", r.get("ms"))
        tps = f"{r['tokens_per_s']:9.1f}" if "tokens_per_s" in r else f"{'':9s}"
        pct = f"{r['pct_of_floor']:7.1f}%" if "pct_of_floor" in r else f"{'':8s}"
        lines.append(f"{r['system']:26s} {r['case']:22s} {ms:9.3f} {tps} {pct}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--png needs matplotlib (pip install matplotlib)") from exc
    rows = result["rows"]
    labels = [f"{r['system']}\n{r['case']}" for r in rows]
    values = [r.get("ms_per_step", r.get("ms")) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    ax.bar(range(len(rows)), values, color=["tab:orange" if r["system"] == "persimmon_rt" else "tab:gray"
                                            for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("ms (decode: per step; prefill: whole prompt)")
    ax.set_title(f"persimmon_rt generation benchmark ({result['gpu']}, {result['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    d = {"preset": "persimmon-8b", "batch": "1", "context": "128", "prefill": "", "new_tokens": 64,
         "transformers": "", **(defaults or {})}
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    parser.add_argument("--model", metavar="DIR", default=None, help="benchmark this model directory")
    parser.add_argument("--preset", default=d["preset"], help="random weights of these shapes (default %(default)s)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    parser.add_argument("--batch", type=ints, default=ints(d["batch"]), help="comma-separated batch sizes")
    parser.add_argument("--context", type=ints, default=ints(d["context"]), help="comma-separated prompt lengths")
    parser.add_argument("--prefill", type=ints, default=ints(d["prefill"]), help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=d["new_tokens"])
    parser.add_argument("--transformers", default=d["transformers"],
                        help="also time transformers on the same weights with these attention backends")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every number here")
    parser.add_argument("--png", default=None, metavar="FILE", help="plot the results (needs matplotlib)")
    parser.add_argument("--verbose", action="store_true", help="print each row as it is measured")


def main(argv: list[str] | None = None, defaults: dict | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, defaults)
    return report(parser.parse_args(argv))


def report(args: argparse.Namespace) -> dict:
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    if args.png:
        plot(result, args.png)
    return result
