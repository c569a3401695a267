"""Pure-PyTorch paged attention: the CPU backend and the oracle for every GPU kernel.

Vectorised over sequences: K/V are gathered through the block tables with one indexing op,
queries of a group of sequences are padded to the longest, and one masked softmax (in fp32)
handles causality, ragged context lengths and sliding windows.  Decodes (one query each) and
prefill/extend sequences are run as separate groups so short queries are not padded to long
ones.  No Python loop over tokens or blocks.
"""

from __future__ import annotations

import torch

from .backend import AttentionBackend, AttentionLayerSpec
from .metadata import AttentionMetadata

# Upper bound on elements of one score tensor; larger groups are processed in query chunks
# so a long prefill on the CPU does not allocate gigabytes of scores at once.
_MAX_SCORE_ELEMS = 1 << 26


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """One scatter per tensor: ``cache.view(N*bs, H, D)[slot_mapping] = k``."""
    n, bs, h, d = k_cache.shape
    k_cache.view(n * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(n * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    query_lens: list[int],
    seq_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of each sequence's new tokens over its paged context (causal).

    Sequence ``i``'s queries are the last ``query_lens[i]`` positions of its ``seq_lens[i]``
    tokens; their K/V must already be in the cache.  Returns ``[T, Hq, D]`` in ``q.dtype``.
    """
    out = torch.empty_like(q)
    start = 0
    i = 0
    b = len(query_lens)
    # Contiguous runs of decodes vs. longer queries, each run batched.
    while i < b:
        j = i
        is_decode = query_lens[i] == 1
        while j < b and (query_lens[j] == 1) == is_decode:
            j += 1
        n_tok = sum(query_lens[i:j])
        out[start:start + n_tok] = _attend_group(
            q[start:start + n_tok], k_cache, v_cache, block_tables[i:j], query_lens[i:j], seq_lens[i:j],
            scale, sliding_window,
        )
        start += n_tok
        i = j
    return out


def _attend_group(q, k_cache, v_cache, block_tables, query_lens, seq_lens, scale, window):
    device = q.device
    _, bs, hkv, d = k_cache.shape
    hq = q.shape[1]
    g = hq // hkv
    bsz = len(query_lens)
    max_q = max(query_lens)
    max_ctx = max(seq_lens)
    n_blk = -(-max_ctx // bs)
    # Gather K/V through the page table: [B, n_blk, bs, Hkv, D] -> [B, ctx, Hkv, D].
    bt = block_tables[:, :n_blk].long()
    keys = k_cache[bt].reshape(bsz, n_blk * bs, hkv, d)[:, :max_ctx].float()
    vals = v_cache[bt].reshape(bsz, n_blk * bs, hkv, d)[:, :max_ctx].float()

    ql = torch.tensor(query_lens, device=device)
    sl = torch.tensor(seq_lens, device=device)
    starts = torch.cumsum(ql, 0) - ql
    jq = torch.arange(max_q, device=device)
    valid_q = jq[None, :] < ql[:, None]  # [B, max_q]
    tok_idx = (starts[:, None] + jq[None, :]).clamp(max=q.shape[0] - 1)
    q_pad = q[tok_idx].float().view(bsz, max_q, hkv, g, d)  # [B, max_q, Hkv, G, D]
    q_pos = (sl - ql)[:, None] + jq[None, :]  # [B, max_q]
    k_pos = torch.arange(max_ctx, device=device)
    # Slots past a sequence's end (and window-released blocks, which read block 0) hold
    # whatever was there before: masked scores give them weight 0, but 0 * NaN is NaN, so the
    # values themselves must be cleared.
    lowest = (sl - ql - window + 1).clamp(min=0) if window is not None else torch.zeros_like(sl)
    readable = (k_pos[None, :] < sl[:, None]) & (k_pos[None, :] >= lowest[:, None])  # [B, ctx]
    vals = torch.where(readable[:, :, None, None], vals, 0.0)

    out = torch.empty(bsz, max_q, hkv, g, d, dtype=torch.float32, device=device)
    per_q = bsz * hq * max_ctx
    chunk = max(1, _MAX_SCORE_ELEMS // max(per_q, 1))
    for c0 in range(0, max_q, chunk):
        c1 = min(max_q, c0 + chunk)
        s = torch.einsum("bqhgd,bkhd->bhgqk", q_pad[:, c0:c1], keys) * scale
        qp = q_pos[:, c0:c1, None]  # [B, C, 1]
        mask = (k_pos[None, None, :] <= qp) & (k_pos[None, None, :] < sl[:, None, None])
        if window is not None:
            mask &= (qp - k_pos[None, None, :]) < window
        s.masked_fill_(~mask[:, None, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.nan_to_num(p, nan=0.0)  # padded query rows are fully masked
        out[:, c0:c1] = torch.einsum("bhgqk,bkhd->bqhgd", p, vals)
    return out.view(bsz, max_q, hq, d)[valid_q].to(q.dtype)


class TorchReferenceBackend(AttentionBackend):
    """The CPU backend (also correct on CUDA, just slower than the Triton kernels)."""

    name = "torch"

    def store_kv(self, k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
        store_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, layer: AttentionLayerSpec) -> torch.Tensor:
        return paged_attention_ref(
            q, k_cache, v_cache, meta.block_tables, meta.query_lens_cpu, meta.seq_lens_cpu,
            layer.scale, layer.sliding_window,
        )
