"""Requests and their sequences: the engine's unit of bookkeeping.

A :class:`Request` is what the user submitted (one prompt, one :class:`SamplingParams`).  It
owns ``n`` :class:`Sequence` objects: one while the prompt is prefilled, then ``n`` after the
first token is sampled (the extra samples fork the prompt's blocks, sharing them until a
write triggers copy-on-write).  Scheduling and preemption act on whole requests so siblings
stay together and keep sharing.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass
class SeedStream:
    """A seeded sample's random stream: draw ``draws`` uses noise keyed by ``(key, draws)``
    (:func:`~pagedattn.kernels.sampling.draw_key`), so its tokens depend on its seed and on
    how many it has drawn, not on the batches it ran in."""

    key: int
    draws: int = 0


@dataclass(eq=False)  # an entity: equal only to itself (queues find and remove it by identity)
class Sequence:
    seq_id: str  # "{request_id}#{index}": the block manager's key
    index: int
    token_ids: list[int]  # prompt + generated
    prompt_len: int
    num_computed_tokens: int = 0  # leading tokens whose K/V is in the cache or being computed
    # Tokens sampled on the device by a step whose output the host has not read yet
    # (overlapped scheduling): they follow ``token_ids`` and the scheduler counts them.
    num_pending: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    seed: SeedStream | None = None  # a request with a seed: this sample's stream
    # Incremental detokenisation state (see .detokenizer).
    text: str = ""
    detok: Any = field(default=None, repr=False, compare=False)
    stop_checked_len: int = 0  # characters of ``text`` already checked for stop strings
    # What DELTA outputs reported already: output tokens, characters of ``text``, the finish.
    sent_tokens: int = 0
    sent_text: int = 0
    sent_finish: bool = False
    grammar: Any = field(default=None, repr=False, compare=False)  # structured output: a .structured.SampleGrammar
    # ``token_ids`` mirrored on the host as an array, for penalties (see .logits_processors).
    token_history: Any = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed_tokens


@dataclass(eq=False)  # an entity: equal only to itself (queues find and remove it by identity)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    extra_key: object = None  # prefix-cache salt
    # How the model computes the K/V its sequences hold, where that depends on their length
    # (ModelArchConfig.kv_variant; part of extra_key when not None).
    kv_variant: object = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    stream: bool = True  # report partial outputs every step (False: only when finished)
    error: str | None = None  # set when the request failed alone (finish_reason "error")
    bad_words_ids: list[list[int]] = field(default_factory=list)  # params.bad_words as token ids
    # With params.prompt_logprobs: one entry per prompt token computed so far (the first is None).
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first scheduled
    reported: bool = False  # a RequestOutput was made (DELTA: the prompt logprobs go in the first)
    # What the params say about every step, read once (asked of every row of every step):
    # params.plain_greedy, and the part of can_overlap that never changes.
    plain_greedy: bool = field(init=False)
    _overlappable: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        p = self.params
        self.plain_greedy = p.plain_greedy
        self._overlappable = p.logprobs is None and not p.has_penalties and not self.bad_words_ids
        if not self.seqs:
            self.seqs = [Sequence(f"{self.request_id}#0", 0, list(self.prompt_token_ids), len(self.prompt_token_ids))]
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether prompt logprobs are still to compute: the prompt's positions must then be
        computed, not taken from the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if s.finish_reason is None]

    @property
    def finished(self) -> bool:
        # Asked of every request three times a step: a plain loop, without the frame a
        # comprehension or generator costs (0.2 against 0.6 us for one sample).
        seqs = self.seqs
        if len(seqs) != self.params.n:
            return False
        for s in seqs:  # noqa: SIM110 (all() over a generator is the slow form this avoids)
            if s.finish_reason is None:
                return False
        return True

    @property
    def can_overlap(self) -> bool:
        """Whether a step sampling this request's next token may stay in flight while the next is
        scheduled (async scheduling): no log-probabilities to read, no first token of n samples
        (they fork), no penalties or bad words (their next logits read every token so far, the
        pending one too).  A grammar's next mask needs this token as well, but only to sample:
        the engine samples such a step after the previous one is processed, as its forward runs."""
        return self._overlappable and (self.params.n == 1 or self.prefill_done)

    @property
    def prefill_done(self) -> bool:
        """True once the first token was sampled (siblings may exist)."""
        return self.seqs[0].num_output_tokens > 0
