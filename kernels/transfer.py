"""Host-to-device copies that do not make the host wait for the device.

``cpu_tensor.to(cuda)`` copies from pageable memory and synchronises the stream (the host waits until the device
has drained its queue); ``torch.tensor(python_list, device=cuda)`` does the same. The engine's small metadata (span
tables, slot indices, masks, positions) is built on the host, so every such copy in the per-layer path goes through
:func:`to_device`: the tensor is staged in pinned memory (torch's caching host allocator keeps the block alive until
the copy has run) and copied asynchronously, in stream order, without a synchronisation.
"""

from __future__ import annotations

import torch

__all__ = ["extend_mirror", "to_device"]


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` (and of ``dtype`` if given), copied without synchronising when it goes host -> CUDA.

    Values are those of ``t.to(device, dtype)``: a dtype change is made on the host, before the copy, exactly as
    ``Tensor.to`` would (conversions of integers and floats are the same on every device).
    """
    device = torch.device(device)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def extend_mirror(host: torch.Tensor, end: int, cached: torch.Tensor | None, synced: int,
                  device: torch.device) -> torch.Tensor:
    """``host[:end]`` on ``device``, reusing the first ``synced`` entries of ``cached`` (an earlier copy whose
    entries before ``synced`` are still current) and copying only the rest, without a synchronisation.

    Args:
        host: ``[n >= end]`` host tensor (a buffer that grows; entries past ``end`` are ignored).
        end: Entries wanted.
        cached: The previous copy on some device, or None.
        synced: Entries of ``cached`` still equal to ``host``'s.
        device: Where the copy is wanted.
    """
    if cached is None or cached.device != torch.device(device):
        cached, synced = None, 0
    synced = min(synced, end, 0 if cached is None else cached.numel())
    if cached is not None and synced == end == cached.numel():
        return cached
    tail = to_device(host[synced:end].clone(), device)
    return tail if cached is None or synced == 0 else torch.cat([cached[:synced], tail])

