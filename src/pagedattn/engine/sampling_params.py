"""Sampling parameters (vLLM's names and defaults), validated on construction.

Every field is checked for its type and range here, so a bad value is a ``ValueError`` naming
it before any work starts; checks that need the model (token ids inside the vocabulary,
``logprobs`` at most the vocabulary size, ``bad_words`` through the tokenizer) run in
``LLMEngine.validate``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .structured import StructuredOutputsParams

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for logit_bias values: [-100, 100]
PENALTY_LIMIT = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]


class RequestOutputKind(enum.IntEnum):
    """What each :class:`RequestOutput` of a request holds (vLLM's names and values).

    * ``CUMULATIVE``: everything so far (the text and token ids since the first token).
    * ``DELTA``: only what is new since the request's previous output: a stream's cost per
      token stays flat however long the output grows (a cumulative output copies the token ids
      so far at every step).  While a sample runs, the last ``len(longest stop string) - 1``
      characters are held back: they may begin a stop string, which is cut from the text.
    * ``FINAL_ONLY``: one output, when the request finishes (what ``LLM.generate`` returns).
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


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
    # generated (as vLLM and HF do), and stop strings are not checked before then, nor later
    # in the text of those tokens (a stop string counts where it ends after them, as in vLLM).
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per generated token
    # Per prompt token after the first: its logprob and the top-k alternatives (vLLM's).
    prompt_logprobs: int | None = None
    # HF's: logits of tokens in the prompt or the output so far are divided by it (positive
    # ones) or multiplied by it (negative ones); 1 is off.
    repetition_penalty: float = 1.0
    # OpenAI's, over the output so far: minus presence_penalty for every token that occurred,
    # minus frequency_penalty times the number of times it occurred.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    # vLLM's: words never to generate.  A word of one token is banned always; one of several
    # tokens has its last token banned whenever the output ends with the others.
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # A JSON schema, regex, choice or grammar the output must follow (compiled when the request
    # is validated; see .structured).
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # vLLM's: keep only the prompt's last k tokens (-1: as many as the context holds with one
    # token to generate); None: a prompt that does not fit is an error.
    truncate_prompt_tokens: int | None = None
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
        _check_int(self, "prompt_logprobs", 0, optional=True)
        _check_int(self, "truncate_prompt_tokens", -1, "must be -1, a positive integer or None", optional=True)
        if self.truncate_prompt_tokens == 0:
            raise _bad(self, "truncate_prompt_tokens", "must be -1, a positive integer or None")
        _check_float(self, "repetition_penalty", lambda v: v > 0, "must be a finite number > 0 (1: off)")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(self, name, lambda v: -PENALTY_LIMIT <= v <= PENALTY_LIMIT,
                         f"must be in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}] (0: off)")
        self.logit_bias = self._logit_bias()
        self.allowed_token_ids = self._token_list("allowed_token_ids")
        self.bad_words = self._bad_words()
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(self, name, "must be true or false")
        self.stop_list = self._stop_strings()
        self.output_kind = self._output_kind()
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

    def _output_kind(self) -> RequestOutputKind:
        kind = self.output_kind
        if isinstance(kind, RequestOutputKind):
            return kind
        if _is_int(kind) and kind in RequestOutputKind._value2member_map_:
            return RequestOutputKind(kind)
        raise _bad(self, "output_kind", "must be a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)")

    def _logit_bias(self) -> dict[int, float] | None:
        bias = self.logit_bias
        if bias is None:
            return None
        if not isinstance(bias, Mapping):
            raise _bad(self, "logit_bias", "must be a dict of token id -> bias")
        out: dict[int, float] = {}
        for t, v in bias.items():
            if not _is_int(t) or t < 0:
                raise _bad(self, "logit_bias", f"keys must be non-negative token ids, got {t!r}")
            if not _is_number(v) or not -LOGIT_BIAS_LIMIT <= v <= LOGIT_BIAS_LIMIT:
                raise _bad(self, "logit_bias", f"the bias of token {t} must be a number in "
                           f"[-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}], got {v!r}")
            out[t] = float(v)
        return out or None

    def _token_list(self, name: str) -> list[int] | None:
        ids = getattr(self, name)
        if ids is None:
            return None
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids \
                or any(not _is_int(t) or t < 0 for t in ids):
            raise _bad(self, name, "must be a non-empty list of non-negative token ids")
        return list(ids)

    def _bad_words(self) -> list[str] | None:
        words = self.bad_words
        if words is None:
            return None
        if isinstance(words, (str, bytes)) or not isinstance(words, Sequence) \
                or any(not isinstance(w, str) or not w.strip() for w in words):
            raise _bad(self, "bad_words", "must be a list of words (strings that are not blank)")
        return list(words) or None

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty needs the tokens generated so far."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def processes_logits(self) -> bool:
        """Whether the logits change before sampling (penalties, biases, masks, bad words)."""
        return self.has_penalties or bool(self.logit_bias) or self.allowed_token_ids is not None \
            or bool(self.bad_words)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def top_k_active(self) -> bool:
        return self.top_k > 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the logits on the host side: no logprobs, no masks
        (min_tokens, a grammar) and no other change to the logits.  Such rows can take the model
        runner's on-device argmax."""
        return self.greedy and self.logprobs is None and self.min_tokens == 0 and self.structured_outputs is None \
            and not self.processes_logits


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
