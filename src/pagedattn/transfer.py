"""Host-to-device copies that do not make the host wait for the device."""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (a host tensor) on ``device``, the host not waiting for queued device work.

    A copy from pageable memory with ``non_blocking=False`` makes torch synchronise the stream,
    i.e. wait for every kernel queued before it: in a step launched while the previous one still
    runs, that stalls the host for the rest of that step.  On CUDA the tensor goes through pinned
    memory (the pinned block is kept until the copy is done) with a non-blocking copy; on other
    devices it is returned as is or copied plainly."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without waiting for it (see :func:`upload`)."""
    return upload(torch.tensor(values, dtype=dtype), device)
