"""Batched sampling on the model's device.

Each row of the logits has its own parameters.  Everything is vectorised (on the GPU the
noise of rows with their own seed too: one kernel, :mod:`..kernels.sampling`), and the caller
does a single host transfer of the chosen tokens per step.

A step's logits first go through the batch's logits-processing stages (allowed tokens, bans,
biases, penalties: :mod:`.logits_processors`), when any row asks for one, then temperature,
top-k, top-p and min-p, then the random choice.

Top-k, top-p and min-p set the logits they drop to -inf; then the random choice, exact on both
devices, in a form that suits each:

* **GPU**: the exponential race, ``argmax(x / T - log q)`` with ``q ~ Exp(1)`` per entry: no
  softmax and no scan, one kernel over the logits (:mod:`..kernels.sampling`).
* **CPU**: one uniform per row against the cumulative softmax (an inverse-CDF draw): noise for
  every entry cost the CPU ~10x a softmax and a scan (docs/benchmarks.md, "Sampling").

A seeded row's draws come from its own stream, keyed by its seed and how many tokens it has
drawn (:class:`~.sequence.SeedStream`), so its tokens never depend on the batch it runs in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from math import inf

import torch

from ..kernels.sampling import draw_key, filter_floor, race_sample, triton
from ..runtime.greedy import argmax_rows
from ..transfer import to_device
from .logits_processors import LogitsStages, RowHistory, TokenHistory, build_stages
from .sampling_params import SamplingParams
from .sequence import Request, SeedStream
from .sequence import Sequence as Seq
from .structured import SampleGrammar, TokenBitmask, allows_only, apply_bitmask, fill_bitmask


@dataclass
class SamplingRow:
    params: SamplingParams
    seed: SeedStream | None  # the row's own random stream (a request with a seed)
    banned: Sequence[int] = ()  # token ids this row may not sample now (EOS before min_tokens)
    grammar: SampleGrammar | None = None  # structured output: the tokens its grammar allows now
    # The sequence's tokens so far (penalties and bad words read them).
    history: RowHistory | None = None
    bad_words: Sequence[Sequence[int]] = ()  # the request's bad words as token ids


def sampling_row(seq: Seq, req: Request, eos_token_ids: Iterable[int], launched: bool = False) -> SamplingRow:
    """``seq``'s row of the next sampling step: its parameters and seed stream, the tokens it may not
    sample yet (EOS and stop ids before ``min_tokens``) and, for penalties and bad words, its
    tokens so far.  ``launched``: the step sampling this row is already counted in
    ``seq.num_pending`` (a step whose grammars are advanced after its launch), so the token being
    sampled is one fewer after the known ones."""
    p = req.params
    before = seq.num_output_tokens + seq.num_pending - int(launched)  # the output tokens ahead of this one
    # A sample that finished while this step ran (its grammar may be complete): the row's token
    # is dropped, so it needs no mask.
    grammar = None if seq.finished else seq.grammar
    banned: list[int] = []
    if before < p.min_tokens:  # EOS and stop ids wait for min_tokens
        banned = [*(() if p.ignore_eos else sorted(eos_token_ids)), *(p.stop_token_ids or ())]
        if grammar is not None and banned and allows_only(grammar, banned):
            banned = []  # a grammar that can only end (or go on through a stop id) wins over min_tokens
    history = None
    if p.has_penalties or req.bad_words_ids:
        if seq.token_history is None:
            seq.token_history = TokenHistory()
        history = RowHistory(seq.token_ids, seq.prompt_len, seq.token_history)
    return SamplingRow(p, seq.seed, banned, grammar=grammar, history=history,
                       bad_words=req.bad_words_ids)


# The CPU decides top-p from a row's most probable tokens when they reach top_p: a partial sort,
# ~20x cheaper than the full one on the 2-core machine (docs/benchmarks.md, "Sampling").  Not on
# the GPU: checking which rows need more would make the host wait for the device; a batch there
# sorts, or from FILTER_KERNEL_MIN_ROWS rows takes the threshold kernel.
TOP_P_CANDIDATES = 256


def top_p_drop(probs: torch.Tensor, top_p: torch.Tensor, candidates: int | None = None) -> torch.Tensor:
    """True where top-p drops a token of ``probs [n, V]`` (``top_p [n, 1]``): a token is kept
    while the mass of the tokens before it, most probable first, is at most ``top_p`` (the
    smallest such set reaching it); a row of ``top_p`` inf keeps everything.

    ``candidates``: a row whose ``candidates`` most probable tokens hold more than ``top_p`` is
    decided from them alone (its last kept probability is the threshold; tokens tied with it
    beyond the set are kept too); the others, or every row with None, from a full sort."""
    v = probs.shape[1]
    if candidates is None or candidates >= v:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) > top_p
        return torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    vals = probs.topk(candidates, dim=-1).values
    cum = vals.cumsum(dim=-1)
    kept = ((cum - vals) <= top_p).sum(dim=-1, keepdim=True)  # >= 1: the most probable always
    keep_all = top_p == inf
    drop = (probs < vals.gather(1, kept - 1)) & ~keep_all
    decided = keep_all | (cum[:, -1:] > top_p)  # the first token dropped is a candidate
    if not bool(decided.all()):
        rest = (~decided[:, 0]).nonzero()[:, 0]
        drop[rest] = top_p_drop(probs[rest], top_p[rest])
    return drop


# From this many rows the GPU filters through the threshold kernel (one program a row: about
# the same time for any batch up to a wave of programs), below it through a sort of the
# probabilities (whose time grows with the rows); the crossing, on an H100 with a 152k
# vocabulary, is near 30 rows (docs/benchmarks.md, "Sampling").
FILTER_KERNEL_MIN_ROWS = 32

CDF_BLOCK = 256  # columns a block: the inverse-CDF draw scans block sums, then one block


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``probs [n, V]`` (float32, rows summing to ~1) the first token whose
    cumulative probability exceeds ``u`` (float64 ``[n]`` in [0, 1)) times the row's total; a
    token of probability 0 is never chosen (a row of NaN gets some token in range).

    Two levels, scanned in float64: the cumulative sum of the row's block sums finds the block,
    then that block's own cumulative sum the token.  A float64 scan of the whole row is a slow
    scalar loop on the CPU and a float32 one would lose the tail's tiny terms; the block sums are
    one vectorised pass."""
    n, v = probs.shape
    blocks = torch.nn.functional.pad(probs, (0, -v % CDF_BLOCK)).view(n, -1, CDF_BLOCK)
    cum = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [n, blocks]; float32 sums of 256 (a float64 sum copies the row)
    # Below the total: right=True then stops at a block (a token) of positive mass, never past it.
    r = torch.minimum(u * cum[:, -1], torch.nextafter(cum[:, -1], torch.zeros_like(u)))[:, None]
    blk = torch.searchsorted(cum, r, right=True).clamp_(max=cum.shape[1] - 1)  # [n, 1]; clamped: a NaN row
    before = torch.where(blk > 0, cum.gather(1, (blk - 1).clamp_(min=0)), 0.0)
    inner = blocks[torch.arange(n, device=probs.device), blk[:, 0]].cumsum(dim=-1, dtype=torch.float64)
    rest = torch.minimum(r - before, torch.nextafter(inner[:, -1:], torch.zeros_like(r)))
    return (blk * CDF_BLOCK + torch.searchsorted(inner, rest, right=True))[:, 0].clamp_(max=v - 1)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: sampled token + top-k, or None
    sampled_logprobs: list[float | None]


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one batch, as device tensors built once.

    Building them never waits for the device (pinned memory, non-blocking copies), so a step
    can be prepared while the previous one is still running; a batch with the same rows can
    reuse them on the next step.
    """

    rows: list[SamplingRow]
    greedy: list[bool]
    all_greedy: bool
    want_logprobs: bool
    temperature: torch.Tensor | None = None  # [n]; 0 for a greedy row
    top_k: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (kmax, k index [n,1], active [n,1])
    top_p: torch.Tensor | None = None  # [n, 1]; inf: no filter
    min_p: torch.Tensor | None = None  # [n, 1]
    seeded: list[int] = field(default_factory=list)  # rows with their own seed stream
    grammar_mask: TokenBitmask | None = None  # structured output's allowed tokens of its rows
    stages: LogitsStages | None = None  # None: no row changes its logits before sampling

    def divisor(self) -> torch.Tensor:
        """What the logits are divided by before a softmax, ``[n]``: each row's temperature, 1
        for a greedy row (temperature 0)."""
        assert self.temperature is not None
        return torch.where(self.temperature > 0, self.temperature, 1.0)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)  # the CPU's draws of rows without a seed
        self.generator.manual_seed(seed)
        # The GPU's: each step's key for the rows without a seed, drawn from this stream.
        self.stream = SeedStream(seed & 0xFFFF_FFFF_FFFF_FFFF)
        self.use_kernel = device.type == "cuda" and triton is not None

    def warm_up(self, vocab_size: int, dtype: torch.dtype = torch.float32) -> None:
        """Sample dummy logits once down every path (greedy, temperature, top-k, top-p, min-p,
        seeded rows, log-probabilities), so the device's first use of these ops (module loads,
        workspaces) happens at start-up, not on a request.  The shared generator's state is
        kept: seeded sampling stays reproducible.  The sampling kernels compile here for the
        model's dtype and float32 (log-probabilities and logits stages take a float32 copy),
        with filters and without."""
        state, draws = self.generator.get_state(), self.stream.draws
        logits = torch.randn(3, vocab_size, dtype=dtype, device=self.device)
        seeded = SeedStream(0)
        rows = [SamplingRow(SamplingParams(temperature=0.0), None),
                SamplingRow(SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05), None, banned=(0,)),
                SamplingRow(SamplingParams(temperature=1.0, top_p=0.5, logprobs=2), seeded)]
        self(logits, rows)  # log-probabilities: float32 logits, filtered
        for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_p=0.9),
                       SamplingParams(temperature=0.7, logprobs=1)):  # the model's dtype, filtered or not; float32
            self(logits[:1], [SamplingRow(params, None)])
        big = torch.randn(FILTER_KERNEL_MIN_ROWS, vocab_size, dtype=dtype, device=self.device)
        for logprobs in (None, 1):  # the filter kernel on the model's dtype, and on float32 (log-probabilities)
            self(big, [SamplingRow(SamplingParams(temperature=0.7, top_p=0.9, logprobs=logprobs), None)] * len(big))
        self.generator.set_state(state)
        self.stream.draws = draws

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """``logits [n, V]`` (any float dtype) -> one token per row (one host transfer)."""
        batch = self.prepare(rows)
        if batch.want_logprobs:
            logits = logits.float()  # once; sample() and the logprobs share it
        tokens = self.sample(logits, batch)
        if not batch.want_logprobs:
            ids = tokens.tolist()
            return SamplerOutput(ids, [None] * len(rows), [None] * len(rows))
        return self._with_logprobs(logits, tokens, rows)

    def prepare(self, rows: list[SamplingRow]) -> SamplingBatch:
        dev = self.device
        greedy = [r.params.greedy for r in rows]
        b = SamplingBatch(rows, greedy, all(greedy), any(r.params.logprobs is not None for r in rows))
        b.stages = build_stages([r.params for r in rows], [r.banned for r in rows], [r.history for r in rows],
                                [r.bad_words for r in rows], dev)
        b.grammar_mask = fill_bitmask([r.grammar for r in rows], dev)
        if b.all_greedy:
            return b
        b.temperature = to_device([0.0 if g else r.params.temperature for r, g in zip(rows, greedy)],
                                   torch.float32, dev)
        # A greedy row filters nothing (its argmax is of the logits as they were): no top-k, top-p
        # of inf, min-p 0.  top_k beyond the vocabulary means "no filter"; clamped so huge values
        # cannot overflow.
        ks = [0 if g or not r.params.top_k_active else min(r.params.top_k, 1 << 30) for r, g in zip(rows, greedy)]
        top_ps = [inf if g or r.params.top_p >= 1.0 else r.params.top_p for r, g in zip(rows, greedy)]
        min_ps = [0.0 if g else r.params.min_p for r, g in zip(rows, greedy)]
        if any(ks):
            kmax = max(ks)
            b.top_k = (kmax, to_device([min(k, kmax) - 1 if k else kmax - 1 for k in ks], torch.long, dev)[:, None],
                       to_device([k > 0 for k in ks], torch.bool, dev)[:, None])
        if any(p < inf for p in top_ps):
            b.top_p = to_device(top_ps, torch.float32, dev)[:, None]
        if any(min_ps):
            b.min_p = to_device(min_ps, torch.float32, dev)[:, None]
        b.seeded = [i for i, (r, g) in enumerate(zip(rows, greedy)) if r.seed is not None and not g]
        return b

    def sample(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """Tokens ``[n]`` on the device; nothing here waits for the device."""
        assert logits.shape[0] == len(b.rows)
        if b.stages is not None:
            logits = b.stages.apply(logits)  # an fp32 copy: the raw logits stay for the logprobs
        if b.grammar_mask is not None:  # in place unless the log-probabilities need the logits as they were
            logits = apply_bitmask(logits, b.grammar_mask, inplace=b.stages is not None or not b.want_logprobs)
        if b.all_greedy:
            # In the model's dtype: widening to fp32 is exact and order-preserving, so the
            # indices are the same, without a copy of the logits.
            return argmax_rows(logits)
        assert b.temperature is not None
        filtered = b.top_k is not None or b.top_p is not None or b.min_p is not None
        keys = [self._next_key(b.rows[i].seed) for i in b.seeded]  # each seeded row's next draw
        if self.use_kernel:
            row_keys = [-1] * len(b.rows)
            for i, key in zip(b.seeded, keys):
                row_keys[i] = key
            row_keys.append(self._next_key(self.stream))  # the rows without a seed
            floor = None
            if filtered and len(b.rows) >= FILTER_KERNEL_MIN_ROWS:
                floor = self._floor(logits, b)
            elif filtered:
                logits = self._filtered(logits.float(), b)
            return race_sample(logits, b.temperature, to_device(row_keys, torch.long, logits.device), floor)
        if filtered:
            logits = self._filtered(logits.float(), b)
        return self._inverse_cdf(logits, b, keys)

    @staticmethod
    def _floor(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """The GPU's filters for a large batch: per row the least logit top-k, top-p and min-p
        keep (see :data:`FILTER_KERNEL_MIN_ROWS`)."""
        n, v = logits.shape
        if b.top_k is not None:
            kmax, k_idx, active = b.top_k
            kth = logits.topk(min(kmax, v), dim=-1).values.gather(1, k_idx.clamp(max=min(kmax, v) - 1))
            floor = torch.where(active, kth.float(), float("-inf"))[:, 0]
        else:
            floor = torch.full((n,), float("-inf"), device=logits.device)
        if b.top_p is None and b.min_p is None:
            return floor
        return filter_floor(logits, b.divisor(), floor, None if b.top_p is None else b.top_p[:, 0],
                            None if b.min_p is None else b.min_p[:, 0])

    def _inverse_cdf(self, logits: torch.Tensor, b: SamplingBatch, keys: list[int]) -> torch.Tensor:
        """The CPU's choice: per sampled row the first token whose cumulative probability exceeds
        a uniform draw (the shared generator's, or the row's seed stream's); per greedy row the
        argmax."""
        assert b.temperature is not None
        sampled = b.temperature > 0
        probs = (logits.float() / b.divisor()[:, None]).softmax(dim=-1)
        dev = logits.device
        u = torch.rand(len(b.rows), generator=self.generator, dtype=torch.float64, device=dev)
        for i, key in zip(b.seeded, keys):
            u[i] = torch.rand(1, generator=torch.Generator(dev).manual_seed(key), dtype=torch.float64, device=dev)
        tokens = inverse_cdf(probs, u)
        if bool(sampled.all()):
            return tokens
        return torch.where(sampled, tokens, argmax_rows(logits))

    @staticmethod
    def _filtered(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """``logits`` (float32) with -inf where a row's top-k, top-p or min-p drops a token (a
        greedy row's filters drop nothing: see :meth:`prepare`)."""
        scaled = logits / b.divisor()[:, None]
        drop: torch.Tensor | None = None
        if b.top_k is not None:
            kmax, k_idx, active = b.top_k
            top_vals = scaled.topk(min(kmax, scaled.shape[1]), dim=-1).values
            thresh = top_vals.gather(1, k_idx.clamp(max=top_vals.shape[1] - 1))
            drop = active & (scaled < thresh)
        if b.top_p is not None or b.min_p is not None:
            probs = (scaled if drop is None else scaled.masked_fill(drop, float("-inf"))).softmax(dim=-1)
            if b.top_p is not None:
                d = top_p_drop(probs, b.top_p, TOP_P_CANDIDATES if probs.device.type == "cpu" else None)
                drop = d if drop is None else drop | d
            if b.min_p is not None:
                d = probs < b.min_p * probs.amax(dim=-1, keepdim=True)
                drop = d if drop is None else drop | d
        assert drop is not None
        return logits.masked_fill(drop, float("-inf"))

    @staticmethod
    def _next_key(stream: SeedStream | None) -> int:
        assert stream is not None
        key = draw_key(stream.key, stream.draws)
        stream.draws += 1
        return key

    def _with_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        lp = torch.log_softmax(logits, dim=-1)
        k = max(r.params.logprobs or 0 for r in rows)
        chosen = lp.gather(1, tokens[:, None]).squeeze(1)
        top_v: list[list[float]] = []
        top_i: list[list[int]] = []
        if k > 0:
            values, indices = lp.topk(k, dim=-1)
            top_v, top_i = values.tolist(), indices.tolist()
        ids = tokens.tolist()
        chosen_l = chosen.tolist()
        out_lp: list[dict[int, float] | None] = []
        for i, r in enumerate(rows):
            if r.params.logprobs is None:
                out_lp.append(None)
                continue
            d = {ids[i]: chosen_l[i]}
            kk = r.params.logprobs or 0
            if kk:
                for t, v in zip(top_i[i][:kk], top_v[i][:kk]):
                    d.setdefault(t, v)
            out_lp.append(d)
        return SamplerOutput(ids, out_lp, chosen_l)
