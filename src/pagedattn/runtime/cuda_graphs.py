"""CUDA graphs for decode steps.

A decode step of a small model is dozens of short kernels per layer; launching them from
Python costs more than running them.  We capture one graph per batch-size bucket (largest
first, sharing one memory pool) over static input buffers, and replay the smallest bucket
that fits, after copying the step's inputs into those buffers from pinned host memory.
Padding rows store nothing (slot -1) and attend to nothing (seq_len 0).
"""

from __future__ import annotations

import logging
from itertools import chain
from typing import Any

import numpy as np
import torch

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata
from ..models.context import ForwardContext
from ..models.interface import CausalLM

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, every 16 up to 512 (vLLM's ladder), then every 64 up to ``max_batch``: above
    512 rows a bucket pads a batch by under 12.5%, and each one captured costs start-up time."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, min(max_batch, 513), 16))
    sizes += [*range(576, max_batch, 64), max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: CausalLM, backend: AttentionBackend,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_batch: int, max_blocks_per_seq: int,
                 max_seq_len: int, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.device = device
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
        # Pinned host staging, copied with non-blocking transfers of contiguous rows.  Two sets,
        # used in turn: with overlapped steps the CPU fills one while the previous step's
        # transfers from the other may still be queued.
        self._staging = [
            (torch.zeros(3, mb, dtype=torch.long, pin_memory=True),
             torch.zeros(mb, dtype=torch.int32, pin_memory=True),
             torch.zeros(mb, w, dtype=torch.int32, pin_memory=True))
            for _ in range(2)
        ]
        self._turn = 0
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # per bucket, one per backend variant
        self.logits: dict[int, torch.Tensor] = {}
        # Per bucket, a second small graph: the greedy tokens of the logits (with tensor
        # parallelism the per-rank maxima and their exchange), replayed only for greedy steps.
        self.greedy: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None  # torch's graph memory-pool handle, shared by every capture

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b], query_start_loc=self.qsl[: b + 1], seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b], max_query_len=1, max_seq_len=self.max_seq_len, num_decodes=b,
            query_lens_cpu=[1] * b, seq_lens_cpu=[self.max_seq_len] * b,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        layer = self.model.attention_specs()[0]
        self.backend.prepare_graph_capture(self.max_batch, self.max_seq_len, layer, self.device)
        torch.cuda.synchronize(self.device)
        for b in reversed(self.buckets):
            ctx = ForwardContext(self._meta(b), self.kv_caches, self.backend)
            self.graphs[b] = []
            for variant in range(self.backend.graph_variants()):
                with self.backend.graph_capture(b, variant):
                    # One eager run first: Triton compiles and autotunes outside the capture.
                    self.model.compute_logits(self.model(self.input_ids[:b], self.positions[:b], ctx), gather=False)
                    torch.cuda.synchronize(self.device)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.pool):
                        # This rank's vocabulary slice: the runner gathers it, or reduces it to
                        # the greedy tokens, outside the graph (tensor parallelism).
                        hidden = self.model(self.input_ids[:b], self.positions[:b], ctx)
                        logits = self.model.compute_logits(hidden, gather=False)
                        if variant:  # later variants leave their logits in the first one's buffer
                            self.logits[b].copy_(logits)
                if self.pool is None:
                    self.pool = g.pool()
                self.graphs[b].append(g)
                if not variant:
                    self.logits[b] = logits
            self.greedy[b] = self._capture_greedy(self.logits[b])
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def _capture_greedy(self, logits: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.model.greedy_tokens(logits)  # eagerly first: the collective's set-up stays outside the capture
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            tokens = self.model.greedy_tokens(logits)
        return g, tokens

    def can_run(self, n: int, max_blocks: int) -> bool:
        return n <= self.max_batch and max_blocks <= self.width

    def run(self, tokens: list[int] | torch.Tensor, positions: np.ndarray, slots: np.ndarray, seq_lens: list[int],
            tables: list[list[int]], greedy: bool = False) -> torch.Tensor:
        """Replay the graph for ``n`` decodes; returns logits ``[n, V]`` (with tensor parallelism
        this rank's vocabulary slice), or with ``greedy`` their argmax over the whole vocabulary
        (int64 ``[n]``): a view of graph memory, valid until the next replay of this batch size.
        ``tokens`` may be a device tensor (the previous step's samples, never seen by the host)."""
        n = len(tables)
        b = next(x for x in self.buckets if x >= n)
        host_t, lens_t, bt_t = self._staging[self._turn]
        self._turn ^= 1
        host = host_t.numpy()
        if not isinstance(tokens, torch.Tensor):
            host[0, :n] = tokens
        host[1, :n] = positions
        host[2, :n] = slots
        host[:, n:b] = 0
        host[2, n:b] = -1  # padding rows store nothing ...
        lens = lens_t.numpy()
        lens[:n] = seq_lens
        lens[n:b] = 0  # ... and attend to nothing
        bt = bt_t.numpy()
        # Scatter the ragged tables in one vectorised assignment.
        sizes = np.fromiter(map(len, tables), dtype=np.int64, count=n)
        flat = np.fromiter(chain.from_iterable(tables), dtype=np.int32, count=int(sizes.sum()))
        rows = np.repeat(np.arange(n), sizes)
        cols = np.arange(flat.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        bt[rows, cols] = np.maximum(flat, 0)  # window-released entries (-1) are never read
        # Backend-owned per-step inputs (cascade decode's shared-prefix groups), planned from the
        # same host arrays; entries of bt past a row's table length are stale and never read.
        variant = self.backend.prepare_decode_inputs(bt[:n], lens[:n], self.kv_caches[0][0].shape[1], b)
        self._packed.copy_(host_t, non_blocking=True)
        if isinstance(tokens, torch.Tensor):
            self.input_ids[:n].copy_(tokens)
        self.seq_lens[:b].copy_(lens_t[:b], non_blocking=True)
        self.block_tables[:b].copy_(bt_t[:b], non_blocking=True)
        self.graphs[b][variant].replay()
        if not greedy:
            return self.logits[b][:n]
        tail, ids = self.greedy[b]
        tail.replay()
        return ids[:n]
