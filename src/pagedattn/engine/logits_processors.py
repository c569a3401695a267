"""What requests ask to change in their next-token distributions, as batched stages over a step's
logits, applied before temperature and the top-k / top-p / min-p filters.

The stages, in vLLM's order:

1. **allowed tokens** (``allowed_token_ids``): every other token of the row is set to -inf;
2. **banned tokens**: EOS and stop ids before ``min_tokens``, and ``bad_words`` (-inf);
3. **logit bias** (``logit_bias``): added;
4. **penalties**: HF's ``repetition_penalty`` over prompt and output, OpenAI's
   ``presence_penalty`` and ``frequency_penalty`` over the output.

Each stage's tensors are built once per batch (:func:`build_stages`), only for the rows that
ask for it, and uploaded without waiting for the device; a batch in which no row asks for
anything has no stages and costs nothing.  Stages work on an fp32 copy of the logits: the raw
logits stay as they were, for the log-probabilities (vLLM's default, ``raw_logprobs``).

Penalties count tokens on the device: each step the rows' token ids go up once as a padded
``[rows, length]`` array (padding -1), and a ``scatter_add`` turns them into ``[rows, vocab]``
counts.  The host side of that is a copy of the tokens appended since the last step
(:class:`TokenHistory`), not a conversion of every sequence's list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..transfer import to_device, upload
from .sampling_params import SamplingParams


class TokenHistory:
    """A sequence's token ids (prompt + output) mirrored in a growing int64 array; each call
    copies only the ids appended since the previous one (token lists only grow)."""

    __slots__ = ("buf", "n")

    def __init__(self) -> None:
        self.buf = np.empty(0, dtype=np.int64)
        self.n = 0

    def view(self, token_ids: Sequence[int]) -> np.ndarray:
        n = len(token_ids)
        if n < self.n:  # not a continuation of what was mirrored: start again
            self.n = 0
        if n > self.buf.shape[0]:
            grown = np.empty(max(n, 2 * self.buf.shape[0], 64), dtype=np.int64)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        if n > self.n:
            self.buf[self.n:n] = token_ids[self.n:n]
            self.n = n
        return self.buf[:n]


@dataclass
class RowHistory:
    """What a row's stages need of its sequence: its token ids and where the output starts."""

    token_ids: Sequence[int]
    prompt_len: int
    cache: TokenHistory | None = None  # kept by the sequence across steps

    def array(self) -> np.ndarray:
        cache = self.cache if self.cache is not None else TokenHistory()
        return cache.view(self.token_ids)

    @property
    def output(self) -> Sequence[int]:
        return self.token_ids[self.prompt_len:]


@dataclass
class Penalties:
    """The penalised rows' token ids and parameters on the device."""

    rows: torch.Tensor | None  # [r] rows of the batch (None: every row)
    output_ids: torch.Tensor  # [r, Lo] output token ids, padded with -1
    prompt_ids: torch.Tensor | None  # [r, Lp] prompt token ids, padded with -1 (repetition penalty only)
    repetition: torch.Tensor | None  # [r, 1]
    presence: torch.Tensor | None  # [r, 1]
    frequency: torch.Tensor | None  # [r, 1]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        sub = logits if self.rows is None else logits.index_select(0, self.rows)
        counts = _token_counts(self.output_ids, sub.shape[1], sub.dtype)
        if self.repetition is not None:
            seen = counts > 0
            if self.prompt_ids is not None:
                seen |= _token_counts(self.prompt_ids, sub.shape[1], sub.dtype) > 0
            penalised = torch.where(sub > 0, sub / self.repetition, sub * self.repetition)
            sub = torch.where(seen, penalised, sub)
        if self.frequency is not None:
            sub = sub - self.frequency * counts
        if self.presence is not None:
            sub = sub - self.presence * (counts > 0).to(sub.dtype)
        return sub if self.rows is None else logits.index_copy_(0, self.rows, sub)


