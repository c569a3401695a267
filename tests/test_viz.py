"""Tests for the block-pool trace: recorded states equal the live manager's, save/load, bad
files, pictures, HTML page data and CLI.  (The page in a real browser: test_viz_browser.py.)"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import pytest

from pagedattn.cache import NULL_BLOCK, BlockManager
from pagedattn.viz import PoolState, Trace, TraceRecorder, load_trace, snapshot
from pagedattn.viz.trace import REQUIRED_STATS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ====================================================================== an engine in miniature
class MiniEngine:
    """Drives a real BlockManager the way the scheduler does: prefix match, prefill, decode,
    fork for n>1, preempt by swapping, finish.  Records every step.

    After every call into the manager, the states its events carried so far, written down in
    order, must give exactly the manager's pool (not only at step ends).
    """

    def __init__(self, bm: BlockManager, rng: random.Random, path: Path | None = None) -> None:
        self.bm = bm
        self.rng = rng
        self.rec = TraceRecorder(path).attach(bm)
        self.seen = snapshot(bm)  # the pool as the events so far describe it
        self.checked_ops = 0
        record = bm.listener

        def listener(kind: str, fields: dict) -> None:
            assert record is not None
            record(kind, fields)
            self.seen.apply(json.loads(json.dumps(fields["state"], default=str)))

        bm.listener = listener
        self.tokens: dict[str, list[int]] = {}
        self.requests: dict[str, list[str]] = {}  # request id -> its sequence ids
        self.waiting: list[tuple[str, list[int], int]] = []
        self.step = 0
        self.snapshots: dict[int, PoolState] = {}

    # ------------------------------------------------------------------ operations
    def check(self) -> None:
        assert self.seen == snapshot(self.bm)
        self.checked_ops += 1

    def admit(self, rid: str, prompt: list[int], n: int = 1) -> bool:
        seq = f"{rid}#0"
        match = self.bm.match_prefix(prompt)
        need = self.bm.blocks_needed(None, match.num_tokens, len(prompt) - match.num_tokens, match)
        if not self.bm.can_allocate(need) or not self.bm.allocate_slots(
                seq, match.num_tokens, len(prompt) - match.num_tokens, match):
            self.check()
            return False
        self.check()
        self.bm.commit(seq, prompt, len(prompt))
        self.check()
        self.tokens[seq] = list(prompt)
        self.requests[rid] = [seq]
        for i in range(1, n):
            child = f"{rid}#{i}"
            self.bm.fork(seq, child)
            self.check()
            self.tokens[child] = list(prompt)
            self.requests[rid].append(child)
        return True

    def decode(self, seq: str, token: int | None = None) -> bool:
        toks = self.tokens[seq]
        ok = self.bm.allocate_slots(seq, len(toks), 1)
        self.check()
        if not ok:
            return False
        toks.append(self.rng.randrange(1000, 50_000) if token is None else token)
        self.bm.commit(seq, toks, len(toks))
        self.check()
        return True

    def finish(self, rid: str) -> None:
        for seq in self.requests.pop(rid):
            self.bm.free(seq)
            self.check()
            del self.tokens[seq]
        self.rec.event("finish", request=rid)

    def running(self) -> list[str]:
        return [r for r, seqs in self.requests.items() if not self.bm.is_swapped(seqs[0])]

    def swapped(self) -> list[str]:
        return [r for r, seqs in self.requests.items() if self.bm.is_swapped(seqs[0])]

    # ------------------------------------------------------------------ steps
    def begin(self) -> None:
        self.step += 1
        self.rec.begin_step(self.step)

    def end(self, num_tokens: int = 0) -> None:
        bm = self.bm
        stats = {
            "running": len(self.running()), "waiting": len(self.waiting), "swapped": len(self.swapped()),
            "blocks_used": bm.num_used_blocks, "blocks_cached": bm.num_cached_blocks,
            "blocks_free": bm.gpu.num_free, "cpu_blocks_used": bm.cpu.num_blocks - bm.cpu.num_free,
            "num_tokens": num_tokens,
        }
        self.rec.end_step(self.step, stats)
        bm.check_integrity()
        self.snapshots[self.step] = snapshot(bm)

    def random_step(self, next_rid: int, prefixes: list[list[int]]) -> int:
        """One step of a random workload; returns the next free request id."""
        self.begin()
        rng = self.rng
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes) + [rng.randrange(1000, 50_000) for _ in range(rng.randrange(1, 9))]
            if self.admit(str(next_rid), prompt, n=rng.choice((1, 1, 2, 3))):
                next_rid += 1
        for rid in self.running():
            seqs = self.requests[rid]
            if not all(self.decode(s) for s in list(seqs)):
                self.preempt(rid)
        if self.requests and rng.random() < 0.2:
            self.finish(rng.choice(sorted(self.requests)))
        for rid in self.swapped():
            if rng.random() < 0.5 and self.bm.can_swap_in(self.requests[rid]):
                self.swap(rid, to_cpu=False)
                self.rec.event("resume", request=rid)
        self.end(num_tokens=len(self.tokens))
        return next_rid

    def swap(self, rid: str, to_cpu: bool) -> None:
        (self.bm.swap_out if to_cpu else self.bm.swap_in)(self.requests[rid])
        self.check()

    def preempt(self, rid: str) -> None:
        seqs = self.requests[rid]
        if self.bm.can_swap_out(seqs):
            self.swap(rid, to_cpu=True)
            self.rec.event("preempt", request=rid, mode="swap")
        else:
            self.finish(rid)


def rand_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 50_000) for _ in range(n)]


def scripted_run(tmp_path: Path | None = None, seed: int = 0) -> MiniEngine:
    """Every pool event at least once: prefix sharing, growth, fork + CoW, swap out / in,
    eviction, and (on a window manager) sliding-window release."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=20, block_size=4, num_cpu_blocks=10, watermark=0.0)
    eng = MiniEngine(bm, rng, tmp_path)
    system = rand_tokens(rng, 8)

    eng.begin()  # 1: request 0 prefills; its two full prompt blocks enter the prefix cache
    assert eng.admit("0", system + rand_tokens(rng, 3))
    eng.end(11)
    eng.begin()  # 2: request 1 shares them (prefix hit)
    assert eng.admit("1", system + rand_tokens(rng, 2))
    eng.end(2)
    for _ in range(3):  # 3-5: both grow
        eng.begin()
        assert eng.decode("0#0") and eng.decode("1#0")
        eng.end(2)
    eng.begin()  # 6: request 2 with n=2 forks after prefill
    assert eng.admit("2", rand_tokens(rng, 6), n=2)
    eng.end(6)
    eng.begin()  # 7: both samples write into the shared partial block -> copy-on-write
    assert eng.decode("2#0") and eng.decode("2#1")
    eng.end(2)
    eng.begin()  # 8: request 2 is swapped out as a group
    eng.swap("2", to_cpu=True)
    eng.rec.event("preempt", request="2", mode="swap")
    eng.end(0)
    eng.begin()  # 9: request 0 finishes; its cached blocks become evictable
    eng.finish("0")
    eng.end(0)
    eng.begin()  # 10: a request as big as the whole free pool: evicts the cached blocks
    assert bm.num_cached_blocks > 0
    assert eng.admit("3", rand_tokens(rng, bm.num_free_blocks * bm.block_size))
    eng.end(40)
    eng.begin()  # 11: request 3 finishes, request 2 comes back
    eng.finish("3")
    eng.swap("2", to_cpu=False)
    eng.end(0)
    return eng


