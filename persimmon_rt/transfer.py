"""Small host-built tensors (indices, lengths, sampling parameters, prompt pieces) onto the device without
the host waiting for the GPU.

torch copies pageable host memory to a GPU synchronously: it queues the copy, then waits for the stream, so
the host stalls until every step already queued has run and the scheduler's pipeline drains. From pinned
memory with non_blocking=True the copy is queued like a kernel. The pinned buffer comes from torch's
caching host allocator, which records the copy's event and hands the buffer out again only once it has
passed, so the caller may drop it at once. On the CPU the values simply become a host tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(values, dtype: torch.dtype, device) -> torch.Tensor:
    """`values` (numbers, or a tensor on any device) as a `dtype` tensor on `device`, queued on the current
    stream."""
    device = torch.device(device)
    if torch.is_tensor(values) and values.device.type != "cpu":
        return values.to(device, dtype, non_blocking=True)
    host = values.to(dtype) if torch.is_tensor(values) else torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def upload_split(parts: Sequence, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Several 1-D host sequences in one copy: consecutive views of one device tensor, in order."""
    host = torch.cat([p.to(dtype).flatten() if torch.is_tensor(p) else torch.tensor(p, dtype=dtype)
                      for p in parts])
    return list(upload(host, dtype, device).split([len(p) for p in parts]))
