"""``python -m persimmon_rt ...`` runs the ``persimmon-rt`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
