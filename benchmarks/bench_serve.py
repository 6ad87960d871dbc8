"""The server's continuous batching under load, in-process: a Poisson load generator drives the scheduler
thread the HTTP server uses (persimmon_rt.serving.worker), with the engine's static batches and its bare
batch decode measured on the same workload in the same run. No HTTP stack is needed.

    python benchmarks/bench_serve.py [--prefill-budget 128,256] [--rates 4,8,16,burst] [--json F]  # 8B, GPU
    python benchmarks/bench_serve.py --quick                                                      # demo, CPU

The workload: prompt and output lengths drawn log-uniformly from fixed ranges (128-2048 in, 32-512 out by
default), random token ids, no stop tokens (every request generates exactly its length). Measured:

    bare            Engine.generate on `rows` of the workload's prompts at once, one output length: its decode
                    step and token rate (prefill excluded).
    32 streams      the same prompts and length through the scheduler thread, all submitted at once and
                    prefilled at once (as in bare): the token rate while every row decodes.
    static          the workload in waves of `rows` through Engine.generate, each wave run to its longest
                    output (a static batch): the requested tokens over the time.
    continuous      the workload through the scheduler thread, arrivals Poisson at each rate ("burst": all at
                    once): output tokens/s, time to first token and inter-token latency (p50, p99), and
                    inter-token p99 over the intervals in which a prompt was being prefilled (see summarize);
                    the running streams' share of it from the client's receipt times and, in the last
                    column, from the times the scheduler thread handed the tokens over (a gap between the
                    two is the event loop's, not the scheduler's).
The continuous runs are repeated once per prefill budget (prompt tokens prefilled per step while rows decode).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from persimmon_rt.engine import Engine
from persimmon_rt.serving.worker import Stream, Worker


@dataclass
class Item:
    ids: list[int]
    out: int


def workload(n: int, prompt_range, output_range, vocab: int, seed: int) -> list[Item]:
    rng = random.Random(seed)

    def draw(lo, hi):
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    items = []
    for _ in range(n):
        length = draw(*prompt_range)
        items.append(Item([rng.randrange(vocab) for _ in range(length)], draw(*output_range)))
    return items


def percentile(values, q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


# ------------------------------------------------------------------------------------ engine baselines
def bare_decode(engine, items: list[Item], new_tokens: int) -> dict:
    prompts = [it.ids for it in items]
    engine.generate(prompts, max_new_tokens=4, stop_token_ids=[])                 # warm-up, capture
    engine.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[])
    stats = engine.last_stats
    step = stats["decode_s"] / max(stats["decode_steps"], 1)
    return {"batch": len(items), "new_tokens": new_tokens, "step_ms": 1e3 * step, "tokens_per_s": len(items) / step}


def static_waves(engine, items: list[Item], rows: int) -> dict:
    _sync(engine)
    start = time.perf_counter()
    for i in range(0, len(items), rows):
        wave = items[i:i + rows]
        engine.generate([it.ids for it in wave], max_new_tokens=max(it.out for it in wave), stop_token_ids=[])
    _sync(engine)
    elapsed = time.perf_counter() - start
    tokens = sum(it.out for it in items)
    return {"requests": len(items), "output_tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


# --------------------------------------------------------------------------------- through the worker
class _Null:
    """Stands in for the Prometheus metrics where prometheus-client is not installed."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


def _metrics(rows: int):
    try:
        from persimmon_rt.serving.metrics import Metrics
    except ImportError:
        return _Null()
    return Metrics(rows)


class PrefillClock:
    """Records when the scheduler calls the engine's prefill (host time)."""

    def __init__(self, engine):
        self.forward, self.times = engine.forward, []
        self.inner = engine.forward.prefill

    def __enter__(self):
        def prefill(*args, **kwargs):
            self.times.append(time.perf_counter())
            return self.inner(*args, **kwargs)

        self.forward.prefill = prefill
        return self

    def __exit__(self, *exc):
        del self.forward.prefill            # the method again


@dataclass(eq=False)
class TimedStream(Stream):
    """A stream that also notes when the scheduler thread hands over each step's events."""
    handed: list = field(default_factory=list)

    def deliver(self, item) -> None:
        if not isinstance(item, Exception):
            self.handed.append(time.perf_counter())
        super().deliver(item)


