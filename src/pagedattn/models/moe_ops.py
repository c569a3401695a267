"""The mixture-of-experts computation: routing, the PyTorch reference and the fused Triton MoE.

Each token's ``top_k`` experts (a token never picks one expert twice) each run a SiLU-gated
FFN on it; the token's output is the routing-weighted sum of those.  Experts are stored fused:
``w13 [E, 2I, H]`` (gate rows, then up rows) and ``w2 [E, H, I]``.

* :func:`route` -- the router's softmax, top-k and optional renormalisation, exactly as
  transformers computes them (shared by every path, so the experts chosen are the oracle's).
* :func:`fused_moe_ref` -- transformers' loop over the experts hit (the CPU path and the
  reference of the kernels), and :func:`fused_moe_dense_ref`, the same sum over *every*
  expert without host synchronisation (the torch path while a CUDA graph is captured).
* :func:`fused_moe_triton` -- the GPU path, vLLM's fused-MoE design: the (token, k) pairs are
  grouped by expert and each expert's run is padded to a multiple of ``BLOCK_M``
  (:func:`moe_align_block_size_triton`, two small kernels; :func:`moe_align_block_size` is
  the same grouping in torch ops, its reference), so every ``BLOCK_M`` rows of the grouped
  list belong to one expert; one grouped GEMM over all blocks computes gate and up together and applies
  ``silu(gate) * up`` in its epilogue; a second grouped GEMM computes down and multiplies the
  routing weight in its epilogue; a sum over the ``top_k`` rows of each token finishes.  Every
  shape on the host depends on the token count only (the sorted list is sized for the worst
  case, blocks past the device-side end exit at once), so a decode step can be captured in a
  CUDA graph: no host synchronisation, no data-dependent launch.

Numerics.  The kernels accumulate in fp32 and round to the activation dtype where the torch
code materialises a tensor (gate, up, the SiLU, the product, the down projection, the weighted
row), so in fp32 they agree with the reference to summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.w4a16 import dot_types
from .fused_ops import silu_and_mul_ref, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the torch reference serves every call
    triton = None
    tl = None


# ---------------------------------------------------------------------- routing
def route(router_logits: torch.Tensor, top_k: int, renormalize: bool, fp32_weights: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, top_k], expert ids [T, top_k] int64)`` from ``router_logits [T, E]``:
    softmax in fp32, the ``top_k`` largest, divided by their sum when ``renormalize``.  The
    weights stay fp32 with ``fp32_weights`` (Mixtral) or go back to the logits' dtype (Qwen3-MoE)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    return (weights if fp32_weights else weights.to(router_logits.dtype)), ids


# ---------------------------------------------------------------------- dispatch
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k topk_weights[t, k] * expert_{ids[t, k]}(x[t])`` for every token, ``[T, H]``
    (written into ``out`` when given): the Triton kernels on CUDA, the torch reference elsewhere."""
    if use_triton(x):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, out=out)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        y = fused_moe_dense_ref(x, w13, w2, topk_weights, topk_ids)
    else:
        y = fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
    return y if out is None else out.copy_(y)


# ---------------------------------------------------------------------- torch references
def _expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's ``down(silu(gate(x)) * up(x))`` (``w13 [2I, H]``, ``w2 [H, I]``)."""
    return F.linear(silu_and_mul_ref(F.linear(x, w13)), w2)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """transformers' experts loop, in its arithmetic: each expert runs on its tokens, each row is
    multiplied by its routing weight, and every token sums its experts' rows in expert order
    (so fp32 matches transformers bit for bit on the CPU).  The tokens are grouped by one
    stable sort instead of a ``where`` and an ``index_add`` per expert (``nonzero`` and
    ``index_add`` cost ~150 us a call on the CPU)."""
    num_tokens, top_k = topk_ids.shape
    # Pairs numbered k * T + t: within an expert its rows come in transformers' order (by the
    # expert's rank k in the token's choice, then by token), which the GEMM's per-row result may
    # depend on (it does on some CPUs' BLAS kernels: the same rows in another order differ in
    # the last bits).
    flat = topk_ids.t().flatten()
    order = torch.argsort(flat, stable=True)  # sorted position -> pair (k * T + t), grouped by expert
    rows = x.index_select(0, order % num_tokens)
    weights = topk_weights.t().flatten().index_select(0, order)[:, None]
    ys = torch.empty_like(rows)
    start = 0
    for e, n in enumerate(torch.bincount(flat, minlength=w13.shape[0]).tolist()):  # the one host sync
        if n:
            sl = slice(start, start + n)
            ys[sl] = _expert_ffn(rows[sl], w13[e], w2[e]) * weights[sl]
            start += n
    # Each token's rows in ascending expert order (their sorted positions ascend with the expert).
    by_expert = torch.argsort(order).view(top_k, num_tokens).t().sort(dim=1).values
    parts = ys.index_select(0, by_expert.flatten()).view(num_tokens, top_k, -1)
    out = parts[:, 0].clone()
    for j in range(1, top_k):  # transformers adds expert by expert into zeros: the same sums
        out += parts[:, j]
    return out