def window_run(tmp_path: Path | None = None, seed: int = 0) -> MiniEngine:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=16, block_size=4, num_cpu_blocks=4, sliding_window=8, watermark=0.0)
    eng = MiniEngine(bm, rng, tmp_path)
    prompt = rand_tokens(rng, 18)
    eng.begin()
    assert eng.admit("0", prompt)
    eng.end(18)
    for _ in range(6):
        eng.begin()
        assert eng.decode("0#0")
        eng.end(1)
    eng.begin()  # a prefix hit past the window edge: leading blocks need not be cached
    assert eng.admit("1", prompt + eng.tokens["0#0"][18:22] + [7])
    eng.end(1)
    return eng


def kinds(trace: Trace) -> set[str]:
    return {e["kind"] for e in trace.events}


# ====================================================================== recorded states
def test_scripted_run_covers_every_pool_event() -> None:
    eng = scripted_run()
    seen = kinds(eng.rec.trace()) | kinds(window_run().rec.trace())
    expected = {"allocate_seq", "allocate", "share", "cow", "cache_insert", "fork", "free",
                "swap_out", "swap_in", "window_release", "evict", "finish", "preempt"}
    assert expected <= seen, expected - seen


@pytest.mark.parametrize("run", [scripted_run, window_run])
def test_recorded_states_match_live_manager_every_step(run) -> None:
    eng = run(seed=random.randrange(1 << 30))
    assert eng.checked_ops > 10  # and after each of those manager calls (MiniEngine.check)
    trace = eng.rec.trace()
    for step, snap in eng.snapshots.items():
        assert trace.state_at(step) == snap, f"step {step}"
    assert trace.state_at(trace.last_step) == snapshot(eng.bm)
    # The one-pass iterator agrees with random access.
    for step, state in trace.states():
        assert state == eng.snapshots[step]


