"""`persimmon-rt bench`: the generation benchmark (benchmarks/generation.py of a source checkout) as a table,
optionally a PNG and JSON.

Default: random weights of the Persimmon-8B shapes on a GPU; on a machine without one, the embedded
demo model on the CPU reference path.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "benchmarks")


def _benchmark():
    """benchmarks/generation.py beside the package (an editable install or a source checkout)."""
    if not os.path.isfile(os.path.join(BENCHMARKS, "generation.py")):
        raise RuntimeError("persimmon-rt bench runs the benchmarks of a source checkout: install with "
                           "`pip install --no-build-isolation -e .` from the repository")
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("generation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        benchmark = _benchmark()
    except RuntimeError:
        return                                 # `run` says why
    benchmark.add_arguments(parser, defaults={"preset": None, "context": "128,2048", "prefill": "2048"})


def run(args: argparse.Namespace) -> int:
    benchmark = _benchmark()
    if args.model is None and args.preset is None:
        if torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda")):
            args.preset = "persimmon-8b"
        else:
            from ..demo import demo_model_path

            args.model = demo_model_path()
    benchmark.report(args)
    return 0
