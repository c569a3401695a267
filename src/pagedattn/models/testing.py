"""A minimal paged-KV driver for a model: for tests, parity checks and small scripts.

It is not the engine (no scheduler, no sampling beyond greedy, no preemption): it owns one
:class:`KVCachePool`, keeps a block table per sequence and runs whatever ragged batch of
``(sequence, new tokens)`` it is given.  Blocks are handed out in a shuffled order so that a
sequence's pages are never contiguous, which exercises the block-table indirection.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata, token_positions
from ..attention.torch_ref import TorchReferenceBackend
from ..cache.kv_pool import KVCachePool
from .context import ForwardContext
from .interface import CausalLM


class PagedHarness:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int = 64,
        block_size: int = 16,
        backend: AttentionBackend | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        """``kv_cache_dtype``: the pool's element type (default the model's; ``torch.float8_e4m3fn``
        for an fp8 cache, read through the attention layers' scales)."""
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.backend = backend or TorchReferenceBackend()
        self.pool = KVCachePool(model.kv_cache_spec(block_size, kv_cache_dtype), num_blocks, self.device)
        # Fill the pool with noise so a read of an unwritten slot cannot go unnoticed (fp8 has
        # no normal_: the noise is drawn in fp32 and cast).
        noise = torch.empty(self.pool.kv.shape, device=self.device)
        self.pool.kv.copy_(noise.normal_(generator=torch.Generator(self.device).manual_seed(seed)))
        self.kv_caches = [self.pool.layer(i) for i in range(model.config.num_layers)]
        gen = torch.Generator().manual_seed(seed)
        self._free: list[int] = torch.randperm(num_blocks, generator=gen).tolist()
        self._tables: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}
        self._total_lens: dict[Hashable, int] = {}

    def seq_len(self, seq_id: Hashable) -> int:
        return self._lens.get(seq_id, 0)

    def free(self, seq_id: Hashable) -> None:
        self._free.extend(self._tables.pop(seq_id, []))
        self._lens.pop(seq_id, None)
        self._total_lens.pop(seq_id, None)

    def _reserve(self, seq_id: Hashable, total_len: int) -> list[int]:
        table = self._tables.setdefault(seq_id, [])
        need = -(-total_len // self.block_size) - len(table)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self._free)} free")
        table.extend(self._free.pop() for _ in range(max(0, need)))
        return table

    @torch.inference_mode()
    def step(self, batch: Sequence[tuple[Hashable, Sequence[int]]],
             total_lens: Mapping[Hashable, int] | None = None) -> list[torch.Tensor]:
        """Run one forward over the new tokens of each ``(seq_id, tokens)``; returns each
        sequence's logits ``[len(tokens), vocab]`` for every new token.

        ``total_lens`` sets a new sequence's full length (what a model that uses it sees in
        ``ForwardContext.total_lens``, at least each token's position + 1); by default its first
        step's length.  To compare a sequence run in chunks with one transformers forward pass
        over all of it, give its length."""
        if not batch:
            raise ValueError("batch must not be empty")
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        ids: list[int] = []
        for seq_id, tokens in batch:
            if len(tokens) == 0:
                raise ValueError(f"sequence {seq_id!r} has no new tokens")
            total = self.seq_len(seq_id) + len(tokens)
            self._total_lens.setdefault(seq_id, (total_lens or {}).get(seq_id, len(tokens)))
            tables.append(list(self._reserve(seq_id, total)))
            query_lens.append(len(tokens))
            seq_lens.append(total)
            ids.extend(int(t) for t in tokens)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, self.device)
        positions = torch.from_numpy(token_positions(query_lens, seq_lens)).to(self.device)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        token_total_lens = torch.tensor([self._total_lens[s] for s, _ in batch], device=self.device)
        ctx = ForwardContext(meta, self.kv_caches, self.backend,
                             token_total_lens.repeat_interleave(torch.tensor(query_lens, device=self.device)))
        hidden = self.model(input_ids, positions, ctx)
        for (seq_id, _), total in zip(batch, seq_lens, strict=True):
            self._lens[seq_id] = total
        return list(self.model.compute_logits(hidden).split(query_lens))

    def greedy(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        seq_id: Hashable = "greedy",
    ) -> list[int]:
        """Greedy continuation of ``prompt`` (prefill, then one token per step)."""
        out: list[int] = []
        logits = self.step([(seq_id, prompt)])[0]
        try:
            for _ in range(max_new_tokens):
                nxt = int(logits[-1].argmax())
                out.append(nxt)
                if nxt in stop_ids or len(out) == max_new_tokens:
                    break
                logits = self.step([(seq_id, [nxt])])[0]
        finally:
            self.free(seq_id)
        return out
