"""One self-contained HTML page that steps through a trace.

Everything is inline (CSS, script, data): the page opens from disk, offline, and can be mailed
around.  The pool states come from the trace (the manager's own, see :mod:`.trace`); the page
gets per-step *changes* of each cell plus a full keyframe every few steps, so jumping with the
slider costs at most ``keyframe_every`` small updates and the file stays small.

Only the blocks the run used are in the data (``Trace.extent()``, rounded up to full rows):
the allocator hands out low ids first, so on a large pool that is a small corner.  The page
draws those by default; "show the whole pool" adds the rest, all free, up to
:data:`WHOLE_POOL_MAX_CELLS` cells.

Cell codes: ``0`` free, ``1`` cached (evictable), ``k >= 2`` held, described by
``groups[k - 2] = [owners, refcount, in_prefix_cache]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .draw import CACHED_COLOR, FREE_COLOR, grid_columns, request_color, round_to_rows, seq_color
from .trace import PoolState, Trace, seq_sort_key, split_seq_id

FREE, CACHED = 0, 1
WHOLE_POOL_MAX_CELLS = 50_000  # a browser lays out this many cells per pool in well under a second


class _Encoder:
    """Interns held-cell descriptions so each cell is one small int in the page."""

    def __init__(self) -> None:
        self.groups: list[list[Any]] = []
        self._index: dict[tuple[tuple[str, ...], int, bool], int] = {}

    def code(self, owners: list[str], ref: int, in_cache: bool) -> int:
        key = (tuple(owners), ref, in_cache)
        if key not in self._index:
            self._index[key] = len(self.groups) + 2
            self.groups.append([list(owners), ref, in_cache])
        return self._index[key]

    def gpu(self, state: PoolState, count: int) -> list[int]:
        """Codes of GPU blocks ``0 .. count-1``."""
        owners = state.gpu_owners()
        out = []
        for b in range(count):
            ref = state.ref(b)
            if ref > 0:
                out.append(self.code(owners.get(b, []), ref, b in state.cached))
            else:
                out.append(CACHED if b in state.evictable else FREE)
        return out

    def cpu(self, state: PoolState, count: int) -> list[int]:
        owners = state.cpu_owners()
        return [self.code(owners.get(b, []), r, False) if (r := state.cpu_ref(b)) > 0 else FREE
                for b in range(count)]


def _tables(state: PoolState) -> dict[str, dict[str, Any]]:
    return {s: {"cpu": s in state.swapped, "blocks": state.tables[s]}
            for s in sorted(state.tables, key=seq_sort_key)}


def _diff(prev: list[int], cur: list[int]) -> list[list[int]]:
    return [[i, c] for i, (p, c) in enumerate(zip(prev, cur)) if p != c]


def _shown(count: int, total: int) -> tuple[int, int]:
    """``(cells, columns)`` of a pool's zoomed grid (no cells when the run never used it)."""
    return round_to_rows(count, total) if count else (0, 0)