@pytest.mark.parametrize("window", [None, 12])
def test_recorded_states_exact_on_random_workload(window: int | None) -> None:
    rng = random.Random(random.randrange(1 << 30))
    bm = BlockManager(num_blocks=32, block_size=4, num_cpu_blocks=16, sliding_window=window, watermark=0.0)
    eng = MiniEngine(bm, rng)
    prefixes = [rand_tokens(rng, 8), rand_tokens(rng, 12), []]
    rid = 0
    for _ in range(80):
        rid = eng.random_step(rid, prefixes)
    trace = eng.rec.trace()
    assert {"share", "evict", "swap_out", "cow"} <= kinds(trace)
    for step, state in trace.states():
        assert state == eng.snapshots[step], f"step {step}"


def test_states_come_from_the_events_not_from_pool_rules() -> None:
    """The reader writes down what each event says the pool became; it applies no rule of its
    own (an allocate that, by the rules, would give refcount 1 shows whatever was recorded)."""
    lines = [
        {"kind": "header", "format": "pagedattn.trace", "version": 2, "num_blocks": 8, "num_cpu_blocks": 2,
         "block_size": 4},
        {"step": 1, "kind": "allocate", "seq": "0#0", "blocks": [3],
         "state": {"gpu": [[3, 5, True, False]], "seqs": [["0#0", [-1, 3], False]]}},
        {"step": 1, "kind": "preempt", "request": "0"},  # engine events carry no state
        {"step": 2, "kind": "anything", "state": {"gpu": [[3, 0, True, True]], "cpu": [[1, 2]],
                                                  "seqs": [["0#0", [1], True]]}},
    ]
    path = "\n".join(json.dumps(x) for x in lines) + "\n"
    trace = _parse(path)
    s1 = trace.state_at(1)
    assert s1.refcounts == {3: 5} and s1.cached == {3} and s1.tables == {"0#0": [NULL_BLOCK, 3]}
    s2 = trace.state_at(2)
    assert s2.refcounts == {} and s2.evictable == {3} and s2.status(3) == "cached"
    assert s2.cpu_refcounts == {1: 2} and s2.swapped == {"0#0"} and s2.cpu_owners() == {1: ["0#0"]}


def _parse(text: str) -> Trace:
    from pagedattn.viz.trace import _parse_lines

    return _parse_lines(text.splitlines(keepends=True), "t.jsonl")


def test_trace_from_mid_run_attach() -> None:
    rng = random.Random(random.randrange(1 << 30))
    bm = BlockManager(num_blocks=12, block_size=4, num_cpu_blocks=4)
    assert bm.allocate_slots("5#0", 0, 9)
    bm.commit("5#0", rand_tokens(rng, 9), 9)
    rec = TraceRecorder().attach(bm)
    rec.begin_step(1)
    bm.fork("5#0", "5#1")
    assert bm.allocate_slots("5#1", 9, 1)
    rec.end_step(1, dict.fromkeys(REQUIRED_STATS, 0))
    trace = rec.trace()
    assert "initial" in trace.header
    assert trace.state_at(0) == trace.initial_state() != PoolState.empty(12, 4, 4)
    assert trace.state_at(1) == snapshot(bm)


