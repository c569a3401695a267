"""Greedy choice on the device: the argmax the model runner (and the sampler) take."""

from __future__ import annotations

import torch


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of ``[n, V]`` logits: the same indices (the first maximum, NaN
    counting as the maximum), fast on a CPU.

    There torch's argmax is a scalar loop, ~0.4 ms for 16 rows of a 49k vocabulary, while
    ``amax`` is vectorised (~20x faster).  So: the max of each block of columns, the first
    block holding its row's maximum (argmax over a few hundred block maxima), then the
    argmax within that block.  Elsewhere, or when no block size divides ``V``, plain argmax.
    """
    n, v = logits.shape
    block = next((b for b in (256, 128, 64) if v % b == 0), 0)
    if logits.device.type != "cpu" or not block or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    blocks = logits.view(n, v // block, block)
    best = blocks.amax(dim=-1).argmax(dim=-1)  # [n]: the first block holding the row's max
    inner = blocks[torch.arange(n, device=logits.device), best].argmax(dim=-1)
    return best * block + inner
