"""The vocabulary-parallel embedding and LM head, and the greedy choice over vocabulary slices.

Both split the vocabulary across ranks: rank ``r`` holds ids ``[r * ceil(V / tp), (r + 1) *
ceil(V / tp))``, the last shard zero-padded, so the head can share the embedding's weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import sampling
from .linear import linear
from .parallel import AllReduce, all_gather_last_dim, check_tp, process_group_all_reduce
from .quantized import GGUFBlockWeight
from .weights import ShardId, check_shape, new_param


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of ``[n, V]`` logits: the same indices (the first maximum, NaN
    counting as the maximum), fast on a CPU.

    There torch's argmax is a scalar loop, ~0.4 ms for 16 rows of a 49k vocabulary, while
    ``amax`` is vectorised (~20x faster).  So: the max of each block of columns, the first
    block holding its row's maximum (argmax over a few hundred block maxima), then the
    argmax within that block.  On a GPU, up to 16 rows, one launch of the sampling kernels'
    argmax (torch's takes ~27-37 us for one row of a 128k vocabulary on an H100, it ~6 us);
    elsewhere, or when no block size divides ``V``, plain argmax.
    """
    n, v = logits.shape
    if logits.is_cuda and sampling.triton is not None and n <= sampling.ARGMAX_KERNEL_ROWS:
        return sampling.argmax(logits)
    block = next((b for b in (256, 128, 64) if v % b == 0), 0)
    if logits.device.type != "cpu" or not block or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    blocks = logits.view(n, v // block, block)
    best = blocks.amax(dim=-1).argmax(dim=-1)  # [n]: the first block holding the row's max
    inner = blocks[torch.arange(n, device=logits.device), best].argmax(dim=-1)
    return best * block + inner


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows: rank ``r`` holds ids
    ``[r * ceil(V / tp), (r + 1) * ceil(V / tp))`` (the last shard zero-padded)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        reduce_results: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.reduce_results = reduce_results
        self.all_reduce: AllReduce = process_group_all_reduce
        self.num_embeddings_per_partition = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = new_param((self.num_embeddings_per_partition, embedding_dim), params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id is not None:
            raise ValueError(f"unexpected shard_id {shard_id!r} for {type(self).__name__}")
        check_shape(loaded_weight, (self.num_embeddings, self.embedding_dim))
        n = max(0, self.vocab_end - self.vocab_start)
        param.data[:n].copy_(loaded_weight[self.vocab_start : self.vocab_start + n])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._rows(input_ids)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start) * in_shard
        out = self._rows(local_ids)
        out.masked_fill_(~in_shard.unsqueeze(-1), 0)
        return self.all_reduce(out) if self.reduce_results else out

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, GGUFBlockWeight):  # a GGUF table kept in its blocks (GPU)
            return self.weight.embedding(ids)
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return (
            f"vocab={self.num_embeddings_per_partition}/{self.num_embeddings}, dim={self.embedding_dim}, "
            f"tp={self.tp_rank}/{self.tp_size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded like the embedding (so it can share its weight)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        gather_output: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, tp_rank=tp_rank, tp_size=tp_size, params_dtype=params_dtype)
        self.gather_output = gather_output

    def forward(self, hidden: torch.Tensor, gather: bool | None = None) -> torch.Tensor:
        """``hidden [n, dim]`` -> logits ``[n, vocab]``, or this rank's padded slice
        ``[n, vocab / tp]`` when not gathering (``gather`` None: ``gather_output``)."""
        logits = linear(hidden, self.weight)
        return self.gather(logits) if (self.gather_output if gather is None else gather) else logits

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's slice ``[n, vocab / tp]`` -> the full logits ``[n, vocab]`` (collective)."""
        if self.tp_size == 1:
            return logits
        return all_gather_last_dim(logits, self.tp_size)[..., : self.num_embeddings]

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """The argmax over the whole vocabulary, int64 ``[n]``, from every rank's slice ``[n, vocab / tp]``
        (collective), exchanging two numbers per row instead of the logits: each rank takes its
        slice's first maximum, then every rank picks the first rank holding the largest.  The
        same index as ``gather(logits).argmax(-1)``: the first maximum, NaN counting as largest.
        """
        if self.tp_size == 1:
            return argmax_rows(logits)
        valid = self.vocab_end - self.vocab_start  # the last slice's tail pads the vocabulary
        n = logits.shape[0]
        if valid > 0:
            idx = logits[:, :valid].argmax(dim=-1)
            val = logits.gather(1, idx[:, None]).squeeze(1).float()
        else:
            idx = torch.zeros(n, dtype=torch.long, device=logits.device)
            val = torch.full((n,), float("-inf"), device=logits.device)
        # ids as fp32 are exact below 2^24 (vocabularies are far smaller).
        mine = torch.stack([val, (idx + self.vocab_start).float()], dim=-1)  # [n, 2]
        parts = all_gather_last_dim(mine, self.tp_size).view(n, self.tp_size, 2)
        best = parts[..., 0].argmax(dim=-1, keepdim=True)  # [n, 1]: ties -> the lower rank (lower ids)
        return parts[..., 1].gather(1, best).squeeze(1).long()