def test_pool_state_views() -> None:
    eng = scripted_run(seed=random.randrange(1 << 30))
    state = eng.rec.trace().state_at(7)  # request 2 forked and copied-on-write
    owners = state.gpu_owners()
    shared = [b for b, own in owners.items() if len(own) > 1]
    assert shared and all(state.ref(b) == len(owners.get(b, [])) for b in range(state.num_blocks))
    assert state.requests() == ["0", "1", "2"]
    assert state.num_used + state.num_evictable + state.num_free == state.num_blocks
    assert {state.status(b) for b in range(state.num_blocks)} == {"held", "free"}
    swapped = eng.rec.trace().state_at(8)
    assert swapped.swapped == {"2#0", "2#1"} and swapped.num_cpu_used > 0
    assert all(swapped.cpu_ref(b) == len(own) for b, own in swapped.cpu_owners().items())
    rebuilt = PoolState.empty(state.num_blocks, state.num_cpu_blocks, state.block_size)
    rebuilt.apply(json.loads(json.dumps(state.to_record())))
    assert rebuilt == state


def test_busiest_step_and_extent() -> None:
    eng = scripted_run(seed=random.randrange(1 << 30))
    trace = eng.rec.trace()
    held = {s: st.num_used + st.num_cpu_used for s, st in eng.snapshots.items()}
    assert trace.busiest_step() == min(s for s in held if held[s] == max(held.values()))
    used = {b for st in eng.snapshots.values() for b in [*st.refcounts, *st.evictable]}
    cpu_used = {b for st in eng.snapshots.values() for b in st.cpu_refcounts}
    assert trace.extent() == (max(max(used) + 1, 16), max(max(cpu_used) + 1, min(16, 10)))
    # A large pool of which a few blocks were used: only those (at least one row of 16) are shown.
    bm = BlockManager(num_blocks=2912, block_size=16, num_cpu_blocks=5825)
    rec = TraceRecorder().attach(bm)
    rec.begin_step(0)
    assert bm.allocate_slots("0#0", 0, 70)
    rec.end_step(0, dict.fromkeys(REQUIRED_STATS, 0))
    rec.begin_step(1)
    assert bm.allocate_slots("1#0", 0, 300)
    rec.end_step(1, dict.fromkeys(REQUIRED_STATS, 0))
    rec.begin_step(2)
    bm.free("1#0")
    rec.end_step(2, dict.fromkeys(REQUIRED_STATS, 0))
    trace = rec.trace()
    assert trace.extent() == (5 + 19, 0) and trace.busiest_step() == 1


# ====================================================================== recorder API
def test_save_load_roundtrip(tmp_path: Path) -> None:
    eng = scripted_run(seed=random.randrange(1 << 30))
    path = eng.rec.save(tmp_path / "t.jsonl")
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert (header["num_blocks"], header["num_cpu_blocks"], header["block_size"]) == (20, 10, 4)
    assert header["version"] == 2
    assert all({"step", "kind"} <= json.loads(line).keys() for line in lines[1:])
    loaded = load_trace(path)
    mem = eng.rec.trace()
    assert loaded == mem
    assert sorted(loaded.summaries) == list(range(1, 12))
    assert loaded.state_at(loaded.last_step) == snapshot(eng.bm)


