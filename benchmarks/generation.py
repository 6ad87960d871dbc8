"""The generation benchmark behind benchmarks/bench_generate.py and `persimmon-rt bench` (from a source
checkout).

Measures the engine's decode (ms per step, tokens/s, % of the bandwidth floor) and prefill on a model
directory or on random weights of a preset's shapes, and optionally transformers on the same weights in
the same process. The floor is the bytes a decode step must read (every weight but the input embedding,
plus the KV cache) over the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

from persimmon_rt.config import PersimmonConfig
from persimmon_rt.engine import Engine


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
    from persimmon_rt.model import PersimmonForCausalLM

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


def decode_bytes(model, config: PersimmonConfig, batch: int, context: int, dtype: torch.dtype,
                 weights=None) -> int:
    kv = 2 * config.num_hidden_layers * config.hidden_size * torch.finfo(dtype).bits // 8
    return decode_weight_bytes(weights, model) + batch * context * kv


def engine_systems(model, config: PersimmonConfig, quantize: str | None, backends: list[str]) -> list:
    """(system name, Weights or None) of each persimmon_rt engine to time: the full-precision one (None: it
    wraps the model's parameters) and, with `quantize`, one on a quantized copy of the same weights."""
    systems = [("persimmon_rt", None)]
    if quantize:
        if backends:
            raise ValueError("--quantize compares against the fp16 engine: leave --transformers off")
        from persimmon_rt.loading import quantize_weights, weights_from_module

        systems.append((f"persimmon_rt {quantize}", quantize_weights(weights_from_module(model, config), quantize)))
    return systems


def weight_bytes(weights, model) -> int:
    """Bytes the engine holds for its weights."""
    if weights is None:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in weights.tensors())


def decode_weight_bytes(weights, model) -> int:
    """Bytes a decode step streams: every weight but the input embedding."""
    if weights is None:
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    embed = weights.embed
    skip = {id(embed.qweight), id(embed.scale)} if hasattr(embed, "qweight") else {id(embed)}
    if weights.lm_head is weights.embed:
        skip = set()
    return sum(t.numel() * t.element_size() for t in weights.tensors() if id(t) not in skip)


def measure_decode(engine: Engine, batch: int, context: int, new_tokens: int) -> dict:
    prompts = torch.randint(0, engine.config.vocab_size, (batch, context)).tolist()
    engine.generate(prompts, max_new_tokens=4, stop_token_ids=[])             # warm-up, graph capture
    engine.generate(prompts, max_new_tokens=new_tokens + 1, stop_token_ids=[])
    stats = dict(engine.last_stats)
    result = {"ms_per_step": 1e3 * stats["decode_s"] / max(stats["decode_steps"], 1)}
    replays = min(20, new_tokens)
    if engine.graphs.use_cuda_graphs:           # the captured step alone, without the host loop around it
        step = engine.decode_step(batch, context)     # the engines here leave new_tokens + 8 positions
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            step()
        end.record()
        end.synchronize()
        result["graph_step_ms"] = start.elapsed_time(end) / replays
    return result


def profile_decode_step(engine: Engine, batch: int, context: int, replays: int = 5) -> dict:
    """Where a captured decode step's time goes: every kernel of `replays` graph replays, per step."""
    if not engine.graphs.use_cuda_graphs:
        return {}
    return kernel_profile(engine.decode_step(batch, context), replays)


def profile_prefill(engine: Engine, tokens: int, repeats: int = 2) -> dict:
    """Where a prefill of `tokens` tokens goes (prompt forward and first token), per prefill."""
    prompt = [torch.randint(0, engine.config.vocab_size, (tokens,)).tolist()]
    engine.generate(prompt, max_new_tokens=1, stop_token_ids=[])               # warm-up
    return kernel_profile(lambda: engine.generate(prompt, max_new_tokens=1, stop_token_ids=[]), repeats)


