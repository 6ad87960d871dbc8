"""`persimmon-rt bench`: the generation benchmark as a table (optionally a PNG and JSON).

Default: random weights of the Persimmon-8B shapes on a GPU; on a machine without one, the embedded
demo model on the CPU reference path.
"""

from __future__ import annotations

import argparse

import torch

from .. import benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benchmark.add_arguments(parser, defaults={"preset": None, "context": "128,2048", "prefill": "2048"})


def run(args: argparse.Namespace) -> int:
    if args.model is None and args.preset is None:
        if torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda")):
            args.preset = "persimmon-8b"
        else:
            from ..demo import demo_model_path

            args.model = demo_model_path()
    benchmark.report(args)
    return 0
