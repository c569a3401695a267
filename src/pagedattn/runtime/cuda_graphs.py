"""CUDA graphs for decode steps.

A decode step of a small model is dozens of short kernels per layer; launching them from
Python costs more than running them.  We capture one graph per batch-size bucket (largest
first, sharing one memory pool) over static input buffers, and replay the smallest bucket
that fits, after copying the step's inputs (its :class:`HostBatch`, the same host arrays an
eager step uploads) into those buffers from pinned host memory.
Padding rows store nothing (slot -1) and attend to nothing (seq_len 0).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata, HostBatch
from ..models.context import ForwardContext
from ..models.interface import CausalLM

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, every 16 up to 512 (vLLM's ladder), then every 64 up to ``max_batch``: above
    512 rows a bucket pads a batch by under 12.5%, and each one captured costs start-up time."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, min(max_batch, 513), 16))
    sizes += [*range(576, max_batch, 64), max_batch]
    return sorted(set(sizes))


class DecodeStaging:
    """Host buffers a decode step's inputs are written into, then copied to the graphs' static
    buffers with non-blocking transfers of contiguous rows (pinned on CUDA).  Two sets, used in
    turn: with overlapped steps the CPU fills one while the previous step's transfers from the
    other may still be queued."""

    def __init__(self, max_batch: int, width: int, pin: bool) -> None:
        self._sets = [
            (torch.zeros(3, max_batch, dtype=torch.long, pin_memory=pin),  # token ids, positions, slots
             torch.zeros(max_batch, dtype=torch.int32, pin_memory=pin),  # seq_lens
             torch.zeros(max_batch, width, dtype=torch.int32, pin_memory=pin))  # block tables
            for _ in range(2)
        ]
        self._turn = 0

    def fill(self, batch: HostBatch, tokens: list[int] | None,
             bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next set, holding ``batch`` in its first rows and padding up to ``bucket``.
        ``tokens`` None: the ids row is left as it is (the caller copies device ids over it)."""
        packed_t, lens_t, tables_t = self._sets[self._turn]
        self._turn ^= 1
        n = batch.num_seqs
        packed, lens = packed_t.numpy(), lens_t.numpy()
        if tokens is not None:
            packed[0, :n] = tokens
        packed[1, :n] = batch.positions
        packed[2, :n] = batch.slots
        packed[:, n:bucket] = 0
        packed[2, n:bucket] = -1  # padding rows store nothing ...
        lens[:n] = batch.seq_lens
        lens[n:bucket] = 0  # ... and attend to nothing
        # Entries past a row's table are never read: window-released ones (-1) become block 0,
        # columns past this step's widest table keep whatever an earlier step left there.
        np.maximum(batch.block_tables, 0, out=tables_t.numpy()[:n, :batch.block_tables.shape[1]])
        return packed_t, lens_t, tables_t


