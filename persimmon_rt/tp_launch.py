"""Starting a command's N tensor-parallel ranks (`persimmon-rt generate|chat|serve --tp N`).

One child process per rank, `python -m persimmon_rt <argv>`, with the variables `TensorParallel.init_from_env`
reads (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free local port), NVLink multicast off
and the child marker set. The ranks run in their own session, so a terminal's Ctrl-C reaches this process
alone, and it hands SIGINT/SIGTERM on to every rank exactly once: a server's rank 0 then drains for as long
as its --shutdown-timeout allows (torchrun would kill the ranks 30 s after a signal on torch < 2.12), and
its other ranks end when rank 0 tells them to. A rank that fails ends the run: the others are stopped and
its status is returned. If this process dies, the kernel kills the ranks (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from .tensor_parallel import NVLS_OFF_ENV, TP_CHILD_ENV

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# After the first rank fails, how long the others get to end by themselves (a SIGTERM) before SIGKILL.
_GRACE_S = 5.0
# After rank 0 ends well, how long the others may take to follow before they are stopped.
_FOLLOW_S = 60.0
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, base: dict | None = None) -> dict:
    """The environment of one rank."""
    env = {**(os.environ if base is None else base), **NVLS_OFF_ENV, TP_CHILD_ENV: "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _rank_setup() -> None:
    """In the child before exec: the forwarded signals back to their defaults (a launcher started with SIGINT
    ignored, as a shell's background job is, would otherwise pass that on and its ranks could not be
    interrupted), and SIGKILL when the launching process dies (Linux; elsewhere not available)."""
    for sig in _FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def in_launched_run() -> bool:
    """True in a process started by `launch` (or by torchrun with more than one process)."""
    return os.environ.get(TP_CHILD_ENV) == "1" or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(nproc: int, argv: Sequence[str], module: str = "persimmon_rt") -> int:
    """Run `python -m <module> <argv>` as ranks 0..nproc-1 on this machine; the exit status of the first
    rank that fails (the others are then stopped; 128 + N for a rank killed by signal N), else 0."""
    port = free_port()
    cmd = [sys.executable, "-m", module, *argv]
    procs = [subprocess.Popen(cmd, env=rank_env(r, nproc, port), start_new_session=True,
                              preexec_fn=_rank_setup)
             for r in range(nproc)]

    def forward(sig, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    rank0_done = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((c for c in codes if c not in (None, 0)), None)
            if failed is not None:                  # the others are stopped below
                return failed if failed > 0 else 128 - failed
            if all(c == 0 for c in codes):
                return 0
            if codes[0] == 0:
                rank0_done = rank0_done or time.monotonic()
                if time.monotonic() - rank0_done > _FOLLOW_S:
                    print(f"persimmon-rt: rank 0 ended but other ranks were still running {_FOLLOW_S:.0f} s later; "
                          "stopping them", file=sys.stderr)
                    return 1
            time.sleep(0.05)
    finally:
        _stop(procs)                                # every rank still running: a signal meanwhile is forwarded
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to the ranks still running, SIGKILL to those still running _GRACE_S later."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + _GRACE_S
    for p in alive:
        try:
            p.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
