"""The seeded-noise kernel: each seeded row's Exp(1) draws are a function of its key alone.

Without CUDA it runs under the Triton interpreter (a small vocabulary); with CUDA at a real
vocabulary size.  The CPU path (a generator per row) is covered by the sampler and engine tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from .triton_interpreter import CUDA, DEVICE, rerun_in_fresh_process, seeded_generator, skip_unless_runnable

pytest.importorskip("triton")

from pagedattn.kernels import sampling

V = 151936 if CUDA else 3000  # not a multiple of the kernel's block: a partial last one


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_kernels_in_fresh_interpreter_process")


def test_kernels_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


def _noise(rows: list[int], keys: list[int], n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    before = torch.rand(n, V, generator=seeded_generator("noise", tuple(rows), tuple(keys))).to(DEVICE)
    q = before.clone()
    sampling.seeded_exponential_(q, rows, keys, use_triton=True)
    return before, q


def test_rows_get_exponential_noise_of_their_key_alone() -> None:
    g = seeded_generator("keys")
    keys = [int(k) for k in torch.randint(0, 2**62, (3,), generator=g)]
    before, q = _noise([0, 2, 4], keys)
    assert torch.equal(q[[1, 3]], before[[1, 3]])  # rows not listed are untouched
    drawn = q[[0, 2, 4]].cpu().double()
    assert bool((drawn > 0).all()) and bool(torch.isfinite(drawn).all())
    # Exp(1): mean 1 and variance 1, within five standard errors over V draws per row.
    assert (drawn.mean(1) - 1).abs().max().item() < 5 / math.sqrt(V)
    assert (drawn.var(1) - 1).abs().max().item() < 5 * math.sqrt(8 / V)
    # P(q > 1) = 1/e per draw.
    assert (((drawn > 1).double().mean(1)) - math.exp(-1)).abs().max().item() < 5 * 0.5 / math.sqrt(V)
    # The same key in another row and batch: the same draws; other keys: other draws.
    _, again = _noise([1], [keys[1]], n=2)
    assert torch.equal(again[1], q[2])
    assert not torch.equal(q[0], q[2]) and not torch.equal(q[2], q[4])


def test_draw_keys_differ_per_draw_and_stream_and_fit_63_bits() -> None:
    keys = {sampling.draw_key(stream, draw) for stream in (0, 1, 2**62) for draw in range(50)}
    assert len(keys) == 150 and all(0 <= k < 2**63 for k in keys)
    assert sampling.draw_key(7, 3) == sampling.draw_key(7, 3)