async def _drive(worker: Worker, engine, items: list[Item], arrivals: list[float]) -> list[tuple]:
    """Submit each item at its arrival time; (submitted, token receipt times, hand-over times) per item.
    Receipt is when the client's coroutine sees a token; hand-over is when the scheduler thread delivered it
    (the two differ by the event loop's wake-up, which waits for the GIL)."""
    loop, start = asyncio.get_running_loop(), time.perf_counter()

    async def one(item: Item, at: float):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        stream = TimedStream([engine.request(item.ids, item.out, stop_token_ids=[])], loop)
        worker.submit(stream)
        times = []
        async for _ in stream.events():
            times.append(time.perf_counter())
        return stream.arrived, times, stream.handed

    return await asyncio.gather(*(one(it, at) for it, at in zip(items, arrivals)))


def served(engine, items: list[Item], arrivals: list[float], rows: int, budget: int | None):
    worker = Worker(engine, _metrics(rows), max_queue=len(items) + rows, rows=rows, prefill_budget=budget)
    worker.start()
    try:
        with PrefillClock(engine) as clock:
            results = asyncio.run(_drive(worker, engine, items, arrivals))
    finally:
        worker.close()
    return results, clock.times


# ------------------------------------------------------------------------------------------- summaries
def summarize(results: list[tuple], prefill_times: list[float], bare_step_s: float) -> dict:
    """Throughput and latencies of one served run. An interval (t_prev, t] counts as one with a prefill
    when a prefill was called after t_prev - 2 bare steps: with two decode steps queued ahead, a prefill's
    cost reaches the streams one or two tokens after the call. `itl_running_prefill_p99_ms` leaves out each
    request's first interval (its first token comes from its own prefill, its second from its first decode
    step, queued behind the steps already in flight): the running streams' share of the stall."""
    import bisect

    prefills = sorted(prefill_times)
    first = [times[0] - arrived for arrived, times in results if times]
    itl, itl_prefill, itl_running_prefill = [], [], []
    for _, times in results:
        for k, (prev, cur) in enumerate(zip(times, times[1:])):
            itl.append(cur - prev)
            i = bisect.bisect_right(prefills, prev - 2 * bare_step_s)
            if i < len(prefills) and prefills[i] <= cur:
                itl_prefill.append(cur - prev)
                if k > 0:
                    itl_running_prefill.append(cur - prev)
    tokens = sum(len(times) for _, times in results)
    span = max(times[-1] for _, times in results) - min(arrived for arrived, _ in results)
    ms = lambda v: None if v is None else 1e3 * v  # noqa: E731
    return {"requests": len(results), "output_tokens": tokens, "seconds": span, "tokens_per_s": tokens / span,
            "ttft_p50_ms": ms(percentile(first, 50)), "ttft_p99_ms": ms(percentile(first, 99)),
            "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99)),
            "itl_prefill_p99_ms": ms(percentile(itl_prefill, 99)), "itl_prefill_intervals": len(itl_prefill),
            "itl_running_prefill_p99_ms": ms(percentile(itl_running_prefill, 99))}


def all_decoding_rate(results: list[tuple]) -> float:
    """Tokens per second while every stream is decoding: from the last first token to the first finish."""
    start = max(times[0] for _, times in results)
    end = min(times[-1] for _, times in results)
    tokens = sum(1 for _, times in results for t in times if start < t <= end)
    return tokens / (end - start) if end > start else float("nan")


