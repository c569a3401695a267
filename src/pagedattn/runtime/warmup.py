"""Start-up warm-up: tiny dummy steps down every path the scheduler can produce.

Triton compiles a kernel variant the first time a launch needs it.  Without a warm-up that is
the first request's step: a batch sharing a long prefix was measured at 6.25 s the first time
and 0.43 s the second on an H200, the difference being extend, cascade, prefix and split-decode
variants compiling on the request path.  So start-up runs one small step of each kind the
scheduler can produce -- plain prefill, a chunked prefill (the second chunk attends its cached
context, as a prefix-cache hit does), prefill and decodes in one step, decodes over a short
context (the decode kernel unsplit) and a long one (split over the keys), decodes sharing
their first blocks (cascade decode: the shared-prefix kernel, unsplit and split own tails),
block copies and swaps -- with greedy and sampled outputs alike.  Each forward pass runs every
layer, so per-layer variants (sliding windows, fused norms, the store) come with it.  Which
kernel variants a step launches is the backend's business; this module only decides shapes,
and the kernels keep their variants few (step-varying values are not specialised on).

The steps write garbage into the pool's first blocks; they are zeroed again afterwards, so the
pool starts as it would have without the warm-up (every slot finite, nothing cached).  Every
rank of a tensor-parallel engine builds the same steps (fixed seed), so their collectives pair up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..cache.block_manager import cdiv
from .model_runner import KVOp, ModelRunner, StepInput

logger = logging.getLogger(__name__)

# A prefill step's tokens (at most; the token budget and the context bound it too).
PREFILL_TOKENS = 192
# Decode contexts: a short one (the decode kernel unsplit) and a long one (with few rows, split
# over its keys; half of it shared, a cascade decode whose own tails are split as well).
SHORT_CONTEXT = 96
LONG_CONTEXT = 1536


@dataclass(frozen=True)
class WarmupLimits:
    """What bounds the dummy steps: the scheduler's limits and the pool's size."""

    block_size: int
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    num_blocks: int
    num_cpu_blocks: int
    vocab_size: int


@dataclass
class WarmupPhase:
    name: str
    steps: list[StepInput] = field(default_factory=list)


class _StepMaker:
    """Builds dummy steps within the limits; a step that cannot fit them is left out (the
    scheduler could not produce it either)."""

    def __init__(self, lim: WarmupLimits, seed: int) -> None:
        self.lim = lim
        self.rng = np.random.default_rng(seed)

    def step(self, query_lens: list[int], seq_lens: list[int], shared_blocks: int = 0,
             sample: bool = True, greedy: bool = True, kv_ops: list[KVOp] | None = None) -> StepInput | None:
        """Rows with these lengths, each on blocks of its own after ``shared_blocks`` common
        ones; every row that completes its tokens samples (``sample``), greedy or not."""
        lim, bs = self.lim, self.lim.block_size
        if (len(query_lens) > lim.max_num_seqs or sum(query_lens) > lim.max_num_batched_tokens
                or max(seq_lens) > lim.max_model_len or any(not 1 <= q <= s for q, s in zip(query_lens, seq_lens))):
            return None
        own = [cdiv(s, bs) - shared_blocks for s in seq_lens]
        if shared_blocks + sum(own) > lim.num_blocks:
            return None
        tables: list[Sequence[int]] = []
        nxt = shared_blocks
        for n in own:
            tables.append(list(range(shared_blocks)) + list(range(nxt, nxt + n)))
            nxt += n
        ends = np.cumsum(query_lens) - 1
        rows = [int(e) for e in ends] if sample else []
        ids = self.rng.integers(0, lim.vocab_size, int(sum(query_lens))).tolist()
        return StepInput(kv_ops=kv_ops or [], query_lens=list(query_lens), seq_lens=list(seq_lens),
                         block_tables=tables, token_ids=ids, sample_rows=rows, greedy=greedy)


def warmup_phases(lim: WarmupLimits, seed: int = 0) -> list[WarmupPhase]:
    """The dummy steps, grouped in named phases (a phase none of whose steps fit is left out)."""
    mk = _StepMaker(lim, seed)
    bs = lim.block_size
    p = min(PREFILL_TOKENS, lim.max_num_batched_tokens, lim.max_model_len - 1)
    short = min(SHORT_CONTEXT, lim.max_model_len)
    long = min(LONG_CONTEXT, lim.max_model_len, (lim.num_blocks // 2) * bs)
    full = (long - 1) // bs  # full blocks before a long row's last token
    c1 = max(1, p // 2)
    phases = [
        _phase("prefill", mk.step([p], [p]), mk.step([p], [p], greedy=False)),
        # The second chunk attends the first one's K/V: what a prefix-cache hit's prompt does.
        _phase("prefill with cached context", mk.step([c1], [c1], sample=False),
               mk.step([p - c1], [p], greedy=False) if p > c1 else None),
        _phase("prefill and decodes in one step", mk.step([1, 1, p - 2], [short, short, p - 2]) if p > 2 else None),
        _phase("decode", mk.step([1, 1], [short, short]), mk.step([1, 1], [long, long], greedy=False),
               mk.step([1], [long])),
        _phase("cascade decode", mk.step([1, 1], [long, long], shared_blocks=full),
               mk.step([1, 1], [long, long], shared_blocks=full // 2, greedy=False)),
        _phase("block copy and swap", _block_moves(lim)),
    ]
    return [ph for ph in phases if ph.steps]


def _phase(name: str, *steps: StepInput | None) -> WarmupPhase:
    return WarmupPhase(name, [s for s in steps if s is not None])


def _block_moves(lim: WarmupLimits) -> StepInput | None:
    """Copy-on-write, and a swap out and back in when there is swap space."""
    if lim.num_blocks < 2:
        return None
    ops: list[KVOp] = [("copy", [(0, 1)])]
    if lim.num_cpu_blocks:
        ops += [("swap_out", [(1, 0)]), ("swap_in", [(0, 1)])]
    return StepInput(kv_ops=ops)


def used_blocks(phases: list[WarmupPhase]) -> list[int]:
    """Every device block the phases' steps write."""
    used = {b for ph in phases for s in ph.steps for t in s.block_tables for b in t}
    for ph in phases:
        for s in ph.steps:
            for kind, pairs in s.kv_ops:
                used.update(dst if kind != "swap_out" else src for src, dst in pairs)
    return sorted(used)


def run_warmup(runner: ModelRunner, phases: list[WarmupPhase], wait: Callable[[], None]) -> dict[str, float]:
    """Run the phases' steps eagerly (before any graph is captured; ``wait``: until the device
    is done), then zero the blocks they wrote.  Returns each phase's seconds."""
    if runner.graphs is not None:
        raise ValueError("warm up before capturing the decode graphs: its decode steps must run eagerly")
    times: dict[str, float] = {}
    for ph in phases:
        t0 = time.perf_counter()
        for step in ph.steps:
            runner.execute(step)
        wait()
        times[ph.name] = time.perf_counter() - t0
    runner.pool.sync_swaps()
    runner.pool.zero_blocks(used_blocks(phases))
    wait()
    return times
