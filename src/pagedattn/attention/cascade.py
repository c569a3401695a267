"""Cascade (shared-prefix) decode: finding the groups and planning the work, on the host.

With prefix caching, many decoding sequences point at the same physical blocks for a shared
prompt.  The plain decode kernel reads those blocks once per sequence.  The cascade path reads
them once per *group*: the decode queries of all rows sharing a prefix attend to it as one small
flash-attention (M = rows x GQA heads, N = prefix keys), each row attends to its own tail with
the split-KV decode kernel, and the partial results are merged by log-sum-exp.

This module is numpy only (no torch, no triton): it turns a step's host-side block tables and
lengths into

* groups: rows whose tables start with the same physical blocks, and how many blocks they share;
* a plan: for each row the first key it attends itself (``tail_start``) and how many prefix
  partials it merges (``num_prefix_parts``); the member rows of every group; and a work list
  for the prefix kernel, one item per (group, key chunk, tile of ``block_m`` (row, head) pairs);
* a packed int32 buffer holding all of it, which the backend copies to the device in one
  transfer (into fixed-size device buffers when decode steps replay as CUDA graphs).

Why rows may share: a block referenced by several tables is full and never written in the step
(copy-on-write separates a shared block before any write), and only blocks strictly before each
row's last token are candidates, so every row keeps at least its own last token as tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:  # the planner itself runs on the host, without torch
    import torch

_Buf = TypeVar("_Buf", np.ndarray, "torch.Tensor")

# Fields of one work item of the prefix kernel, in order (int32 each).
WORK_FIELDS = ("rep_row", "member_start", "num_pairs", "pair_start", "key_lo", "key_hi", "slot", "unused")
WORK_WIDTH = len(WORK_FIELDS)  # 8: a power of two keeps each item one aligned 32-byte load


@dataclass(frozen=True)
class CascadeConfig:
    """Thresholds and tile sizes of the cascade path.

    Defaults, and why:

    * A group has at least two rows (with one, nothing is read twice).
    * ``min_prefix_tokens = 256``: a shorter prefix is at most a few key tiles of each row's
      decode program, hidden behind its other work, while grouping it costs the prefix
      program's fixed work (Q gather, a partial of ``Hq * D`` fp32 per row written and merged)
      and puts a dependent kernel before the decode.  256 is also the decode kernel's shortest
      split chunk (``MIN_TOKENS_PER_SPLIT``).
    * ``max_groups = 8``: bounds the prefix kernel's fixed grid (a CUDA graph cannot grow it);
      a batch rarely holds more distinct long shared prompts, and rows outside the chosen
      groups simply use the full decode.
    * ``max_chunks = 16`` / ``min_chunk_tokens = 256``: a prefix is cut into at most 16 key
      chunks of at least 256 keys, enough programs to fill the GPU with a single group while
      each chunk still amortises its Q load and partial write.
    * ``block_m = 64``: (row, head) pairs per prefix program, the M of its ``tl.dot``.
    * ``chunk_align = 64``: chunk boundaries fall on multiples of the widest key tile.
    * ``programs_per_sm = 2``: the prefix kernel's work list is sized for about two programs
      per SM per KV head pass (its 64 x 64 tiles with three stages leave room for two per SM).
    """

    min_prefix_tokens: int = 256
    max_groups: int = 8
    max_chunks: int = 16
    min_chunk_tokens: int = 256
    block_m: int = 64
    chunk_align: int = 64
    programs_per_sm: int = 2

    def __post_init__(self) -> None:
        for name in ("min_prefix_tokens", "max_groups", "max_chunks", "min_chunk_tokens",
                     "chunk_align", "programs_per_sm"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        bm = self.block_m
        if not isinstance(bm, int) or bm < 16 or bm & (bm - 1):
            raise ValueError(f"block_m must be a power of two >= 16, got {bm!r}")


@dataclass(frozen=True)
class PrefixGroup:
    """Rows (ascending batch indices) whose block tables share their first ``num_blocks`` blocks."""

    rows: tuple[int, ...]
    num_blocks: int

    @property
    def saved_blocks(self) -> int:
        """Block reads the cascade saves per KV head: all rows but one skip the prefix."""
        return (len(self.rows) - 1) * self.num_blocks


@dataclass(frozen=True)
class CascadePlan:
    """Per-step cascade inputs for ``num_rows`` decode rows (all int32)."""

    groups: tuple[PrefixGroup, ...]
    tail_start: np.ndarray  # [num_rows]: first key position each row attends itself (0: ungrouped)
    num_prefix_parts: np.ndarray  # [num_rows]: prefix partials the row merges (0: ungrouped)
    members: np.ndarray  # [sum of group sizes]: the groups' rows, group after group
    work: np.ndarray  # [num_items, WORK_WIDTH]: see WORK_FIELDS

    @property
    def num_rows(self) -> int:
        return int(self.tail_start.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.work.shape[0])

    @property
    def max_parts(self) -> int:
        return int(self.num_prefix_parts.max(initial=0))

    @property
    def active(self) -> bool:
        return bool(self.groups)

    @property
    def max_prefix_blocks(self) -> int:
        return max((g.num_blocks for g in self.groups), default=0)


# ------------------------------------------------------------------------------------ groups


def find_prefix_groups(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int, *,
                       min_blocks: int = 1, max_groups: int = 8) -> list[PrefixGroup]:
    """Disjoint groups of rows whose block tables start with the same physical blocks.

    ``block_tables [n, W]``: row ``i``'s first ``ceil(seq_lens[i] / block_size)`` entries are its
    blocks (later entries are ignored; negative ids are window-released blocks, never shared).
    Only blocks wholly before a row's last token may be shared, so each row keeps its last
    token's block as tail.  A group has at least two rows sharing at least
    ``min_blocks`` blocks.  Among the ways to group rows, the choice maximises the block reads
    saved, ``sum (rows - 1) * blocks`` (a long prefix shared by many rows beats longer prefixes
    shared by subsets of them, and vice versa; rows grouped deeper leave the others of a shared
    prompt to group on it), then keeps the ``max_groups`` best groups.  Groups come out
    ordered by their first row.
    """
    tables = np.asarray(block_tables)
    lens = np.asarray(seq_lens, dtype=np.int64)
    _check_group_args(tables, lens, block_size, min_blocks, max_groups)
    n = lens.shape[0]
    # Full blocks before each row's last token (the block holding it is the row's own tail).
    shareable = np.maximum(lens - 1, 0) // block_size
    if n < 2 or tables.shape[1] == 0:
        return []
    if int(shareable.max(initial=0)) > tables.shape[1]:
        raise ValueError("block_tables is narrower than seq_lens need")
    rows = np.flatnonzero(shareable >= min_blocks)
    rows = _rows_sharing_first_block(tables, rows)
    if rows.size < 2:
        return []
    keys = _row_keys(tables, rows, shareable)
    order = np.argsort(keys.view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).ravel(), kind="stable")
    keys = keys[order]
    rows = rows[order]
    # lcp[i]: blocks shared by sorted rows i and i+1 (rows are cut at their shareable count).
    differs = keys[1:] != keys[:-1]
    lcp = np.where(differs.any(axis=1), differs.argmax(axis=1), keys.shape[1])
    found: list[tuple[tuple[int, ...], int]] = []  # (positions in the sorted order, blocks)
    # Rows sharing fewer than min_blocks never group: split there first, then choose inside runs.
    cuts = np.flatnonzero(lcp < min_blocks)
    starts = np.concatenate([[0], cuts + 1])
    ends = np.concatenate([cuts + 1, [rows.size]])
    lcp_list = lcp.tolist()
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s >= 2:
            found.extend(_GroupChoice(lcp_list, min_blocks).groups(s, e))
    found.sort(key=lambda g: (-(len(g[0]) - 1) * g[1], g[0][0]))
    groups = [PrefixGroup(tuple(sorted(rows[list(pos)].tolist())), b) for pos, b in found[:max_groups]]
    return sorted(groups, key=lambda g: g.rows[0])


def _check_group_args(tables: np.ndarray, lens: np.ndarray, block_size: int, min_blocks: int,
                      max_groups: int) -> None:
    if tables.ndim != 2 or not np.issubdtype(tables.dtype, np.integer):
        raise ValueError(f"block_tables must be a 2-D integer array, got {tables.dtype} {tables.shape}")
    if lens.ndim != 1 or lens.shape[0] != tables.shape[0]:
        raise ValueError(f"seq_lens must have one entry per block-table row, got {lens.shape} for {tables.shape}")
    if (lens < 0).any():
        raise ValueError("seq_lens must be >= 0")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if min_blocks < 1 or max_groups < 0:
        raise ValueError(f"need min_blocks >= 1 and max_groups >= 0, got {min_blocks}, {max_groups}")


def _rows_sharing_first_block(tables: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Drop rows whose first block no other candidate row has (the common case without sharing:
    it keeps the per-step cost of a batch of unrelated sequences at one ``np.unique``)."""
    first = tables[rows, 0]
    rows = rows[first >= 0]
    first = first[first >= 0]
    _, inverse, counts = np.unique(first, return_inverse=True, return_counts=True)
    return rows[counts[inverse] >= 2]


