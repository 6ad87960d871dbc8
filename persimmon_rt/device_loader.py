"""Stream safetensors files straight into GPU memory.

Loading through a memory map (weights.load_state_dict) faults the file in page by page and leaves every
page it touched mapped into the process: an 8B checkpoint shows up as 18 GiB of resident memory while it
loads. Here each file is read sequentially in large blocks into two small pinned buffers, one filling
from disk while the other is copied to the GPU, so host memory stays at the two buffers whatever the
model size (1.1 GiB resident in all, measured). Both ways read a cold checkpoint at the disk's speed.

The header is parsed and checked here (the format is an 8-byte length, a JSON table of dtype, shape and
byte range per tensor, then the data), so a truncated or inconsistent file is refused before any data
is read. Byte ranges may not overlap, so the tensors allocated never add up to more than the file holds.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from .weights import CheckpointError, weight_files

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER_BYTES = 100 * 2**20
BLOCK_BYTES = 64 * 2**20


def read_header(path: str) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
    """(offset of the data, {name: (dtype, shape, begin, end)}) with begin/end relative to the data, after
    checking that every byte range matches its dtype and shape and lies inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"cannot read {path}: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"cannot read {path}: header length {length} does not fit the file ({size} bytes)")
        try:
            table = json.loads(fh.read(length).decode("utf-8"))  # the format's encoding, not json's guess
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also over-long integers
            raise CheckpointError(f"cannot read {path}: the header is not valid JSON ({exc})") from exc
    if not isinstance(table, dict):
        raise CheckpointError(f"cannot read {path}: the header is not a JSON object")
    data_start, data_bytes = 8 + length, size - 8 - length
    entries = {}
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _DTYPES[entry["dtype"]], list(entry["shape"]), entry["data_offsets"]
            numel, extent = 1, 1
            for d in shape:
                if type(d) is not int or d < 0:
                    raise ValueError(f"bad dimension {str(d)[:40]}")
                numel, extent = numel * d, extent * max(d, 1)
            if extent >= 2**62:  # torch's strides are int64, even for a tensor with a zero dimension
                raise ValueError(f"shape {shape} is too large")
            if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= data_bytes):
                raise ValueError(f"byte range [{str(begin)[:40]}, {str(end)[:40]}) outside the {data_bytes} data bytes")
            if end - begin != numel * dtype.itemsize:
                raise ValueError(f"{end - begin} bytes for shape {shape} of {entry['dtype']}")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: tensor {name[:200]!r} has an invalid entry ({exc})") from exc
        entries[name] = (dtype, shape, begin, end)
    ranges = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise CheckpointError(f"cannot read {path}: tensors {first[:200]!r} and {second[:200]!r} overlap")
    return data_start, entries


def load_file(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, in its stored dtype, on `device`."""
    device = torch.device(device)
    data_start, entries = read_header(path)
    out = {name: torch.empty(shape, dtype=dtype, device=device) for name, (dtype, shape, _, _) in entries.items()}
    # The file's data region, block by block, scattered to the tensors whose byte ranges each block covers.
    targets = sorted(((begin, end, out[name].view(-1).view(torch.uint8)) for name, (_, _, begin, end) in entries.items()
                      if end > begin), key=lambda t: t[0])
    if not targets:
        return out
    pinned = device.type == "cuda"
    buffers = [torch.empty(BLOCK_BYTES, dtype=torch.uint8, pin_memory=pinned) for _ in range(2 if pinned else 1)]
    done = [None] * len(buffers)                # event: the buffer's last copies have finished
    first, last = targets[0][0], max(t[1] for t in targets)
    with open(path, "rb", buffering=0) as fh:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        t = 0
        for i, block_start in enumerate(range(first, last, BLOCK_BYTES)):
            block_end = min(block_start + BLOCK_BYTES, last)
            slot = i % len(buffers)
            if done[slot] is not None:
                done[slot].synchronize()
            buf = buffers[slot][:block_end - block_start]
            _read_exactly(fh, memoryview(buf.numpy()), data_start + block_start, path)
            while t < len(targets) and targets[t][1] <= block_start:
                t += 1
            j = t
            while j < len(targets) and targets[j][0] < block_end:
                begin, end, dst = targets[j]
                lo, hi = max(begin, block_start), min(end, block_end)
                dst[lo - begin:hi - begin].copy_(buf[lo - block_start:hi - block_start], non_blocking=pinned)
                j += 1
            if pinned:
                done[slot] = torch.cuda.Event()
                done[slot].record(torch.cuda.current_stream(device))
        if pinned:
            torch.cuda.current_stream(device).synchronize()
    return out


def load_state_dict(directory: str, device, dtype: torch.dtype | None = None,
                    names=None, convert=None) -> dict:
    """The tensors of an HF-format safetensors directory (those in `names`, if given) on `device`, floating
    point ones converted to `dtype` file by file (so a converted copy of at most one file coexists with
    its original on the device). `convert(name, tensor)`, if given, replaces that conversion (it may
    return something other than a tensor: a quantized weight, say)."""
    if convert is None:
        def convert(name, tensor):
            return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    state = {}
    for path in weight_files(directory):
        loaded = load_file(path, device)
        for name in list(loaded):
            tensor = loaded.pop(name)             # the original is freed once converted
            if names is None or name in names:
                state[name] = convert(name, tensor)
    return state


def _read_exactly(fh, view: memoryview, offset: int, path: str) -> None:
    fh.seek(offset)
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise CheckpointError(f"cannot read {path}: the file ends before its tensors do")
        got += n