def page_data(trace: Trace, keyframe_every: int = 25) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data (see the module docstring)."""
    if not isinstance(keyframe_every, int) or keyframe_every < 1:
        raise ValueError(f"keyframe_every must be a positive int, got {keyframe_every!r}")
    gpu_count, cpu_count = trace.extent()
    (n, cols), (m, cpu_cols) = _shown(gpu_count, trace.num_blocks), _shown(cpu_count, trace.num_cpu_blocks)
    enc = _Encoder()
    events_by_step: dict[int, list[dict[str, Any]]] = {}
    for ev in trace.events:  # the recorded states are in the cells; the list shows what happened
        events_by_step.setdefault(int(ev["step"]), []).append({k: v for k, v in ev.items() if k != "state"})
    init = trace.initial_state()
    prev_gpu, prev_cpu, prev_tables = enc.gpu(init, n), enc.cpu(init, m), _tables(init)
    steps: list[dict[str, Any]] = []
    keyframes: dict[str, dict[str, Any]] = {}
    seqs: set[str] = set(init.tables)
    for i, (step, state) in enumerate(trace.states()):
        gpu, cpu, tables = enc.gpu(state, n), enc.cpu(state, m), _tables(state)
        seqs.update(tables)
        dtables: dict[str, Any] = {s: t for s, t in tables.items() if prev_tables.get(s) != t}
        dtables.update({s: None for s in prev_tables if s not in tables})
        steps.append({"step": step, "stats": trace.summaries.get(step, {}), "events": events_by_step.get(step, []),
                      "dgpu": _diff(prev_gpu, gpu), "dcpu": _diff(prev_cpu, cpu), "dtables": dtables})
        if i % keyframe_every == 0:
            keyframes[str(i)] = {"gpu": gpu, "cpu": cpu, "tables": tables}
        prev_gpu, prev_cpu, prev_tables = gpu, cpu, tables
    requests = {split_seq_id(s)[0] for s in seqs}
    header = {k: v for k, v in trace.header.items() if k != "initial"}
    whole_n = min(trace.num_blocks, WHOLE_POOL_MAX_CELLS)
    whole_m = min(trace.num_cpu_blocks, WHOLE_POOL_MAX_CELLS)
    return {
        "header": header,
        "shown": n, "cols": cols, "cpuShown": m, "cpuCols": cpu_cols,
        "whole": whole_n, "wholeCols": grid_columns(whole_n),
        "cpuWhole": whole_m, "cpuWholeCols": grid_columns(whole_m) if whole_m else 0,
        "start": trace.steps.index(trace.busiest_step()) if steps else 0,
        "colors": {s: seq_color(s) for s in sorted(seqs, key=seq_sort_key)},
        "requestColors": {r: request_color(r) for r in sorted(requests)},
        "palette": {"free": FREE_COLOR, "cached": CACHED_COLOR},
        "groups": enc.groups,
        "keyframeEvery": keyframe_every,
        "keyframes": keyframes,
        "steps": steps,
    }


def _embed_json(data: Any) -> str:
    # Escape what could end the <script> element or open a comment inside it.
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(trace: Trace, path: str | Path, *, keyframe_every: int = 25,
                title: str = "pagedattn · KV block pool") -> Path:
    """Write the stepping page for ``trace`` to ``path`` and return the path."""
    data = page_data(trace, keyframe_every)
    html = (_PAGE.replace("__TITLE__", _escape(title)).replace("__CSS__", _CSS).replace("__JS__", _JS)
            .replace("__DATA__", _embed_json(data)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <div class="sub" id="sub"></div>
</header>
<div class="controls">
  <button id="first" title="first step (Home)">&#x25C0;&#x25C0;</button>
  <button id="prev" title="previous step (&#x2190;)">&#x25C0; prev</button>
  <input type="range" id="slider" min="0" max="0" value="0">
  <button id="next" title="next step (&#x2192;)">next &#x25B6;</button>
  <button id="last" title="last step (End)">&#x25B6;&#x25B6;</button>
  <button id="play" title="play / pause (space)">play</button>
  <span id="steplabel" class="steplabel"></span>
</div>
<div class="stats" id="stats"></div>
<div class="zoombar" id="zoombar"><span id="zoomnote" class="muted"></span>
  <button id="zoom" title="toggle the whole pool (z)"></button></div>
<div class="pools">
  <section><h2>GPU KV block pool <span class="count" id="gpucount"></span></h2>
    <div id="gpu" class="grid"></div></section>
  <section id="cpusection"><h2>CPU swap pool <span class="count" id="cpucount"></span></h2>
    <div id="cpu" class="grid"></div></section>
</div>
<div class="legend" id="legend"></div>
<div class="bottom">
  <section class="tables"><h2>Block tables</h2><table id="tables"></table></section>
  <section class="events"><h2>Events in this step</h2><ol id="events"></ol></section>
</div>
<div id="tip" class="tip"></div>
<script id="trace-data" type="application/json">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_CSS = """
:root { --fg: #1d1d1f; --muted: #6b6b70; --line: #d6d6da; --bg: #fafafa; }
* { box-sizing: border-box; }
body { margin: 0; padding: 18px 24px 40px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--fg); background: var(--bg); }
h1 { font-size: 20px; margin: 0; }
h2 { font-size: 14px; margin: 0 0 8px; }
.sub, .count { color: var(--muted); font-weight: normal; font-size: 13px; }
.controls { display: flex; align-items: center; gap: 8px; margin: 14px 0 8px; flex-wrap: wrap; }
.controls button, .zoombar button { font: inherit; padding: 4px 10px; border: 1px solid var(--line); background: #fff;
                   border-radius: 6px; cursor: pointer; }