def _row_keys(tables: np.ndarray, rows: np.ndarray, shareable: np.ndarray) -> np.ndarray:
    """``[len(rows), C]`` int32: each row's shareable block ids, then a value no other row has.

    A row is cut at its shareable count and at its first negative (released) entry; past the
    cut every cell holds ``-(row + 1)``, so two rows never match beyond the shorter cut.
    """
    width = int(shareable[rows].max())
    keys = tables[rows, :width].astype(np.int32, copy=False)  # block ids fit: pools hold < 2**31 blocks
    cut = shareable[rows]
    negative = keys < 0
    cut = np.minimum(cut, np.where(negative.any(axis=1), negative.argmax(axis=1), width))
    past = np.arange(width)[None, :] >= cut[:, None]
    return np.where(past, -(rows[:, None].astype(np.int32) + 1), keys)


class _GroupChoice:
    """The best grouping of a run of sorted rows, by dynamic programming over its prefix tree.

    Rows sharing a prefix are contiguous in lexicographic order and a run's common prefix is
    the minimum of its adjacent LCPs, so a range of sorted rows is a node of the tables'
    prefix tree, and cutting it where the LCP equals that minimum gives its children.  A group
    is a node's depth ``d`` with rows of its subtree that no deeper group took; it saves
    ``(rows - 1) * d``, i.e. ``d`` per row, minus ``d`` once.  So a row left free inside a node
    is worth ``lam`` to the node above, ``lam`` being the depth at which that node groups its
    free rows (0 if none does), and ``value(node, lam)`` = the best saving plus ``lam`` per
    free row is either the children's values at ``lam`` (free rows go up) or, grouping the
    free rows here, the children's values at ``d`` minus ``d``.  A node is evaluated only at
    its ancestors' depths, so a batch costs O(rows x tree depth).  (Grouping here with fewer
    than two free rows never beats passing them up, so every chosen group has two or more.)
    """

    def __init__(self, lcp: list[int], min_blocks: int) -> None:
        self.lcp = lcp
        self.min_blocks = min_blocks
        self._nodes: dict[tuple[int, int], tuple[int, list[tuple[int, int]]]] = {}
        self._memo: dict[tuple[int, int, int], tuple[int, bool]] = {}

    def groups(self, start: int, end: int) -> list[tuple[tuple[int, ...], int]]:
        """``[(positions in the sorted order, blocks)]`` of the best grouping of ``[start, end)``."""
        found: list[tuple[tuple[int, ...], int]] = []
        self._collect(start, end, 0, [], found)
        return found

    def _node(self, start: int, end: int) -> tuple[int, list[tuple[int, int]]]:
        """(depth, children) of the node of sorted rows ``[start, end)``, ``end - start >= 2``."""
        key = (start, end)
        if key not in self._nodes:
            inner = self.lcp[start:end - 1]
            depth = min(inner)
            bounds = [start, *(start + i + 1 for i, x in enumerate(inner) if x == depth), end]
            self._nodes[key] = depth, list(pairwise(bounds))
        return self._nodes[key]

    def _value(self, start: int, end: int, lam: int) -> int:
        if end - start == 1:
            return lam  # a lone row: free
        key = (start, end, lam)
        if key not in self._memo:
            depth, kids = self._node(start, end)
            keep = sum(self._value(s, e, lam) for s, e in kids)
            here = sum(self._value(s, e, depth) for s, e in kids) - depth if depth >= self.min_blocks else keep
            self._memo[key] = (here, True) if here > keep else (keep, False)
        return self._memo[key][0]

    def _collect(self, start: int, end: int, lam: int, free: list[int],
                 found: list[tuple[tuple[int, ...], int]]) -> None:
        """Append the rows left free at ``lam`` to ``free`` and the groups chosen to ``found``."""
        if end - start == 1:
            free.append(start)
            return
        self._value(start, end, lam)
        depth, kids = self._node(start, end)
        if self._memo[(start, end, lam)][1]:
            mine: list[int] = []
            for s, e in kids:
                self._collect(s, e, depth, mine, found)
            found.append((tuple(mine), depth))
        else:
            for s, e in kids:
                self._collect(s, e, lam, free, found)