def test_streamed_trace_equals_saved(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    streamed = scripted_run(tmp_path / "live.jsonl", seed=seed)
    in_memory = scripted_run(None, seed=seed)
    streamed.rec.close()
    assert load_trace(tmp_path / "live.jsonl") == in_memory.rec.trace()
    copy = streamed.rec.save(tmp_path / "copy.jsonl")
    assert copy.read_text() == (tmp_path / "live.jsonl").read_text()
    assert streamed.bm.listener is None  # close() detached it (and what was chained after it)


def test_recorder_chains_existing_listener() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seen: list[str] = []
    bm.listener = lambda kind, fields: seen.append(kind)
    rec = TraceRecorder().attach(bm)
    assert bm.allocate_slots("1#0", 0, 5)
    assert seen == ["allocate_seq", "allocate"]
    assert [e["kind"] for e in rec.trace().events] == seen
    rec.detach()
    assert bm.listener is not None and bm.listener.__name__ == "<lambda>"


def test_recorder_rejects_bad_input(tmp_path: Path) -> None:
    rec = TraceRecorder()
    with pytest.raises(RuntimeError, match="attach"):
        rec.save(tmp_path / "x.jsonl")
    rec.attach(BlockManager(num_blocks=4, block_size=4))
    rec.begin_step(3)
    with pytest.raises(ValueError, match="begin_step"):
        rec.end_step(4, dict.fromkeys(REQUIRED_STATS, 0))
    with pytest.raises(ValueError, match="num_tokens"):
        rec.end_step(3, {k: 0 for k in REQUIRED_STATS if k != "num_tokens"})
    rec.end_step(3, dict.fromkeys(REQUIRED_STATS, 0))
    with pytest.raises(ValueError, match="step"):
        rec.begin_step(2)
    with pytest.raises(ValueError, match="step"):
        rec.event("finish", step=4)
    with pytest.raises(ValueError, match="state"):
        rec.event("finish", state={})
    with pytest.raises(ValueError, match="kind"):
        rec.event("step")
    with pytest.raises(ValueError, match="step must be"):
        rec.trace().state_at(9)
    with pytest.raises(ValueError, match="does not exist"):
        rec.save(tmp_path / "missing" / "x.jsonl")


def test_cache_reset_is_recorded_by_the_manager() -> None:
    rng = random.Random(random.randrange(1 << 30))
    bm = BlockManager(num_blocks=8, block_size=4)
    rec = TraceRecorder().attach(bm)
    rec.begin_step(1)
    toks = rand_tokens(rng, 9)
    assert bm.allocate_slots("0#0", 0, 9)
    bm.commit("0#0", toks, 9)
    bm.free("0#0")
    rec.end_step(1, dict.fromkeys(REQUIRED_STATS, 0))
    rec.begin_step(2)
    assert bm.reset_prefix_cache() == 2
    rec.end_step(2, dict.fromkeys(REQUIRED_STATS, 0))
    trace = rec.trace()
    assert trace.state_at(1).num_evictable == 2
    assert trace.state_at(2) == snapshot(bm) and trace.state_at(2).num_evictable == 0


def test_window_tables_keep_null_entries() -> None:
    eng = window_run(seed=random.randrange(1 << 30))
    state = eng.rec.trace().state_at(eng.step)
    assert state.tables["0#0"][0] == NULL_BLOCK
    assert state.tables["1#0"][0] == NULL_BLOCK  # prefix adopted past the window edge


# ====================================================================== bad trace files
HEADER = '{"kind": "header", "format": "pagedattn.trace", "version": 2, "num_blocks": 4, "num_cpu_blocks": 2, ' \
         '"block_size": 4}\n'
STEP = '{"step": %d, "kind": "step", "stats": {"running": 1}}\n'


@pytest.mark.parametrize(("text", "match"), [
    ("", r"empty trace"),
    ('[{"kind": "header"}]\n', r"t.jsonl:1: expected a JSON object, got list"),
    ('{"step": 1, "kind": "allocate"}\n', r"t.jsonl:1: the first line must be the trace header"),
    (HEADER.replace('"num_blocks": 4', '"num_blocks": -1'), r"t.jsonl:1: header field 'num_blocks'"),
    (HEADER.replace('"block_size": 4', '"block_size": 0'), r"t.jsonl:1: header field 'block_size'"),
    (HEADER.replace('"version": 2', '"version": 1'), r"t.jsonl:1: trace format version 1 is not supported"),
    (HEADER + '{"kind": "allocate", "blocks": [1]}\n', r"t.jsonl:2: field 'step' must be a non-negative int"),
    (HEADER + '{"step": "3", "kind": "free"}\n', r"t.jsonl:2: field 'step'"),
    (HEADER + '{"step": 1}\n', r"t.jsonl:2: field 'kind'"),
    (HEADER + STEP % 5 + STEP % 4, r"t.jsonl:3: step 4 comes after step 5"),
    (HEADER + STEP % 5 + STEP % 5, r"t.jsonl:3: a second summary for step 5"),
    (HEADER + "{oops\n" + STEP % 1, r"t.jsonl:2: not a JSON line"),
    (HEADER + HEADER, r"t.jsonl:2: a second header line"),
    (HEADER + '{"step": 1, "kind": "step", "stats": [1]}\n', r"t.jsonl:2: field 'stats'"),
    (HEADER + '{"step": 1, "kind": "step", "stats": {"running": "2"}}\n', r"t.jsonl:2: field 'stats.running'"),
    (HEADER + '{"step": 1, "kind": "free", "state": {"gpu": [[9, 0, false, false]]}}\n',
     r"t.jsonl:2: field 'state'.gpu block 9 is not a block of a 4-block pool"),
    (HEADER + '{"step": 1, "kind": "free", "state": {"gpu": [[1, 0]]}}\n', r"t.jsonl:2: .*\[block, refcount"),
    (HEADER + '{"step": 1, "kind": "swap_out", "state": {"seqs": [["0#0", [0, 2], true]]}}\n',
     r"t.jsonl:2: field 'state'.seqs table entry 2 is not a block of a 2-block pool"),
])
def test_bad_trace_files_are_rejected_naming_the_line_and_field(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_trace(path)


def test_missing_trace_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_trace(tmp_path / "nope.jsonl")


def test_cut_off_last_line_is_read_up_to_the_cut(tmp_path: Path) -> None:
    """A run that died mid-write: everything before the cut is drawn, with a warning."""
    from pagedattn.viz.trace import TraceWarning

    eng = scripted_run(tmp_path / "run.jsonl", seed=random.randrange(1 << 30))
    eng.rec.close()
    lines = (tmp_path / "run.jsonl").read_text().splitlines(keepends=True)
    cut_at = next(i for i in range(len(lines) - 1, 0, -1) if json.loads(lines[i])["step"] == 9)  # inside step 9
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:cut_at]) + lines[cut_at][: len(lines[cut_at]) // 2])
    with pytest.warns(TraceWarning, match=rf"cut.jsonl:{cut_at + 1}: the last line is cut off"):
        trace = load_trace(cut)
    assert trace.last_step == 9 and 9 not in trace.summaries
    for step in range(1, 9):
        assert trace.state_at(step) == eng.snapshots[step]
    # Cut inside the header: nothing to draw.
    cut.write_text(lines[0][:20])
    with pytest.raises(ValueError, match="header line is cut off"):
        load_trace(cut)


def test_header_claiming_a_huge_pool_needs_little_memory(tmp_path: Path) -> None:
    """Memory follows the blocks a trace uses, not the pool size its header claims."""
    import tracemalloc

    from pagedattn.viz import draw_memory_map, draw_timeline
    from pagedattn.viz.html import WHOLE_POOL_MAX_CELLS, page_data

    huge = 200_000_000
    path = tmp_path / "huge.jsonl"
    path.write_text(HEADER.replace('"num_blocks": 4', f'"num_blocks": {huge}') + STEP % 0
                    + '{"step": 1, "kind": "allocate", "seq": "0#0", "blocks": [0, 1], "pad": 0, "state": {"gpu": '
                      '[[0, 1, false, false], [1, 1, false, false]], "seqs": [["0#0", [0, 1], false]]}}\n' + STEP % 1)
    tracemalloc.start()
    try:
        trace = load_trace(path)
        state = trace.state_at(trace.busiest_step())
        data = page_data(trace)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20, peak  # a dense per-block list alone would be 1.6 GB
    assert state.num_used == 2 and state.num_free == huge - 2
    assert data["shown"] == 16 and data["whole"] == WHOLE_POOL_MAX_CELLS
    # The pictures draw the blocks in use (matplotlib's own allocations kept out of the count above).
    draw_memory_map(state, tmp_path / "map.png", extent=trace.extent())
    draw_timeline(trace, tmp_path / "timeline.png")


def test_check_trace_path(tmp_path: Path) -> None:
    from pagedattn.viz.trace import check_trace_path

    with pytest.raises(ValueError, match=r"missing/run.jsonl: directory .*missing does not exist"):
        check_trace_path(tmp_path / "missing" / "run.jsonl")
    assert not (tmp_path / "missing").exists()  # not created
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"afile/run\.jsonl"):
        check_trace_path(tmp_path / "afile" / "run.jsonl")
    with pytest.raises(ValueError, match="is a directory"):
        check_trace_path(tmp_path)
    assert check_trace_path(tmp_path / "new.jsonl") == tmp_path / "new.jsonl"
    assert not (tmp_path / "new.jsonl").exists()  # nothing left behind
    (tmp_path / "old.jsonl").write_text("keep")
    check_trace_path(tmp_path / "old.jsonl")
    assert (tmp_path / "old.jsonl").read_text() == "keep"  # not truncated
    with pytest.raises(ValueError, match="missing"):
        TraceRecorder(tmp_path / "missing" / "run.jsonl")


