"""Pick the attention backend for a device: Triton on CUDA, the torch reference elsewhere."""

from __future__ import annotations

import logging

import torch

from .backend import AttentionBackend
from .torch_ref import TorchReferenceBackend

logger = logging.getLogger(__name__)

_NAMES = ("auto", "torch", "triton")


def get_attention_backend(device: torch.device | str, name: str = "auto", *,
                          finite_cache: bool = False) -> AttentionBackend:
    """``"auto"``: Triton on CUDA when triton imports, else the torch reference (with a warning
    on CUDA).  ``"torch"`` / ``"triton"`` force one; forcing Triton without it installed raises.

    Triton is imported only when it may be used, so CPU-only code never pays for (or depends
    on) it.  ``finite_cache``: the caches never hold NaN/Inf (see ``TorchReferenceBackend``).
    """
    if name not in _NAMES:
        raise ValueError(f"name must be one of {_NAMES}, got {name!r}")
    device = torch.device(device)
    if name == "torch":
        return TorchReferenceBackend(finite_cache)
    if name == "auto" and device.type != "cuda":
        return TorchReferenceBackend(finite_cache)
    try:
        from .triton_backend import TritonBackend
    except ImportError as e:
        if name == "triton":
            raise ImportError(f"attention backend 'triton' requested but triton is unavailable: {e}") from e
        logger.warning("triton is unavailable (%s); using the slow torch reference attention on %s",
                       e, device)
        return TorchReferenceBackend(finite_cache)
    return TritonBackend()
