"""Copies between host and device that do not make the host wait for the device."""

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


class HostCopies:
    """Copies of small int64 device tensors to the host that never wait for the device: two
    pinned buffers in turn, so the one the host is still reading stays intact while the next copy
    lands."""

    def __init__(self) -> None:
        self._bufs = [torch.empty(0, dtype=torch.long)] * 2

    def start(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """``t``'s host copy, valid once the returned event fires (None: already valid)."""
        if not t.is_cuda:
            return t, None
        n = t.shape[0]
        if self._bufs[0].shape[0] < n:
            self._bufs = [torch.empty(max(n, 256), dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._bufs.reverse()
        host = self._bufs[0][:n]
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done
