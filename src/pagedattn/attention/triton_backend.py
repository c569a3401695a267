"""The GPU attention backend: Triton kernels for KV store, paged decode and paged extend.

``attend`` runs the decode kernel on the leading ``meta.num_decodes`` sequences (one new token
each) and the extend kernel on the rest.  Launch sizes come from the host-side lists in the
metadata only, so a step never synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

from . import triton_ops as ops
from .backend import AttentionBackend, AttentionLayerSpec
from .metadata import AttentionMetadata

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Split heuristic's SM count where there is no CUDA device (the interpreter on a CPU).
_CPU_NUM_SMS = 4


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Hkv, D], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match "
                         f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}")
    if k_cache.dtype not in _DTYPES:
        raise ValueError(f"k_cache dtype must be one of {_DTYPES}, got {k_cache.dtype}")
    bs = k_cache.shape[1]
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"k_cache block_size must be a power of two, got {bs}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache must be contiguous in head_dim")


class TritonBackend(AttentionBackend):
    """Paged attention through Triton kernels (CUDA, or the Triton interpreter for tests).

    ``decode_splits`` forces the split-KV count of eager decode steps (tests, benchmarks);
    by default it is chosen from batch size, context length and the GPU's SM count.
    """

    name = "triton"

    def __init__(self, decode_splits: int | None = None) -> None:
        if decode_splits is not None and not 1 <= decode_splits <= ops.decode.MAX_SPLITS:
            raise ValueError(f"decode_splits must be in 1..{ops.decode.MAX_SPLITS}, got {decode_splits}")
        self.decode_splits = decode_splits
        # CUDA-graph state (see AttentionBackend's contract).
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graph_layer: AttentionLayerSpec | None = None
        self._graph_max_seq_len = 0
        self._graph_batch: int | None = None

    # ------------------------------------------------------------------ store
    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        _check_cache(k_cache, v_cache)
        t = meta.num_tokens
        want = (t, k_cache.shape[2], k_cache.shape[3])
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k/v must be [T, Hkv, D] = {want}, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            raise ValueError("k/v must be contiguous in head_dim")
        if meta.slot_mapping.dtype != torch.int64:
            raise ValueError(f"slot_mapping must be int64, got {meta.slot_mapping.dtype}")
        ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    # ------------------------------------------------------------------ attend
    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, layer: AttentionLayerSpec) -> torch.Tensor:
        self._check_attend(q, k_cache, v_cache, meta, layer)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self._decode(q, k_cache, v_cache, meta, layer, out)
        if nd < meta.num_seqs:
            ops.extend_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                layer.scale, layer.sliding_window, out,
                seq_offset=nd, num_seqs=meta.num_seqs - nd, max_query_len=max(meta.query_lens_cpu[nd:]),
            )
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                layer: AttentionLayerSpec, out: torch.Tensor) -> None:
        nd = meta.num_decodes
        workspace = None
        if self._graph_batch is not None:
            if not nd == meta.num_seqs == self._graph_batch:
                raise ValueError(f"a captured step must be {self._graph_batch} decodes, got num_decodes={nd} "
                                 f"of {meta.num_seqs} sequences")
            splits = self._graph_splits(layer)
            workspace = self._workspace
        elif self.decode_splits is not None:
            splits = self.decode_splits
        else:
            ctx = max(meta.seq_lens_cpu[:nd])
            if layer.sliding_window is not None:
                ctx = min(ctx, layer.sliding_window)
            splits = ops.choose_num_splits(nd, layer.num_kv_heads, ctx, _num_sms(q.device))
        ops.decode_attention(
            q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
            layer.scale, layer.sliding_window, out[:nd], splits, workspace=workspace,
        )

    @staticmethod
    def _check_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      layer: AttentionLayerSpec) -> None:
        _check_cache(k_cache, v_cache)
        want = (meta.num_tokens, layer.num_heads, layer.head_dim)
        if tuple(q.shape) != want:
            raise ValueError(f"q must be [T, Hq, D] = {want}, got {tuple(q.shape)}")
        if q.dtype not in _DTYPES:
            raise ValueError(f"q dtype must be one of {_DTYPES}, got {q.dtype}")
        if q.stride(-1) != 1:
            raise ValueError("q must be contiguous in head_dim")
        if tuple(k_cache.shape[2:]) != (layer.num_kv_heads, layer.head_dim):
            raise ValueError(f"k_cache heads/head_dim {tuple(k_cache.shape[2:])} do not match layer "
                             f"({layer.num_kv_heads}, {layer.head_dim})")
        if len(meta.query_lens_cpu) != meta.num_seqs or meta.query_start_loc.shape[0] != meta.num_seqs + 1:
            raise ValueError("query_lens_cpu / query_start_loc do not match seq_lens_cpu")
        if not 0 <= meta.num_decodes <= meta.num_seqs:
            raise ValueError(f"num_decodes {meta.num_decodes} out of range 0..{meta.num_seqs}")

    # ------------------------------------------------------------------ CUDA graphs
    def supports_cuda_graphs(self) -> bool:
        return True

    def prepare_graph_capture(self, max_batch_size: int, max_seq_len: int, layer: AttentionLayerSpec,
                              device: torch.device | str) -> None:
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch_size, max_seq_len must be >= 1, got {max_batch_size}, {max_seq_len}")
        self._graph_layer = layer
        self._graph_max_seq_len = max_seq_len
        device = torch.device(device)
        # The most splits any bucket uses is the smallest bucket's (batch 1).
        s = ops.choose_num_splits(1, layer.num_kv_heads, self._graph_context(layer), _num_sms(device))
        shape = (max_batch_size, layer.num_heads, s)
        self._workspace = (torch.empty(*shape, layer.head_dim, dtype=torch.float32, device=device),
                           torch.empty(*shape, dtype=torch.float32, device=device))

    @contextmanager
    def graph_capture(self, batch_size: int) -> Iterator[None]:
        if self._workspace is None:
            raise ValueError("graph_capture needs prepare_graph_capture first")
        if not 1 <= batch_size <= self._workspace[0].shape[0]:
            raise ValueError(f"batch_size {batch_size} outside 1..{self._workspace[0].shape[0]} prepared")
        self._graph_batch = batch_size
        try:
            yield
        finally:
            self._graph_batch = None

    def _graph_context(self, layer: AttentionLayerSpec) -> int:
        ctx = self._graph_max_seq_len
        return min(ctx, layer.sliding_window) if layer.sliding_window is not None else ctx

    def _graph_splits(self, layer: AttentionLayerSpec) -> int:
        assert self._graph_batch is not None and self._workspace is not None
        prepared = self._graph_layer
        if prepared is None or (layer.num_heads, layer.num_kv_heads, layer.head_dim) != (
                prepared.num_heads, prepared.num_kv_heads, prepared.head_dim):
            raise ValueError(f"layer {layer} does not match the prepared graph layer {prepared}")
        splits = ops.choose_num_splits(self._graph_batch, layer.num_kv_heads, self._graph_context(layer),
                                       _num_sms(self._workspace[0].device))
        return min(splits, self._workspace[0].shape[2])