# ====================================================================== pictures
def read_png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_draw_memory_map_and_timeline(tmp_path: Path) -> None:
    from pagedattn.viz import draw_memory_map, draw_timeline

    eng = scripted_run(seed=random.randrange(1 << 30))
    trace = eng.rec.trace()
    for step in (7, 8):  # forked + copied-on-write; swapped out
        w, h = read_png_size(draw_memory_map(trace.state_at(step), tmp_path / f"map{step}.png", step=step,
                                             extent=trace.extent()))
        assert 300 < w < 4000 and 200 < h < 4000
    w, h = read_png_size(draw_timeline(trace, tmp_path / "timeline.png"))
    assert 300 < w < 4000 and 200 < h < 4000


def test_draw_memory_map_large_pool_is_compact(tmp_path: Path) -> None:
    from pagedattn.viz import draw_memory_map

    rng = random.Random(random.randrange(1 << 30))
    bm = BlockManager(num_blocks=3000, block_size=16, num_cpu_blocks=500, watermark=0.0)
    for r in range(40):
        n = rng.randrange(200, 1200)
        assert bm.allocate_slots(f"{r}#0", 0, n)
        bm.commit(f"{r}#0", rand_tokens(rng, n), n)
    for r in range(0, 40, 3):
        bm.free(f"{r}#0")
    bm.swap_out(["1#0"])
    w, h = read_png_size(draw_memory_map(snapshot(bm), tmp_path / "big.png"))
    assert w < 4000 and h < 4000