def fused_moe_dense_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """The same sum with every expert run on every token (weight 0 where not routed): no shape
    depends on the routing, so it can be captured in a CUDA graph; ``E`` times the work."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        w = (topk_weights * (topk_ids == e)).sum(dim=-1, keepdim=True)  # [T, 1]: the token's weight, or 0
        out += (_expert_ffn(x, w13[e], w2[e]) * w).to(out.dtype)
    return out


# ---------------------------------------------------------------------- grouping by expert
def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most rows the sorted, block-padded list can need: each expert hit (at most
    ``min(E, pairs)`` of them) pads its run by fewer than ``block_m`` rows."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, k) pairs by expert, each expert's run padded to a multiple of ``block_m``.

    Returns ``sorted_ids`` int32 ``[max_padded_rows]`` (pair index ``t * top_k + k``, or
    ``T * top_k`` for padding), ``expert_ids`` int32 ``[max_padded_rows / block_m]`` (the expert
    of each block, -1 past the end) and ``num_rows`` int32 ``[1]`` (rows in use, padding
    included).  Sizes depend on ``topk_ids.shape`` only and nothing is read back to the host.
    Within an expert the pairs keep their order (a stable sort), so the result is deterministic.
    """
    flat = topk_ids.flatten().long()
    pairs = flat.numel()
    dev = flat.device
    rows = max_padded_rows(pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)  # pair indices, grouped by expert
    expert_of = flat[order]
    rank = torch.arange(pairs, device=dev) - (counts.cumsum(0) - counts)[expert_of]  # place within its expert
    dest = (padded_end - padded)[expert_of] + rank
    sorted_ids = torch.full((rows,), pairs, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, rows, block_m, device=dev)
    expert_ids = torch.searchsorted(padded_end, block_start, right=True)  # first expert ending after it
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, padded_end[-1:].to(torch.int32)