def _token_counts(ids: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """``[r, L]`` token ids padded with -1 -> how often each token occurs per row, ``[r, vocab]``."""
    valid = ids >= 0
    counts = torch.zeros(ids.shape[0], vocab, dtype=dtype, device=ids.device)
    return counts.scatter_add_(1, ids.clamp(min=0), valid.to(dtype))


@dataclass
class LogitsStages:
    """A batch's logits-processing stages; each is None when no row of the batch asks for it."""

    allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, pair rows, pair ids)
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) set to -inf
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, token ids, values)
    penalties: Penalties | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [n, V]`` -> a processed fp32 copy (``logits`` itself is left as it was)."""
        out = logits.float()
        out = out.clone() if out is logits else out
        if self.allowed is not None:
            rows, pair_rows, pair_ids = self.allowed
            keep = torch.ones_like(out, dtype=torch.bool)
            keep[rows] = False
            keep[pair_rows, pair_ids] = True
            out.masked_fill_(~keep, float("-inf"))
        if self.banned is not None:
            out.index_put_(self.banned, torch.tensor(float("-inf"), device=out.device))
        if self.bias is not None:
            rows, ids, values = self.bias
            out.index_put_((rows, ids), values, accumulate=True)
        if self.penalties is not None:
            out = self.penalties.apply(out)
        return out


def build_stages(params: Sequence[SamplingParams], banned: Sequence[Sequence[int]],
                 histories: Sequence[RowHistory | None], bad_words: Sequence[Sequence[Sequence[int]]],
                 device: torch.device) -> LogitsStages | None:
    """The stages of a batch whose rows have ``params`` (and, per row: token ids banned for now,
    its sequence's history, its bad words' token ids); None when no row needs any."""
    n = len(params)
    if not any(banned) and not any(bad_words) and not any(p.processes_logits for p in params):
        return None
    st = LogitsStages()
    allowed = [i for i in range(n) if params[i].allowed_token_ids is not None]
    if allowed:
        pairs = [(i, t) for i in allowed for t in params[i].allowed_token_ids or ()]
        st.allowed = (to_device(allowed, torch.long, device), *_pair_tensors(pairs, device))
    ban = [(i, t) for i in range(n) for t in banned[i]]
    for i in range(n):
        if bad_words[i]:
            h = histories[i]
            ban.extend((i, t) for t in bad_word_bans(bad_words[i], h.output if h is not None else ()))
    if ban:
        st.banned = _pair_tensors(ban, device)
    bias = [(i, t, v) for i in range(n) for t, v in (params[i].logit_bias or {}).items()]
    if bias:
        rows_t, ids_t = _pair_tensors([(i, t) for i, t, _ in bias], device)
        st.bias = (rows_t, ids_t, to_device([v for _, _, v in bias], torch.float32, device))
    st.penalties = _penalties(params, histories, device)
    return st


def _pair_tensors(pairs: Sequence[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, ids = zip(*pairs)
    return to_device(list(rows), torch.long, device), to_device(list(ids), torch.long, device)


def _penalties(params: Sequence[SamplingParams], histories: Sequence[RowHistory | None],
               device: torch.device) -> Penalties | None:
    idx = [i for i, p in enumerate(params) if p.has_penalties]
    if not idx:
        return None
    hist = [histories[i] for i in idx]
    if any(h is None for h in hist):
        raise ValueError("a row with penalties needs its sequence's token ids")
    arrays = [h.array() for h in hist if h is not None]
    starts = [h.prompt_len for h in hist if h is not None]
    ps = [params[i] for i in idx]
    rep = any(p.repetition_penalty != 1.0 for p in ps)
    return Penalties(
        rows=None if len(idx) == len(params) else to_device(idx, torch.long, device),
        output_ids=_padded([a[s:] for a, s in zip(arrays, starts)], device),
        prompt_ids=_padded([a[:s] if p.repetition_penalty != 1.0 else a[:0] for a, s, p in zip(arrays, starts, ps)],
                           device) if rep else None,
        repetition=_column([p.repetition_penalty for p in ps], device) if rep else None,
        presence=_column([p.presence_penalty for p in ps], device) if any(p.presence_penalty for p in ps) else None,
        frequency=_column([p.frequency_penalty for p in ps], device)
        if any(p.frequency_penalty for p in ps) else None,
    )


def _padded(arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Rows of token ids -> one ``[rows, longest]`` int64 tensor padded with -1, on the device."""
    width = max(1, max(a.shape[0] for a in arrays))
    out = np.full((len(arrays), width), -1, dtype=np.int64)
    for i, a in enumerate(arrays):
        out[i, :a.shape[0]] = a
    return upload(torch.from_numpy(out), device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device)[:, None]


# ---------------------------------------------------------------------- bad words
def bad_word_bans(words: Sequence[Sequence[int]], output: Sequence[int]) -> list[int]:
    """The tokens the bad words forbid next: a one-token word always, the last token of a longer
    word when the output ends with the word's other tokens (vLLM's rule)."""
    out: list[int] = []
    n = len(output)
    for w in words:
        k = len(w) - 1
        if k == 0 or (k <= n and all(output[n - k + j] == w[j] for j in range(k))):
            out.append(w[-1])
    return out


def bad_words_token_ids(words: Sequence[str], encode: Callable[[str], list[int]], vocab_size: int) -> list[list[int]]:
    """Each bad word as token ids, vLLM's way: the word as written (leading spaces stripped) and,
    where it is a different token run of the same length, the word after a space (the form it
    takes inside a text).  A word the tokenizer maps outside the vocabulary is a ValueError."""
    out: list[list[int]] = []
    for word in words:
        plain = encode(word.lstrip())
        spaced = encode(" " + word.lstrip())
        if not plain:
            raise ValueError(f"SamplingParams.bad_words: {word!r} has no tokens")
        out.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    bad = sorted({t for ids in out for t in ids if not 0 <= t < vocab_size})
    if bad:
        raise ValueError(f"SamplingParams.bad_words: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    return out


# ---------------------------------------------------------------------- checks against the model
def check_token_fields(params: SamplingParams, vocab_size: int, encode: Callable[[str], list[int]] | None
                       ) -> list[list[int]]:
    """The checks of the token-id fields that need the model (ValueError naming the field);
    returns ``bad_words`` as token ids (``encode``: the tokenizer's, without special tokens)."""
    for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ())):
        bad = sorted({t for t in ids if t >= vocab_size})
        if bad:
            raise ValueError(f"SamplingParams.{name}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if params.prompt_logprobs is not None and params.prompt_logprobs > vocab_size:
        raise ValueError(f"SamplingParams.prompt_logprobs: {params.prompt_logprobs} is more than the vocabulary's "
                         f"{vocab_size} tokens")
    if not params.bad_words:
        return []
    if encode is None:
        raise ValueError("SamplingParams.bad_words: this model has no tokenizer to find the words' tokens")
    return bad_words_token_ids(params.bad_words, encode, vocab_size)
