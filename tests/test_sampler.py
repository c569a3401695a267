"""The CPU's choices: the blocked argmax picks exactly what ``torch.argmax`` picks, the
inverse-CDF draw exactly what a scan one token at a time picks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedattn.engine.sampler import Sampler, SamplingRow, argmax_rows, inverse_cdf, top_p_drop
from pagedattn.engine.sampling_params import SamplingParams
from pagedattn.engine.sequence import SeedStream


def _logits(seed: int, n: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rounded to a coarse grid so rows hold many exactly equal maxima (ties across blocks).
    return (torch.randn(n, vocab, generator=g) * 2).round()


@pytest.mark.parametrize("vocab", [49152, 384, 64 * 7, 1000, 997])
def test_argmax_rows_is_torch_argmax(vocab: int) -> None:
    for seed in range(20):
        logits = _logits(seed * 1000 + vocab, 6, vocab)
        assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


def test_argmax_rows_nan_inf_and_ties_follow_torch() -> None:
    logits = _logits(1, 5, 1024)
    logits[0, 700] = logits[0, 900] = float("inf")  # equal infinities: the first one
    logits[1, 300] = float("nan")  # NaN counts as the maximum
    logits[1, 800] = float("nan")
    logits[2] = float("-inf")  # nothing but -inf: index 0
    logits[3, 5] = logits[3, 1000] = logits[3].max() + 1  # a tie in different blocks
    expected = logits.argmax(dim=-1)
    assert expected.tolist()[:4] == [700, 300, 0, 5]
    assert torch.equal(argmax_rows(logits), expected)


def test_argmax_rows_non_contiguous_falls_back() -> None:
    logits = _logits(2, 4, 2048)[:, :1536]
    assert not logits.is_contiguous()
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


def test_greedy_sampler_picks_the_argmax() -> None:
    logits = torch.randn(8, 4096, generator=torch.Generator().manual_seed(3))
    rows = [SamplingRow(SamplingParams(temperature=0.0), None) for _ in range(8)]
    out = Sampler(torch.device("cpu"), seed=0)(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    # A greedy row in a mixed batch takes the same path.
    mixed = [*rows[:4], SamplingRow(SamplingParams(temperature=0.8, seed=1), SeedStream(1))]
    tokens = Sampler(torch.device("cpu"), seed=0)(logits[:5], mixed).token_ids
    assert tokens[:4] == logits[:4].argmax(dim=-1).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_sampler_on_half_precision_logits_picks_the_fp32_argmax(dtype: torch.dtype) -> None:
    """An all-greedy batch samples the model-dtype logits without widening them: the indices are
    those of the fp32 copy (widening is exact and keeps the order, ties and NaN included)."""
    logits = _logits(4, 6, 4096).to(dtype)
    logits[0, 10] = logits[0, 3000] = logits[0].max() + 1
    logits[1, 77] = float("nan")
    rows = [SamplingRow(SamplingParams(temperature=0.0), None) for _ in range(6)]
    out = Sampler(torch.device("cpu"), seed=0)(logits, rows)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.token_ids[:2] == [10, 77]


def test_warm_up_samples_every_path_and_keeps_the_shared_generator() -> None:
    warmed, fresh = Sampler(torch.device("cpu"), seed=5), Sampler(torch.device("cpu"), seed=5)
    warmed.warm_up(50)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    rows = [SamplingRow(SamplingParams(temperature=1.0), None) for _ in range(4)]
    # The warm-up drew from its own generators: sampling after it is what it was without it.
    assert warmed(logits, rows).token_ids == fresh(logits, rows).token_ids


def test_a_batch_that_banned_tokens_is_not_reused_once_the_ban_is_over() -> None:
    """A step left in flight may reuse the previous step's sampling tensors when its rows are the
    same -- but not when those tensors banned EOS until min_tokens: the next token may be EOS."""
    from pagedattn.engine.sequence import Request
    from pagedattn.engine.step_sampler import StepSampler

    eos = 2
    step_sampler = StepSampler(Sampler(torch.device("cpu")), {eos})
    req = Request("r", None, [5, 6, 7], SamplingParams(temperature=0.0, min_tokens=1, max_tokens=4))
    seq = req.seqs[0]
    targets = [(seq, req)]
    first = step_sampler.batch(targets, None, None)  # output token 0: EOS banned
    logits = torch.full((1, 16), -1.0)
    logits[0, eos] = 5.0
    assert step_sampler.sampler.sample(logits, first).tolist() != [eos]
    seq.token_ids.append(9)  # min_tokens reached
    second = step_sampler.batch(targets, targets, first)
    assert second is not first
    assert step_sampler.sampler.sample(logits, second).tolist() == [eos]
    third = step_sampler.batch(targets, targets, second)  # nothing banned on either: reused
    assert third is second


def _inverse_cdf_reference(probs: torch.Tensor, u: torch.Tensor) -> list[int]:
    """Per row the first token whose float64 running sum exceeds ``u`` times the row's total,
    one token at a time; a token of probability 0 is never it."""
    out = []
    for row, ui in zip(probs.double().tolist(), u.tolist()):
        total = sum(row)
        target, acc, pick = ui * total, 0.0, None
        for j, p in enumerate(row):
            acc += p
            if p > 0:
                pick = j  # the last token of positive mass so far
                if acc > target:
                    break
        out.append(pick)
    return out


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 700), zero_share=st.floats(0, 0.95),
       seed=st.integers(0, 2**31 - 1))
def test_inverse_cdf_matches_the_one_token_at_a_time_scan(rows: int, vocab: int, zero_share: float, seed: int) -> None:
    """Any vocabulary (a partial last block), tokens of probability 0 anywhere (a block's ends,
    whole blocks), uniforms at 0, just below 1 and at 1 (what a rounding of ``u`` times the total
    may reach): the chosen token is the reference scan's and never one of probability 0."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[torch.rand(rows, vocab, generator=g) < zero_share] = float("-inf")
    logits[:, int(torch.randint(0, vocab, (1,), generator=g))] = 0.0  # every row has a token to sample
    probs = logits.softmax(dim=-1)
    for u in (torch.rand(rows, generator=g, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64),
              torch.full((rows,), 1 - 2**-53, dtype=torch.float64), torch.ones(rows, dtype=torch.float64)):
        tokens = inverse_cdf(probs, u).tolist()
        assert all(probs[i, t] > 0 for i, t in enumerate(tokens))
        if 0 < u[0] < 1 - 2**-53:  # at the ends a rounding may pick a neighbour of equal standing
            assert tokens == _inverse_cdf_reference(probs, u)


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.integers(1, 300), candidates=st.integers(1, 40),
       peak=st.floats(0.1, 8.0), seed=st.integers(0, 2**31 - 1))
def test_top_p_from_candidates_is_top_p_from_the_full_sort(rows: int, vocab: int, candidates: int, peak: float,
                                                           seed: int) -> None:
    """Rows decided from their most probable tokens, rows sent on to the full sort, rows of
    top_p inf (the sampler's rows of top_p >= 1): the same tokens dropped as by the full sort,
    which keeps the smallest most-probable set whose mass before its last token is at most top_p
    (checked one row at a time here)."""
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * peak).softmax(dim=-1).float()
    top_p = torch.rand(rows, 1, generator=g) * 1.2
    top_p[top_p >= 1] = float("inf")
    full = top_p_drop(probs, top_p)
    assert torch.equal(top_p_drop(probs, top_p, candidates), full)
    for row, p, drop in zip(probs.tolist(), top_p[:, 0].tolist(), full.tolist()):
        before, expected = 0.0, [False] * vocab
        for j in sorted(range(vocab), key=lambda j: -row[j]):
            expected[j] = before > p
            before = before + row[j]
        # The sampler sums in float32, this loop in float64: a token right at the boundary may differ.
        assert sum(a != b for a, b in zip(drop, expected)) <= 1