# ---------------------------------------------------------------------- Triton kernels
@dataclass(frozen=True)
class MoEConfig:
    """Tiles of the grouped GEMMs: ``block_m`` rows (pairs of one expert), ``block_n`` output
    columns, ``block_k`` of the reduction per step."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")


def default_config(num_pairs: int, num_experts: int, element_size: int = 2) -> MoEConfig:
    """Tiles by the expected rows per expert: decode-sized batches waste little on padding with
    16-row blocks, prefills reuse each weight tile over 64 rows.  fp32 operands take half the
    pipeline stages and narrower tiles, to stay within shared memory (~100-150 KB here)."""
    per_expert = num_pairs / num_experts
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    wide = block_m == 64 and element_size < 4
    stages = (3 if block_m == 64 else 4) if element_size < 4 else 2 if block_m == 64 else 3
    return MoEConfig(block_m=block_m, block_n=128 if wide else 64, block_k=64, num_warps=8 if block_m == 64 else 4,
                     num_stages=stages)


if triton is not None:

    @triton.jit
    def _round(x, DTYPE: tl.constexpr):
        """``x`` (fp32) rounded to ``DTYPE`` and back: a tensor the torch code stores in that dtype."""
        return x.to(DTYPE).to(tl.float32)

    @triton.jit
    def _block_rows(SortedIds, ExpertIds, NumRows, pid_m, num_pairs, BLOCK_M: tl.constexpr):
        """The expert of row block ``pid_m`` (-1: past the end) and its pair indices with their mask."""
        e = tl.load(ExpertIds + pid_m)
        if pid_m * BLOCK_M >= tl.load(NumRows):
            e = -1
        ids = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        return e, ids, ids < num_pairs

    @triton.jit
    def _moe_align_kernel(
        TopkIds, SortedIds, ExpertIds, NumRows, Cursor,
        num_pairs, num_experts, num_blocks,
        BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr, CHUNK_B: tl.constexpr,
    ):
        """One program: each expert's pair count, its run's padded start (``Cursor``), the rows in
        use, the expert of every row block, and padding in every row of the sorted list."""
        counts = tl.zeros((E_POW2,), dtype=tl.int32)
        for start in range(0, num_pairs, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            m = offs < num_pairs
            ids = tl.load(TopkIds + offs, mask=m, other=0).to(tl.int32)
            counts += tl.histogram(ids, E_POW2, mask=m)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        end = tl.cumsum(padded, 0)
        experts = tl.arange(0, E_POW2)
        tl.store(Cursor + experts, end - padded, mask=experts < num_experts)
        total = tl.sum(padded, 0)
        tl.store(NumRows, total)
        for b0 in range(0, num_blocks, CHUNK_B):
            b = b0 + tl.arange(0, CHUNK_B)
            row = b * BLOCK_M
            # The block's expert: how many experts' runs end at or before its first row.
            e = tl.sum((end[None, :] <= row[:, None]).to(tl.int32), axis=1)
            tl.store(ExpertIds + b, tl.where(row < total, e, -1), mask=b < num_blocks)
        for r0 in range(0, num_blocks * BLOCK_M, CHUNK):
            r = r0 + tl.arange(0, CHUNK)
            tl.store(SortedIds + r, tl.full((CHUNK,), 0, tl.int32) + num_pairs, mask=r < num_blocks * BLOCK_M)

    @triton.jit
    def _moe_scatter_kernel(TopkIds, SortedIds, Cursor, num_pairs, CHUNK: tl.constexpr):
        """Each pair takes the next free row of its expert's run (an atomic counter per expert):
        the order within a run varies, what each row computes does not."""
        offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        m = offs < num_pairs
        ids = tl.load(TopkIds + offs, mask=m, other=0).to(tl.int32)
        pos = tl.atomic_add(Cursor + ids, 1, mask=m)
        tl.store(SortedIds + pos, offs, mask=m)

    @triton.jit
    def _moe_gate_up_kernel(
        X, W, Out, SortedIds, ExpertIds, NumRows,
        num_pairs, top_k, N, K,
        stride_xm, stride_we, stride_wn, stride_wk, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """``Out[pair, n] = silu(x[token] . w_gate[e, n]) * (x[token] . w_up[e, n])`` for a
        block of one expert's pairs and ``BLOCK_N`` of its ``N`` intermediate columns."""
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m = tl.program_id(0) // num_n
        pid_n = tl.program_id(0) % num_n
        e, ids, row_mask = _block_rows(SortedIds, ExpertIds, NumRows, pid_m, num_pairs, BLOCK_M)
        if e >= 0:
            tok = (ids // top_k).to(tl.int64)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            w_base = W + e.to(tl.int64) * stride_we
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                a = tl.load(X + tok[:, None] * stride_xm + offs_k[None, :],
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
                w_mask = k_mask[:, None] & n_mask[None, :]
                w_off = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BLOCK_K, BLOCK_N]
                wg = tl.load(w_base + w_off, mask=w_mask, other=0.0).to(DOT_DTYPE)
                wu = tl.load(w_base + N * stride_wn + w_off, mask=w_mask, other=0.0).to(DOT_DTYPE)
                acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PRECISION)
                acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PRECISION)
            dtype = Out.dtype.element_ty
            gate = _round(acc_g, dtype)
            act = _round(gate / (1.0 + tl.exp(-gate)), dtype)  # F.silu's output, stored before the multiply
            h = act * _round(acc_u, dtype)
            tl.store(Out + ids.to(tl.int64)[:, None] * stride_om + offs_n[None, :], h.to(dtype),
                     mask=row_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _moe_down_kernel(
        A, W, Out, TopkWeights, SortedIds, ExpertIds, NumRows,
        num_pairs, N, K,
        stride_am, stride_we, stride_wn, stride_wk, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """``Out[pair, n] = weight[pair] * (A[pair] . w2[e, n])``: the down projection of a block
        of one expert's pairs, the routing weight applied in the epilogue."""
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m = tl.program_id(0) // num_n
        pid_n = tl.program_id(0) % num_n
        e, ids, row_mask = _block_rows(SortedIds, ExpertIds, NumRows, pid_m, num_pairs, BLOCK_M)
        if e >= 0:
            rows = ids.to(tl.int64)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            w_base = W + e.to(tl.int64) * stride_we
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                a = tl.load(A + rows[:, None] * stride_am + offs_k[None, :],
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
                w = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(DOT_DTYPE)
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            dtype = Out.dtype.element_ty
            weight = tl.load(TopkWeights + rows, mask=row_mask, other=0.0).to(tl.float32)
            y = _round(acc, dtype) * weight[:, None]  # the expert's output (stored), then the weight multiply
            tl.store(Out + rows[:, None] * stride_om + offs_n[None, :], y.to(dtype),
                     mask=row_mask[:, None] & n_mask[None, :])


ALIGN_CHUNK = 1024  # pairs per histogram step and per scatter program
ALIGN_CHUNK_BLOCKS = 64  # row blocks per step of the expert-of-block search


def moe_align_block_size_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`moe_align_block_size` in two launches (counts and offsets in one program, then an
    atomic scatter of the pairs), with the same outputs except the order of the pairs within
    an expert's run."""
    flat = topk_ids.reshape(-1)
    pairs = flat.numel()
    rows = max_padded_rows(pairs, num_experts, block_m)
    dev = flat.device
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(rows // block_m, dtype=torch.int32, device=dev)
    num_rows = torch.empty(1, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    _moe_align_kernel[(1,)](flat, sorted_ids, expert_ids, num_rows, cursor, pairs, num_experts, rows // block_m,
                            BLOCK_M=block_m, E_POW2=max(16, triton.next_power_of_2(num_experts)), CHUNK=ALIGN_CHUNK,
                            CHUNK_B=ALIGN_CHUNK_BLOCKS, num_warps=4)
    _moe_scatter_kernel[(triton.cdiv(pairs, ALIGN_CHUNK),)](flat, sorted_ids, cursor, pairs, CHUNK=ALIGN_CHUNK,
                                                           num_warps=4)
    return sorted_ids, expert_ids, num_rows


# Tokens per launch pair: bounds the [pairs, I] and [pairs, H] intermediates of a long prefill.
MAX_TOKENS_PER_CHUNK = 8192


def _check_inputs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"need x [T, H], w13 [E, 2I, H], w2 [E, H, I]; got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    E, two_i, H = w13.shape
    if two_i % 2 or x.shape[1] != H or tuple(w2.shape) != (E, H, two_i // 2):
        raise ValueError(f"expert shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must "
                         f"both be [T={x.shape[0]}, top_k]")
    if x.dtype != w13.dtype or x.dtype != w2.dtype:
        raise ValueError(f"activations and expert weights must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, out: torch.Tensor | None = None,
                     config: MoEConfig | None = None) -> torch.Tensor:
    """The fused MoE (see the module docstring); ``out [T, H]`` receives the result when given."""
    if triton is None:
        raise ImportError("the fused MoE kernels need triton; install it or run on the CPU path")
    _check_inputs(x, w13, w2, topk_weights, topk_ids)
    out = torch.empty_like(x) if out is None else out
    chunk = MAX_TOKENS_PER_CHUNK
    for start in range(0, x.shape[0], chunk):
        sl = slice(start, start + chunk)
        _fused_moe_chunk(x[sl], w13, w2, topk_weights[sl], topk_ids[sl], out[sl], config)
    return out


def _fused_moe_chunk(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, out: torch.Tensor, config: MoEConfig | None) -> None:
    T, H = x.shape
    E, two_i, _ = w13.shape
    n_inter, top_k = two_i // 2, topk_ids.shape[1]
    pairs = T * top_k
    cfg = config or default_config(pairs, E, x.element_size())
    sorted_ids, expert_ids, num_rows = moe_align_block_size_triton(topk_ids.contiguous(), E, cfg.block_m)
    dot_dtype, precision = dot_types(x.dtype)
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_DTYPE=dot_dtype,
                  DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    blocks = expert_ids.numel()
    inter = torch.empty((pairs, n_inter), dtype=x.dtype, device=x.device)
    _moe_gate_up_kernel[(blocks * triton.cdiv(n_inter, cfg.block_n),)](
        x, w13, inter, sorted_ids, expert_ids, num_rows, pairs, top_k, n_inter, H,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), inter.stride(0), **common)
    rows_out = torch.empty((pairs, H), dtype=x.dtype, device=x.device)
    _moe_down_kernel[(blocks * triton.cdiv(H, cfg.block_n),)](
        inter, w2, rows_out, topk_weights.reshape(-1), sorted_ids, expert_ids, num_rows, pairs, H, n_inter,
        inter.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), rows_out.stride(0), **common)
    torch.sum(rows_out.view(T, top_k, H), dim=1, out=out)
