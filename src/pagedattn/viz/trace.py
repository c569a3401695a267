"""Recording what the block pool does, step by step, and reading it back.

The block manager reports every change to its pool through its ``listener`` hook (``allocate``,
``share``, ``cow``, ``swap_out`` ...), and each report carries the *state it left*: the refcount
and prefix-cache status of every block it touched and the table of every sequence it touched,
read from the manager itself.  :class:`TraceRecorder` appends those events, tagged with the
engine step they happened in, plus one summary per step, and writes them as JSON lines::

    {"kind": "header", "format": "pagedattn.trace", "version": 2, "num_blocks": 64, ...}
    {"step": 3, "kind": "allocate", "seq": "7#0", "blocks": [5], "pad": 0,
     "state": {"gpu": [[5, 1, false, false]], "cpu": [], "seqs": [["7#0", [2, 5], false]]}}
    {"step": 3, "kind": "step", "stats": {"running": 2, "waiting": 0, ...}}

:class:`Trace` rebuilds the pool (:class:`PoolState`) at the end of any step by writing those
states down in order -- it knows nothing of the manager's refcount, park or evict rules, so it
need not change when they do.  :func:`snapshot` reads the same picture from a live manager.
A :class:`PoolState` stores only blocks that are in use, so its size follows the run, not the
pool (a header may claim any number of blocks).  Nothing here imports torch or matplotlib.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeGuard

from ..cache.block_manager import NULL_BLOCK, BlockManager, EventListener

TRACE_FORMAT = "pagedattn.trace"
TRACE_VERSION = 2  # 2: events carry the state they left (1 was replayed by re-applying the rules)
STEP_KIND = "step"  # the per-step summary line
HEADER_KIND = "header"
REQUIRED_STATS = (
    "running", "waiting", "swapped", "blocks_used", "blocks_cached", "blocks_free",
    "cpu_blocks_used", "num_tokens",
)
MIN_SHOWN_BLOCKS = 16  # pictures show at least this much of a pool (one row), even if less was used


class TraceWarning(UserWarning):
    """Something in a trace was skipped but the rest could be read (e.g. a cut-off last line)."""


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
    """The block pool at one moment, holding only blocks that are in use.

    A GPU block is *free* (refcount 0, not cached), *held* (refcount >= 1; its owners are the
    sequences whose tables point at it) or *cached* (refcount 0 but kept by the prefix cache,
    evictable).  ``cached`` lists every block the prefix cache knows, held or not.  Sequence ids
    are strings; tables keep :data:`NULL_BLOCK` where the sliding window released a block.
    """

    num_blocks: int
    num_cpu_blocks: int
    block_size: int
    refcounts: dict[int, int] = field(default_factory=dict)  # held GPU block -> refcount (>= 1)
    evictable: set[int] = field(default_factory=set)  # GPU blocks with refcount 0 kept by the prefix cache
    cached: set[int] = field(default_factory=set)  # GPU blocks registered in the prefix cache (held or evictable)
    cpu_refcounts: dict[int, int] = field(default_factory=dict)  # used CPU block -> refcount (>= 1)
    tables: dict[str, list[int]] = field(default_factory=dict)  # block table of every live sequence
    swapped: set[str] = field(default_factory=set)  # sequences whose table indexes the CPU pool

    # ------------------------------------------------------------------ per block
    def ref(self, block: int) -> int:
        """Refcount of a GPU block (0 for free and cached ones)."""
        return self.refcounts.get(block, 0)

    def cpu_ref(self, block: int) -> int:
        return self.cpu_refcounts.get(block, 0)

    def status(self, block: int) -> str:
        """``"free"``, ``"held"`` or ``"cached"`` (evictable) for a GPU block."""
        if block in self.refcounts:
            return "held"
        return "cached" if block in self.evictable else "free"

    def gpu_owners(self) -> dict[int, list[str]]:
        """For each held GPU block, the sequences holding it (sorted by request, then sample)."""
        return self._owners(on_cpu=False)

    def cpu_owners(self) -> dict[int, list[str]]:
        return self._owners(on_cpu=True)

    def _owners(self, on_cpu: bool) -> dict[int, list[str]]:
        owners: dict[int, list[str]] = {}
        for seq in sorted(self.tables, key=seq_sort_key):
            if (seq in self.swapped) != on_cpu:
                continue
            for b in self.tables[seq]:
                if b != NULL_BLOCK:
                    owners.setdefault(b, []).append(seq)
        return owners

    # ------------------------------------------------------------------ totals
    @property
    def num_used(self) -> int:
        return len(self.refcounts)

    @property
    def num_evictable(self) -> int:
        return len(self.evictable)

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used - self.num_evictable

    @property
    def num_cpu_used(self) -> int:
        return len(self.cpu_refcounts)

    def requests(self) -> list[str]:
        """Request ids with at least one live sequence, in display order."""
        return sorted({split_seq_id(s)[0] for s in self.tables}, key=request_sort_key)

    def copy(self) -> PoolState:
        return PoolState(
            self.num_blocks, self.num_cpu_blocks, self.block_size, dict(self.refcounts), set(self.evictable),
            set(self.cached), dict(self.cpu_refcounts), {s: list(t) for s, t in self.tables.items()},
            set(self.swapped),
        )

    # ------------------------------------------------------------------ the recorded form
    def apply(self, record: dict[str, Any]) -> None:
        """Write down a recorded state (an event's ``state``, see :meth:`BlockManager._state_of`):
        each named block and sequence takes the value recorded for it.  No pool rule is applied."""
        for b, ref, in_cache, evictable in record.get("gpu", ()):
            _put(self.refcounts, b, ref)
            _mark(self.cached, b, in_cache)
            _mark(self.evictable, b, evictable)
        for b, ref in record.get("cpu", ()):
            _put(self.cpu_refcounts, b, ref)
        for seq, table, on_cpu in record.get("seqs", ()):
            seq = str(seq)
            if table is None:
                self.tables.pop(seq, None)
                self.swapped.discard(seq)
            else:
                self.tables[seq] = list(table)
                _mark(self.swapped, seq, on_cpu)

    def to_record(self) -> dict[str, list[Any]]:
        """Every block and sequence in use, in the recorded form (``PoolState.empty(...).apply``
        of it gives this state back)."""
        gpu = sorted(set(self.refcounts) | self.cached | self.evictable)
        return {
            "gpu": [[b, self.ref(b), b in self.cached, b in self.evictable] for b in gpu],
            "cpu": [[b, r] for b, r in sorted(self.cpu_refcounts.items())],
            "seqs": [[s, list(t), s in self.swapped] for s, t in sorted(self.tables.items())],
        }

    @classmethod
    def empty(cls, num_blocks: int, num_cpu_blocks: int, block_size: int) -> PoolState:
        return cls(num_blocks, num_cpu_blocks, block_size)


def shown_blocks(top: int, pool: int) -> int:
    """Leading blocks to draw when ``top`` is the highest block id in use: at least
    :data:`MIN_SHOWN_BLOCKS`, at most the pool."""
    return min(pool, max(top + 1, MIN_SHOWN_BLOCKS))


def _put(counts: dict[int, int], block: int, ref: int) -> None:
    if ref > 0:
        counts[block] = ref
    else:
        counts.pop(block, None)


def _mark(members: set[Any], item: Any, on: bool) -> None:
    if on:
        members.add(item)
    else:
        members.discard(item)


def snapshot(bm: BlockManager) -> PoolState:
    """Read the pool of a live block manager (what a recorded trace must reproduce)."""
    n, m = bm.num_blocks, bm.cpu.num_blocks
    tables: dict[str, list[int]] = {}
    swapped: set[str] = set()
    for s in bm.seq_ids():
        if bm.is_swapped(s):
            tables[str(s)] = list(bm.swapped_block_table(s))
            swapped.add(str(s))
        else:
            tables[str(s)] = list(bm.block_table(s))
    return PoolState(
        num_blocks=n, num_cpu_blocks=m, block_size=bm.block_size,
        refcounts={b: r for b in range(n) if (r := bm.gpu.refcount(b)) > 0},
        evictable=set(bm.cache.evictable_blocks()),
        cached={b for b in range(n) if bm.cache.is_cached(b)},
        cpu_refcounts={b: r for b in range(m) if (r := bm.cpu.refcount(b)) > 0},
        tables=tables, swapped=swapped,
    )


def _header_for(bm: BlockManager) -> dict[str, Any]:
    header: dict[str, Any] = {
        "kind": HEADER_KIND, "format": TRACE_FORMAT, "version": TRACE_VERSION,
        "num_blocks": bm.num_blocks, "num_cpu_blocks": bm.cpu.num_blocks, "block_size": bm.block_size,
        "sliding_window": bm.sliding_window, "enable_prefix_caching": bm.enable_prefix_caching,
    }
    state = snapshot(bm)
    if state != PoolState.empty(bm.num_blocks, bm.cpu.num_blocks, bm.block_size):
        header["initial"] = state.to_record()  # attached mid-run: the pool starts from here
    return header


# ====================================================================== checking records
def _is_int(v: Any, lo: int = 0) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _check_block(b: Any, n: int, what: str) -> None:
    if not _is_int(b) or b >= n:
        raise ValueError(f"{what} {b!r} is not a block of a {n}-block pool")


def _check_state(rec: Any, header: dict[str, Any], where: str) -> None:
    """A recorded state (see :meth:`PoolState.apply`) must name real blocks with sane values."""
    n, m = header["num_blocks"], header["num_cpu_blocks"]
    if not isinstance(rec, dict):
        raise ValueError(f"{where} must be an object, got {type(rec).__name__}")
    for key in ("gpu", "cpu", "seqs"):
        if not isinstance(rec.get(key, []), list):
            raise ValueError(f"{where}.{key} must be a list")
    for e in rec.get("gpu", []):
        if not (isinstance(e, list) and len(e) == 4 and _is_int(e[1]) and all(isinstance(x, bool) for x in e[2:])):
            raise ValueError(f"{where}.gpu entry {e!r} is not [block, refcount, in_cache, evictable]")
        _check_block(e[0], n, f"{where}.gpu block")
    for e in rec.get("cpu", []):
        if not (isinstance(e, list) and len(e) == 2 and _is_int(e[1])):
            raise ValueError(f"{where}.cpu entry {e!r} is not [block, refcount]")
        _check_block(e[0], m, f"{where}.cpu block")
    for e in rec.get("seqs", []):
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[2], bool)
                and (e[1] is None or isinstance(e[1], list))):
            raise ValueError(f"{where}.seqs entry {e!r} is not [seq, table or null, on_cpu]")
        for b in e[1] or ():
            if b != NULL_BLOCK:
                _check_block(b, m if e[2] else n, f"{where}.seqs table entry")


def _check_header(rec: dict[str, Any]) -> None:
    if rec.get("format", TRACE_FORMAT) != TRACE_FORMAT:
        raise ValueError(f"not a {TRACE_FORMAT} header (format {rec.get('format')!r})")
    if rec.get("version") != TRACE_VERSION:
        raise ValueError(f"trace format version {rec.get('version')!r} is not supported (this viewer reads "
                         f"version {TRACE_VERSION}); record the run again")
    for name in ("num_blocks", "num_cpu_blocks", "block_size"):
        if not _is_int(rec.get(name), 1 if name == "block_size" else 0):
            raise ValueError(f"header field {name!r} must be a {'positive' if name == 'block_size' else 'non-negative'}"
                             f" int, got {rec.get(name)!r}")
    if "initial" in rec:
        _check_state(rec["initial"], rec, "header field 'initial'")


def _check_record(rec: dict[str, Any], header: dict[str, Any], last_step: int) -> None:
    step, kind = rec.get("step"), rec.get("kind")
    if kind == HEADER_KIND:
        raise ValueError("a second header line")
    if not _is_int(step):
        raise ValueError(f"field 'step' must be a non-negative int, got {step!r}")
    if step < last_step:
        raise ValueError(f"step {step} comes after step {last_step} (records must be in step order)")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"field 'kind' must be a non-empty string, got {kind!r}")
    if kind == STEP_KIND:
        stats = rec.get("stats")
        if not isinstance(stats, dict):
            raise ValueError(f"field 'stats' of a step summary must be an object, got {stats!r}")
        for k in REQUIRED_STATS:
            if k in stats and not _is_int(stats[k]):
                raise ValueError(f"field 'stats.{k}' must be a non-negative int, got {stats[k]!r}")
    elif "state" in rec:
        _check_state(rec["state"], header, "field 'state'")


# ====================================================================== trace
@dataclass
class Trace:
    """A recorded run: pool sizes, the ordered events and the per-step summaries."""

    header: dict[str, Any]
    events: list[dict[str, Any]]  # each {"step", "kind", ...fields}, in the order they happened
    summaries: dict[int, dict[str, Any]]  # step -> stats passed to end_step

    def __post_init__(self) -> None:
        for name in ("num_blocks", "num_cpu_blocks", "block_size"):
            if not _is_int(self.header.get(name)):
                raise ValueError(f"trace header field {name!r} must be a non-negative int, "
                                 f"got {self.header.get(name)!r}")

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
        state = PoolState.empty(self.num_blocks, self.num_cpu_blocks, self.block_size)
        state.apply(self.header.get("initial", {}))
        return state

    def events_at(self, step: int) -> list[dict[str, Any]]:
        return [e for e in self.events if e["step"] == step]

    def state_at(self, step: int) -> PoolState:
        """The pool at the end of ``step`` (after all of its events)."""
        if not _is_int(step) or step > self.last_step:
            raise ValueError(f"step must be an int in [0, {self.last_step}], got {step!r}")
        state = self.initial_state()
        for ev in self.events:
            if ev["step"] > step:
                break
            state.apply(ev.get("state", {}))
        return state

    def states(self) -> Iterator[tuple[int, PoolState]]:
        """``(step, state at its end)`` for every step in :attr:`steps`, in one pass."""
        state = self.initial_state()
        events = iter(self.events)
        pending: dict[str, Any] | None = next(events, None)
        for step in self.steps:
            while pending is not None and pending["step"] <= step:
                state.apply(pending.get("state", {}))
                pending = next(events, None)
            yield step, state.copy()

    def busiest_step(self) -> int:
        """The first step holding the most blocks (GPU and CPU together): the default picture."""
        best, best_used = self.last_step, -1
        for step, state in self.states():
            used = state.num_used + state.num_cpu_used
            if used > best_used:
                best, best_used = step, used
        return best

    def extent(self) -> tuple[int, int]:
        """How many leading GPU and CPU blocks cover every block the run ever used, rounded up
        to at least :data:`MIN_SHOWN_BLOCKS` (or the whole pool): what pictures draw.  The
        allocator hands out low ids first, so this is usually a small corner of a large pool."""
        top_gpu, top_cpu = -1, -1
        for rec in [self.header.get("initial", {}), *(e.get("state", {}) for e in self.events)]:
            for b, ref, in_cache, _ in rec.get("gpu", ()):
                if ref or in_cache:
                    top_gpu = max(top_gpu, b)
            for b, ref in rec.get("cpu", ()):
                if ref:
                    top_cpu = max(top_cpu, b)
        return shown_blocks(top_gpu, self.num_blocks), shown_blocks(top_cpu, self.num_cpu_blocks) if top_cpu >= 0 else 0

    def timeline(self) -> dict[str, list[int]]:
        """Per-step series for plots: the engine's summary where given, else from the states."""
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


def _parse_lines(lines: Iterable[str], source: str) -> Trace:
    """Build a :class:`Trace` from JSON lines, checking each; errors name ``source:line``.

    A last line that is cut off (no newline, not valid JSON: the recording process died while
    writing it) is skipped with a :class:`TraceWarning`, so a crashed run can still be drawn.
    """
    header: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    summaries: dict[int, dict[str, Any]] = {}
    last_step = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if line.endswith("\n"):
                raise ValueError(f"{source}:{lineno}: not a JSON line ({e.msg})") from e
            # Only the last line can lack its newline: the writer stopped in the middle of it.
            if header is None:
                raise ValueError(f"{source}: empty trace (its header line is cut off)") from e
            warnings.warn(f"{source}:{lineno}: the last line is cut off (the run stopped while writing it); "
                          f"reading the trace up to step {last_step}", TraceWarning, stacklevel=3)
            break
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            if header is None:
                if rec.get("kind") != HEADER_KIND:
                    raise ValueError("the first line must be the trace header")
                _check_header(rec)
                header = rec
                continue
            _check_record(rec, header, last_step)
        except ValueError as e:
            raise ValueError(f"{source}:{lineno}: {e}") from None
        last_step = rec["step"]
        if rec["kind"] == STEP_KIND:
            if last_step in summaries:
                raise ValueError(f"{source}:{lineno}: a second summary for step {last_step}")
            summaries[last_step] = dict(rec["stats"])
        else:
            events.append(rec)
    if header is None:
        raise ValueError(f"{source}: empty trace (no header line)")
    return Trace(header, events, summaries)


def load_trace(path: str | Path) -> Trace:
    """Read a JSON-lines trace written by :class:`TraceRecorder` (streamed or saved).

    Raises ``ValueError`` naming the file and line of the first bad record.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file not found: {path}")
    with path.open(encoding="utf-8", errors="replace") as f:
        return _parse_lines(f, str(path))


def check_trace_path(path: str | Path) -> Path:
    """Make sure a trace can be written to ``path`` before any work is done; return it.

    Raises ``ValueError`` naming the path when its directory does not exist (it is not
    created: a typo should not make directories) or the file cannot be opened for writing.
    Nothing is left behind: an existing file is not truncated and a new one is removed.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write the trace to {path}: directory {parent} does not exist")
    if path.is_dir():
        raise ValueError(f"cannot write the trace to {path}: it is a directory")
    existed = path.exists()
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write the trace to {path}: {e.strerror or e}") from e
    if not existed:
        os.unlink(path)
    return path


# ====================================================================== recorder
class TraceRecorder:
    """Listens to a block manager and records its events per engine step.

    ``path`` given: lines are streamed to that file as they happen (memory stays flat on long
    runs); the path is checked at once (:func:`check_trace_path`).  Otherwise lines are kept in
    memory until :meth:`save`.  Events between ``end_step(n)`` and the next ``begin_step`` are
    filed under step ``n + 1``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = check_trace_path(path) if path is not None else None
        self._header: dict[str, Any] | None = None
        self._lines: list[str] = []  # events and summaries as JSON lines (memory mode)
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
        if self.path is not None:
            try:
                self._file = self.path.open("w", encoding="utf-8")
            except OSError as e:
                raise ValueError(f"cannot write the trace to {self.path}: {e.strerror or e}") from e
        self._header = _header_for(bm)
        self._bm = bm
        self._prev_listener = bm.listener
        prev = bm.listener

        def listener(kind: str, fields: dict[str, Any]) -> None:
            self._record({"step": self._step, "kind": kind, **fields})
            if prev is not None:
                prev(kind, fields)

        bm.listener = listener
        if self._file is not None:
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
        """An engine-level event (``preempt``, ``finish``, ``abort`` ...); it changes no block."""
        if not kind or kind in (STEP_KIND, HEADER_KIND):
            raise ValueError(f"kind must be a non-empty event name other than 'step'/'header', got {kind!r}")
        if "step" in fields or "state" in fields:
            raise ValueError("event fields must not include 'step' or 'state' (the recorder and the "
                             "block manager set them)")
        self._record({"step": self._step, "kind": kind, **fields})

    def _check_step(self, step: int) -> None:
        if not _is_int(step) or step <= self._last_ended:
            raise ValueError(f"step must be an int greater than the last ended step {self._last_ended}, "
                             f"got {step!r}")

    def _record(self, rec: dict[str, Any]) -> None:
        # Serialised at once: the fields may be lists the caller goes on to change.
        line = _json_line(rec) + "\n"
        if self._file is not None:
            self._file.write(line)
        else:
            self._lines.append(line)

    # ------------------------------------------------------------------ output
    def trace(self) -> Trace:
        """Everything recorded so far, as a :class:`Trace`."""
        header = self._require_header()
        if self.path is not None:
            self._flush()
            return load_trace(self.path)
        return _parse_lines([_json_line(header) + "\n", *self._lines], "<recorder>")

    def save(self, path: str | Path) -> Path:
        """Write the trace as JSON lines to ``path`` (its directory must exist) and return it."""
        header = self._require_header()
        path = check_trace_path(path)
        if self.path is not None:
            self._flush()
            if path.resolve() != self.path.resolve():
                shutil.copyfile(self.path, path)
            return path
        with path.open("w", encoding="utf-8") as f:
            f.write(_json_line(header) + "\n")
            f.writelines(self._lines)
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
