"""Tests for the block-pool trace: exact replay, save/load, pictures, HTML page and CLI."""

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
    fork for n>1, preempt by swapping, finish.  Records every step."""

    def __init__(self, bm: BlockManager, rng: random.Random, path: Path | None = None) -> None:
        self.bm = bm
        self.rng = rng
        self.rec = TraceRecorder(path).attach(bm)
        self.tokens: dict[str, list[int]] = {}
        self.requests: dict[str, list[str]] = {}  # request id -> its sequence ids
        self.waiting: list[tuple[str, list[int], int]] = []
        self.step = 0
        self.snapshots: dict[int, PoolState] = {}

    # ------------------------------------------------------------------ operations
    def admit(self, rid: str, prompt: list[int], n: int = 1) -> bool:
        seq = f"{rid}#0"
        match = self.bm.match_prefix(prompt)
        need = self.bm.blocks_needed(None, match.num_tokens, len(prompt) - match.num_tokens, match)
        if not self.bm.can_allocate(need) or not self.bm.allocate_slots(
                seq, match.num_tokens, len(prompt) - match.num_tokens, match):
            return False
        self.bm.commit(seq, prompt, len(prompt))
        self.tokens[seq] = list(prompt)
        self.requests[rid] = [seq]
        for i in range(1, n):
            child = f"{rid}#{i}"
            self.bm.fork(seq, child)
            self.tokens[child] = list(prompt)
            self.requests[rid].append(child)
        return True

    def decode(self, seq: str, token: int | None = None) -> bool:
        toks = self.tokens[seq]
        if not self.bm.allocate_slots(seq, len(toks), 1):
            return False
        toks.append(self.rng.randrange(1000, 50_000) if token is None else token)
        self.bm.commit(seq, toks, len(toks))
        return True

    def finish(self, rid: str) -> None:
        for seq in self.requests.pop(rid):
            self.bm.free(seq)
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
                self.bm.swap_in(self.requests[rid])
                self.rec.event("resume", request=rid)
        self.end(num_tokens=len(self.tokens))
        return next_rid

    def preempt(self, rid: str) -> None:
        seqs = self.requests[rid]
        if self.bm.can_swap_out(seqs):
            self.bm.swap_out(seqs)
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
    eng.bm.swap_out(eng.requests["2"])
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
    eng.bm.swap_in(eng.requests["2"])
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


# ====================================================================== replay
def test_scripted_run_covers_every_pool_event() -> None:
    eng = scripted_run()
    seen = kinds(eng.rec.trace()) | kinds(window_run().rec.trace())
    expected = {"allocate_seq", "allocate", "share", "cow", "cache_insert", "fork", "free",
                "swap_out", "swap_in", "window_release", "evict", "finish", "preempt"}
    assert expected <= seen, expected - seen


@pytest.mark.parametrize("run", [scripted_run, window_run])
def test_replay_matches_live_manager_every_step(run) -> None:
    eng = run(seed=random.randrange(1 << 30))
    trace = eng.rec.trace()
    for step, snap in eng.snapshots.items():
        assert trace.state_at(step) == snap, f"step {step}"
    assert trace.state_at(trace.last_step) == snapshot(eng.bm)
    # The one-pass iterator agrees with random access.
    for step, state in trace.states():
        assert state == eng.snapshots[step]


@pytest.mark.parametrize("window", [None, 12])
def test_replay_exact_on_random_workload(window: int | None) -> None:
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


def test_replay_from_mid_run_attach() -> None:
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
    assert trace.state_at(0) == trace.initial_state()
    assert trace.state_at(1) == snapshot(bm)


def test_pool_state_views() -> None:
    eng = scripted_run(seed=random.randrange(1 << 30))
    state = eng.rec.trace().state_at(7)  # request 2 forked and copied-on-write
    owners = state.gpu_owners()
    shared = [b for b in range(state.num_blocks) if len(owners[b]) > 1]
    assert shared and all(state.refcount[b] == len(owners[b]) for b in range(state.num_blocks))
    assert state.requests() == ["0", "1", "2"]
    assert state.num_used + state.num_evictable + state.num_free == state.num_blocks
    assert {state.status(b) for b in range(state.num_blocks)} == {"held", "free"}
    swapped = eng.rec.trace().state_at(8)
    assert swapped.swapped == {"2#0", "2#1"} and swapped.num_cpu_used > 0
    assert any(swapped.cpu_owners())
    assert PoolState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


# ====================================================================== recorder API
def test_save_load_roundtrip(tmp_path: Path) -> None:
    eng = scripted_run(seed=random.randrange(1 << 30))
    path = eng.rec.save(tmp_path / "t.jsonl")
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert (header["num_blocks"], header["num_cpu_blocks"], header["block_size"]) == (20, 10, 4)
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
    assert streamed.bm.listener is None  # close() detached it


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
    with pytest.raises(ValueError, match="kind"):
        rec.event("step")
    with pytest.raises(ValueError, match="step must be"):
        rec.trace().state_at(9)


def test_load_trace_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "kind": "allocate"}\n')
    with pytest.raises(ValueError, match="header"):
        load_trace(bad)
    bad.write_text('{"kind": "header", "num_blocks": 4, "num_cpu_blocks": 0, "block_size": 4}\n{oops\n')
    with pytest.raises(ValueError, match=":2:"):
        load_trace(bad)
    bad.write_text('{"kind": "header", "num_blocks": -1, "num_cpu_blocks": 0, "block_size": 4}\n')
    with pytest.raises(ValueError, match="num_blocks"):
        load_trace(bad)


def test_cache_reset_event_frees_evictable_blocks() -> None:
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
    rec.event("cache_reset")
    rec.end_step(2, dict.fromkeys(REQUIRED_STATS, 0))
    trace = rec.trace()
    assert trace.state_at(1).num_evictable == 2
    assert trace.state_at(2) == snapshot(bm)


def test_window_tables_keep_null_entries() -> None:
    eng = window_run(seed=random.randrange(1 << 30))
    state = eng.rec.trace().state_at(eng.step)
    assert state.tables["0#0"][0] == NULL_BLOCK
    assert state.tables["1#0"][0] == NULL_BLOCK  # prefix adopted past the window edge


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
        w, h = read_png_size(draw_memory_map(trace.state_at(step), tmp_path / f"map{step}.png", step=step))
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
    assert page_events == trace.events
    assert data["header"]["num_blocks"] == 20


def test_html_cells_replay_to_the_pool_state(tmp_path: Path) -> None:
    """Rebuild each step's cells from the page's keyframes + deltas (as its script does)."""
    from pagedattn.viz import render_html

    eng = scripted_run(seed=random.randrange(1 << 30))
    trace = eng.rec.trace()
    data = embedded_data(render_html(trace, tmp_path / "t.html", keyframe_every=4).read_text())
    gpu: list = []
    for i, entry in enumerate(data["steps"]):
        if str(i) in data["keyframes"]:
            gpu = list(data["keyframes"][str(i)]["gpu"])
        for b, code in entry["dgpu"]:
            gpu[b] = code
        state = trace.state_at(entry["step"])
        groups = data["groups"]
        for b, code in enumerate(gpu):
            status = state.status(b)
            assert (code == 0) == (status == "free") and (code == 1) == (status == "cached")
            if code >= 2:
                owners, ref, _ = groups[code - 2]
                assert owners == state.gpu_owners()[b] and ref == state.refcount[b]


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
    with pytest.raises(SystemExit, match="step"):
        run_viz(args)