class DecodeGraphs:
    def __init__(self, model: CausalLM, backend: AttentionBackend,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_batch: int, max_blocks_per_seq: int,
                 max_seq_len: int, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = kv_caches[0][0].shape[1]
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.width = max_blocks_per_seq
        self.max_seq_len = max_seq_len
        mb, w = self.max_batch, max_blocks_per_seq
        # Device-side static inputs (graphs read these addresses on every replay).  Token ids,
        # positions and slots are rows of one tensor so a step's inputs arrive in one transfer.
        self._packed = torch.zeros(3, mb, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slots = self._packed[0], self._packed[1], self._packed[2]
        self.seq_lens = torch.zeros(mb, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(mb, w, dtype=torch.int32, device=device)
        self.qsl = torch.arange(mb + 1, dtype=torch.int32, device=device)
        self.staging = DecodeStaging(mb, w, pin=device.type == "cuda")
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # per bucket, one per backend variant
        self.logits: dict[int, torch.Tensor] = {}
        # Per bucket, a second small graph: the greedy tokens of the logits (with tensor
        # parallelism the per-rank maxima and their exchange), replayed only for greedy steps.
        self.greedy: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None  # torch's graph memory-pool handle, shared by every capture

    # ------------------------------------------------------------------ what a graph records
    def init_backend(self) -> int:
        """Let the backend allocate what the captured steps share; returns its variant count.
        The layer with the widest window sizes it: a sliding first layer (Gemma's) would cap the
        split count of the global layers' long contexts."""
        layer = max(self.model.attention_specs(), key=lambda s: s.sliding_window or float("inf"))
        return self.backend.init_cuda_graphs(self.max_batch, self.max_seq_len, self.block_size, layer, self.device)

    def context(self, b: int, variant: int) -> ForwardContext:
        """The forward context of bucket ``b``'s graph ``variant``: metadata over the static buffers,
        with the backend's state of a captured step."""
        meta = AttentionMetadata(
            slot_mapping=self.slots[:b], query_start_loc=self.qsl[: b + 1], seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b], max_query_len=1, max_seq_len=self.max_seq_len, num_decodes=b,
            query_lens_cpu=[1] * b, seq_lens_cpu=[self.max_seq_len] * b, block_size=self.block_size,
        )
        self.backend.prepare_for_capture(meta, variant)
        return ForwardContext(meta, self.kv_caches, self.backend)

    def step_logits(self, b: int, ctx: ForwardContext) -> torch.Tensor:
        """The step a graph of bucket ``b`` records: the forward pass over the static inputs, to
        this rank's vocabulary slice of the logits (the runner gathers it, or reduces it to the
        greedy tokens, outside the graph: tensor parallelism)."""
        return self.model.compute_logits(self.model(self.input_ids[:b], self.positions[:b], ctx), gather=False)

    # ------------------------------------------------------------------ capture
    @torch.inference_mode()
    def capture(self) -> None:
        variants = self.init_backend()
        torch.cuda.synchronize(self.device)
        for b in reversed(self.buckets):
            self.graphs[b] = [self._capture(b, variant) for variant in range(variants)]
            self.greedy[b] = self._capture_greedy(self.logits[b])
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def _capture(self, b: int, variant: int) -> torch.cuda.CUDAGraph:
        ctx = self.context(b, variant)
        self.step_logits(b, ctx)  # one eager run first: Triton compiles and autotunes outside the capture
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            logits = self.step_logits(b, ctx)
            if variant:  # later variants leave their logits in the first one's buffer
                self.logits[b].copy_(logits)
        if self.pool is None:
            self.pool = g.pool()
        if not variant:
            self.logits[b] = logits
        return g

    def _capture_greedy(self, logits: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.model.greedy_tokens(logits)  # eagerly first: the collective's set-up stays outside the capture
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            tokens = self.model.greedy_tokens(logits)
        return g, tokens

    # ------------------------------------------------------------------ replay
    def fits(self, batch: HostBatch) -> bool:
        return batch.num_seqs <= self.max_batch and batch.block_tables.shape[1] <= self.width

    def load(self, batch: HostBatch, tokens: list[int] | torch.Tensor) -> tuple[int, int]:
        """Put a decode step into the static buffers (enqueued copies, no host wait); returns the
        bucket and the backend's variant to replay.  ``tokens`` may be a device tensor (the
        previous step's samples, never seen by the host)."""
        n = batch.num_seqs
        b = next(x for x in self.buckets if x >= n)
        host_ids = None if isinstance(tokens, torch.Tensor) else tokens
        packed, lens, tables = self.staging.fill(batch, host_ids, b)
        # Backend-owned per-step inputs (cascade decode's shared-prefix groups), from the same host arrays.
        variant = self.backend.prepare_for_replay(batch, b)
        self._packed.copy_(packed, non_blocking=True)
        if isinstance(tokens, torch.Tensor):
            self.input_ids[:n].copy_(tokens)
        self.seq_lens[:b].copy_(lens[:b], non_blocking=True)
        self.block_tables[:b].copy_(tables[:b], non_blocking=True)
        return b, variant

    def run(self, batch: HostBatch, tokens: list[int] | torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """Replay the graph for the step's ``n`` decodes; returns logits ``[n, V]`` (with tensor
        parallelism this rank's vocabulary slice), or with ``greedy`` their argmax over the whole
        vocabulary (int64 ``[n]``): a view of graph memory, valid until the next replay of this
        batch size."""
        n = batch.num_seqs
        b, variant = self.load(batch, tokens)
        self.graphs[b][variant].replay()
        if not greedy:
            return self.logits[b][:n]
        tail, ids = self.greedy[b]
        tail.replay()
        return ids[:n]
