"""Subcommands of `persimmon-rt`: each module provides add_arguments(parser) and run(args) -> int."""