def poisson(n: int, rate: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    rng, at, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(at)
        at += rng.expovariate(rate)
    return out


# ---------------------------------------------------------------------------------------------- the run
def build_engine(args) -> tuple[Engine, str]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    max_seq_len = args.prompt_max + args.output_max + 8
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.model or (device.type == "cpu" and args.preset is None):
        from persimmon_rt.demo import demo_model_path

        path = args.model or demo_model_path()
        engine = Engine.from_pretrained(path, dtype=dtype, device=device, max_batch_size=args.rows,
                                        max_seq_len=max_seq_len)
        return engine, f"{path} on {device}"
    from generation import random_model        # benchmarks/generation.py: random weights made on the GPU

    from persimmon_rt.config import PersimmonConfig

    preset = args.preset or "persimmon-8b"
    config = PersimmonConfig.preset(preset)
    model = random_model(config, dtype, device)
    engine = Engine(model, config, max_batch_size=args.rows, max_seq_len=max_seq_len)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return engine, f"{preset} shapes, random {str(dtype).removeprefix('torch.')} weights, {where}"


def run(args) -> dict:
    engine, label = build_engine(args)
    rows = args.rows
    items = workload(args.requests, (args.prompt_min, args.prompt_max), (args.output_min, args.output_max),
                     engine.config.vocab_size, args.seed)
    streams = [Item(it.ids, args.stream_tokens) for it in items[:rows]]
    served(engine, [Item(it.ids, 8) for it in items[:rows]], [0.0] * rows, rows, None)        # warm-up
    bare = bare_decode(engine, streams, args.stream_tokens)
    # The same prompts through the scheduler thread, prefilled at once as in `bare`: the decode contexts
    # match, so the two rates differ by what serving adds.
    together = all_decoding_rate([(a, t) for a, t, _ in served(engine, streams, [0.0] * rows, rows, None)[0]])
    static = static_waves(engine, items, rows)
    by_budget = []
    for budget in args.prefill_budget:
        runs = []
        for rate in args.rates:
            n = len(items) if math.isinf(rate) else min(len(items), max(rows, int(rate * args.duration)))
            results, prefills = served(engine, items[:n], poisson(n, rate, args.seed + 1), rows, budget or None)
            step_s = bare["step_ms"] / 1e3
            at_handover = summarize([(a, h) for a, _, h in results], prefills, step_s)
            runs.append({"rate": rate, **summarize([(a, t) for a, t, _ in results], prefills, step_s),
                         "handover": {k: at_handover[k] for k in ("itl_p50_ms", "itl_p99_ms", "itl_prefill_p99_ms",
                                                                  "itl_running_prefill_p99_ms")}})
            print(f"budget {budget}, rate {rate}: {runs[-1]}", file=sys.stderr, flush=True)
        by_budget.append({"prefill_budget": budget or None, "runs": runs,
                          "targets": targets(bare, together, static, runs)})
    return {"setup": label, "rows": rows, "requests": len(items),
            "streams": {"tokens_per_s": together, "pct_of_bare": 100 * together / bare["tokens_per_s"]},
            "prompt_range": [args.prompt_min, args.prompt_max], "output_range": [args.output_min, args.output_max],
            "mean_prompt": statistics.mean(len(it.ids) for it in items),
            "mean_output": statistics.mean(it.out for it in items), "bare": bare, "static": static,
            "by_budget": by_budget}


def targets(bare: dict, together: float, static: dict, runs: list[dict]) -> dict:
    burst = next((r for r in runs if math.isinf(r["rate"])), None)
    prefill_p99 = [r["itl_prefill_p99_ms"] for r in runs if r["itl_prefill_p99_ms"] is not None]
    worst = max(prefill_p99) if prefill_p99 else None
    return {"streams_vs_bare": {"value": together / bare["tokens_per_s"], "target": 0.9},
            "continuous_vs_static": {"value": burst["tokens_per_s"] / static["tokens_per_s"] if burst else None,
                                     "target": 1.5},
            "itl_prefill_p99_vs_bare_step": {"value": worst / bare["step_ms"] if worst else None, "target": 2.0,
                                             "at_most": True, "ms": worst}}


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_table(r: dict) -> str:
    rows, bare, st = r["rows"], r["bare"], r["static"]
    lines = [f"{r['setup']}; {rows} rows",
             f"workload: {r['requests']} requests, prompts {r['prompt_range'][0]}-{r['prompt_range'][1]} tokens "
             f"(mean {r['mean_prompt']:.0f}), outputs {r['output_range'][0]}-{r['output_range'][1]} "
             f"(mean {r['mean_output']:.0f}), log-uniform",
             f"{'case':30s} {'rate':>6s} {'reqs':>5s} {'out tok/s':>10s} {'TTFT p50/p99 ms':>17s} "
             f"{'ITL p50/p99 ms':>15s} {'ITL p99 prefill':>15s} {'(running)':>9s} {'(handover)':>10s}",
             f"{'bare generate, batch ' + str(bare['batch']):30s} {'-':>6s} {bare['batch']:5d} "
             f"{bare['tokens_per_s']:10.1f} {'':>17s} {'step ' + _ms(bare['step_ms']):>15s}",
             f"{str(rows) + ' streams, all decoding':30s} {'burst':>6s} {rows:5d} "
             f"{r['streams']['tokens_per_s']:10.1f}   ({r['streams']['pct_of_bare']:.1f} % of bare)",
             f"{'static waves of ' + str(rows):30s} {'burst':>6s} {st['requests']:5d} {st['tokens_per_s']:10.1f}"]
    for b in r["by_budget"]:
        lines.append(f"prefill budget {b['prefill_budget'] or 'none'} tokens/step:")
        for run in b["runs"]:
            rate = "burst" if math.isinf(run["rate"]) else f"{run['rate']:g}/s"
            lines.append(f"{'  continuous':30s} {rate:>6s} {run['requests']:5d} {run['tokens_per_s']:10.1f} "
                         f"{_ms(run['ttft_p50_ms']) + ' / ' + _ms(run['ttft_p99_ms']):>17s} "
                         f"{_ms(run['itl_p50_ms']) + ' / ' + _ms(run['itl_p99_ms']):>15s} "
                         f"{_ms(run['itl_prefill_p99_ms']):>15s} {_ms(run.get('itl_running_prefill_p99_ms')):>9s} "
                         f"{_ms(run.get('handover', {}).get('itl_running_prefill_p99_ms')):>10s}")
        for name, t in b["targets"].items():
            value = t["value"]
            ok = None if value is None else (value <= t["target"] if t.get("at_most") else value >= t["target"])
            shown = "-" if value is None else f"{value:.2f}"
            lines.append(f"  target {name:30s} {shown:>6s} ({'<=' if t.get('at_most') else '>='} {t['target']}) "
                         f"{'n/a' if ok is None else ('met' if ok else 'MISSED')}")
    return "\n".join(lines)


def parse_args(argv=None):
    rate = lambda v: math.inf if v == "burst" else float(v)  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: demo model on the CPU, small workload")
    p.add_argument("--model", metavar="DIR", help="a model directory instead of random weights")
    p.add_argument("--preset", default=None, help="shapes of the random weights (default persimmon-8b on a GPU; "
                   "on the CPU the demo model unless given)")
    p.add_argument("--device", default=None)
    p.add_argument("--rows", type=int, default=None, help="concurrent sequences (default 32; quick 8)")
    p.add_argument("--requests", type=int, default=None, help="workload size (default 256; quick 24)")
    p.add_argument("--rates", default=None, help="Poisson arrival rates, requests/s, or 'burst' "
                   "(default 4,8,16,burst; quick 20,burst)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of arrivals per finite rate (default 20; quick 5)")
    p.add_argument("--prompt-range", default=None, help="min,max prompt tokens (default 128,2048; quick 16,256)")
    p.add_argument("--output-range", default=None, help="min,max output tokens (default 32,512; quick 8,64)")
    p.add_argument("--stream-tokens", type=int, default=None, help="output length of the bare/streams runs "
                   "(default 512; quick 32; at most the longest output)")
    p.add_argument("--prefill-budget", default="192", help="prompt tokens per step while rows decode, one run "
                   "per value (0: no limit; default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--switch-interval", type=float, default=None, metavar="MS",
                   help="the interpreter's thread switch interval for the run (sys.setswitchinterval), in ms")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"rows": 8 if quick else 32, "requests": 24 if quick else 256, "duration": 5 if quick else 20,
                "rates": "20,burst" if quick else "4,8,16,burst", "prompt_range": "16,256" if quick else "128,2048",
                "output_range": "8,64" if quick else "32,512", "stream_tokens": 32 if quick else 512}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.prefill_budget = [int(v) for v in str(args.prefill_budget).split(",") if v]
    args.rates = [rate(v) for v in str(args.rates).split(",") if v]
    args.prompt_min, args.prompt_max = map(int, args.prompt_range.split(","))
    args.output_min, args.output_max = map(int, args.output_range.split(","))
    if args.stream_tokens > args.output_max:
        p.error("--stream-tokens must not exceed the longest output (the cache is sized for it)")
    return args


def _plain(value):
    """Strict JSON: an infinite rate is "burst", a missing figure (NaN) null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "burst" if value == math.inf else None
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval / 1e3)
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_plain(result), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