# ------------------------------------------------------------------------------------ plan


def max_work_items(num_rows: int, gqa: int, num_kv_heads: int, num_sms: int, cfg: CascadeConfig) -> int:
    """Work-list capacity: every group's tiles with one chunk each (the bound that must always
    fit), or about ``programs_per_sm`` programs per SM over the KV heads, whichever is more."""
    tiles = -(-num_rows * gqa // cfg.block_m) + cfg.max_groups - 1
    fill = -(-cfg.programs_per_sm * num_sms // num_kv_heads)
    return max(tiles, fill)


def plan_cascade(groups: list[PrefixGroup], num_rows: int, block_size: int, gqa: int, max_items: int,
                 cfg: CascadeConfig) -> CascadePlan:
    """Tail starts, prefix-part counts, member rows and the prefix kernel's work list.

    Every group gets the same number of key chunks, the largest power of two (at most
    ``max_chunks``) whose items still fit ``max_items``, but no group cuts its prefix into
    chunks shorter than ``min_chunk_tokens``.  Items are ordered group, chunk, tile, so the
    programs running together read the same keys (L2 hits).
    """
    tail_start = np.zeros(num_rows, dtype=np.int32)
    parts = np.zeros(num_rows, dtype=np.int32)
    if not groups:
        return CascadePlan((), tail_start, parts, np.zeros(0, np.int32), np.zeros((0, WORK_WIDTH), np.int32))
    tiles = [-(-len(g.rows) * gqa // cfg.block_m) for g in groups]
    if sum(tiles) > max_items:
        raise ValueError(f"max_items {max_items} cannot hold the groups' {sum(tiles)} tiles")
    chunks = min(cfg.max_chunks, _prev_power_of_2(max_items // sum(tiles)))
    members = np.concatenate([np.asarray(g.rows, dtype=np.int32) for g in groups])
    if members.min() < 0 or members.max() >= num_rows or np.unique(members).size != members.size:
        raise ValueError(f"groups must hold distinct rows of the batch of {num_rows}")
    work, start = [], 0
    for g, t in zip(groups, tiles):
        bounds = np.asarray(_chunk_bounds(g.num_blocks * block_size, chunks, cfg), dtype=np.int32)
        rows = np.asarray(g.rows)
        tail_start[rows] = g.num_blocks * block_size
        parts[rows] = len(bounds)
        # [chunks, tiles] items, chunk-major.
        item = np.zeros((len(bounds), t, WORK_WIDTH), dtype=np.int32)
        item[..., 0] = g.rows[0]
        item[..., 1] = start
        item[..., 2] = len(g.rows) * gqa
        item[..., 3] = np.arange(t) * cfg.block_m
        item[..., 4:6] = bounds[:, None, :]
        item[..., 6] = np.arange(len(bounds))[:, None]
        work.append(item.reshape(-1, WORK_WIDTH))
        start += len(g.rows)
    return CascadePlan(tuple(groups), tail_start, parts, members, np.concatenate(work))


def _prev_power_of_2(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _chunk_bounds(prefix_len: int, chunks: int, cfg: CascadeConfig) -> list[tuple[int, int]]:
    """Key ranges cutting ``[0, prefix_len)`` into at most ``chunks`` non-empty aligned chunks."""
    chunks = max(1, min(chunks, prefix_len // cfg.min_chunk_tokens))
    step = -(-prefix_len // chunks)
    step = -(-step // cfg.chunk_align) * cfg.chunk_align
    return [(lo, min(lo + step, prefix_len)) for lo in range(0, prefix_len, step)]


def build_plan(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int, gqa: int, max_items: int,
               cfg: CascadeConfig) -> CascadePlan:
    """Groups and plan of one step's decode rows (the two functions above, with ``cfg``'s thresholds)."""
    min_blocks = -(-cfg.min_prefix_tokens // block_size)
    groups = find_prefix_groups(block_tables, seq_lens, block_size, min_blocks=min_blocks,
                                max_groups=cfg.max_groups)
    return plan_cascade(groups, len(seq_lens), block_size, gqa, max_items, cfg)


def plan_signature(plan: CascadePlan, block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> np.ndarray:
    """The table entries ``plan`` depends on: ``[n, max prefix blocks]`` int32, each row's
    entries before its last token's block, -1 past them (and for released blocks).  Only
    entries inside each row's table are kept, so stale cells of a reused host buffer past a
    short row's table never count."""
    width = plan.max_prefix_blocks
    lens = np.asarray(seq_lens, dtype=np.int64)
    cut = np.minimum(np.maximum(lens - 1, 0) // block_size, width)
    cols = np.asarray(block_tables)[:, :width]
    return np.where(np.arange(width)[None, :] < cut[:, None], cols, -1).astype(np.int32)


def plan_still_holds(plan: CascadePlan, signature: np.ndarray, block_tables: np.ndarray,
                     seq_lens: np.ndarray) -> bool:
    """Whether an active ``plan`` with ``signature`` (``plan_signature`` of the step it was made
    for) is still correct for this step: as many rows, the same entries where the signature
    has them, and every grouped row keeping at least its last token as tail.

    Between admissions a decode batch keeps its rows and only their tails grow, so the plan of
    the previous step holds and the per-step cost is one comparison of the prefix columns.  (It
    stays correct, not necessarily the best grouping: a row replaced by another sequence with
    the same leading blocks keeps its old group even if the new one shares more.)
    """
    lens = np.asarray(seq_lens)
    width = signature.shape[1]
    if not plan.active or lens.shape[0] != plan.num_rows or block_tables.shape[1] < width:
        return False
    if not (lens > plan.tail_start).all():
        return False
    return np.array_equal(np.where(signature >= 0, block_tables[:, :width], -1), signature)


# ------------------------------------------------------------------------------------ packing


@dataclass(frozen=True)
class PackedLayout:
    """Offsets of the plan's arrays in one int32 buffer for ``rows`` rows and ``items`` work items:
    ``[tail_start | num_prefix_parts | members | work]``."""

    rows: int
    items: int

    @property
    def size(self) -> int:
        return 3 * self.rows + WORK_WIDTH * self.items

    def views(self, buf: _Buf) -> tuple[_Buf, _Buf, _Buf, _Buf]:
        """``(tail_start, num_prefix_parts, members, work)`` views of ``buf`` (the host array or
        its copy on the device)."""
        r = self.rows
        return buf[:r], buf[r:2 * r], buf[2 * r:3 * r], buf[3 * r:self.size].reshape(self.items, WORK_WIDTH)


def pack_plan(plan: CascadePlan, layout: PackedLayout, out: np.ndarray | None = None) -> np.ndarray:
    """Write ``plan`` into ``out`` (or a new buffer) laid out as ``layout``; every cell is
    written, so a reused buffer holds nothing stale: rows past the plan's and unused work items
    are zero (zero pairs: their programs do nothing)."""
    if plan.num_rows > layout.rows or plan.num_items > layout.items:
        raise ValueError(f"plan of {plan.num_rows} rows / {plan.num_items} items exceeds the layout "
                         f"({layout.rows} / {layout.items})")
    buf = np.zeros(layout.size, dtype=np.int32) if out is None else out
    if buf.dtype != np.int32 or buf.shape[0] < layout.size:
        raise ValueError(f"out must be int32 with >= {layout.size} elements, got {buf.dtype} {buf.shape}")
    buf[:layout.size] = 0
    tail, parts, members, work = layout.views(buf)
    n = plan.num_rows
    tail[:n] = plan.tail_start
    parts[:n] = plan.num_prefix_parts
    members[:plan.members.shape[0]] = plan.members
    work[:plan.num_items] = plan.work
    return buf
