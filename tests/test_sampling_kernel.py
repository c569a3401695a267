"""The sampling kernel (``argmax(x / T - log q)``, Exp(1) noise ``q`` of each row's key) and the
sampler's filters on both of its paths.

Without CUDA the kernel runs under the Triton interpreter (a small vocabulary); with CUDA at a
real vocabulary size.  Every distribution check is a chi-square test on fixed logits and keys
(generators of constant seeds): the same draws every run (no flakes), at a level (0.1%) a
correct sampler passes and a wrong one, with hundreds of draws, does not.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from .triton_interpreter import CUDA, DEVICE, randn, rerun_in_fresh_process, seeded_generator, skip_unless_runnable

pytest.importorskip("triton")

from pagedattn.engine.sampler import Sampler, SamplingRow
from pagedattn.engine.sampling_params import SamplingParams
from pagedattn.engine.sequence import SeedStream
from pagedattn.kernels import sampling

V = 151936 if CUDA else 3000  # not a multiple of the kernel's block: a partial last one
# Rows a distribution check draws through the kernel: the interpreter takes ~13 ms a row.
KERNEL_DRAWS = 20000 if CUDA else 300


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_kernels_in_fresh_interpreter_process")


def test_kernels_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


def _race(logits: torch.Tensor, temps: list[float], keys: list[int], splits: int | None = None) -> list[int]:
    return sampling.race_sample(logits.to(DEVICE), torch.tensor(temps, dtype=torch.float32, device=DEVICE),
                                torch.tensor(keys, dtype=torch.int64, device=DEVICE), splits=splits).tolist()


def _fixed(seed: int) -> torch.Generator:
    """A generator of a constant seed: a distribution check's draws are the same in every run."""
    return torch.Generator().manual_seed(seed)


def _keys(g: torch.Generator, n: int) -> list[int]:
    return [int(k) for k in torch.randint(0, 2**62, (n,), generator=g)]


def _chi_square_ok(tokens: list[int], probs: list[float]) -> tuple[bool, float]:
    """Counts of ``tokens`` against ``probs`` (0 where a token must never come): True when no
    impossible token came and the statistic is under the 0.1% critical value."""
    n = len(tokens)
    counts = [0] * len(probs)
    for t in tokens:
        counts[t] += 1
    if any(c and p == 0 for c, p in zip(counts, probs)):
        return False, math.inf
    df = sum(p > 0 for p in probs) - 1
    if df == 0:  # one possible token, and only it came
        return True, 0.0
    stat = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)
    # Wilson-Hilferty: the chi-square quantile from the normal one (z = 3.09 for 0.1%).
    crit = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    return stat < crit, stat


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_rows_take_the_first_maximum(dtype: torch.dtype) -> None:
    g = seeded_generator("greedy", dtype)
    logits = (torch.randn(4, V, generator=g) * 2).round().to(dtype)  # many equal maxima
    logits[0, 10] = logits[0, V - 5] = 100.0  # a tie across blocks and slices: the first
    logits[1, V - 1] = 100.0  # the last column, in the partial block
    expected = logits.float().argmax(dim=-1).tolist()
    assert expected[:2] == [10, V - 1]
    keys = [-1, 5, -1, 7, 11]  # greedy rows ignore their noise, seeded or not
    for splits in (1, 3):
        assert _race(logits, [0.0] * 4, keys, splits) == expected


# Rows argmax must order as torch does: NaN counts as the maximum (its first), equal infinities
# (the first), nothing but -inf (index 0), the maximum in the last column, few distinct values
# (ties everywhere), or plain coarse values (equal maxima).
EDGES = ["nan", "inf", "-inf row", "last", "spread", "plain"]


