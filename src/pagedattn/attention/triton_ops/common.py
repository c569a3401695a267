"""Constants and small helpers shared by the attention kernels' launchers."""

from __future__ import annotations

import os

import torch
import triton.language as tl

# Scores are kept in the base-2 domain (exp2 is one instruction): scale * log2(e).
LOG2E = 1.4426950408889634


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def interpreting() -> bool:
    """Whether kernels run under the Triton interpreter (``TRITON_INTERPRET`` set)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def dot_dtype(cache_dtype: torch.dtype) -> tl.dtype:
    """Operand type of the kernels' ``tl.dot``: the cache dtype, except bf16 under the
    interpreter, whose bf16 dot returns garbage (triton 3.9): there operands go up to fp32."""
    if cache_dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPES[cache_dtype]


def dot_precision(cache_dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact for fp32 operands (tf32 would cost ~3e-4 relative
    error), the default otherwise (ignored for 16-bit operands)."""
    return "ieee" if dot_dtype(cache_dtype) == tl.float32 else "tf32"
