"""Pure-PyTorch paged attention: the CPU backend and the oracle for every GPU kernel.

K/V are gathered through the block tables with one indexing op per group of sequences, and
a masked attention (PyTorch's fused SDPA, in fp32) handles causality, ragged context lengths
and sliding windows: one call for a group of decodes (one query each), one per sequence for
prefill/extend queries, so short queries are never padded to long ones.  No Python loop over
tokens or blocks.  With attention-logit soft-capping (which SDPA cannot do) the same calls are
an explicit masked softmax in fp32, in transformers' order of operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cache.kv_pool import dequantize, gather_pages, store_kv_ref
from .backend import AttentionBackend, AttentionLayerSpec, KVScales
from .metadata import AttentionMetadata, BackendState


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    query_lens: list[int],
    seq_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    clean: bool = True,
    softcap: float | None = None,
    scales: KVScales | None = None,
) -> torch.Tensor:
    """Attention of each sequence's new tokens over its paged context (causal).

    Sequence ``i``'s queries are the last ``query_lens[i]`` positions of its ``seq_lens[i]``
    tokens; their K/V must already be in the cache.  Returns ``[T, Hq, D]`` in ``q.dtype``.
    ``clean=False`` skips zeroing gathered slots that must not be read (only valid if the caches
    hold no NaN/Inf).  ``softcap``: each scaled score ``s`` becomes ``softcap * tanh(s / softcap)``.
    fp8 caches are read as ``page * scale`` (``scales`` None: 1.0).
    """
    plans = _make_plans(block_tables, query_lens, seq_lens, k_cache.shape[1], sliding_window, q.device)
    return _attend_planned(q, k_cache, v_cache, plans, scale, clean, softcap, scales)


def _attend_planned(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plans: list[_GroupPlan],
                    scale: float, clean: bool, softcap: float | None, scales: KVScales | None) -> torch.Tensor:
    if len(plans) == 1:  # only decodes or only longer queries: no output to assemble
        return _attend_group(q, k_cache, v_cache, plans[0], scale, clean, softcap, scales)
    out = torch.empty_like(q)
    for plan in plans:
        out[plan.tok_start:plan.tok_end] = _attend_group(q[plan.tok_start:plan.tok_end], k_cache, v_cache, plan,
                                                         scale, clean, softcap, scales)
    return out


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
                          softcap: float) -> torch.Tensor:
    """What SDPA computes, with each scaled score soft-capped first: ``q [B, Hq, Lq, D]``,
    ``k``/``v`` ``[B, Hkv, Lk, D]`` (query head ``h`` reads KV head ``h // (Hq / Hkv)``), ``allowed``
    broadcastable to ``[B, Hq, Lq, Lk]``.  transformers' order: scale, ``/ cap``, tanh, ``* cap``,
    mask, softmax."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores.masked_fill_(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class _GroupPlan:
    """Everything about one group of sequences that is the same in every layer."""

    def __init__(self, tok_start: int, block_tables: torch.Tensor, query_lens: list[int], seq_lens: list[int],
                 block_size: int, window: int | None, device: torch.device) -> None:
        bsz, max_q, max_ctx = len(query_lens), max(query_lens), max(seq_lens)
        self.tok_start = tok_start
        self.tok_end = tok_start + sum(query_lens)
        self.bsz, self.max_q = bsz, max_q
        self.query_lens, self.seq_lens = query_lens, seq_lens
        ql = torch.tensor(query_lens, device=device)
        sl = torch.tensor(seq_lens, device=device)
        # Whole pages are gathered (one index_select of [bs, Hkv, D] rows: ~5x faster on a CPU
        # than indexing token slots), so the context is padded to a page multiple.
        num_pages = -(-max_ctx // block_size)
        self.ctx = num_pages * block_size
        self.pages = block_tables[:, :num_pages].reshape(-1).long()  # [B * num_pages]
        k_pos = torch.arange(self.ctx, device=device)
        jq = torch.arange(max_q, device=device)
        q_pos = (sl - ql)[:, None, None] + jq[None, :, None]  # [B, max_q, 1]
        mask = (k_pos <= q_pos) & (k_pos < sl[:, None, None])
        if window is not None:
            mask &= (q_pos - k_pos) < window
        self.allowed = mask[:, None]  # [B, 1, max_q, ctx]: True where a query may attend
        # Decodes pass the mask as the additive bias SDPA would otherwise build from it in
        # every layer (0 where allowed, -inf elsewhere): [B, 1, 1, ctx], built once per step.
        self.bias: torch.Tensor | None = None
        if max_q == 1:
            self.bias = torch.zeros(self.allowed.shape, dtype=torch.float32, device=device)
            self.bias.masked_fill_(~self.allowed, float("-inf"))
        # A query run that is a whole sequence (no cached context) under no binding window is
        # plain causal attention: SDPA's ``is_causal`` needs no mask and skips the blocks
        # above the diagonal.
        self.plain_causal = [ql == sl and (window is None or window >= sl) for ql, sl in zip(query_lens, seq_lens)]
        # Slots past a sequence's end (and window-released blocks, which read block 0) hold
        # whatever was there before: masking gives them weight 0, but 0 * NaN is NaN, so
        # gathered keys and values there are cleared (unless the caches are known finite).
        lowest = (sl - ql - window + 1).clamp(min=0) if window is not None else torch.zeros_like(sl)
        readable = (k_pos[None, :] < sl[:, None]) & (k_pos[None, :] >= lowest[:, None])
        self.unreadable = ~readable[:, :, None, None]  # [B, ctx, 1, 1]


def _make_plans(block_tables: torch.Tensor, query_lens: list[int], seq_lens: list[int], block_size: int,
                window: int | None, device: torch.device) -> list[_GroupPlan]:
    """Split the batch into runs of decodes vs. longer queries so short queries are not padded
    to long ones; one plan per run."""
    plans = []
    i, tok, b = 0, 0, len(query_lens)
    while i < b:
        j = i
        is_decode = query_lens[i] == 1
        while j < b and (query_lens[j] == 1) == is_decode:
            j += 1
        plans.append(_GroupPlan(tok, block_tables[i:j], query_lens[i:j], seq_lens[i:j], block_size, window, device))
        tok = plans[-1].tok_end
        i = j
    return plans


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _GroupPlan,
                  scale: float, clean: bool, softcap: float | None = None,
                  scales: KVScales | None = None) -> torch.Tensor:
    _, _, hkv, d = k_cache.shape
    hq = q.shape[1]
    bsz = plan.bsz
    # [B, ctx, Hkv, D]: one gather of pages through the page table, in fp32 (fp8: dequantized)
    keys = dequantize(gather_pages(k_cache, plan.pages), None if scales is None else scales.k)
    vals = dequantize(gather_pages(v_cache, plan.pages), None if scales is None else scales.v)
    keys, vals = keys.view(bsz, plan.ctx, hkv, d), vals.view(bsz, plan.ctx, hkv, d)
    if clean:
        # SDPA adds the mask to the scores and multiplies probabilities into the values, so
        # NaN in a slot it must not read would still poison the output.
        keys.masked_fill_(plan.unreadable, 0.0)
        vals.masked_fill_(plan.unreadable, 0.0)
    # PyTorch's fused SDPA in fp32 (GQA without repeating K/V, scores never materialised): on a
    # CPU 2x faster than an explicit masked softmax for decodes, 1.5x for prefill.
    if softcap is not None:
        return _attend_group_softcapped(q, keys, vals, plan, scale, softcap)
    if plan.max_q == 1:
        out = F.scaled_dot_product_attention(
            q.float().view(bsz, hq, 1, d), keys.transpose(1, 2), vals.transpose(1, 2),
            attn_mask=plan.bias, scale=scale, enable_gqa=True)
        return out.view(bsz, hq, d).to(q.dtype)
    # Longer queries one sequence at a time, so none is padded to the longest.
    out = torch.empty_like(q)
    start = 0
    for b, (ql, sl) in enumerate(zip(plan.query_lens, plan.seq_lens)):
        # 4-D operands: with 3-D ones SDPA falls back to its (1.5x slower) math path on a CPU.
        causal = plan.plain_causal[b]
        o = F.scaled_dot_product_attention(
            q[None, start:start + ql].float().transpose(1, 2), keys[b:b + 1, :sl].transpose(1, 2),
            vals[b:b + 1, :sl].transpose(1, 2), attn_mask=None if causal else plan.allowed[b:b + 1, :, :ql, :sl],
            is_causal=causal, scale=scale, enable_gqa=True)  # [1, Hq, ql, D]
        out[start:start + ql] = o[0].transpose(0, 1)
        start += ql
    return out


def _attend_group_softcapped(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, plan: _GroupPlan,
                             scale: float, softcap: float) -> torch.Tensor:
    """:func:`_attend_group` with soft-capped scores, from the gathered ``keys``/``vals`` ``[B, ctx, Hkv, D]``."""
    bsz, d = plan.bsz, q.shape[-1]
    if plan.max_q == 1:
        out = _softcapped_attention(q.float().view(bsz, -1, 1, d), keys.transpose(1, 2), vals.transpose(1, 2),
                                    plan.allowed, scale, softcap)
        return out.view(bsz, -1, d).to(q.dtype)
    out = torch.empty_like(q)
    start = 0
    for b, (ql, sl) in enumerate(zip(plan.query_lens, plan.seq_lens)):
        o = _softcapped_attention(q[None, start:start + ql].float().transpose(1, 2), keys[b:b + 1, :sl].transpose(1, 2),
                                  vals[b:b + 1, :sl].transpose(1, 2), plan.allowed[b:b + 1, :, :ql, :sl], scale,
                                  softcap)  # [1, Hq, ql, D]
        out[start:start + ql] = o[0].transpose(0, 1)
        start += ql
    return out


@dataclass
class _StepPlans(BackendState):
    """A step's gather indices and masks, per sliding window (they depend only on the batch and
    the window), made by the first layer with that window and shared by the others."""

    by_window: dict[int | None, list[_GroupPlan]] = field(default_factory=dict)


class TorchReferenceBackend(AttentionBackend[_StepPlans]):
    """The CPU backend (also correct on CUDA, just slower than the Triton kernels).

    ``finite_cache=True`` promises that every slot of the caches it is given holds a finite
    number (the engine's zero-initialised KV pool does), which lets it skip clearing the
    slots it gathers but must not read -- ~8% of a CPU decode step.
    """

    name = "torch"

    def __init__(self, finite_cache: bool = False) -> None:
        self.finite_cache = finite_cache

    def prepare(self, meta: AttentionMetadata) -> _StepPlans:
        return _StepPlans(self)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scales: KVScales | None = None) -> None:
        store_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping, *(scales or (None, None)))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               layer: AttentionLayerSpec, scales: KVScales | None = None) -> torch.Tensor:
        plans = self.step_state(meta).by_window
        window = layer.sliding_window
        if window not in plans:
            plans[window] = _make_plans(meta.block_tables, meta.query_lens_cpu, meta.seq_lens_cpu, k_cache.shape[1],
                                        window, q.device)
        return _attend_planned(q, k_cache, v_cache, plans[window], layer.scale, not self.finite_cache,
                               layer.logit_softcap, scales)
