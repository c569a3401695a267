"""pagedattn: a compact, tested LLM inference engine built around PagedAttention."""

__version__ = "0.1.0"
