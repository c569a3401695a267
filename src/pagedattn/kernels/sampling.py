"""The GPU's sampling kernels: the random choice of a step, ``argmax(x / T - log q)`` with
``q ~ Exp(1)`` per vocabulary entry, all rows in one launch (:func:`race_sample`), the least
logit a row's top-k, top-p and min-p keep, without a sort (:func:`filter_floor`), and a greedy
step's argmax in one launch (:func:`argmax`).

``argmax(p / q)`` with Exp(1) noise ``q`` samples from ``p`` exactly (the exponential race), and
in logs it needs no softmax: ``log p = x / T - logsumexp``, whose constant does not move the
argmax.  So a step's choice is one pass over its logits, in whatever dtype the LM head wrote
them.  A row of temperature 0 is greedy: the first maximum of ``x``, no noise.

A seeded row's ``q`` must depend on its seed and on how many tokens it has drawn, never on the
batch it runs in; the shared generator cannot give that, and a generator per row means a launch
per row and step (at batch 256 the host spent more time on those launches than the model on its
forward).  So each row's draw has a 63-bit *key* (its seed stream and draw count mixed on the host,
:func:`draw_key`) and its noise is a counter-based function of (key, column): Philox-4x32 keyed
by the row's key (rows without a seed: the step's key, the row number in the high word of the
counter), four draws per counter, ``q = -log(1 - u)``.  Each program takes the best of a slice of
the columns, and a small reduction the best slice (its first maximum: ties go to the lower
column, as argmax's).  The CPU samples otherwise (``engine/sampler.py``); a seed reproduces a
sample on the same device.

Before these kernels the GPU took six passes over float32 logits (cast, divide, softmax, noise,
divide, argmax) and sorted the probabilities for top-p (docs/benchmarks.md, "Sampling").
"""

from __future__ import annotations

import torch

from .w4a16 import TILE_COUNTERS, _sm_count, device_counters

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the sampler draws on the CPU
    triton = None
    tl = None

_MASK64 = (1 << 64) - 1
QUARTER = 512  # columns per Philox draw lane: a program's block is 4 x QUARTER columns
BLOCK = 4 * QUARTER
# The grid splits a row's columns until it has about this many programs an SM.  A sweep on an
# H100 (docs/benchmarks.md, "Sampling"): 512-column quarters, 4 warps and 16 programs an SM were
# best or within 5% of it at 1, 64 and 256 rows.
PROGRAMS_PER_SM = 16


