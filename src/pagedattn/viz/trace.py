"""Recording and replaying what the block pool does, step by step.

The block manager reports every change to its pool through its ``listener`` hook (``allocate``,
``share``, ``cow``, ``swap_out`` ...).  :class:`TraceRecorder` appends those events, tagged with
the engine step they happened in, plus one summary per step, and writes them as JSON lines::

    {"kind": "header", "num_blocks": 64, "num_cpu_blocks": 16, "block_size": 16, ...}
    {"step": 3, "kind": "allocate", "seq": "7#0", "blocks": [5], "pad": 0}
    {"step": 3, "kind": "step", "stats": {"running": 2, "waiting": 0, ...}}

:class:`Trace` replays the events to rebuild the pool (:class:`PoolState`) at the end of any
step; :func:`snapshot` reads the same picture from a live manager, so the two can be compared
exactly.  Nothing here imports torch or matplotlib.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..cache.block_manager import NULL_BLOCK, BlockManager, EventListener

TRACE_FORMAT = "pagedattn.trace"
TRACE_VERSION = 1
STEP_KIND = "step"  # the per-step summary line
HEADER_KIND = "header"
REQUIRED_STATS = (
    "running", "waiting", "swapped", "blocks_used", "blocks_cached", "blocks_free",
    "cpu_blocks_used", "num_tokens",
)


# ====================================================================== sequence ids
def split_seq_id(seq: str) -> tuple[str, int]:
    """``"7#1"`` -> ``("7", 1)``: the request a sequence belongs to and its sample index."""
    request, sep, sample = seq.rpartition("#")
    if not sep:
        return seq, 0
    return request, int(sample) if sample.isdigit() else 0


def request_sort_key(request: str) -> tuple[int, int, str]:
    """Numeric request ids sort numerically (2 before 10), others after them by name."""
    return (0, int(request), "") if request.isdigit() else (1, 0, request)


def seq_sort_key(seq: str) -> tuple[tuple[int, int, str], int]:
    request, sample = split_seq_id(seq)
    return request_sort_key(request), sample


def request_hash(request: str) -> int:
    """A stable small integer per request id (same in every process, unlike ``hash``)."""
    return int(request) if request.isdigit() else zlib.crc32(request.encode())


# ====================================================================== pool state
@dataclass
class PoolState:
    """The block pool at one moment.

    A GPU block is *free* (refcount 0, not cached), *held* (refcount >= 1; its owners are the
    sequences whose tables point at it) or *cached* (refcount 0 but kept by the prefix cache,
    evictable).  ``cached`` lists every block the prefix cache knows, held or not.  Sequence ids
    are strings; tables keep :data:`NULL_BLOCK` where the sliding window released a block.
    """

    num_blocks: int
    num_cpu_blocks: int
    block_size: int
    refcount: list[int]  # per GPU block
    evictable: set[int]  # GPU blocks with refcount 0 kept by the prefix cache
    cached: set[int]  # GPU blocks registered in the prefix cache (held or evictable)
    cpu_refcount: list[int]  # per CPU block
    tables: dict[str, list[int]]  # block table of every live sequence
    swapped: set[str] = field(default_factory=set)  # sequences whose table indexes the CPU pool

    # ------------------------------------------------------------------ per block
    def status(self, block: int) -> str:
        """``"free"``, ``"held"`` or ``"cached"`` (evictable) for a GPU block."""
        if self.refcount[block] > 0:
            return "held"
        return "cached" if block in self.evictable else "free"

    def gpu_owners(self) -> list[list[str]]:
        """For each GPU block, the sequences holding it (sorted by request, then sample)."""
        return self._owners(self.num_blocks, on_cpu=False)

    def cpu_owners(self) -> list[list[str]]:
        return self._owners(self.num_cpu_blocks, on_cpu=True)

    def _owners(self, n: int, on_cpu: bool) -> list[list[str]]:
        owners: list[list[str]] = [[] for _ in range(n)]
        for seq in sorted(self.tables, key=seq_sort_key):
            if (seq in self.swapped) != on_cpu:
                continue
            for b in self.tables[seq]:
                if b != NULL_BLOCK:
                    owners[b].append(seq)
        return owners

    # ------------------------------------------------------------------ totals
    @property
    def num_used(self) -> int:
        return sum(r > 0 for r in self.refcount)

    @property
    def num_evictable(self) -> int:
        return len(self.evictable)

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used - self.num_evictable

    @property
    def num_cpu_used(self) -> int:
        return sum(r > 0 for r in self.cpu_refcount)

    def requests(self) -> list[str]:
        """Request ids with at least one live sequence, in display order."""
        return sorted({split_seq_id(s)[0] for s in self.tables}, key=request_sort_key)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "num_blocks": self.num_blocks, "num_cpu_blocks": self.num_cpu_blocks,
            "block_size": self.block_size, "refcount": list(self.refcount),
            "evictable": sorted(self.evictable), "cached": sorted(self.cached),
            "cpu_refcount": list(self.cpu_refcount), "tables": {s: list(t) for s, t in self.tables.items()},
            "swapped": sorted(self.swapped),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolState:
        return cls(
            int(d["num_blocks"]), int(d["num_cpu_blocks"]), int(d["block_size"]),
            list(d["refcount"]), set(d["evictable"]), set(d["cached"]), list(d["cpu_refcount"]),
            {str(s): list(t) for s, t in d["tables"].items()}, {str(s) for s in d["swapped"]},
        )

    @classmethod
    def empty(cls, num_blocks: int, num_cpu_blocks: int, block_size: int) -> PoolState:
        return cls(num_blocks, num_cpu_blocks, block_size, [0] * num_blocks, set(), set(),
                   [0] * num_cpu_blocks, {}, set())

    def copy(self) -> PoolState:
        return PoolState(
            self.num_blocks, self.num_cpu_blocks, self.block_size, list(self.refcount),
            set(self.evictable), set(self.cached), list(self.cpu_refcount),
            {s: list(t) for s, t in self.tables.items()}, set(self.swapped),
        )


def snapshot(bm: BlockManager) -> PoolState:
    """Read the pool of a live block manager (what a replayed trace must reproduce)."""
    n, m = bm.num_blocks, bm.cpu.num_blocks
    seqs = bm._seqs  # the manager keeps no public view of whole tables incl. swapped ones
    return PoolState(
        num_blocks=n, num_cpu_blocks=m, block_size=bm.block_size,
        refcount=[bm.gpu.refcount(b) for b in range(n)],
        evictable=set(bm.cache.evictable_blocks()),
        cached={b for b in range(n) if bm.cache.is_cached(b)},
        cpu_refcount=[bm.cpu.refcount(b) for b in range(m)],
        tables={str(s): list(st.blocks) for s, st in seqs.items()},
        swapped={str(s) for s, st in seqs.items() if st.on_cpu},
    )


def _header_for(bm: BlockManager) -> dict[str, Any]:
    header: dict[str, Any] = {
        "kind": HEADER_KIND, "format": TRACE_FORMAT, "version": TRACE_VERSION,
        "num_blocks": bm.num_blocks, "num_cpu_blocks": bm.cpu.num_blocks, "block_size": bm.block_size,
        "sliding_window": bm.sliding_window, "enable_prefix_caching": bm.enable_prefix_caching,
    }
    state = snapshot(bm)
    if state != PoolState.empty(bm.num_blocks, bm.cpu.num_blocks, bm.block_size):
        header["initial"] = state.to_dict()  # attached mid-run: replay starts from here
    return header


# ====================================================================== replay
class _Replayer:
    """Applies block-manager events to a :class:`PoolState`, mirroring the manager's rules.

    Engine-level events (``preempt``, ``finish`` ...) do not touch the pool and are skipped.
    """

    def __init__(self, state: PoolState) -> None:
        self.s = state
        self.index = 0  # events applied so far, for error messages

    def apply(self, ev: dict[str, Any]) -> None:
        handler = getattr(self, "_on_" + str(ev.get("kind")), None)
        if handler is not None:
            try:
                handler(ev)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"trace event #{self.index} {ev!r} cannot be replayed: {e!r}") from e
        self.index += 1

    # ------------------------------------------------------------------ primitives
    def _take(self, b: int) -> None:
        """A block handed out for new contents, off the free list.  If the replay still has
        it parked, the manager evicted it without an event (e.g. a cache reset the engine did
        not record), so it is no longer cached.  (A swap-in publishes its blocks to the cache
        *before* its own event, hence a cached block with refcount 0 is left alone.)"""
        s = self.s
        if s.refcount[b] != 0:
            raise ValueError(f"block {b} allocated while held (refcount {s.refcount[b]})")
        s.refcount[b] = 1
        if b in s.evictable:
            s.evictable.discard(b)
            s.cached.discard(b)

    def _drop(self, b: int) -> None:
        s = self.s
        if s.refcount[b] <= 0:
            raise ValueError(f"block {b} released with refcount {s.refcount[b]}")
        s.refcount[b] -= 1
        if s.refcount[b] == 0 and b in s.cached:
            s.evictable.add(b)  # parked: the prefix cache keeps it until evicted

    # ------------------------------------------------------------------ block-manager events
    def _on_allocate_seq(self, ev: dict[str, Any]) -> None:
        # The prefix blocks' references were taken by the "share" events just before.
        self.s.tables[str(ev["seq"])] = [NULL_BLOCK] * int(ev.get("num_released", 0)) + list(
            ev.get("prefix_blocks", []))

    def _on_share(self, ev: dict[str, Any]) -> None:
        b = ev["block"]
        self.s.evictable.discard(b)
        self.s.refcount[b] += 1

    def _on_allocate(self, ev: dict[str, Any]) -> None:
        table = self.s.tables[str(ev["seq"])]
        table.extend([NULL_BLOCK] * int(ev.get("pad", 0)))
        for b in ev["blocks"]:
            self._take(b)
            table.append(b)

    def _on_cow(self, ev: dict[str, Any]) -> None:
        table = self.s.tables[str(ev["seq"])]
        src, dst = ev["src"], ev["dst"]
        self._take(dst)
        self._drop(src)
        table[table.index(src)] = dst

    def _on_cache_insert(self, ev: dict[str, Any]) -> None:
        self.s.cached.update(ev["blocks"])

    def _on_fork(self, ev: dict[str, Any]) -> None:
        table = list(self.s.tables[str(ev["parent"])])
        for b in table:
            if b != NULL_BLOCK:
                self.s.refcount[b] += 1
        self.s.tables[str(ev["seq"])] = table

    def _on_free(self, ev: dict[str, Any]) -> None:
        seq = str(ev["seq"])
        table = self.s.tables.pop(seq)
        on_cpu = seq in self.s.swapped
        self.s.swapped.discard(seq)
        for b in reversed(table):
            if b == NULL_BLOCK:
                continue
            if on_cpu:
                self._cpu_drop(b)
            else:
                self._drop(b)

    def _cpu_drop(self, b: int) -> None:
        if self.s.cpu_refcount[b] <= 0:
            raise ValueError(f"cpu block {b} released with refcount {self.s.cpu_refcount[b]}")
        self.s.cpu_refcount[b] -= 1

    def _on_swap_out(self, ev: dict[str, Any]) -> None:
        seqs = [str(x) for x in ev["seqs"]]
        for seq in seqs:
            for b in self.s.tables[seq]:
                if b != NULL_BLOCK:
                    self._drop(b)
        self._set_tables(ev, seqs)
        for seq in seqs:  # every CPU block was fresh; it gets one reference per table entry
            for b in self.s.tables[seq]:
                if b != NULL_BLOCK:
                    self.s.cpu_refcount[b] += 1
        self.s.swapped.update(seqs)

    def _on_swap_in(self, ev: dict[str, Any]) -> None:
        seqs = [str(x) for x in ev["seqs"]]
        for seq in seqs:
            for b in self.s.tables[seq]:
                if b != NULL_BLOCK:
                    self._cpu_drop(b)
        self._set_tables(ev, seqs)
        # Copied blocks start with one reference, cached twins got theirs from "share" events;
        # like the manager, add one more per further table entry inside the group.
        for _, dst in ev["pairs"]:
            self._take(dst)
        counts: dict[int, int] = {}
        for seq in seqs:
            for b in self.s.tables[seq]:
                if b != NULL_BLOCK:
                    counts[b] = counts.get(b, 0) + 1
        for b, c in counts.items():
            self.s.refcount[b] += c - 1
        self.s.swapped.difference_update(seqs)

    def _set_tables(self, ev: dict[str, Any], seqs: list[str]) -> None:
        tables = {str(k): list(v) for k, v in ev["tables"].items()}
        for seq in seqs:
            self.s.tables[seq] = tables[seq]

    def _on_window_release(self, ev: dict[str, Any]) -> None:
        table = self.s.tables[str(ev["seq"])]
        for b in ev["blocks"]:
            table[table.index(b)] = NULL_BLOCK
            self._drop(b)

    def _on_evict(self, ev: dict[str, Any]) -> None:
        b = ev["block"]
        if self.s.refcount[b] != 0:
            raise ValueError(f"block {b} evicted while held")
        self.s.evictable.discard(b)
        self.s.cached.discard(b)

    def _on_cache_reset(self, ev: dict[str, Any]) -> None:
        """Engine-recorded ``reset_prefix_cache()``: every evictable block goes back to free."""
        self.s.cached.difference_update(self.s.evictable)
        self.s.evictable.clear()


# ====================================================================== trace
@dataclass
class Trace:
    """A recorded run: pool sizes, the ordered events and the per-step summaries."""

    header: dict[str, Any]
    events: list[dict[str, Any]]  # each {"step", "kind", ...fields}, in the order they happened
    summaries: dict[int, dict[str, Any]]  # step -> stats passed to end_step

    def __post_init__(self) -> None:
        for name in ("num_blocks", "num_cpu_blocks", "block_size"):
            v = self.header.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"trace header field {name!r} must be a non-negative int, got {v!r}")

    @property
    def num_blocks(self) -> int:
        return int(self.header["num_blocks"])

    @property
    def num_cpu_blocks(self) -> int:
        return int(self.header["num_cpu_blocks"])

    @property
    def block_size(self) -> int:
        return int(self.header["block_size"])

    @property
    def steps(self) -> list[int]:
        """Every step that has a summary or at least one event, ascending."""
        return sorted(set(self.summaries) | {int(e["step"]) for e in self.events})

    @property
    def last_step(self) -> int:
        steps = self.steps
        return steps[-1] if steps else 0

    def initial_state(self) -> PoolState:
        if "initial" in self.header:
            return PoolState.from_dict(self.header["initial"])
        return PoolState.empty(self.num_blocks, self.num_cpu_blocks, self.block_size)

    def events_at(self, step: int) -> list[dict[str, Any]]:
        return [e for e in self.events if e["step"] == step]

    def state_at(self, step: int) -> PoolState:
        """The pool at the end of ``step`` (after all of its events)."""
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= self.last_step:
            raise ValueError(f"step must be an int in [0, {self.last_step}], got {step!r}")
        replay = _Replayer(self.initial_state())
        for ev in self.events:
            if ev["step"] > step:
                break
            replay.apply(ev)
        return replay.s

    def states(self) -> Iterator[tuple[int, PoolState]]:
        """``(step, state at its end)`` for every step in :attr:`steps`, replaying once."""
        replay = _Replayer(self.initial_state())
        events = iter(self.events)
        pending: dict[str, Any] | None = next(events, None)
        for step in self.steps:
            while pending is not None and pending["step"] <= step:
                replay.apply(pending)
                pending = next(events, None)
            yield step, replay.s.copy()

    def timeline(self) -> dict[str, list[int]]:
        """Per-step series for plots: the engine's summary where given, else from the replay."""
        out: dict[str, list[int]] = {k: [] for k in ("step", *REQUIRED_STATS)}
        for step, state in self.states():
            derived = {
                "blocks_used": state.num_used, "blocks_cached": state.num_evictable,
                "blocks_free": state.num_free, "cpu_blocks_used": state.num_cpu_used,
                "swapped": len({split_seq_id(s)[0] for s in state.swapped}),
            }
            stats = self.summaries.get(step, {})
            out["step"].append(step)
            for k in REQUIRED_STATS:
                out[k].append(int(stats.get(k, derived.get(k, 0))))
        return out