def kernel_profile(fn, repeats: int) -> dict:
    """Every GPU kernel of `repeats` calls of `fn` (CUPTI, through torch.profiler), grouped by kernel name
    and grid, per call; "gaps" is a call's span on the GPU minus the time its kernels ran."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as fh:
            trace = json.load(fh)
    finally:
        os.remove(path)
    kernels = sorted((e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not kernels:
        return {}
    groups: dict[str, dict] = {}
    for e in kernels:
        name = e["name"].split("<")[0].split("(")[0].replace("void ", "").strip()
        grid = e.get("args", {}).get("grid")
        key = f"{name} grid={'x'.join(str(v) for v in grid)}" if grid else name
        entry = groups.setdefault(key, {"kernel": key, "calls": 0, "us": 0.0})
        entry["calls"] += 1
        entry["us"] += e["dur"]
    span_us = (kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]) / repeats
    busy_us = sum(e["dur"] for e in kernels) / repeats
    rows = sorted(({"kernel": v["kernel"], "calls_per_step": v["calls"] / repeats, "us_per_step": v["us"] / repeats}
                   for v in groups.values()), key=lambda r: -r["us_per_step"])
    return {"span_us": span_us, "kernel_us": busy_us, "gaps_us": span_us - busy_us, "kernels": rows}


def measure_prefill(engine: Engine, tokens: int) -> float:
    prompt = [torch.randint(0, engine.config.vocab_size, (tokens,)).tolist()]
    times = []
    for _ in range(3):
        engine.generate(prompt, max_new_tokens=1, stop_token_ids=[])
        times.append(engine.last_stats["prefill_s"])
    return 1e3 * min(times[1:])


class _TokenClock:
    """A transformers streamer that notes when each new token reaches the host (generate hands it over
    with .cpu(), which waits for the step); the first put is the prompt."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


TRANSFORMERS_COMPILED = "compile"   # sdpa + static cache, which transformers' generate compiles itself


@torch.no_grad()
def transformers_decode(model, batch: int, context: int, new_tokens: int, compiled: bool) -> dict:
    """ms per decode step of transformers' generate (greedy): the time between the first and the last new
    token over the steps between them. compiled: static cache, so that generate torch.compiles the forward;
    the first (compiling) call's time is returned as warmup_s."""
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=model.device)
    extra = {"cache_implementation": "static"} if compiled else {}

    def run():
        clock = _TokenClock()
        model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                       pad_token_id=0, eos_token_id=None, streamer=clock, **extra)
        return clock.times

    t = time.perf_counter()
    run()
    warmup = time.perf_counter() - t
    run()
    times = run()
    return {"ms_per_step": 1e3 * (times[-1] - times[1]) / (len(times) - 2), "warmup_s": warmup}


