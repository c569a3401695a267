"""Typed attention metadata: everything a kernel needs to find K/V for one forward step.

Built once per step by the model runner and passed explicitly through the model to every
attention layer (no module-level global context).

Batch layout: the step's new tokens of all sequences are flattened into one ragged batch of
``T`` tokens.  Sequence ``i`` owns tokens ``query_start_loc[i]:query_start_loc[i+1]``.  The
runner puts sequences with exactly one new token (decodes) first, so backends can run a
decode kernel on the first ``num_decodes`` sequences and a prefill/extend kernel on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..transfer import upload


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
    # Host copy of the block tables, [B, >= max blocks] with -1 for unused and window-released
    # entries (``build`` fills it; None when built otherwise): lets a backend find the rows that
    # share prefix blocks without reading the device tensor back.
    block_tables_cpu: np.ndarray | None = field(default=None, repr=False, compare=False)
    # Derived per-step data a backend computes on the first layer and reuses in the others
    # (gather indices, masks).  Owned by the backend; never read by the model.
    scratch: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

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
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        pad_blocks_to: int | None = None,
    ) -> AttentionMetadata:
        """Build metadata from host lists (eager steps; tests).  The copies to ``device`` do not
        wait for queued device work.

        Negative block ids in ``block_tables`` (window-released blocks) become 0: they lie wholly
        outside the window, so no kernel ever reads them.
        """
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
        if not query_lens:
            raise ValueError("a batch needs at least one sequence")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        for ql, sl, bt in zip(query_lens, seq_lens, block_tables):
            if ql < 1 or sl < ql:
                raise ValueError(f"need 1 <= query_len <= seq_len, got {ql=} {sl=}")
            if len(bt) * block_size < sl:
                raise ValueError(f"block table of {len(bt)} blocks cannot hold {sl} tokens")
        num_decodes = 0
        for ql in query_lens:
            if ql != 1:
                break
            num_decodes += 1
        max_blocks = max([len(bt) for bt in block_tables] + [pad_blocks_to or 1])
        bt_np = np.full((len(block_tables), max_blocks), -1, dtype=np.int64)
        for i, bt in enumerate(block_tables):
            bt_np[i, : len(bt)] = bt
        ql_np = np.asarray(query_lens, dtype=np.int64)
        seq_idx = np.repeat(np.arange(len(query_lens)), ql_np)
        pos = token_positions(query_lens, seq_lens)
        blocks = bt_np[seq_idx, pos // block_size]
        if (blocks < 0).any():
            raise ValueError("a new token falls in a released (NULL) block")
        slots = blocks * block_size + pos % block_size
        qsl = np.concatenate([[0], np.cumsum(ql_np)])
        bt_host = torch.from_numpy(np.maximum(bt_np, 0).astype(np.int32))
        return cls(
            slot_mapping=upload(torch.from_numpy(slots), device),
            query_start_loc=upload(torch.from_numpy(qsl.astype(np.int32)), device),
            seq_lens=upload(torch.tensor(seq_lens, dtype=torch.int32), device),
            block_tables=upload(bt_host, device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            num_decodes=num_decodes,
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            block_tables_cpu=bt_np,
        )


def token_positions(query_lens: list[int], seq_lens: list[int]) -> np.ndarray:
    """Absolute position of every new token: sequence i's new tokens are the last
    ``query_lens[i]`` of its ``seq_lens[i]`` tokens.  Returns int64 ``[sum(query_lens)]``."""
    ql = np.asarray(query_lens, dtype=np.int64)
    sl = np.asarray(seq_lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(ql)[:-1]])
    total = int(ql.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(starts, ql) + np.repeat(sl - ql, ql)
