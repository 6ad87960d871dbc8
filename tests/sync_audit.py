"""A CPU stand-in for torch.cuda.set_sync_debug_mode: records the calls that the engine's step-path code makes
which, with its tensors on a GPU, would make the host wait for the device.

    a value read back            item, tolist, bool/int/float of a tensor, numpy, cpu, nonzero, unique, ...
    data put onto a device       torch.tensor / as_tensor / asarray with device= (a pageable copy, then a wait)
    a blocking transfer          .to(<device>) or .cuda() without non_blocking=True
    a Python list as an index    x[[...]]: the list becomes a host tensor that is copied over first
    a boolean mask as an index   x[mask]: the number of selected elements is read back

Only calls made directly by the modules in AUDITED count (ops and reference run the kernels' stand-ins on
the CPU; the GPU runs kernels there). scheduler.py reads its results' host copies after the one wait it
means to make (the oldest result's event), so there only the transfers count.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.overrides import TorchFunctionMode

import persimmon_rt

PACKAGE = os.path.dirname(persimmon_rt.__file__)
TORCH = os.path.dirname(torch.__file__)
AUDITED = {"forward.py", "decode_state.py", "sampling.py", "transfer.py", "scheduler.py", "fuyu/frontend.py"}
TRANSFERS_ONLY = {"scheduler.py"}

T = torch.Tensor
READS = {T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.numpy, T.cpu, T.nonzero,
         torch.nonzero, T.masked_select, torch.masked_select, T.unique, torch.unique, T.argwhere, torch.argwhere}
FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
INDEXING = {T.__getitem__, T.__setitem__, T.index_put_, T.index_put}


def _index_kind(index) -> str | None:
    for i in index if isinstance(index, tuple) else (index,):
        if isinstance(i, list):
            return "indexes with a Python list"
        if torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8):
            return "indexes with a boolean mask"
    return None


def _blocking_transfer(func, args, kwargs) -> bool:
    if func is T.cuda:
        return not kwargs.get("non_blocking", False)
    if func is not T.to:
        return False
    targets = [a for a in args[1:] if isinstance(a, (str, torch.device, torch.Tensor))] + \
        ([kwargs["device"]] if kwargs.get("device") is not None else [])
    non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args[1:])
    return bool(targets) and not non_blocking


class HostWaits(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        where = self._caller()
        if where is not None:
            module, line = where
            kind = self._kind(func, args, kwargs, transfers_only=module in TRANSFERS_ONLY)
            if kind:
                self.calls.append(f"{module}:{line} {kind} ({getattr(func, '__name__', func)})")
        return func(*args, **kwargs)

    @staticmethod
    def _caller():
        """(module file, line) of the nearest frame outside torch, if it is an audited module of the package."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH):
            frame = frame.f_back
        if frame is None or not frame.f_code.co_filename.startswith(PACKAGE):
            return None
        name = os.path.relpath(frame.f_code.co_filename, PACKAGE).replace(os.sep, "/")
        return (name, frame.f_lineno) if name in AUDITED else None

    @staticmethod
    def _kind(func, args, kwargs, transfers_only: bool) -> str | None:
        if func in READS and not transfers_only:
            return "reads a value back"
        if func in FROM_DATA and kwargs.get("device") is not None:
            return "puts host data onto a device"
        if _blocking_transfer(func, args, kwargs):
            return "blocking transfer"
        if func in INDEXING and len(args) > 1:
            return _index_kind(args[1])
        return None