def _json_line(obj: dict[str, Any]) -> str:
    # default=str: sequence ids may be any hashable; the trace stores their text form.
    return json.dumps(obj, separators=(",", ":"), default=str)


def _normalise(record: dict[str, Any]) -> dict[str, Any]:
    """What the record looks like after a trip through JSON (tuples -> lists, keys -> str)."""
    return json.loads(_json_line(record))


def load_trace(path: str | Path) -> Trace:
    """Read a JSON-lines trace written by :meth:`TraceRecorder.save` (or streamed)."""
    path = Path(path)
    header: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    summaries: dict[int, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e.msg})") from e
            if header is None:
                if rec.get("kind") != HEADER_KIND:
                    raise ValueError(f"{path}:{lineno}: the first line must be the trace header")
                header = rec
            elif rec.get("kind") == STEP_KIND:
                summaries[int(rec["step"])] = dict(rec.get("stats", {}))
            else:
                events.append(rec)
    if header is None:
        raise ValueError(f"{path}: empty trace (no header line)")
    return Trace(header, events, summaries)


# ====================================================================== recorder
class TraceRecorder:
    """Listens to a block manager and records its events per engine step.

    ``path`` given: lines are streamed to that file as they happen (memory stays flat on long
    runs).  Otherwise they are kept in memory until :meth:`save`.  Events between
    ``end_step(n)`` and the next ``begin_step`` are filed under step ``n + 1``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._header: dict[str, Any] | None = None
        self._records: list[dict[str, Any]] = []  # events and summaries (memory mode)
        self._file: IO[str] | None = None
        self._bm: BlockManager | None = None
        self._prev_listener: EventListener | None = None
        self._step = 0
        self._open_step: int | None = None
        self._last_ended = -1

    # ------------------------------------------------------------------ wiring
    def attach(self, bm: BlockManager) -> TraceRecorder:
        """Start listening to ``bm`` (an existing listener keeps receiving every event)."""
        if self._bm is not None:
            raise RuntimeError("this recorder is already attached to a block manager")
        self._header = _header_for(bm)
        self._bm = bm
        self._prev_listener = bm.listener
        prev = bm.listener

        def listener(kind: str, fields: dict[str, Any]) -> None:
            self._record({"step": self._step, "kind": kind, **fields})
            if prev is not None:
                prev(kind, fields)

        bm.listener = listener
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
            self._file.write(_json_line(self._header) + "\n")
        return self

    def detach(self) -> None:
        if self._bm is not None:
            self._bm.listener = self._prev_listener
            self._bm = None

    # ------------------------------------------------------------------ recording
    def begin_step(self, step: int) -> None:
        self._check_step(step)
        self._open_step = self._step = step

    def end_step(self, step: int, stats: dict[str, Any]) -> None:
        if self._open_step is not None and step != self._open_step:
            raise ValueError(f"end_step({step}) does not match begin_step({self._open_step})")
        self._check_step(step)
        missing = [k for k in REQUIRED_STATS if k not in stats]
        if missing:
            raise ValueError(f"end_step stats lack field(s) {missing}")
        self._record({"step": step, "kind": STEP_KIND, "stats": dict(stats)})
        self._last_ended, self._open_step, self._step = step, None, step + 1
        if self._file is not None:
            self._file.flush()

    def event(self, kind: str, **fields: Any) -> None:
        """An engine-level event (``preempt``, ``finish``, ``abort``, ``cache_reset`` ...)."""
        if not kind or kind in (STEP_KIND, HEADER_KIND):
            raise ValueError(f"kind must be a non-empty event name other than 'step'/'header', got {kind!r}")
        if "step" in fields:
            raise ValueError("event fields must not include 'step' (the recorder sets it)")
        self._record({"step": self._step, "kind": kind, **fields})

    def _check_step(self, step: int) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step <= self._last_ended:
            raise ValueError(f"step must be an int greater than the last ended step {self._last_ended}, "
                             f"got {step!r}")

    def _record(self, rec: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(_json_line(rec) + "\n")
        else:
            self._records.append(rec)

    # ------------------------------------------------------------------ output
    def trace(self) -> Trace:
        """Everything recorded so far, as a :class:`Trace` (JSON-normalised)."""
        header = self._require_header()
        if self.path is not None:
            self._flush()
            return load_trace(self.path)
        events: list[dict[str, Any]] = []
        summaries: dict[int, dict[str, Any]] = {}
        for rec in self._records:
            rec = _normalise(rec)
            if rec["kind"] == STEP_KIND:
                summaries[rec["step"]] = rec["stats"]
            else:
                events.append(rec)
        return Trace(_normalise(header), events, summaries)

    def save(self, path: str | Path) -> Path:
        """Write the trace as JSON lines to ``path`` and return it."""
        header = self._require_header()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.path is not None:
            self._flush()
            if path.resolve() != self.path.resolve():
                shutil.copyfile(self.path, path)
            return path
        with path.open("w", encoding="utf-8") as f:
            f.write(_json_line(header) + "\n")
            for rec in self._records:
                f.write(_json_line(rec) + "\n")
        return path

    def close(self) -> None:
        """Stop listening; a streamed file is flushed and closed."""
        self.detach()
        if self._file is not None:
            self._file.close()
            self._file = None  # later trace()/save() calls read the finished file

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def _require_header(self) -> dict[str, Any]:
        if self._header is None:
            raise RuntimeError("attach() the recorder to a block manager before saving its trace")
        return self._header

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
