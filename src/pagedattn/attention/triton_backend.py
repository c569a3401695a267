"""The GPU attention backend: Triton kernels for KV store, paged decode and paged extend.

``attend`` runs the decode kernel on the leading ``meta.num_decodes`` sequences (one new token
each) and the extend kernel on the rest.  Launch sizes come from the host-side lists in the
metadata only, so a step never synchronises with the device.

Decode rows that share prefix blocks (prefix caching) go through cascade decode (see
``cascade.py``): the groups are found on the host from the step's block tables, their shared
prefix is attended once per group, and each row's own tail by the decode kernel.  Eager steps
plan from ``meta.block_tables_cpu``; captured steps read fixed device buffers that
``prepare_decode_inputs`` refills before every replay.  Sliding-window layers never use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from ..envs import switches
from . import triton_ops as ops
from .backend import AttentionBackend, AttentionLayerSpec
from .cascade import (
    CascadeConfig,
    CascadePlan,
    PackedLayout,
    build_plan,
    max_work_items,
    pack_plan,
    plan_signature,
    plan_still_holds,
)
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


# Captured-step variants (see AttentionBackend's graph contract).
PLAIN_VARIANT, CASCADE_VARIANT = 0, 1


@dataclass
class _GraphCascade:
    """Cascade buffers of captured decode steps: one device buffer the cascade variant of the
    graphs reads, refilled before a replay from two pinned staging buffers used in turn (the
    CPU fills one while the previous copy from the other may still be queued)."""

    layout: PackedLayout
    device: torch.Tensor  # [layout.size] int32
    staging: list[torch.Tensor]
    inputs: ops.CascadeInputs  # views of ``device``
    gqa: int
    turn: int = 0
    # The active plan the device buffer holds and its signature (reused while it still holds:
    # see cascade.plan_still_holds).
    plan: CascadePlan | None = None
    signature: np.ndarray | None = None


def _cascade_from_env() -> bool:
    """``PAGEDATTN_DISABLE_CASCADE=1`` turns cascade decode off (A/B benchmarks)."""
    return not switches().disable_cascade


class TritonBackend(AttentionBackend):
    """Paged attention through Triton kernels (CUDA, or the Triton interpreter for tests).

    ``decode_splits`` forces the split-KV count of eager decode steps (tests, benchmarks);
    by default it is chosen from batch size, context length and the GPU's SM count.
    ``cascade``: shared-prefix decode with the default thresholds (True, unless the environment
    sets ``PAGEDATTN_DISABLE_CASCADE=1``), with these (a ``CascadeConfig``), or off (False).
    """

    name = "triton"

    def __init__(self, decode_splits: int | None = None, cascade: bool | CascadeConfig | None = None,
                 prefix_config: ops.PrefixConfig | None = None) -> None:
        if decode_splits is not None and not 1 <= decode_splits <= ops.decode.MAX_SPLITS:
            raise ValueError(f"decode_splits must be in 1..{ops.decode.MAX_SPLITS}, got {decode_splits}")
        if cascade is not None and not isinstance(cascade, (bool, CascadeConfig)):
            raise ValueError(f"cascade must be a bool or a CascadeConfig, got {cascade!r}")
        self.decode_splits = decode_splits
        if cascade is None:
            cascade = _cascade_from_env()
        self.cascade: CascadeConfig | None = (CascadeConfig() if cascade is True else cascade) or None
        self.prefix_config = prefix_config
        # CUDA-graph state (see AttentionBackend's contract).
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graph_layer: AttentionLayerSpec | None = None
        self._graph_max_seq_len = 0
        self._graph_tail_slots = 0  # workspace slots for the splits' partials
        self._graph_batch: int | None = None
        self._graph_variant = PLAIN_VARIANT
        self._graph_cascade: _GraphCascade | None = None
        self._graph_page: int | None = None

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
        cascade = None
        if self._graph_batch is not None:
            if not nd == meta.num_seqs == self._graph_batch:
                raise ValueError(f"a captured step must be {self._graph_batch} decodes, got num_decodes={nd} "
                                 f"of {meta.num_seqs} sequences")
            splits = self._graph_splits(layer)
            workspace = self._workspace
            if self._graph_variant == CASCADE_VARIANT and layer.sliding_window is None:
                assert self._graph_cascade is not None
                cascade = self._graph_cascade.inputs
                self._graph_page = k_cache.shape[1]
        else:
            planned = self._eager_cascade(meta, layer, k_cache.shape[1], q.device)
            if planned is not None:
                cascade, ctx = planned
            else:
                ctx = max(meta.seq_lens_cpu[:nd])
            if layer.sliding_window is not None:
                ctx = min(ctx, layer.sliding_window)
            splits = self.decode_splits or ops.choose_num_splits(nd, layer.num_kv_heads, ctx, _num_sms(q.device))
        ops.decode_attention(
            q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
            layer.scale, layer.sliding_window, out[:nd], splits, workspace=workspace,
            cascade=cascade, prefix_config=self.prefix_config,
        )

    def _eager_cascade(self, meta: AttentionMetadata, layer: AttentionLayerSpec, page: int,
                       device: torch.device) -> tuple[ops.CascadeInputs, int] | None:
        """This step's cascade inputs on the device and the longest own tail, or None when no
        group qualifies.  Planned once per step (the first layer that asks) and kept in
        ``meta.scratch`` for the other layers."""
        cfg = self.cascade
        if cfg is None or layer.sliding_window is not None or meta.block_tables_cpu is None:
            return None
        gqa = layer.num_heads // layer.num_kv_heads
        key = ("cascade", page, gqa, layer.num_kv_heads)
        if key not in meta.scratch:
            meta.scratch[key] = self._plan_eager(meta, page, gqa, layer.num_kv_heads, device, cfg)
        return meta.scratch[key]

    @staticmethod
    def _plan_eager(meta: AttentionMetadata, page: int, gqa: int, num_kv_heads: int, device: torch.device,
                    cfg: CascadeConfig) -> tuple[ops.CascadeInputs, int] | None:
        nd = meta.num_decodes
        assert meta.block_tables_cpu is not None
        lens = np.asarray(meta.seq_lens_cpu[:nd], dtype=np.int64)
        max_items = max_work_items(nd, gqa, num_kv_heads, _num_sms(device), cfg)
        plan = build_plan(meta.block_tables_cpu[:nd], lens, page, gqa, max_items, cfg)
        if not plan.active:
            return None
        layout = PackedLayout(nd, plan.num_items)
        packed = torch.from_numpy(pack_plan(plan, layout)).to(device, non_blocking=True)
        return _cascade_inputs(packed, layout, plan.max_parts, cfg), int((lens - plan.tail_start).max())

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
        self._graph_tail_slots = s
        self._graph_cascade = None
        slots = s
        if self.cascade is not None:
            self._graph_cascade = self._prepare_graph_cascade(max_batch_size, layer, device, self.cascade)
            slots = ops.cascade_slots(s, self.cascade.max_chunks)  # splits' partials, then prefix partials
        shape = (max_batch_size, layer.num_heads, slots)
        self._workspace = (torch.empty(*shape, layer.head_dim, dtype=torch.float32, device=device),
                           torch.empty(*shape, dtype=torch.float32, device=device))

    @staticmethod
    def _prepare_graph_cascade(max_batch_size: int, layer: AttentionLayerSpec, device: torch.device,
                               cfg: CascadeConfig) -> _GraphCascade:
        gqa = layer.num_heads // layer.num_kv_heads
        items = max_work_items(max_batch_size, gqa, layer.num_kv_heads, _num_sms(device), cfg)
        layout = PackedLayout(max_batch_size, items)
        buf = torch.zeros(layout.size, dtype=torch.int32, device=device)  # zeros: no groups
        pin = device.type == "cuda"
        staging = [torch.zeros(layout.size, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        return _GraphCascade(layout, buf, staging, _cascade_inputs(buf, layout, cfg.max_chunks, cfg), gqa)

    def graph_variants(self) -> int:
        """With cascade on, two: the plain decode (replayed when no group qualifies, so steps
        without shared prefixes run exactly the kernels they ran without cascade) and cascade
        decode."""
        return 2 if self._graph_cascade is not None else 1

    def prepare_decode_inputs(self, block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int,
                              batch_size: int) -> int:
        """Plan the step's shared-prefix groups; when some qualify, copy them into the cascade
        variant's buffers (one non-blocking transfer, none while the previous plan still holds)
        and return that variant, else the plain one."""
        gc = self._graph_cascade
        if gc is None:
            return PLAIN_VARIANT
        n = len(seq_lens)
        if not n <= batch_size <= gc.layout.rows:
            raise ValueError(f"batch_size {batch_size} must hold the {n} rows and be <= {gc.layout.rows} prepared")
        if self._graph_page is not None and block_size != self._graph_page:
            raise ValueError(f"block_size {block_size} differs from the captured caches' {self._graph_page}")
        assert self.cascade is not None
        if gc.plan is not None and gc.signature is not None and plan_still_holds(
                gc.plan, gc.signature, block_tables, seq_lens):
            return CASCADE_VARIANT
        plan = build_plan(block_tables, seq_lens, block_size, gc.gqa, gc.layout.items, self.cascade)
        gc.plan, gc.signature = None, None
        if not plan.active:
            return PLAIN_VARIANT  # the plain variant reads none of the cascade buffers
        host = gc.staging[gc.turn]
        gc.turn ^= 1
        pack_plan(plan, gc.layout, host.numpy())
        gc.device.copy_(host, non_blocking=True)
        gc.plan, gc.signature = plan, plan_signature(plan, block_tables, seq_lens, block_size)
        return CASCADE_VARIANT

    @contextmanager
    def graph_capture(self, batch_size: int, variant: int = PLAIN_VARIANT) -> Iterator[None]:
        if self._workspace is None:
            raise ValueError("graph_capture needs prepare_graph_capture first")
        if not 1 <= batch_size <= self._workspace[0].shape[0]:
            raise ValueError(f"batch_size {batch_size} outside 1..{self._workspace[0].shape[0]} prepared")
        if not 0 <= variant < self.graph_variants():
            raise ValueError(f"variant {variant} outside 0..{self.graph_variants() - 1}")
        self._graph_batch, self._graph_variant = batch_size, variant
        try:
            yield
        finally:
            self._graph_batch, self._graph_variant = None, PLAIN_VARIANT

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
        return min(splits, self._graph_tail_slots)


def _cascade_inputs(packed: torch.Tensor, layout: PackedLayout, max_parts: int,
                    cfg: CascadeConfig) -> ops.CascadeInputs:
    """Device views of a packed plan (``cascade.pack_plan``'s layout)."""
    tail, parts, members, work = layout.views(packed)
    return ops.CascadeInputs(tail, parts, members, work, max(1, max_parts), cfg.block_m)