def test_pictures_of_a_mostly_empty_pool_zoom_to_the_used_blocks(tmp_path: Path) -> None:
    """A real run on a large pool uses a few blocks: the map draws a row of cells, not 2912,
    and the timeline's scale follows peak use."""
    from pagedattn.viz import draw_memory_map
    from pagedattn.viz.draw import timeline_top

    bm = BlockManager(num_blocks=2912, block_size=16, num_cpu_blocks=5825)
    rec = TraceRecorder().attach(bm)
    rec.begin_step(0)
    assert bm.allocate_slots("0#0", 0, 150)
    bm.fork("0#0", "0#1")
    assert bm.allocate_slots("0#1", 150, 10)  # copy-on-write of the shared partial block
    rec.end_step(0, {**dict.fromkeys(REQUIRED_STATS, 0), "blocks_used": bm.num_used_blocks})
    trace = rec.trace()
    zoomed = draw_memory_map(trace.state_at(0), tmp_path / "zoomed.png", extent=trace.extent())
    whole = draw_memory_map(trace.state_at(0), tmp_path / "whole.png", extent=(2912, 5825))
    # One row of 16 cells against a 2912-cell grid beside a 5825-cell CPU grid.
    assert read_png_size(zoomed)[1] < 300 < read_png_size(whole)[1]
    top, is_zoomed = timeline_top(2912, trace.timeline())
    assert is_zoomed and 11 <= top <= 15  # 11 blocks held at the peak
    assert timeline_top(16, {"blocks_used": [12], "blocks_cached": [2], "cpu_blocks_used": [3]}) == (16 * 1.02, False)