.controls button:hover, .zoombar button:hover { background: #f0f0f3; }
.zoombar { display: flex; align-items: center; gap: 10px; margin: 0 0 10px; font-size: 13px; }
.zoombar button { font-size: 13px; padding: 2px 8px; }
#slider { flex: 1 1 320px; min-width: 200px; }
.steplabel { font-variant-numeric: tabular-nums; min-width: 120px; font-weight: 600; }
.stats { display: flex; gap: 16px; flex-wrap: wrap; color: var(--muted); margin-bottom: 14px;
         font-variant-numeric: tabular-nums; }
.stats b { color: var(--fg); }
.pools { display: flex; gap: 36px; align-items: flex-start; flex-wrap: wrap; }
.grid { display: grid; gap: 2px; }
.cell { position: relative; border: 1px solid #444; border-radius: 3px; display: flex; align-items: center;
        justify-content: center; font-weight: 700; font-size: 12px; cursor: default; user-select: none; }
.cell.free { background: #fff; border-color: #cfcfd4; }
.cell.cached { border-color: #8c8c8c;
  background: repeating-linear-gradient(45deg, #d0d0d0 0 3px, #b9b9b9 3px 4.5px); }
.cell .id { position: absolute; top: 1px; left: 3px; font-size: 8px; font-weight: 400; opacity: .75; }
.grid.small .cell { border-width: 0; border-radius: 1px; font-size: 0; }
.grid.small .cell.free { outline: 1px solid #e4e4e8; outline-offset: -1px; }
.cell.hl { outline: 3px solid #111; outline-offset: -1px; z-index: 1; }
.cell.changed { box-shadow: 0 0 0 2px #ffbf00; }
.grid.small .cell.changed { box-shadow: 0 0 0 1px #e0a000; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 14px 0 18px; color: var(--muted); font-size: 13px; }
.legend span.key { display: inline-flex; align-items: center; gap: 6px; }
.legend i { width: 16px; height: 16px; border: 1px solid #444; border-radius: 3px; display: inline-block; }
.bottom { display: flex; gap: 36px; flex-wrap: wrap; align-items: flex-start; }
.bottom section { flex: 1 1 380px; min-width: 300px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 3px 8px; border-bottom: 1px solid #ececf0; text-align: left; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
tr.hl td { background: #fff6d6; }
.chip { display: inline-block; min-width: 22px; padding: 0 4px; margin: 1px; border-radius: 3px; text-align: center;
        font-variant-numeric: tabular-nums; border: 1px solid #444; font-size: 12px; }
.chip.null { border-style: dashed; border-color: #b0b0b0; color: #a0a0a0; background: #fff; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; border: 1px solid #444;
          vertical-align: -1px; margin-right: 6px; }
.where { font-size: 11px; padding: 0 5px; border-radius: 8px; background: #eceff7; color: #3a4a7a; }
.where.cpu { background: #fde8e8; color: #8a2b2b; }
ol { padding-left: 22px; margin: 0; font: 12.5px/1.6 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
ol .k { font-weight: 700; }
.muted { color: var(--muted); }
.tip { position: fixed; pointer-events: none; background: #1d1d1f; color: #fff; padding: 6px 9px; border-radius: 6px;
       font-size: 12px; display: none; max-width: 360px; z-index: 10; }
"""

_JS = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("trace-data").textContent);
  const H = D.header, N = H.num_blocks, M = H.num_cpu_blocks, S = D.steps.length;
  const $ = (id) => document.getElementById(id);
  const NULL_BLOCK = -1;
  const KIND_COLORS = { allocate: "#1f77b4", allocate_seq: "#1f77b4", share: "#2ca02c", cow: "#d62728",
    fork: "#9467bd", free: "#7f7f7f", evict: "#8c564b", swap_out: "#e377c2", swap_in: "#e377c2",
    window_release: "#bcbd22", cache_insert: "#17becf" };

  function cellPx(n) { return n <= 64 ? 40 : n <= 256 ? 30 : n <= 1024 ? 18 : n <= 2048 ? 11 : 8; }
  let PX = 40, showIds = true, gpuCells = [], cpuCells = [];
  function reqOf(seq) { const i = seq.lastIndexOf("#"); return i < 0 ? seq : seq.slice(0, i); }
  function seqColor(seq) { return D.colors[seq] || "#000"; }
  function textOn(hex) {
    const v = parseInt(hex.slice(1), 16), r = (v >> 16) & 255, g = (v >> 8) & 255, b = v & 255;
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255 > 0.5 ? "#1a1a1a" : "#fff";
  }

  // ---------------------------------------------------------------- grids
  // Zoomed (default): the blocks the run used, D.shown / D.cpuShown; whole: the pools up to
  // D.whole / D.cpuWhole cells.  Cells past the zoomed ones are free at every step.
  let whole = false;
  function makeGrid(el, n, cols) {
    el.innerHTML = "";
    el.style.gridTemplateColumns = "repeat(" + cols + ", " + PX + "px)";
    el.style.gridAutoRows = PX + "px";
    el.classList.toggle("small", PX < 18);
    const cells = [];
    for (let b = 0; b < n; b++) {
      const c = document.createElement("div");
      c.dataset.block = b;
      el.appendChild(c);
      cells.push(c);
      paint(c, 0, b);
    }
    return cells;
  }
  function build() {
    const n = whole ? D.whole : D.shown, m = whole ? D.cpuWhole : D.cpuShown;
    PX = cellPx(Math.max(n, m));
    showIds = PX >= 30;  // room for a block id in the corner
    gpuCells = makeGrid($("gpu"), n, whole ? D.wholeCols : D.cols);
    cpuCells = makeGrid($("cpu"), m, whole ? D.cpuWholeCols : D.cpuCols);
    $("cpu").style.display = m ? "" : "none";
    $("cpusection").style.display = M ? "" : "none";
    const zoomable = D.shown < N || D.cpuShown < M;
    $("zoombar").style.display = zoomable ? "" : "none";
    $("zoom").textContent = whole ? "show only the blocks in use" : "show the whole pool";
    const part = (shown, total, name) => shown === total ? "all " + total + " " + name + " blocks"
      : shown ? name + " blocks 0–" + (shown - 1) + " of " + total : "no " + name + " blocks (of " + total + ")";
    $("zoomnote").textContent = whole
      ? (D.whole < N || D.cpuWhole < M ? "showing the first " + D.whole + " GPU and " + D.cpuWhole +
         " CPU blocks (too many to draw them all)" : "showing every block")
      : "showing " + part(D.shown, N, "GPU") + (M ? " and " + part(D.cpuShown, M, "CPU") : "") +
        ": the run never used the others";
  }

  // data-state / data-ref / data-owners say what the cell shows (read by tests and tools).
  function paint(cell, code, b) {
    cell.className = "cell";
    cell.style.background = "";
    cell.style.color = "";
    cell.textContent = "";
    cell.dataset.state = code === 0 ? "free" : code === 1 ? "cached" : "held";
    cell.dataset.ref = code >= 2 ? D.groups[code - 2][1] : 0;
    cell.dataset.owners = code >= 2 ? D.groups[code - 2][0].join(" ") : "";
    if (code === 0) cell.classList.add("free");
    else if (code === 1) cell.classList.add("cached");
    else {
      const g = D.groups[code - 2], owners = g[0], ref = g[1];
      const base = owners.length ? seqColor(owners[0]) : "#000";
      const reqs = [...new Set(owners.map(reqOf))];
      cell.style.background = reqs.length > 1
        ? "linear-gradient(135deg, " + base + " 0 60%, " + D.requestColors[reqs[1]] + " 60%)" : base;
      cell.style.color = textOn(base);
      if (ref > 1) cell.textContent = String(ref);
    }
    if (showIds) {
      const id = document.createElement("span");
      id.className = "id";
      id.textContent = b;
      cell.appendChild(id);
    }
  }

  // ---------------------------------------------------------------- state at a step
  let cur = { i: -1, gpu: null, cpu: null, tables: null }, repaint = false;
  function stateAt(i) {
    let start, gpu, cpu, tables;
    if (cur.i >= 0 && cur.i <= i && i - cur.i <= D.keyframeEvery) {
      start = cur.i; gpu = cur.gpu.slice(); cpu = cur.cpu.slice(); tables = Object.assign({}, cur.tables);
    } else {
      start = Math.floor(i / D.keyframeEvery) * D.keyframeEvery;
      const k = D.keyframes[String(start)];
      gpu = k.gpu.slice(); cpu = k.cpu.slice(); tables = Object.assign({}, k.tables);
    }
    for (let j = start + 1; j <= i; j++) {
      const s = D.steps[j];
      for (const [b, c] of s.dgpu) gpu[b] = c;
      for (const [b, c] of s.dcpu) cpu[b] = c;
      for (const seq in s.dtables) {
        if (s.dtables[seq] === null) delete tables[seq]; else tables[seq] = s.dtables[seq];
      }
    }
    return { i: i, gpu: gpu, cpu: cpu, tables: tables };
  }

  // ---------------------------------------------------------------- rendering
  function show(i) {
    if (!S) { $("steplabel").textContent = "empty trace"; return; }
    i = Math.max(0, Math.min(S - 1, i));
    const prev = cur;
    cur = stateAt(i);
    const step = D.steps[i];
    const changed = new Set(step.dgpu.map((x) => x[0]));
    const repaintAll = prev.i < 0 || prev.gpu === null || repaint;
    repaint = false;
    cur.gpu.forEach((code, b) => {
      if (repaintAll || prev.gpu[b] !== code || gpuCells[b].classList.contains("changed") !== changed.has(b)) {
        paint(gpuCells[b], code, b);
        if (changed.has(b)) gpuCells[b].classList.add("changed");
      }
    });
    cur.cpu.forEach((code, b) => { if (repaintAll || prev.cpu[b] !== code) paint(cpuCells[b], code, b); });
    $("slider").value = i;
    $("steplabel").textContent = "step " + step.step + "  (" + (i + 1) + "/" + S + ")";
    renderStats(step.stats, cur);
    renderTables(cur.tables);
    renderEvents(step.events);
  }

  function counts(st) {
    let used = 0, cached = 0, cpu = 0;
    for (const c of st.gpu) { if (c === 1) cached++; else if (c >= 2) used++; }
    for (const c of st.cpu) if (c >= 2) cpu++;
    return { used: used, cached: cached, free: N - used - cached, cpu: cpu };
  }

  function renderStats(stats, st) {
    const c = counts(st);
    $("gpucount").textContent = c.used + " used · " + c.cached + " cached · " + c.free + " free of " + N;
    $("cpucount").textContent = c.cpu + " of " + M + " used" + (D.cpuShown ? "" : " · never used in this run");
    const items = [["running", stats.running], ["waiting", stats.waiting], ["swapped", stats.swapped],
                   ["tokens this step", stats.num_tokens]];
    $("stats").innerHTML = "";
    for (const [k, v] of items) {
      if (v === undefined) continue;
      const s = document.createElement("span");
      s.innerHTML = k + " <b></b>";
      s.querySelector("b").textContent = v;
      $("stats").appendChild(s);
    }
  }

  function renderTables(tables) {
    const t = $("tables");
    t.innerHTML = "<tr><th>sequence</th><th>where</th><th>block table (logical → physical)</th></tr>";
    const seqs = Object.keys(tables);
    const LIMIT = 200;
    for (const seq of seqs.slice(0, LIMIT)) {
      const row = document.createElement("tr");
      row.dataset.seq = seq;
      const tb = tables[seq];
      const name = document.createElement("td");
      name.innerHTML = '<span class="swatch"></span>';
      name.firstChild.style.background = seqColor(seq);
      name.appendChild(document.createTextNode(seq));
      const where = document.createElement("td");
      where.innerHTML = '<span class="where' + (tb.cpu ? " cpu" : "") + '">' + (tb.cpu ? "CPU" : "GPU") + "</span>";
      const blocks = document.createElement("td");
      for (const b of tb.blocks) {
        const chip = document.createElement("span");
        chip.className = "chip" + (b === NULL_BLOCK ? " null" : "");
        chip.textContent = b === NULL_BLOCK ? "–" : b;
        chip.title = b === NULL_BLOCK ? "released: outside the sliding window" : "";
        if (b !== NULL_BLOCK) { chip.style.background = seqColor(seq); chip.style.color = textOn(seqColor(seq)); }
        blocks.appendChild(chip);
      }
      row.append(name, where, blocks);
      row.addEventListener("mouseenter", () => highlightSeq(seq, true));
      row.addEventListener("mouseleave", () => highlightSeq(seq, false));
      t.appendChild(row);
    }
    const note = (text) =>
      t.insertAdjacentHTML("beforeend", '<tr><td colspan="3" class="muted">' + text + "</td></tr>");
    if (!seqs.length) note("no live sequences");
    if (seqs.length > LIMIT) note("+" + (seqs.length - LIMIT) + " more sequences");
  }

  function highlightSeq(seq, on) {
    const tb = cur.tables[seq];
    if (!tb) return;
    const cells = tb.cpu ? cpuCells : gpuCells;
    for (const b of tb.blocks) if (b !== NULL_BLOCK && cells[b]) cells[b].classList.toggle("hl", on);
  }

  function fmt(v) { return typeof v === "object" && v !== null ? JSON.stringify(v) : String(v); }

  function renderEvents(events) {
    const ol = $("events");
    ol.innerHTML = "";
    if (!events.length) { ol.innerHTML = '<li class="muted">no pool events</li>'; return; }
    for (const ev of events) {
      const li = document.createElement("li");
      const k = document.createElement("span");
      k.className = "k";
      k.textContent = ev.kind;
      k.style.color = KIND_COLORS[ev.kind] || "#1d1d1f";
      li.appendChild(k);
      const rest = Object.keys(ev).filter((f) => f !== "kind" && f !== "step")
        .map((f) => f + "=" + fmt(ev[f])).join("  ");
      li.appendChild(document.createTextNode("  " + rest));
      ol.appendChild(li);
    }
  }

  // ---------------------------------------------------------------- legend, tooltip, controls
  function legend() {
    const el = $("legend");
    const add = (style, label, cls) => {
      const s = document.createElement("span");
      s.className = "key";
      const i = document.createElement("i");
      if (cls) i.className = "cell " + cls;
      Object.assign(i.style, style);
      s.append(i, document.createTextNode(label));
      el.appendChild(s);
    };
    const reqs = Object.keys(D.requestColors).sort((a, b) => (+a - +b) || a.localeCompare(b));
    for (const r of reqs.slice(0, 16)) add({ background: D.requestColors[r] }, "request " + r);
    if (reqs.length > 16) el.appendChild(document.createTextNode("+" + (reqs.length - 16) + " more requests"));
    add({ background: "#fff" }, "free");
    add({}, "cached, evictable", "cached");
    add({ background: "linear-gradient(135deg, #1f77b4 0 60%, #ff7f0e 60%)" }, "shared with another request");
    add({ background: "#fff", boxShadow: "0 0 0 2px #ffbf00" }, "changed in this step");
    el.appendChild(document.createTextNode("number = refcount · samples of a request are shades of its colour"));
  }

  function codeOf(b, onCpu) {  // cells past the zoomed ones are always free
    const codes = onCpu ? cur.cpu : cur.gpu;
    return b < codes.length ? codes[b] : 0;
  }

  function describe(b, onCpu) {
    const code = codeOf(b, onCpu);
    const where = onCpu ? "CPU block " : "GPU block ";
    if (code === 0) return where + b + ": free";
    if (code === 1) return where + b + ": cached, evictable (refcount 0; a prefix hit revives it)";
    const g = D.groups[code - 2];
    return where + b + ": refcount " + g[1] + " · held by " + g[0].join(", ") +
      (g[2] ? " · in prefix cache" : "");
  }

  function hookTips(el, onCpu) {
    const tip = $("tip");
    el.addEventListener("mousemove", (e) => {
      const c = e.target.closest(".cell");
      if (!c || cur.i < 0) { tip.style.display = "none"; return; }
      tip.textContent = describe(+c.dataset.block, onCpu);
      tip.style.display = "block";
      tip.style.left = (e.clientX + 14) + "px";
      tip.style.top = (e.clientY + 14) + "px";
      document.querySelectorAll("#tables tr.hl").forEach((r) => r.classList.remove("hl"));
      const code = codeOf(+c.dataset.block, onCpu);
      if (code >= 2) for (const s of D.groups[code - 2][0]) {
        const row = document.querySelector('#tables tr[data-seq="' + CSS.escape(s) + '"]');
        if (row) row.classList.add("hl");
      }
    });
    el.addEventListener("mouseleave", () => {
      tip.style.display = "none";
      document.querySelectorAll("#tables tr.hl").forEach((r) => r.classList.remove("hl"));
    });
  }

  let timer = null;
  function play(on) {
    if (on && cur.i >= S - 1) show(0);
    clearInterval(timer);
    timer = on ? setInterval(() => { if (cur.i >= S - 1) play(false); else show(cur.i + 1); }, 450) : null;
    $("play").textContent = timer ? "pause" : "play";
  }

  $("sub").textContent = N + " GPU blocks · " + M + " CPU blocks · " + H.block_size + " tokens per block" +
    (H.sliding_window ? " · sliding window " + H.sliding_window : "") +
    (H.enable_prefix_caching === false ? " · prefix caching off" : "");
  $("slider").max = Math.max(0, S - 1);
  $("slider").addEventListener("input", (e) => show(+e.target.value));
  $("first").onclick = () => show(0);
  $("prev").onclick = () => show(cur.i - 1);
  $("next").onclick = () => show(cur.i + 1);
  $("last").onclick = () => show(S - 1);
  $("play").onclick = () => play(!timer);
  function toggleWhole() { whole = !whole; build(); repaint = true; show(cur.i); }
  $("zoom").onclick = toggleWhole;
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" && e.key !== " ") return;
    if (e.key === "ArrowLeft") show(cur.i - 1);
    else if (e.key === "ArrowRight") show(cur.i + 1);
    else if (e.key === "Home") show(0);
    else if (e.key === "End") show(S - 1);
    else if (e.key === " ") { e.preventDefault(); play(!timer); }
    else if (e.key === "z" && $("zoombar").style.display !== "none") toggleWhole();
  });
  build();
  hookTips($("gpu"), false);
  if (M) hookTips($("cpu"), true);
  legend();
  show(D.start);  // the busiest step, as memory_map.png
})();
"""