def draw_key(stream_key: int, draw: int) -> int:
    """The key of draw number ``draw`` of a seed stream: splitmix64 of the two, 63 bits (a
    valid torch seed and Philox key)."""
    z = (stream_key + 0x9E3779B97F4A7C15 * (draw + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFF_FFFF_FFFF_FFFF


def race_splits(n: int, v: int, sms: int) -> int:
    """Column slices per row: enough programs for ``PROGRAMS_PER_SM`` an SM, each slice still at
    least four blocks."""
    blocks = triton.cdiv(v, BLOCK)
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, n), blocks // 4))


def race_sample(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor,
                floor: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """Tokens ``[n]`` (int64, on the logits' device) of ``logits [n, V]`` (any float dtype, rows
    contiguous) through the Triton kernel.  ``temperature [n]`` float32 (0: greedy);
    ``keys [n + 1]`` int64: each row's key, -1 for a row without a seed, whose noise is keyed by
    ``keys[n]`` (the step's key) and its row number.  ``floor [n]`` float32: a row's logits
    below it are out (its filters', :func:`filter_floor`; None: none).  ``splits``: column
    slices per row (default :func:`race_splits`); the noise of a (key, column) never depends on
    it."""
    n, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if splits is None:
        sms = _sm_count(logits.device) if logits.is_cuda else 4
        splits = race_splits(n, v, sms)
    cols = triton.cdiv(triton.cdiv(v, splits), BLOCK) * BLOCK  # whole blocks a slice
    splits = triton.cdiv(v, cols)
    best = torch.empty((n, splits), dtype=torch.float32, device=logits.device)
    index = torch.empty((n, splits), dtype=torch.int64, device=logits.device)
    _race_kernel[(n, splits)](logits, logits.stride(0), temperature, keys, floor if floor is not None else temperature,
                              best, index, n, v, cols, HAS_FLOOR=floor is not None, QUARTER=QUARTER, num_warps=4)
    if splits == 1:
        return index[:, 0]
    return index.gather(1, best.argmax(dim=1, keepdim=True))[:, 0]


ARGMAX_BLOCK = 1024  # logits a step of the argmax kernel's loop (a lane's running best: 8 a thread)
# Rows up to which :func:`argmax` beats torch's: on an H100 (docs/benchmarks.md) 4.3x / 2.7x at 1 /
# 16 rows of a 128k vocabulary, but 0.8x / 0.4x at 64 / 256 rows, where a program's slice is long.
ARGMAX_KERNEL_ROWS = 16
ARGMAX_MAX_SPLITS = 64  # column slices a row at most: the last slice reduces them in one tile


def argmax(logits: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of ``[n, V]`` logits (any float dtype) as int64 ``[n]``, the same
    indices (the first maximum; NaN counts as the maximum), in one launch.

    torch's argmax reduces a row in one block: ~37 us for one row of a 128k vocabulary on an
    H100, 1% of a batch-1 decode step of an 8B int4 model (docs/benchmarks.md).  Here a row's
    columns are cut into ``splits`` slices (default: about two programs an SM, each slice at
    least four blocks); each slice writes its best to a partial and counts itself done on its
    row's counter, and the slice that finds the others done reduces the partials."""
    n, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    if splits is None:
        sms = _sm_count(logits.device) if logits.is_cuda else 4
        splits = max(1, min(triton.cdiv(2 * sms, n), triton.cdiv(v, 4 * ARGMAX_BLOCK)))
    splits = max(1, min(splits, ARGMAX_MAX_SPLITS, triton.cdiv(v, ARGMAX_BLOCK)))
    if n > TILE_COUNTERS:
        splits = 1  # more rows than the device's counters (a row's is one): nothing to reduce
    cols = triton.cdiv(triton.cdiv(v, splits), ARGMAX_BLOCK) * ARGMAX_BLOCK  # whole blocks a slice
    splits = triton.cdiv(v, cols)
    keys = torch.empty((n, splits), dtype=torch.int32, device=logits.device)
    index = torch.empty((n, splits), dtype=torch.int32, device=logits.device)
    _argmax_kernel[(n, splits)](logits, logits.stride(0), keys, index, device_counters(logits.device), out, v, cols,
                                BLOCK=ARGMAX_BLOCK, MAX_SPLITS=ARGMAX_MAX_SPLITS, num_warps=4)
    return out


FLOOR_BLOCK = 512  # logits a step of the threshold kernel's loops (8 warps: an H100 sweep, docs/benchmarks.md)
PIVOTS = 16  # the top-p search splits its key range in 16 a pass: 8 passes for 32 bits


def filter_floor(logits: torch.Tensor, temperature: torch.Tensor, floor: torch.Tensor, top_p: torch.Tensor | None,
                 min_p: torch.Tensor | None) -> torch.Tensor:
    """Per row of ``logits [n, V]`` the least logit its filters keep, float32 ``[n]``: the
    largest of ``floor`` (top-k's k-th logit, or -inf), top-p's and min-p's thresholds over the
    softmax of ``logits / temperature`` (``[n]``, > 0) restricted to the logits >= ``floor``
    (``top_p [n]``, inf: none; ``min_p [n]``, 0: none; either None: no row has it).

    The same tokens as sorting the probabilities (but for ties with the threshold, all kept),
    one program a row streaming its logits ~10 times, never waiting for the host: top-p's
    threshold is the least logit whose more probable tokens hold at most ``top_p`` of the mass,
    found by a 16-way search over the logits' order-preserving 32-bit keys."""
    n, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    _filter_floor_kernel[(n,)](logits, logits.stride(0), temperature, floor,
                               top_p if top_p is not None else floor, min_p if min_p is not None else floor, out, v,
                               int(top_p is not None), int(min_p is not None), BLOCK=FLOOR_BLOCK, PIVOTS=PIVOTS,
                               num_warps=8)
    return out


if triton is not None:

    @triton.jit
    def _order_key(x):
        """fp32 ``x`` -> an int32 whose signed order is ``x``'s (negative floats' lower 31 bits
        flipped); its own inverse."""
        b = x.to(tl.int32, bitcast=True)
        return b ^ ((b >> 31) & 0x7FFFFFFF)

    @triton.jit(do_not_specialize=("has_top_p", "has_min_p"))
    def _filter_floor_kernel(L, stride_l, Temps, Floor, TopP, MinP, Out, V, has_top_p, has_min_p,
                             BLOCK: tl.constexpr, PIVOTS: tl.constexpr):
        """Row ``program_id(0)``: see :func:`filter_floor` (the flags are runtime values: one
        compiled kernel a dtype)."""
        row = tl.program_id(0)
        row_ptr = L + row.to(tl.int64) * stride_l
        inv_t = 1.0 / tl.load(Temps + row)
        floor = tl.load(Floor + row)
        offs = tl.arange(0, BLOCK)
        # Every sum and maximum stays per lane through a loop, reduced once after it: a
        # reduction across the program's threads in every step bounded the first version.
        m_lane = tl.full((BLOCK,), float("-inf"), tl.float32)
        for c in range(0, V, BLOCK):
            x = tl.load(row_ptr + c + offs, mask=c + offs < V, other=float("-inf")).to(tl.float32)
            m_lane = tl.maximum(m_lane, x)
        m = tl.max(m_lane, axis=0)
        thr = floor
        if has_min_p != 0:
            min_p = tl.load(MinP + row)
            # p >= min_p * p_max  <=>  (x - m) * inv_t >= log(min_p)
            thr = tl.where(min_p > 0.0, tl.maximum(thr, m + tl.log(tl.maximum(min_p, 1e-30)) / inv_t), thr)
        if has_top_p != 0:
            top_p = tl.load(TopP + row)
            if top_p < 1.0:
                z = tl.zeros((BLOCK,), tl.float32)
                for c in range(0, V, BLOCK):
                    x = tl.load(row_ptr + c + offs, mask=c + offs < V, other=float("-inf")).to(tl.float32)
                    z += tl.where(x >= floor, tl.exp((x - m) * inv_t), 0.0)
                budget = top_p * tl.sum(z, axis=0)
                # Keys in (lo, hi]: mass(key > lo) > budget and mass(key > hi) <= budget; the
                # least kept key is hi once hi = lo + 1.
                lo = tl.full((), -2147483648, tl.int64)
                hi = _order_key(m).to(tl.int64)
                steps = tl.arange(1, PIVOTS + 1).to(tl.int64)  # pivot PIVOTS is hi itself
                for _ in range(0, 32, 4):
                    # [PIVOTS] keys, non-decreasing, the last hi; int32 in the inner loop (64-bit
                    # compares cost two instructions and twice the registers).  The logits load
                    # as a [BLOCK, 1] column of the accumulator's own 2-D layout: a 1-D block
                    # broadcast against the pivots went through shared memory every step.
                    piv = lo + ((hi - lo) * steps) // PIVOTS
                    piv32 = piv.to(tl.int32)[None, :]
                    acc = tl.zeros((BLOCK, PIVOTS), tl.float32)
                    for c in range(0, V, BLOCK):
                        cols = c + offs[:, None]
                        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                        e = tl.where(x >= floor, tl.exp((x - m) * inv_t), 0.0)
                        acc += tl.where(_order_key(x) > piv32, e, 0.0)
                    mass = tl.sum(acc, axis=0)
                    within = mass <= budget
                    hi = tl.min(tl.where(within, piv, hi), axis=0)
                    lo = tl.max(tl.where(within, lo, piv), axis=0)
                thr = tl.maximum(thr, _order_key(hi.to(tl.int32)).to(tl.float32, bitcast=True))
        tl.store(Out + row, thr)

    @triton.jit
    def _argmax_key(x):
        """An int32 whose signed order is fp32 ``x``'s, NaN above everything (argmax's order)."""
        return tl.where(x != x, 0x7FFFFFFF, _order_key(x))

    @triton.jit(do_not_specialize=("V", "cols_per_split"))
    def _argmax_kernel(L, stride_l, Keys, Index, Counters, Out, V, cols_per_split,
                       BLOCK: tl.constexpr, MAX_SPLITS: tl.constexpr):
        """Row ``program_id(0)``, its columns ``[s * cols_per_split, (s + 1) * cols_per_split)``
        for ``s = program_id(1)``: the first maximum (see :func:`argmax`)."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        row_ptr = L + row.to(tl.int64) * stride_l
        start = split * cols_per_split
        end = tl.minimum(start + cols_per_split, V)
        lane = tl.arange(0, BLOCK)
        # A lane's columns only grow and a later one replaces its best only when greater: each
        # lane keeps its first maximum.  Masked columns (key INT32_MIN) never replace anything.
        best = tl.full((BLOCK,), -2147483648, tl.int32)
        best_i = tl.full((BLOCK,), 0, tl.int32) + V
        for c in range(start, end, BLOCK):
            cols = c + lane
            x = tl.load(row_ptr + cols, mask=cols < end, other=0.0).to(tl.float32)
            k = tl.where(cols < end, _argmax_key(x), -2147483648)
            take = k > best
            best = tl.where(take, k, best)
            best_i = tl.where(take, cols, best_i)
        top = tl.max(best, axis=0)
        first = tl.min(tl.where(best == top, best_i, V), axis=0)
        if splits == 1:
            tl.store(Out + row, first.to(tl.int64))
        else:
            tl.store(Keys + row * splits + split, top)
            tl.store(Index + row * splits + split, first)
            tl.debug_barrier()  # the partial is written before the count says so
            counter = Counters + row
            if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
                # The slices in column order: the first holding the top has its first maximum.
                s = tl.arange(0, MAX_SPLITS)
                ks = tl.load(Keys + row * splits + s, mask=s < splits, other=-2147483648, cache_modifier=".cg")
                ix = tl.load(Index + row * splits + s, mask=s < splits, other=0, cache_modifier=".cg")
                top = tl.max(ks, axis=0)
                tl.store(Out + row, tl.min(tl.where(ks == top, ix, V), axis=0).to(tl.int64))
                tl.atomic_xchg(counter, 0)

    @triton.jit
    def _race_quarter(row_ptr, c, V, inv_t, greedy, floor, u, best, best_i, QUARTER: tl.constexpr):
        """Each lane's running ``(best score, its column)`` after columns ``c .. c + QUARTER`` (one
        per lane; uniform draws ``u``).  A lane's columns only grow, and a later one replaces the
        best only when strictly greater: each lane keeps its first maximum."""
        cols = c + tl.arange(0, QUARTER)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x >= floor, x, float("-inf"))
        # Clamped above zero as torch's exponential_ is: q = 0 would make log q infinite.
        q = tl.maximum(-tl.log(1.0 - u), 1e-30)
        s = tl.where(greedy, x, x * inv_t - tl.log(q))
        take = s > best
        return tl.where(take, s, best), tl.where(take, cols, best_i)

    @triton.jit(do_not_specialize=("n_rows", "cols_per_split"))
    def _race_kernel(L, stride_l, Temps, Keys, Floor, Best, Index, n_rows, V, cols_per_split,
                     HAS_FLOOR: tl.constexpr, QUARTER: tl.constexpr):
        """Row ``program_id(0)``, its columns ``[s * cols_per_split, (s + 1) * cols_per_split)`` for
        ``s = program_id(1)``: the best score and its column into ``Best`` / ``Index [n, splits]``."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        t = tl.load(Temps + row)
        greedy = t <= 0.0
        inv_t = 1.0 / tl.where(greedy, 1.0, t)
        floor = tl.load(Floor + row) if HAS_FLOOR else float("-inf")
        key = tl.load(Keys + row)
        seeded = key >= 0
        seed = tl.where(seeded, key, tl.load(Keys + n_rows))
        # A row without a seed shares the step's key: its row number (+1) is the counter's high word.
        hi = tl.where(seeded, 0, row + 1).to(tl.int64) << 32
        row_ptr = L + row.to(tl.int64) * stride_l
        start = split.to(tl.int64) * cols_per_split
        end = tl.minimum(start + cols_per_split, V)
        lane = tl.arange(0, QUARTER)
        best = tl.full((QUARTER,), float("-inf"), tl.float32)
        best_i = start + lane
        for c0 in range(start, end, 4 * QUARTER):
            # Column c0 + k QUARTER + j takes draw k of counter c0 / 4 + j: the same whatever the
            # split (c0 is always a multiple of the block).
            u1, u2, u3, u4 = tl.rand4x(seed, hi + c0 // 4 + lane)
            best, best_i = _race_quarter(row_ptr, c0, V, inv_t, greedy, floor, u1, best, best_i, QUARTER)
            best, best_i = _race_quarter(row_ptr, c0 + QUARTER, V, inv_t, greedy, floor, u2, best, best_i, QUARTER)
            best, best_i = _race_quarter(row_ptr, c0 + 2 * QUARTER, V, inv_t, greedy, floor, u3, best, best_i, QUARTER)
            best, best_i = _race_quarter(row_ptr, c0 + 3 * QUARTER, V, inv_t, greedy, floor, u4, best, best_i, QUARTER)
        top = tl.max(best, axis=0)
        # The slice's first maximum: the lowest column among the lanes holding it.
        first = tl.min(tl.where(best == top, best_i, V), axis=0)
        tl.store(Best + row * tl.num_programs(1) + split, top)
        tl.store(Index + row * tl.num_programs(1) + split, tl.minimum(first, end - 1))
