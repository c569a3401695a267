"""The logits-processing stages (penalties, logit bias, allowed tokens, bans, bad words) against a
plain per-row PyTorch reference on random logits and histories, HF's
``RepetitionPenaltyLogitsProcessor`` as the oracle of ``repetition_penalty``, and the checks of
the new sampling fields."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedattn.engine.logits_processors import (
    RowHistory,
    TokenHistory,
    bad_word_bans,
    bad_words_token_ids,
    build_stages,
    check_token_fields,
)
from pagedattn.engine.sampler import Sampler, SamplingRow
from pagedattn.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


# ====================================================================== the reference
def reference(logits: torch.Tensor, params: list[SamplingParams], banned: list[list[int]],
              histories: list[RowHistory | None], bad_words: list[list[list[int]]]) -> torch.Tensor:
    """One row at a time, one token at a time, as the fields' definitions say."""
    out = logits.float().clone()
    for i, p in enumerate(params):
        row = out[i]
        h = histories[i]
        prompt = list(h.token_ids[:h.prompt_len]) if h is not None else []
        output = list(h.token_ids[h.prompt_len:]) if h is not None else []
        if p.allowed_token_ids is not None:
            keep = torch.zeros_like(row, dtype=torch.bool)
            for t in p.allowed_token_ids:
                keep[t] = True
            row[~keep] = float("-inf")
        for t in banned[i]:
            row[t] = float("-inf")
        for w in bad_words[i]:
            if len(w) == 1 or output[len(output) - len(w) + 1:] == w[:-1]:
                row[w[-1]] = float("-inf")
        for t, b in (p.logit_bias or {}).items():
            row[t] += b
        for t in set(prompt) | set(output):
            if p.repetition_penalty != 1.0:
                row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        for t in set(output):
            row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


def _apply(logits, params, banned, histories, bad_words):
    stages = build_stages(params, banned, histories, bad_words, CPU)
    return logits.float() if stages is None else stages.apply(logits)


def _random_params(rng: random.Random, vocab: int) -> SamplingParams:
    kw: dict = {}
    if rng.random() < 0.5:
        kw["repetition_penalty"] = rng.choice([1.0, rng.uniform(0.5, 2.0)])
    if rng.random() < 0.5:
        kw["presence_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.5:
        kw["frequency_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.3:
        kw["logit_bias"] = {rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(rng.randint(1, 4))}
    if rng.random() < 0.2:
        kw["allowed_token_ids"] = rng.sample(range(vocab), rng.randint(1, min(8, vocab)))
    return SamplingParams(**kw)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 7), vocab=st.sampled_from([5, 17, 64, 300]))
def test_stages_match_the_per_row_reference(seed: int, rows: int, vocab: int) -> None:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    params = [_random_params(rng, vocab) for _ in range(rows)]
    histories: list[RowHistory | None] = []
    banned: list[list[int]] = []
    bad_words: list[list[list[int]]] = []
    for _ in range(rows):
        plen, olen = rng.randint(1, 12), rng.randint(0, 12)
        ids = [rng.randrange(vocab) for _ in range(plen + olen)]  # small vocabularies: many repeats
        histories.append(RowHistory(ids, plen, TokenHistory()) if rng.random() < 0.9 else None)
        banned.append(rng.sample(range(vocab), rng.randint(0, 2)) if rng.random() < 0.3 else [])
        words = []
        if rng.random() < 0.3 and histories[-1] is not None:
            out = ids[plen:]
            words.append([rng.randrange(vocab)])
            if out:  # a word whose prefix is the output's tail, and one whose is not
                k = rng.randint(1, len(out))
                words.append([*out[-k:], rng.randrange(vocab)])
            words.append([rng.randrange(vocab) for _ in range(3)])
        bad_words.append(words)
    params = [p if histories[i] is not None else SamplingParams(logit_bias=p.logit_bias)
              for i, p in enumerate(params)]
    bad_words = [w if histories[i] is not None else [] for i, w in enumerate(bad_words)]
    before = logits.clone()
    got = _apply(logits, params, banned, histories, bad_words)
    want = reference(logits, params, banned, histories, bad_words)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, before), "the raw logits must stay as they were (they give the logprobs)"


@pytest.mark.parametrize("penalty", [0.6, 1.3, 2.5])
def test_repetition_penalty_is_hf_s(penalty: float) -> None:
    vocab = 500
    g = torch.Generator().manual_seed(int(penalty * 10))
    logits = torch.randn(3, vocab, generator=g) * 4
    ids = torch.randint(0, vocab, (3, 40), generator=g)
    prompt_lens = [10, 25, 39]
    hf = transformers.RepetitionPenaltyLogitsProcessor(penalty)
    want = torch.cat([hf(ids[i:i + 1], logits[i:i + 1].clone()) for i in range(3)])
    hist = [RowHistory(ids[i].tolist(), prompt_lens[i]) for i in range(3)]
    params = [SamplingParams(repetition_penalty=penalty)] * 3
    got = _apply(logits, params, [[]] * 3, hist, [[]] * 3)
    torch.testing.assert_close(got, want)


