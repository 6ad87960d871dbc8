"""Tensor-parallel decode: ms per step (batch 1, or --batch) and the largest batch x context that fits, for one TP
size per run.
Random weights of the Persimmon-8B shapes (fp16), made directly as each rank's shard; every rank runs the
same calls and rank 0 prints.

    python benchmarks/bench_tp.py                                      # TP=1 (the single-GPU path)
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_tp.py    # TP=2
    torchrun --standalone --nproc-per-node 4 benchmarks/bench_tp.py    # TP=4
    options: --batch 1,8,32 --context 128,2048 --new-tokens 128 --fit-context 2048,4096,16384 --check-fit --json FILE

"Fits": KV cache capacity from the memory free after the weights, keeping the engine's 2 GiB reserve for
activations; --check-fit also builds that engine and decodes a few tokens at that batch and context.
CPU smoke run: --device cpu --preset tiny --context 16 --new-tokens 4 (gloo, no fit numbers).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from generation import measure_decode
from persimmon_rt.cache import StaticKVCache
from persimmon_rt.config import PersimmonConfig
from persimmon_rt.engine import Engine
from persimmon_rt.loading import Weights, normalise_names
from persimmon_rt.tensor_parallel import TensorParallel
from persimmon_rt.weights import expected_shapes

RESERVE = 2 * 2**30          # as Engine._check_cache_fits


class _RandomTensor:
    """Stands for a full tensor that is never allocated: indexing it returns random values of the slice's
    shape (LayerNorm weights around 1), so each rank makes only its share."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype, device):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device
        self.mean, self.std = (1.0, 0.1) if "layernorm" in name and name.endswith("weight") else (0.0, 0.02)

    def __getitem__(self, index) -> torch.Tensor:
        shape = torch.empty(self.shape, device="meta")[index].shape
        return torch.empty(shape, dtype=self.dtype, device=self.device).normal_(self.mean, self.std)


def random_shard(config: PersimmonConfig, rank: int, world: int, dtype, device) -> Weights:
    """One rank's Weights with random values, allocated at their local shapes only. Every rank draws in the
    same order from the same seed, so replicated tensors agree across ranks."""
    torch.manual_seed(0)
    full = {name: _RandomTensor(name, shape, dtype, device) for name, shape in expected_shapes(config).items()}
    return Weights.assemble(normalise_names(full, config), config, shard=(rank, world))


def all_reduce_latency_us(tp: TensorParallel, width: int, dtype, calls: int = 64) -> dict:
    """us per all-reduce of one [1, width] row (8 KB at Persimmon's width in fp16) with the residual
    LayerNorm that follows it in the decode step, as the decode graph issues them: `calls` back to back in
    a captured graph. The engine's path (fused where enabled), NCCL + the LayerNorm kernel, NCCL alone."""
    import torch.distributed as dist

    from persimmon_rt import ops

    x = torch.randn(1, width, dtype=dtype, device=tp.device)
    w, b = torch.ones(width, dtype=dtype, device=tp.device), torch.zeros(width, dtype=dtype, device=tp.device)
    out, h = torch.empty_like(x), torch.randn_like(x)

    def nccl_layernorm(t):
        dist.all_reduce(t, group=tp.group)
        ops.layernorm(t, w, b, out, 1e-5, h, h)

    paths = {"engine": lambda t: tp.all_reduce_layernorm(t, w, b, out, 1e-5, h, h),
             "nccl + layernorm": nccl_layernorm,
             "nccl": lambda t: dist.all_reduce(t, group=tp.group)}
    result = {}
    for name, reduce in paths.items():
        for _ in range(3):
            reduce(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(calls):
                reduce(x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        result[name] = sorted(times)[len(times) // 2]
        del graph
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]          # noqa: E731
    parser.add_argument("--preset", default="persimmon-8b")
    parser.add_argument("--device", default=None, help="cuda (default when a GPU is visible) or cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch", type=ints, default=ints("1"), help="decode batch sizes")
    parser.add_argument("--context", type=ints, default=ints("128,2048"), help="prompt lengths of the decode runs")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--fit-context", type=ints, default=ints("2048,4096,16384"))
    parser.add_argument("--check-fit", action="store_true", help="also run the largest batch at each fit context")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tp = TensorParallel.init_from_env(device_type) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    rank, world = (tp.rank, tp.world_size) if tp else (0, 1)
    device = tp.device if tp else torch.device(device_type)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    config = PersimmonConfig.preset(args.preset)
    weights = random_shard(config, rank, world, dtype, device)
    weight_bytes = sum(t.numel() * t.element_size() for t in weights.tensors())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = {"tp": world, "device": name, "preset": args.preset, "dtype": str(dtype),
              "weights_gib_per_rank": weight_bytes / 2**30, "decode": [], "fit": []}

    max_ctx = max(args.context) + args.new_tokens + 8
    engine = Engine(None, config, max_batch_size=max(args.batch), max_seq_len=max_ctx, tp=tp, weights=weights)
    for batch in args.batch:
        for context in args.context:
            torch.manual_seed(1)                      # the same prompts on every rank
            row = {"batch": batch, "context": context, **measure_decode(engine, batch, context, args.new_tokens)}
            result["decode"].append(row)
    del engine

    if device.type == "cuda":
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0]
        free = tp.min_over_ranks(free) if tp else free
        per_token = StaticKVCache.nbytes(config, 1, 1, dtype, world)
        capacity = max(free - RESERVE, 0) // per_token
        for context in args.fit_context:
            row = {"context": context, "max_batch": capacity // context, "kv_tokens_per_rank": capacity}
            if args.check_fit and row["max_batch"] > 0:
                row["checked"] = _check(config, weights, tp, row["max_batch"], context)
            result["fit"].append(row)

    if tp is not None and device.type == "cuda":
        result["all_reduce"] = tp.all_reduce_backend
        result["all_reduce_us_8kb"] = all_reduce_latency_us(tp, config.hidden_size, dtype)
    if rank == 0:
        gib = result["weights_gib_per_rank"]
        print(f"TP={world} on {name} ({args.preset}, {dtype}); weights {gib:.2f} GiB per rank")
        if "all_reduce" in result:
            print(f"  all-reduce: {result['all_reduce']}; one {config.hidden_size}-wide row (+ LayerNorm) in a graph: "
                  + ", ".join(f"{k} {v:.1f} us" for k, v in result["all_reduce_us_8kb"].items()))
        for row in result["decode"]:
            graph = f", captured step {row['graph_step_ms']:.3f} ms" if "graph_step_ms" in row else ""
            print(f"  decode batch {row['batch']}, context {row['context']}: {row['ms_per_step']:.3f} ms/step{graph}")
        for row in result["fit"]:
            print(f"  fits: batch {row['max_batch']} x context {row['context']}"
                  + (f" (checked: {row['checked']})" if "checked" in row else ""))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)
    if tp:
        tp.shutdown()


def _check(config, weights, tp, batch: int, context: int) -> str:
    """Build the engine at this size and decode 4 tokens. An out-of-memory error on one rank only would
    leave the others waiting in a collective, so the engine checks memory before any collective runs."""
    try:
        engine = Engine(None, config, max_batch_size=batch, max_seq_len=context, tp=tp, weights=weights)
        torch.manual_seed(2)
        prompts = torch.randint(0, config.vocab_size, (batch, context - 8)).tolist()
        engine.generate(prompts, max_new_tokens=4, stop_token_ids=[])
        del engine
        return "ok"
    except (MemoryError, torch.OutOfMemoryError) as exc:
        return f"failed: {type(exc).__name__}"
    finally:
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