# ====================================================================== HTML page
def embedded_data(html: str) -> dict:
    m = re.search(r'<script id="trace-data" type="application/json">(.*?)</script>', html, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_html_is_self_contained_and_embeds_events(tmp_path: Path) -> None:
    from pagedattn.viz import render_html

    eng = scripted_run(seed=random.randrange(1 << 30))
    trace = eng.rec.trace()
    html = render_html(trace, tmp_path / "trace.html").read_text(encoding="utf-8")
    assert not re.search(r"https?://", html)
    assert not re.search(r"""\b(src|href)\s*=""", html)
    assert "<link" not in html and "@import" not in html
    data = embedded_data(html)
    assert [s["step"] for s in data["steps"]] == trace.steps
    page_events = [e for s in data["steps"] for e in s["events"]]
    assert page_events == [{k: v for k, v in e.items() if k != "state"} for e in trace.events]
    assert data["header"]["num_blocks"] == 20
    assert data["steps"][data["start"]]["step"] == trace.busiest_step()


def test_html_cells_equal_the_pool_state(tmp_path: Path) -> None:
    """Rebuild each step's cells from the page's keyframes + deltas (as its script does)."""
    from pagedattn.viz import render_html

    eng = scripted_run(seed=random.randrange(1 << 30))
    trace = eng.rec.trace()
    data = embedded_data(render_html(trace, tmp_path / "t.html", keyframe_every=4).read_text())
    assert (data["shown"], data["cpuShown"]) == trace.extent()  # 20 and 10: full rows already
    gpu: list = []
    for i, entry in enumerate(data["steps"]):
        if str(i) in data["keyframes"]:
            gpu = list(data["keyframes"][str(i)]["gpu"])
        for b, code in entry["dgpu"]:
            gpu[b] = code
        state = eng.snapshots[entry["step"]]
        groups = data["groups"]
        assert len(gpu) == data["shown"]
        for b, code in enumerate(gpu):
            status = state.status(b)
            assert (code == 0) == (status == "free") and (code == 1) == (status == "cached")
            if code >= 2:
                owners, ref, _ = groups[code - 2]
                assert owners == state.gpu_owners()[b] and ref == state.ref(b)


# ====================================================================== CLI
def test_cli_writes_pictures_and_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pagedattn.viz import add_viz_parser, run_viz

    eng = scripted_run(seed=random.randrange(1 << 30))
    path = eng.rec.save(tmp_path / "run.jsonl")
    parser = argparse.ArgumentParser(prog="pagedattn")
    add_viz_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["viz", str(path), "--out", str(tmp_path / "out"), "--step", "8", "--html"])
    assert run_viz(args) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in printed)
    assert names == ["memory_map.png", "timeline.png", "trace.html"]
    for p in printed:
        assert Path(p).stat().st_size > 0
    assert Path(printed[0]).read_bytes()[:8] == PNG_MAGIC

    args = parser.parse_args(["viz", str(path), "--out", str(tmp_path / "o2"), "--step", "99"])
    with pytest.raises(ValueError, match="step"):
        run_viz(args)


def test_pagedattn_viz_reports_bad_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pagedattn viz``: a bad file is ``error: ...`` and exit status 2; a cut-off one a warning."""
    from pagedattn.entrypoints.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(HEADER + '{"kind": "allocate"}\n')
    assert main(["viz", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:2: field 'step'" in err and "Traceback" not in err
    assert main(["viz", str(tmp_path / "none.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err

    cut = tmp_path / "cut.jsonl"
    cut.write_text(HEADER + STEP % 0 + STEP[:20])
    assert main(["viz", str(cut), "--out", str(tmp_path / "o")]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: ") and "cut.jsonl:3: the last line is cut off" in err
    assert len(out.split()) == 2


def test_generate_checks_the_trace_path_before_loading_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pagedattn.entrypoints import cli

    def no_model(config: object) -> None:
        raise AssertionError("the model must not load when the trace path is bad")

    monkeypatch.setattr(cli, "build_llm", no_model)
    target = tmp_path / "no_such_dir" / "run.jsonl"
    assert cli.main(["generate", "hi", "--trace", str(target)]) == 2
    assert f"error: cannot write the trace to {target}" in capsys.readouterr().err
    assert not target.parent.exists()
