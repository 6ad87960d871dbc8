"""One end-to-end generation on the GPU, small enough to run under compute-sanitizer: the demo model in fp16,
bf16 and fp16 with int8 weights; one prompt (the one-row graph, LayerNorms folded into the GEMVs), a batch of 3
(packed, chunked prefill, decode graph of 4 rows) and one of 20 (a 32-row graph, the 17..32-row GEMV); greedy
and sampled. Exits non-zero if a generation comes out malformed.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_generate.py
"""

import torch

from persimmon_rt.demo import demo_model_path
from persimmon_rt.engine import Engine


def main() -> None:
    for dtype, quantize in ((torch.float16, None), (torch.bfloat16, None), (torch.float16, "int8")):
        engine = Engine.from_pretrained(demo_model_path(), dtype=dtype, device="cuda", max_batch_size=32,
                                        max_seq_len=256, prefill_chunk_tokens=48, quantize=quantize)
        one = ["BRUTUS:\n"]
        small = ["BRUTUS:\n", "PORTIA:\nO my lord, ", "CASSIUS:\n" * 12]
        large = [f"{name}:\n" for name in ("BRUTUS", "CASSIUS", "CASCA", "PORTIA", "LUCIUS")] * 4
        for prompts in (one, small, large):
            for sampling in ({}, {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 1}):
                result = engine.generate(prompts, max_new_tokens=10, stop_token_ids=[], **sampling)
                assert [len(ids) for ids in result.token_ids] == [10] * len(prompts)
        torch.cuda.synchronize()
        print(f"{dtype}{' int8' if quantize else ''}: ok", flush=True)


if __name__ == "__main__":
    main()
