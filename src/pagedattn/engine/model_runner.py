"""Model runner: turns a scheduled batch into one forward pass on the paged cache.

It executes the step's block moves (swap-out, copy-on-write, swap-in) in the order the
scheduler decided them, builds the flattened ragged batch and its :class:`AttentionMetadata`,
runs the model, and returns the logits of the sequences that sample this step.
"""

from __future__ import annotations

import numpy as np
import torch

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata, token_positions
from ..cache.block_manager import BlockManager
from ..cache.kv_pool import KVCachePool
from ..models.context import ForwardContext
from .cuda_graphs import DecodeGraphs
from .scheduler import SchedulerOutput
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_pool: KVCachePool, backend: AttentionBackend,
                 block_manager: BlockManager) -> None:
        self.model = model
        self.pool = kv_pool
        self.backend = backend
        self.bm = block_manager
        self.device = kv_pool.device
        self.block_size = kv_pool.spec.block_size
        self.kv_caches = [kv_pool.layer(i) for i in range(kv_pool.spec.num_layers)]
        self.graphs: DecodeGraphs | None = None

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Record decode steps as CUDA graphs (needs a backend that supports capture)."""
        if self.device.type != "cuda" or not self.backend.supports_cuda_graphs():
            return
        width = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.backend, self.kv_caches, max_batch, width, max_model_len,
                                   self.device)
        self.graphs.capture()

    def run_kv_ops(self, ops: list[tuple[str, list[tuple[int, int]]]]) -> None:
        for kind, pairs in ops:
            if kind == "swap_out":
                self.pool.swap_out(pairs)
            elif kind == "copy":
                self.pool.copy_blocks(pairs)
            elif kind == "swap_in":
                self.pool.swap_in(pairs)
            else:  # pragma: no cover - scheduler bug
                raise ValueError(f"unknown KV op {kind!r}")

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Run one step; returns logits ``[num_sampling_seqs, V]`` in scheduled order."""
        self.run_kv_ops(sched.kv_ops)
        if sched.is_empty:
            return torch.empty(0)
        if self.graphs is not None and all(s.num_new_tokens == 1 for s in sched.scheduled):
            logits = self._execute_graph(sched)
            if logits is not None:
                return logits
        input_ids, positions, meta, sample_idx = self.prepare(sched)
        ctx = ForwardContext(meta=meta, kv_caches=self.kv_caches, backend=self.backend)
        hidden = self.model(input_ids, positions, ctx)
        if sample_idx.numel() == 0:
            return torch.empty(0, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, sample_idx))

    def _execute_graph(self, sched: SchedulerOutput) -> torch.Tensor | None:
        """A pure-decode step through the captured graphs (every sequence samples); None if
        the batch does not fit the captured sizes."""
        seqs = [s.seq for s in sched.scheduled]
        pos = np.fromiter((q.num_computed_tokens for q in seqs), dtype=np.int64, count=len(seqs))
        tokens = [q.token_ids[p] for q, p in zip(seqs, pos.tolist())]
        return self._decode_graph(seqs, pos, tokens)

    @torch.inference_mode()
    def execute_lookahead(self, seqs: list[Sequence], input_ids: torch.Tensor) -> torch.Tensor:
        """Decode one position past each sequence's in-flight token, whose id exists only on
        the device (``input_ids [n]``, the previous step's samples): overlapped scheduling."""
        pos = np.fromiter((q.num_computed_tokens + 1 for q in seqs), dtype=np.int64, count=len(seqs))
        if self.graphs is not None:
            logits = self._decode_graph(seqs, pos, input_ids)
            if logits is not None:
                return logits
        tables = [self.bm.block_table(q.seq_id) for q in seqs]
        n = len(seqs)
        meta = AttentionMetadata.build([1] * n, (pos + 1).tolist(), tables, self.block_size, self.device)
        positions = torch.from_numpy(pos).to(self.device, non_blocking=True)
        ctx = ForwardContext(meta=meta, kv_caches=self.kv_caches, backend=self.backend)
        return self.model.compute_logits(self.model(input_ids, positions, ctx))

    def _decode_graph(self, seqs: list[Sequence], pos: np.ndarray, tokens: list[int] | torch.Tensor
                      ) -> torch.Tensor | None:
        assert self.graphs is not None
        table_of = self.bm.block_table
        tables = [table_of(q.seq_id) for q in seqs]
        if not self.graphs.can_run(len(seqs), max(map(len, tables))):
            return None
        bs = self.block_size
        blocks = np.fromiter((t[p] for t, p in zip(tables, (pos // bs).tolist())), dtype=np.int64, count=len(seqs))
        slots = blocks * bs + pos % bs
        return self.graphs.run(tokens, pos, slots, (pos + 1).tolist(), tables)

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        tokens: list[int] = []
        sample_rows: list[int] = []
        end = 0
        for s in sched.scheduled:
            c, n = s.seq.num_computed_tokens, s.num_new_tokens
            tokens.extend(s.seq.token_ids[c:c + n])
            query_lens.append(n)
            seq_lens.append(c + n)
            tables.append(self.bm.block_table(s.seq.seq_id))
            end += n
            if s.samples:
                sample_rows.append(end - 1)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, self.device)
        pos = token_positions(query_lens, seq_lens)
        input_ids = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)
        positions = torch.from_numpy(pos).to(self.device, non_blocking=True)
        sample_idx = torch.from_numpy(np.asarray(sample_rows, dtype=np.int64)).to(self.device, non_blocking=True)
        return input_ids, positions, meta, sample_idx
