"""Typed attention metadata: everything a kernel needs to find K/V for one forward step.

Batch layout: the step's new tokens of all sequences are flattened into one ragged batch of
``T`` tokens.  Sequence ``i`` owns tokens ``query_start_loc[i]:query_start_loc[i+1]``.  The
runner puts sequences with exactly one new token (decodes) first, so backends can run a
decode kernel on the first ``num_decodes`` sequences and a prefill/extend kernel on the rest.

:class:`HostBatch` is the one place where a step's positions, KV slots and padded block table
are computed, on the host: an eager step uploads it as :class:`AttentionMetadata`, a CUDA-graph
step copies it into the graphs' static buffers.  The metadata is passed explicitly through the
model to every attention layer (no module-level global context) and carries the backend's own
per-step state (:class:`BackendState`), so a backend behaves the same whoever calls it.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..transfer import upload

if TYPE_CHECKING:
    from .backend import AttentionBackend


@dataclass(frozen=True)
class HostBatch:
    """One step's ragged batch as host arrays (see :meth:`build`)."""

    block_size: int
    query_lens: np.ndarray  # [B] int64: new tokens per sequence
    seq_lens: np.ndarray  # [B] int64: tokens with K/V per sequence after the step
    block_tables: np.ndarray  # [B, W] int32: physical blocks; -1 for unused and window-released entries
    positions: np.ndarray  # [T] int64: absolute position of each new token
    slots: np.ndarray  # [T] int64: flat KV slot (block * block_size + offset) of each new token
    num_decodes: int  # leading sequences with exactly one new token

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slots.shape[0])

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: Sequence[Sequence[int]], block_size: int,
              pad_blocks_to: int | None = None) -> HostBatch:
        """Validate a step and compute its positions, slots and block table (``pad_blocks_to``:
        at least that many columns).  Vectorised: a decode batch of hundreds of rows costs a
        few numpy calls, not a Python loop per row."""
        ql, sl, sizes = _check_lengths(query_lens, seq_lens, block_tables, block_size)
        tables = _pad_tables(block_tables, sizes, max(int(sizes.max()), pad_blocks_to or 1))
        longer = np.flatnonzero(ql != 1)
        if longer.size:
            positions = token_positions(ql, sl)
            owners = np.repeat(np.arange(ql.shape[0]), ql)
        else:  # a decode batch (every CUDA-graph step): one token per row, at its last position
            positions, owners = sl - 1, np.arange(ql.shape[0])
        blocks = tables[owners, positions // block_size]
        if blocks.min() < 0:
            raise ValueError("a new token falls in a released (NULL) block")
        slots = blocks.astype(np.int64) * block_size + positions % block_size
        num_decodes = int(longer[0]) if longer.size else ql.shape[0]
        return cls(block_size, ql, sl, tables, positions, slots, num_decodes)


def _check_lengths(query_lens: list[int], seq_lens: list[int], block_tables: Sequence[Sequence[int]],
                   block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(query_lens, seq_lens, table sizes)`` as int64 arrays, after checking they make a step."""
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
    if not query_lens:
        raise ValueError("a batch needs at least one sequence")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    ql = np.asarray(query_lens, dtype=np.int64)
    sl = np.asarray(seq_lens, dtype=np.int64)
    sizes = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(block_tables))
    if ((ql < 1) | (sl < ql) | (sizes * block_size < sl)).any():  # one test on the hot path, then which
        bad = (ql < 1) | (sl < ql)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"need 1 <= query_len <= seq_len, got ql={ql[i]} sl={sl[i]}")
        i = int(np.flatnonzero(sizes * block_size < sl)[0])
        raise ValueError(f"block table of {sizes[i]} blocks cannot hold {sl[i]} tokens")
    return ql, sl, sizes


def _pad_tables(block_tables: Sequence[Sequence[int]], sizes: np.ndarray, width: int) -> np.ndarray:
    """The ragged tables as one ``[B, width]`` int32 array, -1 past each row's end (block ids
    fit: pools hold fewer than 2**31 blocks).  A boolean mask assigns in row-major order, so the
    flattened ids land in their rows in one vectorised step."""
    total = int(sizes.sum())
    if all(type(t) is array and t.typecode == "i" for t in block_tables):  # the block manager's tables
        flat = np.frombuffer(b"".join(block_tables), dtype=np.int32, count=total)  # type: ignore[arg-type]
    else:
        flat = np.fromiter(chain.from_iterable(block_tables), dtype=np.int32, count=total)
    out = np.full((sizes.shape[0], width), -1, dtype=np.int32)
    out[np.arange(width) < sizes[:, None]] = flat
    return out


def token_positions(query_lens: list[int] | np.ndarray, seq_lens: list[int] | np.ndarray) -> np.ndarray:
    """Absolute position of every new token: sequence i's new tokens are the last
    ``query_lens[i]`` of its ``seq_lens[i]`` tokens.  Returns int64 ``[sum(query_lens)]``."""
    ql = np.asarray(query_lens, dtype=np.int64)
    sl = np.asarray(seq_lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(ql)[:-1]])
    total = int(ql.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(starts, ql) + np.repeat(sl - ql, ql)


@dataclass
class BackendState:
    """What a backend derives from one step's metadata once for all its layers (launch sizes,
    plans, device inputs).  Each backend subclasses it.  ``backend`` is the one that made it:
    another backend handed the same metadata (tests compare backends on one batch) makes its
    own instead of reading this one."""

    backend: AttentionBackend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat slot (block * block_size + offset) for each new token's K/V
    query_start_loc: torch.Tensor  # [B+1] int32: cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence *including* its new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32: physical block of each logical block (0 if unused)
    max_query_len: int
    max_seq_len: int
    num_decodes: int  # leading sequences with exactly one new token
    # Host-side copies so the CPU reference path never synchronises with the device.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int  # tokens per page of the caches the slots and tables point into
    # Host copy of the block tables, [B, >= max blocks] with -1 for unused and window-released
    # entries (None for a captured step's static metadata): lets a backend find the rows that
    # share prefix blocks without reading the device tensor back.
    block_tables_cpu: np.ndarray | None = field(default=None, repr=False, compare=False)
    # The backend's per-step state: set by its prepare_for_capture for a captured step, else by
    # the step's first attention layer (AttentionBackend.step_state).  Never read by the model.
    state: BackendState | None = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        pad_blocks_to: int | None = None,
    ) -> AttentionMetadata:
        """Metadata of a step given as host lists (see :meth:`from_host`)."""
        return cls.from_host(HostBatch.build(query_lens, seq_lens, block_tables, block_size, pad_blocks_to), device)

    @classmethod
    def from_host(cls, batch: HostBatch, device: torch.device | str = "cpu") -> AttentionMetadata:
        """Upload a step's host arrays; the copies to ``device`` do not wait for queued device work.

        Negative block ids (window-released blocks) become 0: they lie wholly outside the
        window, so no kernel ever reads them.
        """
        qsl = np.concatenate([[0], np.cumsum(batch.query_lens)]).astype(np.int32)
        return cls(
            slot_mapping=upload(torch.from_numpy(batch.slots), device),
            query_start_loc=upload(torch.from_numpy(qsl), device),
            seq_lens=upload(torch.from_numpy(batch.seq_lens.astype(np.int32)), device),
            block_tables=upload(torch.from_numpy(np.maximum(batch.block_tables, 0)), device),
            max_query_len=int(batch.query_lens.max()),
            max_seq_len=int(batch.seq_lens.max()),
            num_decodes=batch.num_decodes,
            query_lens_cpu=batch.query_lens.tolist(),
            seq_lens_cpu=batch.seq_lens.tolist(),
            block_size=batch.block_size,
            block_tables_cpu=batch.block_tables,
        )
