"""pagedattn: a compact, tested LLM inference engine built around PagedAttention.

``from pagedattn import LLM, SamplingParams`` is the offline API.  The exports are resolved
lazily so that the pure-Python cache bookkeeping (``pagedattn.cache``) imports without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "LLMEngine", "RequestOutput", "RequestOutputKind", "SamplingParams"]

if TYPE_CHECKING:
    from .engine.llm import LLM
    from .engine.llm_engine import LLMEngine
    from .engine.outputs import CompletionOutput, RequestOutput
    from .engine.sampling_params import RequestOutputKind, SamplingParams

_LAZY = {
    "LLM": ".engine.llm",
    "LLMEngine": ".engine.llm_engine",
    "SamplingParams": ".engine.sampling_params",
    "RequestOutputKind": ".engine.sampling_params",
    "RequestOutput": ".engine.outputs",
    "CompletionOutput": ".engine.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pagedattn' has no attribute {name!r}")