def test_nothing_asked_means_no_stages() -> None:
    params = [SamplingParams(temperature=t) for t in (0.0, 0.7)]
    assert build_stages(params, [[], []], [None, None], [[], []], CPU) is None
    b = Sampler(CPU).prepare([SamplingRow(p, None) for p in params])
    assert b.stages is None


def test_only_the_rows_that_ask_are_penalised_and_in_half_precision_too() -> None:
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(4, 64, generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(0, 64, (4, 20), generator=g).tolist()
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.5), SamplingParams(), SamplingParams(
        repetition_penalty=1.7)]
    hist = [RowHistory(ids[i], 5) if p.has_penalties else None for i, p in enumerate(params)]
    got = _apply(logits, params, [[]] * 4, hist, [[]] * 4)
    assert got.dtype == torch.float32
    assert torch.equal(got[0], logits[0].float()) and torch.equal(got[2], logits[2].float())
    torch.testing.assert_close(got, reference(logits, params, [[]] * 4, hist, [[]] * 4))


def test_token_history_copies_only_the_new_tokens() -> None:
    h = TokenHistory()
    ids = [3, 1, 4]
    assert h.view(ids).tolist() == ids
    buf = h.buf
    ids += [1, 5]
    assert h.view(ids).tolist() == [3, 1, 4, 1, 5] and h.buf is buf  # appended in place
    ids += list(range(200))
    assert h.view(ids).tolist() == ids  # grown
    assert h.view([9, 9]).tolist() == [9, 9]  # not a continuation: rebuilt
    assert isinstance(h.view([]), np.ndarray)


def test_greedy_sampler_follows_the_stages() -> None:
    """A bias of 100 forces its token, the allowed set is kept, a penalty moves the argmax."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    top = int(logits[2].argmax())
    rows = [SamplingRow(SamplingParams(temperature=0, logit_bias={17: 100.0}), None),
            SamplingRow(SamplingParams(temperature=0, allowed_token_ids=[3, 9]), None),
            SamplingRow(SamplingParams(temperature=0, presence_penalty=2.0, repetition_penalty=100.0),
                        None, history=RowHistory([top, top], 1))]
    out = Sampler(CPU)(logits, rows).token_ids
    assert out[0] == 17
    assert out[1] == (3 if logits[1, 3] > logits[1, 9] else 9)
    assert out[2] != top


# ====================================================================== bad words
def test_bad_word_bans() -> None:
    words = [[5], [1, 2, 3], [7, 8]]
    assert bad_word_bans(words, []) == [5]
    assert bad_word_bans(words, [9, 1, 2]) == [5, 3]
    assert bad_word_bans(words, [1, 2, 7]) == [5, 8]
    assert bad_word_bans(words, [2, 1]) == [5]


def test_bad_words_token_ids_take_both_spellings() -> None:
    vocab = {"hello": [10], " hello": [11], "big cat": [20, 21], " big cat": [22, 21], "x y": [30, 31],
             " x y": [32, 33, 34]}
    out = bad_words_token_ids(["hello", "  big cat", "x y"], lambda s: vocab[s], 100)
    assert out == [[10], [11], [20, 21], [22, 21], [30, 31]]  # " x y" is longer: not another spelling
    with pytest.raises(ValueError, match=r"SamplingParams\.bad_words: token ids \[100\]"):
        bad_words_token_ids(["hello"], lambda s: [100], 100)


# ====================================================================== checks
@pytest.mark.parametrize(("kw", "field"), [
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": True}, "frequency_penalty"),
    ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"logit_bias": [(5, 1)]}, "logit_bias"),
    ({"logit_bias": {5: float("inf")}}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
    ({"allowed_token_ids": "12"}, "allowed_token_ids"),
    ({"bad_words": "word"}, "bad_words"),
    ({"bad_words": ["ok", " "]}, "bad_words"),
    ({"bad_words": [3]}, "bad_words"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
])
def test_bad_values_name_their_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field}:"):
        SamplingParams(**kw)


def test_checks_against_the_vocabulary() -> None:
    ok = SamplingParams(logit_bias={99: -100, 0: 100}, allowed_token_ids=[0, 99], prompt_logprobs=100)
    assert check_token_fields(ok, 100, None) == []
    for kw, field in (({"logit_bias": {100: 1}}, "logit_bias"), ({"allowed_token_ids": [5, 100]}, "allowed_token_ids"),
                      ({"prompt_logprobs": 101}, "prompt_logprobs")):
        with pytest.raises(ValueError, match=rf"^SamplingParams\.{field}:"):
            check_token_fields(SamplingParams(**kw), 100, None)
    with pytest.raises(ValueError, match=r"^SamplingParams\.bad_words: this model has no tokenizer"):
        check_token_fields(SamplingParams(bad_words=["a"]), 100, None)


def test_plain_greedy_only_without_logits_processing() -> None:
    assert SamplingParams(temperature=0).plain_greedy
    for kw in ({"repetition_penalty": 1.1}, {"presence_penalty": 0.1}, {"frequency_penalty": -0.1},
               {"logit_bias": {1: 1.0}}, {"allowed_token_ids": [1]}, {"bad_words": ["a"]}):
        assert not SamplingParams(temperature=0, **kw).plain_greedy, kw
    assert SamplingParams(temperature=0, logit_bias={}).plain_greedy  # an empty bias is no bias
