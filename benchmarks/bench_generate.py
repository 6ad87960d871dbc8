"""End-to-end generation on Persimmon-8B shapes (random fp16 weights): persimmon_rt's engine against
transformers in the same process, on the same weights (the engine wraps transformers' parameters).

    python benchmarks/bench_generate.py [--transformers eager,sdpa] [--context 128,2048,16128] [--json F]

Everything persimmon-rt bench accepts works here; only the defaults differ (the full comparison).
"""

from generation import main

if __name__ == "__main__":
    main(defaults={"batch": "1,8,32", "context": "128,2048", "prefill": "2048,8192", "new_tokens": 128,
                   "transformers": "eager,sdpa"})
