"""Fuyu-8B shapes with random weights, one GPU: time to first token for one 1080 x 1920 image plus a short
prompt, and decode ms/token, for the engine and for transformers (sdpa) on the same weights in one run.

The engine references the transformers model's parameters in place (fuyu_from_module), so one copy of the
weights is on the card. Both sides get the same token ids and patches (our processor's layout: 36 rows of
64 patches + image-newlines, <s>, the prompt, <0x04>). TTFT includes the patch projection and the
embedding; image decoding/resizing (the same numpy/Pillow code for both) is timed separately.

    python benchmarks/bench_fuyu.py [--dtype float16] [--new-tokens 128] [--layers 36] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from persimmon_rt.engine import Engine
from persimmon_rt.fuyu.frontend import fuyu_from_module
from persimmon_rt.fuyu.processor import FuyuImageProcessor

PROMPT_IDS = [71374, 71389, 120412, 71377, 71835, 71374, 73615, 71375]     # a short prompt's worth of ids
IMAGE_ID, NEWLINE_ID, BOS_ID, ANSWER_ID = 71011, 71019, 1, 71122


def build_model(dtype, layers: int):
    from transformers import FuyuConfig, FuyuForCausalLM

    config = FuyuConfig(num_hidden_layers=layers)          # Fuyu-8B: hidden 4096, 64 heads, vocab 262144
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = FuyuForCausalLM(config)
    model = model.to_empty(device="cuda").to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0 if name.endswith("layernorm.weight") else 0.0)
    return model.eval()


def inputs(image_processor):
    image = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    start = time.perf_counter()
    patches, rows, cols = image_processor(image)
    preprocess_s = time.perf_counter() - start
    ids = ([IMAGE_ID] * cols + [NEWLINE_ID]) * rows + [BOS_ID] + PROMPT_IDS + [ANSWER_ID]
    return ids, patches, preprocess_s


def timed(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_transformers(model, ids, patches, new_tokens: int) -> dict:
    input_ids = torch.tensor([ids], device="cuda")
    image_patches = torch.from_numpy(patches).to("cuda", model.dtype)[None]
    kwargs = dict(input_ids=input_ids, image_patches=image_patches, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        first = timed(lambda: model.generate(**kwargs, max_new_tokens=1, min_new_tokens=1))
        full = timed(lambda: model.generate(**kwargs, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1), 2)
    return {"ttft_ms": first * 1e3, "decode_ms_per_token": (full - first) * 1e3 / new_tokens}


def bench_engine(model, ids, patches, new_tokens: int) -> dict:
    config, weights, front = fuyu_from_module(model)
    engine = Engine(model, config.text_config, max_seq_len=len(ids) + new_tokens + 8, weights=weights)
    engine.capture([1])

    def first_token():
        embeds = front.embed(ids, torch.from_numpy(patches), engine.forward.embed)
        engine.generate(None, inputs_embeds=[embeds], max_new_tokens=1, stop_token_ids=[])

    ttft = timed(first_token)
    embeds = front.embed(ids, torch.from_numpy(patches), engine.forward.embed)
    engine.generate(None, inputs_embeds=[embeds], max_new_tokens=new_tokens + 1, stop_token_ids=[])
    stats = engine.last_stats
    return {"ttft_ms": ttft * 1e3, "decode_ms_per_token": stats["decode_s"] * 1e3 / max(stats["decode_steps"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    ids, patches, preprocess_s = inputs(FuyuImageProcessor())
    model = build_model(dtype, args.layers)
    results = {"prompt_tokens": len(ids), "patches": len(patches), "preprocess_ms": preprocess_s * 1e3,
               "engine": bench_engine(model, ids, patches, args.new_tokens),
               "transformers_sdpa": bench_transformers(model, ids, patches, args.new_tokens)}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"Fuyu-8B shapes ({args.layers} layers, {args.dtype}), one 1080x1920 image: {len(patches)} patches, "
          f"{len(ids)} prompt tokens; image preprocessing {preprocess_s * 1e3:.1f} ms")
    print(f"{'':20s}{'TTFT ms':>10s}{'decode ms/token':>18s}")
    for name in ("engine", "transformers_sdpa"):
        r = results[name]
        print(f"{name:20s}{r['ttft_ms']:10.1f}{r['decode_ms_per_token']:18.2f}")
    e, t = results["engine"], results["transformers_sdpa"]
    print(f"{'speed-up':20s}{t['ttft_ms'] / e['ttft_ms']:9.2f}x{t['decode_ms_per_token'] / e['decode_ms_per_token']:17.2f}x")


if __name__ == "__main__":
    main()