def _argmax_logits(g: torch.Generator, v: int, edges: list[str], dtype: torch.dtype) -> torch.Tensor:
    """``[len(edges), v]`` logits rounded to a coarse grid (many equal maxima), row ``r`` with
    the edge ``edges[r]``, on DEVICE."""
    logits = (torch.randn(len(edges), v, generator=g) * 2).round()
    for row, edge in enumerate(edges):
        cols = torch.randint(0, v, (2,), generator=g)
        if edge == "nan":
            logits[row, cols] = float("nan")
        elif edge == "inf":
            logits[row, cols] = float("inf")
        elif edge == "-inf row":
            logits[row] = float("-inf")
        elif edge == "last":
            logits[row, v - 1] = logits[row].max() + 1
        elif edge == "spread":
            logits[row] = torch.randint(0, 2, (v,), generator=g).float()
    return logits.to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_argmax_is_torch_argmax(dtype: torch.dtype) -> None:
    """One launch, any split of the columns (one slice; several; more than the row's blocks),
    at the test's real vocabulary too: the same indices as torch's argmax, and the row counters
    left at zero."""
    from pagedattn.kernels.w4a16 import device_counters

    g = seeded_generator("argmax", dtype)
    for n, v in [(1, V), (len(EDGES), V), (5, 1000), (2, sampling.ARGMAX_BLOCK), (1, 1)]:
        logits = _argmax_logits(g, v, [EDGES[(n + i) % len(EDGES)] for i in range(n)], dtype)
        expected = logits.argmax(dim=-1)
        for splits in (None, 1, 3, 200):
            got = sampling.argmax(logits, splits=splits)
            assert got.dtype == torch.int64 and torch.equal(got, expected), (n, v, splits)
        assert not device_counters(logits.device)[:n].any()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(v=st.integers(1, 5000), splits=st.sampled_from([None, 1, 2, 3, 7, 64, 1000]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       edges=st.lists(st.sampled_from(EDGES), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_argmax_on_drawn_rows_and_splits(v: int, splits: int | None, dtype: torch.dtype, edges: list[str],
                                         seed: int) -> None:
    """Drawn vocabularies (one column up, off the block), column slices (more than the row's
    blocks, more than the kernel takes) and one to four rows of drawn edges."""
    logits = _argmax_logits(torch.Generator().manual_seed(seed), v, edges, dtype)
    assert torch.equal(sampling.argmax(logits, splits=splits), logits.argmax(dim=-1))


def test_argmax_of_no_rows_and_strided_rows() -> None:
    g = seeded_generator("argmax-strided")
    wide = randn(g, 3, 2 * V, dtype=torch.float32)
    rows = wide[:, ::2]  # columns not contiguous: copied first
    assert torch.equal(sampling.argmax(rows), rows.argmax(dim=-1))
    assert sampling.argmax(wide[:0]).shape == (0,)


def test_samples_follow_the_softmax_at_the_row_temperature() -> None:
    """Rows of one logit vector, half without a seed (the step's key and their row number) and
    half with keys of their own: the tokens' frequencies are softmax(x / T)."""
    g = _fixed(1)
    vocab = 12
    x = torch.randn(vocab, generator=g) * 1.5
    for temp in (0.6, 1.7):
        n = KERNEL_DRAWS
        keys = _keys(g, n + 1)
        keys[: n // 2] = [-1] * (n // 2)
        tokens = _race(x.expand(n, vocab).contiguous(), [temp] * n, keys)
        ok, stat = _chi_square_ok(tokens, (x / temp).softmax(0).tolist())
        assert ok, (temp, stat)


def test_a_rows_noise_depends_on_its_key_and_column_alone() -> None:
    """The same seeded key draws the same token in another batch, at another row, with the
    columns split otherwise; a row without a seed draws by its row number and the step's key."""
    g = seeded_generator("independence")
    logits = torch.randn(5, V, generator=g)
    key, step_key = _keys(g, 2)
    hot = [3.0] * 5  # noise-dominated: other keys give other tokens
    alone = _race(logits[2:3], hot[:1], [key, step_key], splits=1)[0]
    batch = _race(logits, hot, [-1, -1, key, -1, 12345, step_key], splits=4)
    assert batch[2] == alone
    again = _race(logits, hot, [-1, -1, key, -1, 12345, step_key], splits=2)
    assert again == batch  # the split count never changes a draw
    # Rows without a seed at different row numbers: different draws from the one step key.
    same = logits[:1].expand(5, V).contiguous()
    unseeded = _race(same, hot, [-1] * 5 + [step_key])
    assert len(set(unseeded)) > 1
    other_step = _race(same, hot, [-1] * 5 + [step_key + 1])
    assert other_step != unseeded


def test_dropped_tokens_are_never_chosen() -> None:
    g = seeded_generator("dropped")
    logits = torch.randn(6, V, generator=g)
    allowed = [3, V // 2, V - 1]
    logits[:, [c for c in range(V) if c not in allowed]] = float("-inf")
    tokens = _race(logits, [5.0, 1.0, 0.3, 0.0, 2.0, 9.0], _keys(g, 7))
    assert all(t in allowed for t in tokens), tokens


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_a_row_of_nan_samples_some_token_in_range_and_leaves_the_others_alone() -> None:
    """A numerically broken row (NaN logits) through the filter and sampling kernels: a token in
    range for it; the rows beside it sample as they would alone."""
    g = seeded_generator("nan")
    logits = torch.randn(3, V, generator=g)
    logits[1] = float("nan")
    sampler = Sampler(DEVICE, seed=0)
    sampler.use_kernel = True
    rows = [SamplingRow(SamplingParams(temperature=t, top_p=0.9), None) for t in (0.0, 0.7, 1.0)]
    b = sampler.prepare(rows)
    floor = sampler._floor(logits.to(DEVICE), b)
    keys = _keys(g, 4)
    tokens = sampling.race_sample(logits.to(DEVICE), b.temperature, torch.tensor(keys, device=DEVICE), floor).tolist()
    assert all(0 <= t < V for t in tokens)
    assert tokens[0] == int(logits[0].argmax())
    alone = sampling.race_sample(logits[2:].to(DEVICE), b.temperature[2:],
                                 torch.tensor([keys[2], keys[3]], device=DEVICE), floor[2:]).tolist()
    assert tokens[2] == alone[0]


@pytest.mark.parametrize("use_kernel", [False, True])
def test_sampler_filters_sample_the_renormalised_distribution(use_kernel: bool) -> None:
    """Top-k, top-p and min-p rows (with temperature, greedy rows beside them) against the
    distribution each filter leaves, computed here in plain Python; both the torch path (the
    CPU's) and the kernel's."""
    g = _fixed(2)
    vocab = 10
    x = (torch.randn(vocab, generator=g) * 1.2).tolist()
    temp = 0.9
    p = torch.tensor(x).div(temp).softmax(0).tolist()
    order = sorted(range(vocab), key=lambda i: -p[i])

    def renorm(keep: set[int]) -> list[float]:
        total = sum(p[i] for i in keep)
        return [p[i] / total if i in keep else 0.0 for i in range(vocab)]

    def top_p_keep(top_p: float) -> set[int]:
        keep, cum = set(), 0.0
        for i in order:
            if cum > top_p:
                break
            keep.add(i)
            cum += p[i]
        return keep

    cases = {
        "top_k": (SamplingParams(temperature=temp, top_k=4), renorm(set(order[:4]))),
        "top_p": (SamplingParams(temperature=temp, top_p=0.6), renorm(top_p_keep(0.6))),
        "min_p": (SamplingParams(temperature=temp, min_p=0.1),
                  renorm({i for i in range(vocab) if p[i] >= 0.1 * max(p)})),
    }
    sampler = Sampler(DEVICE, seed=3)
    sampler.use_kernel = use_kernel
    n = KERNEL_DRAWS if use_kernel else 20000
    logits = torch.tensor(x, device=DEVICE).expand(n, vocab).contiguous()
    for name, (params, expected) in cases.items():
        rows = [SamplingRow(params, SeedStream(i) if i % 2 else None) for i in range(n)]
        # Greedy beside them, with filters of its own: the argmax.
        rows[0] = SamplingRow(SamplingParams(temperature=0.0, top_k=3, top_p=0.2, min_p=0.5), None)
        tokens = sampler(logits, rows).token_ids
        assert tokens[0] == max(range(vocab), key=lambda i: x[i]), name
        ok, stat = _chi_square_ok(tokens[1:], expected)
        assert ok, (name, stat, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_filter_floor_keeps_what_sorting_the_probabilities_keeps(dtype: torch.dtype) -> None:
    """The GPU's filters (the least kept logit a row, found by the kernel's search) against
    top-k by topk, top-p by the full sort and min-p against the max in float64, on rows with
    each filter alone and together, flat and peaked, at several temperatures: the tokens the two
    place differently, but for ties with the least kept logit (all kept here, cut in sort order
    there), hold at most 1e-4 of a row's probability (the kernel sums in float32)."""
    g = seeded_generator("floor", dtype)
    n, vocab = 8, 1000 if not CUDA else V
    logits = (torch.randn(n, vocab, generator=g) * torch.tensor([1, 4, 0.5, 2, 3, 1, 6, 2])[:, None]).to(dtype)
    logits[3, :10] = logits[3].max()  # ties at the top
    temps = [0.7, 1.3, 1.0, 0.5, 1.0, 2.0, 0.9, 1.0]
    ks = [0, 40, 0, 0, 7, 0, 300, 0]
    top_ps = [0.9, 0.5, 0.99, 0.3, float("inf"), 0.95, 0.8, 0.6]
    min_ps = [0.0, 0.0, 0.05, 0.0, 0.2, 0.0, 0.01, 0.0]
    sampler = Sampler(DEVICE, seed=0)
    rows = [SamplingRow(SamplingParams(temperature=t, top_k=k or -1, top_p=min(p, 1.0), min_p=mp), None)
            for t, k, p, mp in zip(temps, ks, top_ps, min_ps)]
    b = sampler.prepare(rows)
    x = logits.to(DEVICE)
    floor = sampler._floor(x, b)[:, None]
    kept = (x.float() >= floor).cpu()
    tied = (x.float() == floor).cpu()  # tokens tied with the least kept logit are all kept
    reference = sampler._filtered(x.double(), b).cpu()
    expected = ~torch.isinf(reference)
    probs = (logits.double() / torch.tensor(temps, dtype=torch.float64)[:, None]).softmax(dim=-1)
    misplaced = (probs * ((kept != expected) & ~tied)).sum(dim=1)
    assert float(misplaced.max()) <= 1e-4, misplaced.tolist()
    assert bool((kept.sum(dim=1) >= 1).all()) and int(kept[4].sum()) <= 7
    assert int((kept != expected).sum()) < int(expected.sum()) // 50  # not a tolerance that hides a wrong filter


def test_draw_keys_differ_per_draw_and_stream_and_fit_63_bits() -> None:
    keys = {sampling.draw_key(stream, draw) for stream in (0, 1, 2**62) for draw in range(50)}
    assert len(keys) == 150 and all(0 <= k < 2**63 for k in keys)
    assert sampling.draw_key(7, 3) == sampling.draw_key(7, 3)
