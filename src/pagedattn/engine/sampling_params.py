"""Sampling parameters (vLLM's names and defaults), validated on construction.

Every field is checked for its type and range here, so a bad value is a ``ValueError`` naming
it before any work starts; checks that need the model (token ids inside the vocabulary,
``logprobs`` at most the vocabulary size) run in ``LLMEngine.validate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .structured import StructuredOutputsParams

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context length
    # EOS and stop_token_ids are masked out of the logits until this many tokens were
    # generated (as vLLM and HF do), and stop strings are not checked before then.
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per generated token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # A JSON schema, regex, choice or grammar the output must follow (compiled when the request
    # is validated; see .structured).
    structured_outputs: StructuredOutputsParams | None = None
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_int(self, "n", 1)
        _check_float(self, "temperature", lambda v: v >= 0, "must be a finite number >= 0")
        _check_float(self, "top_p", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
        _check_int(self, "top_k", -1, "must be -1 (disabled), 0 (disabled) or a positive integer")
        _check_float(self, "min_p", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
        _check_int(self, "max_tokens", 1, optional=True)
        _check_int(self, "min_tokens", 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad(self, "min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        _check_int(self, "seed", _I64_MIN, "must be an int64 or None", optional=True, hi=_I64_MAX)
        _check_int(self, "logprobs", 0, optional=True)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(self, name, "must be true or false")
        self.stop_list = self._stop_strings()
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _bad(self, "structured_outputs", "must be a StructuredOutputsParams or None")
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) \
                    or any(not _is_int(t) or t < 0 for t in ids):
                raise _bad(self, "stop_token_ids", "must be a list of non-negative token ids")
            self.stop_token_ids = list(ids)

    def _stop_strings(self) -> list[str]:
        stop = self.stop
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, Sequence) or any(not isinstance(s, str) or not s for s in items):
            raise _bad(self, "stop", "must be a non-empty string or a list of them")
        return list(items)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def top_k_active(self) -> bool:
        return self.top_k > 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the logits on the host side: no logprobs and no
        masks (min_tokens, a grammar).  Such rows can take the model runner's on-device argmax."""
        return self.greedy and self.logprobs is None and self.min_tokens == 0 and self.structured_outputs is None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bad(p: SamplingParams, name: str, why: str) -> ValueError:
    return ValueError(f"SamplingParams.{name}: {why} (got {getattr(p, name)!r})")


def _check_int(p: SamplingParams, name: str, lo: int, why: str | None = None, *, optional: bool = False,
               hi: int = _I64_MAX) -> None:
    v = getattr(p, name)
    if v is None and optional:
        return
    if not _is_int(v) or not lo <= v <= hi:
        raise _bad(p, name, why or f"must be an integer >= {lo}" + (" or None" if optional else ""))


def _check_float(p: SamplingParams, name: str, ok: Callable[[float], bool], why: str) -> None:
    v = getattr(p, name)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not ok(v):
        raise _bad(p, name, why)