def cold_start(model, config: PersimmonConfig, dtype: torch.dtype, batch: int, directory: str | None = None) -> dict:
    """Save `model` as HF safetensors, evict the files from the page cache, and time a fresh Python process
    that imports persimmon_rt, loads them with Engine.from_pretrained onto the model's device and (on a GPU)
    captures the decode graph for `batch` rows. Also reports the child's peak host memory: anonymous (what loading allocates)
    and resident (which counts the memory-mapped file pages it has touched, reclaimable page cache)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from persimmon_rt.weights import save_state_dict

    tmp = tempfile.mkdtemp(prefix="persimmon-rt-cold-", dir=directory)
    try:
        started = time.perf_counter()
        files = save_state_dict(model.state_dict(), tmp)
        config.save_pretrained(tmp)
        save_s = time.perf_counter() - started
        evicted = all(_evict_from_page_cache(f) for f in files)
        code = ("import time, sys; t0 = time.perf_counter(); "
                f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                "from generation import cold_start_child; cold_start_child(t0, sys.argv[1:])")
        device = next(model.parameters()).device
        child = subprocess.run([sys.executable, "-c", code, tmp, str(dtype).replace("torch.", ""), str(batch),
                                device.type],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"cold-start child failed:\n{child.stderr[-4000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        checkpoint = sum(os.path.getsize(f) for f in files)
        result.update(save_s=save_s, page_cache_evicted=evicted, checkpoint_gib=checkpoint / 2**30,
                      largest_file_gib=max(os.path.getsize(f) for f in files) / 2**30,
                      read_gb_s=checkpoint / result["load_s"] / 1e9)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _evict_from_page_cache(path: str) -> bool:
    """Write `path` back and ask the kernel to drop its cached pages, so the next read comes from disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def cold_start_child(t0: float, argv: list[str]) -> None:
    """The timed process of cold_start(): prints one JSON line."""
    import threading

    path, dtype_name, batch, device = argv[0], argv[1], int(argv[2]), torch.device(argv[3])
    peak = {"anon_kib": 0, "rss_kib": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            status = _proc_status()
            peak["anon_kib"] = max(peak["anon_kib"], status.get("RssAnon", 0))
            peak["rss_kib"] = max(peak["rss_kib"], status.get("VmRSS", 0))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    imported = time.perf_counter()
    torch.empty(1, device=device)             # the CUDA context, timed apart from the loading
    cuda_ready = time.perf_counter()
    engine = Engine.from_pretrained(path, dtype=getattr(torch, dtype_name), device=device, max_batch_size=batch,
                                    max_seq_len=min(2048, _max_positions(path)))
    _sync(device)
    loaded = time.perf_counter()
    engine.capture([batch])
    _sync(device)
    captured = time.perf_counter()
    done.set()
    sampler.join()
    status = _proc_status()
    print(json.dumps({"import_s": imported - t0, "cuda_init_s": cuda_ready - imported, "load_s": loaded - cuda_ready,
                      "capture_s": captured - loaded, "total_s": captured - t0,
                      "peak_host_anon_gib": peak["anon_kib"] / 2**20,
                      "peak_host_rss_gib": max(peak["rss_kib"], status.get("VmHWM", 0)) / 2**20}))


def _max_positions(path: str) -> int:
    return PersimmonConfig.from_pretrained(path).max_position_embeddings


def _proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status in KiB (empty where there is no /proc)."""
    fields = {}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    fields[key] = int(value.split()[0])
    except OSError:
        pass
    return fields


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


def decode_case(args, model, config, weights, batch: int, context: int, bandwidth, dtype, backends,
                fused_attention: bool = True) -> dict:
    """One decode row: capture, ms per step, tokens/s, and against the bandwidth floor. fused_attention=False:
    the step runs qk_norm_rope_cache + attention_decode instead of qkv_attention_decode (A/B timing)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t = time.perf_counter()
    max_seq_len = context + args.new_tokens + 8
    engine = Engine.from_transformers(model, max_batch_size=batch, max_seq_len=max_seq_len) if backends else \
        Engine(model, config, max_batch_size=batch, max_seq_len=max_seq_len, weights=weights)
    engine.forward.fuse_decode_attention &= fused_attention
    engine.capture([batch])
    numbers = {"capture_s": time.perf_counter() - t, **measure_decode(engine, batch, context, args.new_tokens)}
    numbers["tokens_per_s"] = 1e3 * batch / numbers["ms_per_step"]
    if bandwidth:
        floor = 1e3 * decode_bytes(model, config, batch, context, dtype, weights) / bandwidth
        numbers.update(floor_ms=floor, pct_of_floor=100 * floor / numbers["ms_per_step"],
                       peak_extra_gib=(torch.cuda.max_memory_allocated(device) - base) / 2**30)
    return numbers


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
        from persimmon_rt.model import PersimmonForCausalLM

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
    profiles: list[dict] = []

    def record(system: str, case: str, **numbers) -> None:
        rows.append({"system": system, "case": case, **numbers})
        if args.verbose:
            print(f"[{gpu}] {system} {case} {numbers}", flush=True)

    systems = engine_systems(model, config, args.quantize, backends)
    for system, weights in systems:
        if weights is not None or len(systems) > 1:
            record(system, "weights", gib=weight_bytes(weights, model) / 2**30)
    for batch in args.batch:
        for context in args.context:
            if context + args.new_tokens > config.max_position_embeddings:
                continue
            for system, weights in systems:
                record(system, f"decode b={batch} ctx={context}",
                       **decode_case(args, model, config, weights, batch, context, bandwidth, dtype, backends))
                _free()
                if args.unfused_decode_attention:
                    record(f"{system}, unfused attention", f"decode b={batch} ctx={context}",
                           **decode_case(args, model, config, weights, batch, context, bandwidth, dtype, backends,
                                         fused_attention=False))
                    _free()
    for tokens in args.prefill:
        if tokens + 8 > config.max_position_embeddings:
            continue
        for system, weights in systems:
            engine = Engine(model, config, max_batch_size=1, max_seq_len=tokens + 8, weights=weights)
            record(system, f"prefill {tokens}", ms=measure_prefill(engine, tokens))
            if args.profile and device.type == "cuda":
                profiles.append({"case": f"{system} prefill {tokens}", **profile_prefill(engine, tokens)})
            del engine
            _free()
    for batch in args.batch if args.profile and device.type == "cuda" else []:
        context = args.context[0]
        engine = Engine(model, config, max_batch_size=batch, max_seq_len=context + 64, weights=systems[-1][1])
        engine.generate(torch.randint(0, config.vocab_size, (batch, context)).tolist(), max_new_tokens=2,
                        stop_token_ids=[])
        profiles.append({"case": f"{systems[-1][0]} decode b={batch} ctx={context}",
                         **profile_decode_step(engine, batch, context)})
        del engine
        _free()
    if args.cold_start:
        record("persimmon_rt", "cold start", **cold_start(model, config, dtype, args.batch[0], args.cold_start_dir))
    for backend in backends:
        compiled = backend == TRANSFORMERS_COMPILED
        model.set_attn_implementation("sdpa" if compiled else backend)
        system = "transformers sdpa+static+compile" if compiled else f"transformers {backend}"
        for batch in args.batch:
            for context in args.context:
                if batch * context <= 8 * 2048:
                    record(system, f"decode b={batch} ctx={context}",
                           **transformers_decode(model, batch, context, max(args.new_tokens // 2, 8), compiled))
        for tokens in [] if compiled else args.prefill:   # generate compiles the decode step only
            if tokens > config.max_position_embeddings:
                continue
            if backend != "eager" or tokens <= 2048:  # eager materialises [H, T, T] fp32 scores
                record(system, f"prefill {tokens}", ms=transformers_prefill_ms(model, tokens))
    return {"gpu": gpu, "dtype": str(dtype).replace("torch.", ""),
            "copy_bandwidth_tb_s": bandwidth / 1e12 if bandwidth else None, "rows": rows, "profiles": profiles}


def format_table(result: dict) -> str:
    lines = [f"{result['gpu']}, {result['dtype']}" + (f", copy {result['copy_bandwidth_tb_s']:.2f} TB/s"
                                                      if result["copy_bandwidth_tb_s"] else ""),
             f"{'system':34s} {'case':22s} {'ms':>9s} {'tok/s':>9s} {'% floor':>8s}"]
    base = {r["case"]: r.get("ms_per_step", r.get("ms")) for r in result["rows"] if r["system"] == "persimmon_rt"}
    for r in result["rows"]:
        if "gib" in r:
            lines.append(f"{r['system']:34s} {'weights':22s} {r['gib']:8.2f} GiB")
            continue
        ms = r.get("ms_per_step", r.get("ms"))
        tps = f"{r['tokens_per_s']:9.1f}" if "tokens_per_s" in r else f"{'':9s}"
        pct = f"{r['pct_of_floor']:7.1f}%" if "pct_of_floor" in r else f"{'':8s}"
        if ms is None:                              # cold start: seconds, not ms
            lines.append(f"{r['system']:34s} {r['case']:22s} {r['total_s']:8.2f}s (load {r['load_s']:.2f} s, "
                         f"capture {r['capture_s']:.2f} s, peak host anon {r['peak_host_anon_gib']:.2f} GiB)")
            continue
        ratio = (f"  {base[r['case']] / ms:5.2f}x fp" if r["system"] != "persimmon_rt" and r["system"].startswith(
            "persimmon_rt") and base.get(r["case"]) else "")
        lines.append(f"{r['system']:34s} {r['case']:22s} {ms:9.3f} {tps} {pct}{ratio}")
    for p in result.get("profiles", []):
        if not p.get("kernels"):
            continue
        lines.append(f"\nprofile, {p['case']}: span {p['span_us']:.1f} us per call, kernels {p['kernel_us']:.1f} us, "
                     f"gaps {p['gaps_us']:.1f} us")
        for k in p["kernels"]:
            lines.append(f"  {k['us_per_step']:9.1f} us {k['calls_per_step']:6.1f} calls  {k['kernel']}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--png needs matplotlib (pip install matplotlib)") from exc
    rows = [r for r in result["rows"] if r.get("ms_per_step", r.get("ms")) is not None]
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
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="also time an engine on int8 weights (quantized from the same weights; the ratio column "
                             "is the full-precision engine's time over its time)")
    parser.add_argument("--transformers", default=d["transformers"],
                        help="also time transformers on the same weights: attention backends (eager, sdpa) "
                             "and/or 'compile' (sdpa + static cache, compiled by generate)")
    parser.add_argument("--unfused-decode-attention", action="store_true",
                        help="also time each decode case with qk_norm_rope_cache + attention_decode in place of the "
                             "fused qkv_attention_decode (same weights, same process)")
    parser.add_argument("--profile", action="store_true",
                        help="per-kernel breakdown of the captured decode step (each batch size, first context) and of "
                             "each prefill")
    parser.add_argument("--cold-start", action="store_true",
                        help="time a fresh process loading the weights from safetensors and capturing the decode graph")
    parser.add_argument("--cold-start-dir", default=None, metavar="DIR",
                        help="where --cold-start writes the checkpoint (default: the system temp dir)")
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
