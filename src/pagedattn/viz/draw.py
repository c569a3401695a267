"""Pictures of the block pool: a memory map of one step and a timeline of the whole run.

The colour scheme (shared with the HTML page): each request has a hue, its samples are shades
of it; free blocks are white, cached-but-evictable blocks grey and hatched; a number in a cell
is its refcount when several sequences share it.  matplotlib is imported only when drawing,
through the Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .trace import PoolState, Trace, request_hash, shown_blocks, split_seq_id

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# tab10 without its grey (grey means "cached"): neighbouring request ids get distinct hues.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
           "#17becf")
# Sample k of a request: + lightens towards white, - darkens towards black.
SHADES = (0.0, 0.45, -0.35, 0.7, -0.55)
FREE_COLOR = "#ffffff"
CACHED_COLOR = "#d0d0d0"
EDGE_COLOR = "#8c8c8c"
TEXT_DARK, TEXT_LIGHT = "#1a1a1a", "#ffffff"
DETAILED_MAX_BLOCKS = 512  # above this the grid is drawn as an image without numbers
BLOCK_IDS_MAX_BLOCKS = 128  # block ids printed in cells up to this pool size
LEGEND_MAX_REQUESTS = 12


# ====================================================================== colours (no matplotlib)
def _rgb(hex_color: str) -> tuple[float, float, float]:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) / 255 for i in (0, 2, 4))
    return r, g, b


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(min(1.0, max(0.0, c)) * 255):02x}" for c in rgb)


def shade(hex_color: str, amount: float) -> str:
    """Mix towards white (``amount > 0``) or black (``amount < 0``) by ``|amount|``."""
    target = 1.0 if amount > 0 else 0.0
    a = abs(amount)
    return _hex([c + (target - c) * a for c in _rgb(hex_color)])


def request_color(request: str) -> str:
    return PALETTE[request_hash(request) % len(PALETTE)]


def seq_color(seq: str) -> str:
    """Hue from the request id, shade from the sample index."""
    request, sample = split_seq_id(seq)
    return shade(request_color(request), SHADES[sample % len(SHADES)])


def text_color(hex_color: str) -> str:
    """Black or white, whichever reads better on ``hex_color`` (relative luminance)."""
    r, g, b = _rgb(hex_color)
    return TEXT_DARK if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else TEXT_LIGHT


def grid_columns(n: int) -> int:
    """Columns for an ``n``-block grid: about twice as wide as tall, a multiple of 8."""
    if n <= 16:
        return max(n, 1)
    return min(n, 8 * math.ceil(math.sqrt(2 * n) / 8))


def round_to_rows(count: int, total: int) -> tuple[int, int]:
    """``(cells, columns)`` for drawing the first ``count`` blocks of a ``total``-block pool:
    the grid's columns for ``count``, and ``count`` rounded up to full rows (within the pool)."""
    cols = grid_columns(count)
    return min(total, math.ceil(count / cols) * cols), cols


# ====================================================================== cells
def _cells(state: PoolState, on_cpu: bool, count: int) -> list[dict[str, Any]]:
    """One dict per block of the first ``count``: face colour, refcount, owners, second request
    (if shared across requests)."""
    owners = state.cpu_owners() if on_cpu else state.gpu_owners()
    refs = state.cpu_refcounts if on_cpu else state.refcounts
    out = []
    for b in range(count):
        own = owners.get(b, [])
        ref = refs.get(b, 0)
        cell: dict[str, Any] = {"ref": ref, "owners": own, "status": "free", "face": FREE_COLOR, "other": None}
        if ref > 0:
            cell["status"] = "held"
            cell["face"] = seq_color(own[0]) if own else "#000000"
            requests = list(dict.fromkeys(split_seq_id(s)[0] for s in own))
            if len(requests) > 1:
                cell["other"] = request_color(requests[1])
        elif not on_cpu and b in state.evictable:
            cell["status"], cell["face"] = "cached", CACHED_COLOR
        out.append(cell)
    return out


def _mpl() -> Any:
    import matplotlib

    matplotlib.rcParams["font.family"] = "DejaVu Sans"  # ships with matplotlib: same look everywhere
    return matplotlib


def _new_figure(width: float, height: float) -> Figure:
    _mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", facecolor="white")
    return path


# ====================================================================== memory map
def _draw_grid_detailed(ax: Axes, cells: list[dict[str, Any]], cols: int, show_ids: bool) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Polygon, Rectangle

    groups: dict[str, list[Any]] = {"free": [], "cached": [], "held": []}
    faces: list[str] = []
    corners = []
    for b, c in enumerate(cells):
        r, col = divmod(b, cols)
        x, y = col, r
        rect = Rectangle((x + 0.04, y + 0.04), 0.92, 0.92)
        groups[c["status"]].append(rect)
        if c["status"] == "held":
            faces.append(c["face"])
            if c["other"]:  # shared with a second request: its colour in the lower-right corner
                corners.append(Polygon([(x + 0.96, y + 0.42), (x + 0.96, y + 0.96), (x + 0.42, y + 0.96)],
                                       closed=True, facecolor=c["other"], edgecolor="none"))
    ax.add_collection(PatchCollection(groups["free"], facecolor=FREE_COLOR, edgecolor="#c4c4c4", lw=0.6))
    ax.add_collection(PatchCollection(groups["cached"], facecolor=CACHED_COLOR, edgecolor=EDGE_COLOR,
                                      hatch="////", lw=0.6))
    ax.add_collection(PatchCollection(groups["held"], facecolor=faces, edgecolor="#404040", lw=0.6))
    for p in corners:
        ax.add_patch(p)
    for b, c in enumerate(cells):
        r, col = divmod(b, cols)
        fg = text_color(c["face"])
        if show_ids:
            ax.text(col + 0.1, r + 0.12, str(b), fontsize=5.5, ha="left", va="top",
                    color=fg if c["status"] == "held" else "#8a8a8a", alpha=0.85)
        if c["ref"] > 1:
            ax.text(col + 0.5, r + 0.56, str(c["ref"]), fontsize=9, ha="center", va="center",
                    fontweight="bold", color=fg)


def _draw_grid_compact(ax: Axes, cells: list[dict[str, Any]], cols: int) -> None:
    import numpy as np
    from matplotlib.patches import Rectangle

    rows = math.ceil(len(cells) / cols)
    img = np.ones((rows, cols, 3))
    shared_x, shared_y = [], []
    for b, c in enumerate(cells):
        r, col = divmod(b, cols)
        img[r, col] = _rgb(c["face"])
        if c["ref"] > 1:
            shared_x.append(col + 0.5)
            shared_y.append(r + 0.5)
    ax.imshow(img, extent=(0, cols, rows, 0), interpolation="nearest", aspect="auto")
    # Hairlines between cells keep single blocks countable (and free cells visible).
    ax.vlines(range(cols + 1), 0, rows, colors="#dadada", lw=0.35)
    ax.hlines(range(rows + 1), 0, cols, colors="#dadada", lw=0.35)
    tail = len(cells) - (rows - 1) * cols  # blocks in the last row
    if tail < cols:  # blank out the cells past the last block
        ax.add_patch(Rectangle((tail + 0.02, rows - 1 + 0.02), cols - tail + 0.1, 1.1, facecolor="white",
                               edgecolor="none", zorder=3))
    if shared_x:  # too small for numbers: a dot marks a shared block
        ax.scatter(shared_x, shared_y, s=2.0, c="#111111", marker="o", linewidths=0, zorder=4)


SUBTITLE_PT = 12.5  # height of one subtitle line, in points


def _setup_grid_axes(ax: Axes, cols: int, rows: int, title: str, subtitles: list[str]) -> None:
    ax.set_xlim(-0.05, cols + 0.05)
    ax.set_ylim(rows + 0.05, -0.05)  # block 0 top-left, reading order
    ax.axis("off")
    ax.annotate(title, xy=(0, 1), xycoords="axes fraction", xytext=(1, 4.5 + SUBTITLE_PT * len(subtitles)),
                textcoords="offset points", fontsize=11, fontweight="bold", va="bottom", ha="left")
    for i, line in enumerate(reversed(subtitles)):
        ax.annotate(line, xy=(0, 1), xycoords="axes fraction", xytext=(1, 4 + SUBTITLE_PT * i),
                    textcoords="offset points", fontsize=8.5, color="#555555", va="bottom", ha="left")


class _CornerHandler:
    """Legend key for "shared with another request": a block with a coloured corner."""

    def legend_artist(self, legend: Any, orig_handle: Any, fontsize: float, handlebox: Any) -> Any:
        from matplotlib.patches import Polygon, Rectangle

        x, y, w, h = handlebox.xdescent, handlebox.ydescent, handlebox.width, handlebox.height
        s = min(w, h * 1.3)
        base = Rectangle((x, y), s, h, facecolor=PALETTE[0], edgecolor="#404040", lw=0.6,
                         transform=handlebox.get_transform())
        corner = Polygon([(x + s, y), (x + s, y + h * 0.55), (x + s * 0.45, y)], closed=True,
                         facecolor=PALETTE[1], edgecolor="none", transform=handlebox.get_transform())
        handlebox.add_artist(base)
        handlebox.add_artist(corner)
        return base


def _legend_handles(state: PoolState, compact: bool) -> tuple[list[Any], dict[Any, Any]]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    requests = state.requests()
    samples: dict[str, int] = {}
    for s in state.tables:
        samples[split_seq_id(s)[0]] = samples.get(split_seq_id(s)[0], 0) + 1
    for rid in requests[:LEGEND_MAX_REQUESTS]:
        n = samples[rid]
        label = f"request {rid}" + (f" ({n} samples)" if n > 1 else "")
        handles.append(Patch(facecolor=request_color(rid), edgecolor="#404040", lw=0.6, label=label))
    if len(requests) > LEGEND_MAX_REQUESTS:
        handles.append(Patch(facecolor="none", edgecolor="none",
                             label=f"+{len(requests) - LEGEND_MAX_REQUESTS} more requests"))
    handles.append(Patch(facecolor=FREE_COLOR, edgecolor="#a0a0a0", lw=0.6, label="free"))
    handles.append(Patch(facecolor=CACHED_COLOR, edgecolor=EDGE_COLOR, hatch="////", lw=0.6,
                         label="cached, evictable"))
    handler_map: dict[Any, Any] = {}
    if compact:
        handles.append(Line2D([], [], ls="none", marker="o", markersize=3, color="#111111",
                              label="shared (refcount > 1)"))
    else:
        handles.append(Line2D([], [], ls="none", marker="$2$", markersize=7, color="#111111",
                              label="refcount of a shared block"))
        corner = Patch(label="shared with another request")
        handles.append(corner)
        handler_map[corner] = _CornerHandler()
    return handles, handler_map


def draw_memory_map(state: PoolState, path: str | Path, *, step: int | None = None,
                    extent: tuple[int, int] | None = None) -> Path:
    """The block pool as a grid (GPU, and the CPU swap pool beside it when it is used).

    Only the first ``extent = (gpu, cpu)`` blocks of each pool are drawn (``Trace.extent()``
    gives the blocks a whole run used; default: those ``state`` uses), rounded up to full rows:
    the allocator hands out low ids first, so a large pool's unused tail would only be a sea of
    empty cells.  Up to :data:`DETAILED_MAX_BLOCKS` drawn blocks each cell shows its refcount
    (and block id on small grids); more become a compact image where a dot marks a shared block.
    """
    n_all, m_all = state.num_blocks, state.num_cpu_blocks
    gpu_count, cpu_count = extent if extent is not None else state_extent(state)
    n, gcols = round_to_rows(min(gpu_count, n_all), n_all)
    m = round_to_rows(min(cpu_count, m_all), m_all)[0] if cpu_count else 0
    compact = max(n, m) > DETAILED_MAX_BLOCKS
    grows = math.ceil(n / gcols)
    ccols = max(math.ceil(m / grows), min(m, 8)) if m else 0
    crows = math.ceil(m / ccols) if m else 0
    gap_cols = 2 if m else 0
    total_cols = gcols + gap_cols + ccols
    # Inches per cell: big enough for numbers in detailed mode, a bounded picture otherwise.
    cell = min(0.42, 11.0 / total_cols) if not compact else min(0.2, 12.0 / total_cols)
    handles, handler_map = _legend_handles(state, compact)
    ncol = 4
    at = f" · step {step}" if step is not None else ""
    notes = [s for s in (f"blocks 0–{n - 1} shown (the rest are free)" if n < n_all else "",
                         f"CPU swap pool ({m_all} blocks) unused" if m_all and not m else "") if s]
    gpu_lines = [f"{state.num_used} used · {state.num_evictable} cached · {state.num_free} free"
                 f"   ({n_all} blocks × {state.block_size} tokens)"] + ([" · ".join(notes)] if notes else [])
    margin, gap_h = 0.35, 0.3
    top_h = 0.62 + (len(gpu_lines) - 1) * SUBTITLE_PT / 72
    grid_h = max(grows, crows) * cell
    legend_h = math.ceil(len(handles) / ncol) * 0.21 + 0.1
    cpu_x = margin + (gcols + gap_cols) * cell
    width = max(margin + gcols * cell + margin, cpu_x + (max(ccols * cell, 2.3) if m else 0) + margin, 7.5)
    height = top_h + grid_h + gap_h + legend_h + 0.1
    fig = _new_figure(width, height)

    def place(x: float, cols: int, rows: int) -> Axes:
        return fig.add_axes((x / width, 1 - (top_h + rows * cell) / height, cols * cell / width,
                             rows * cell / height))

    ax = place(margin, gcols, grows)
    _setup_grid_axes(ax, gcols, grows, f"GPU KV block pool{at}", gpu_lines)
    _draw_cells(ax, _cells(state, False, n), gcols, compact, n <= BLOCK_IDS_MAX_BLOCKS)
    if m:
        cax = place(cpu_x, ccols, crows)
        swapped = len({split_seq_id(s)[0] for s in state.swapped})
        cpu_shown = f" · blocks 0–{m - 1} shown" if m < m_all else ""
        _setup_grid_axes(cax, ccols, crows, "CPU swap pool", [
            f"{state.num_cpu_used} of {m_all} used · {_plural(swapped, 'request')} swapped out{cpu_shown}"])
        _draw_cells(cax, _cells(state, True, m), ccols, compact, m <= BLOCK_IDS_MAX_BLOCKS)
    fig.legend(handles=handles, handler_map=handler_map, loc="upper left", ncol=ncol, fontsize=8,
               frameon=False, bbox_to_anchor=(margin / width - 0.005, 1 - (top_h + grid_h + gap_h) / height),
               handlelength=1.5, handleheight=1.1, columnspacing=1.6, borderaxespad=0, borderpad=0)
    return _save(fig, path)


def state_extent(state: PoolState) -> tuple[int, int]:
    """Like :meth:`Trace.extent`, for the blocks one state uses."""
    gpu = max([*state.refcounts, *state.cached, *state.evictable], default=-1)
    cpu = max(state.cpu_refcounts, default=-1)
    return shown_blocks(gpu, state.num_blocks), shown_blocks(cpu, state.num_cpu_blocks) if cpu >= 0 else 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _draw_cells(ax: Axes, cells: list[dict[str, Any]], cols: int, compact: bool, show_ids: bool) -> None:
    if compact:
        _draw_grid_compact(ax, cells, cols)
    else:
        _draw_grid_detailed(ax, cells, cols, show_ids)


# ====================================================================== timeline
def timeline_top(num_blocks: int, t: dict[str, list[int]]) -> tuple[float, bool]:
    """Top of the blocks axis and whether it is zoomed: the whole GPU pool when the run filled
    at least half of it, else a little above peak use (a few blocks of a large pool would be a
    flat line at the bottom of the picture)."""
    peak = max([0, *(u + c for u, c in zip(t["blocks_used"], t["blocks_cached"])), *t["cpu_blocks_used"]])
    if 2 * peak >= num_blocks:
        return max(num_blocks, peak) * 1.02 or 1.0, False
    return float(max(math.ceil(peak * 1.25), peak + 2)), True


def draw_timeline(trace: Trace, path: str | Path) -> Path:
    """Per step: GPU blocks used / cached / free (stacked) and running / waiting / swapped."""
    t = trace.timeline()
    steps = t["step"]
    fig = _new_figure(10.0, 6.2)
    gs = fig.add_gridspec(2, 1, height_ratios=[3, 2], hspace=0.12, left=0.08, right=0.8, top=0.92,
                          bottom=0.09)
    ax = fig.add_subplot(gs[0])
    ax2 = fig.add_subplot(gs[1], sharex=ax)
    if not steps:
        steps = [0]
        t = {k: [0] for k in t}
    # "post" steps hold each value until the next step: repeat the last one to show it too.
    steps = [*steps, steps[-1] + 1]
    t = {k: [*v, v[-1]] for k, v in t.items()}
    used_c = PALETTE[0]
    ax.stackplot(steps, t["blocks_used"], t["blocks_cached"], t["blocks_free"], step="post",
                 colors=[used_c, CACHED_COLOR, "#f2f2f2"], edgecolor="#606060", lw=0.3,
                 labels=["used (held)", "cached, evictable", "free"])
    ax.collections[1].set_hatch("////")
    if trace.num_cpu_blocks:
        ax.step(steps, t["cpu_blocks_used"], where="post", color="#d62728", lw=1.4, ls="--",
                label="CPU blocks used (swap)")
    top, zoomed = timeline_top(trace.num_blocks, t)
    ax.set_ylim(0, top)
    ax.set_ylabel("blocks" + (" (scale: peak use)" if zoomed else ""))
    peak = max(t["blocks_used"], default=0)
    ax.set_title(f"Block pool over time: peak {peak} of {trace.num_blocks} GPU blocks held"
                 f"  ({trace.num_cpu_blocks} CPU blocks, {trace.block_size} tokens per block)",
                 fontsize=11, loc="left", fontweight="bold")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    ax.tick_params(labelbottom=False)
    for key, color, style in (("running", PALETTE[2], "-"), ("waiting", PALETTE[1], "-"),
                              ("swapped", PALETTE[3], "--")):
        ax2.step(steps, t[key], where="post", color=color, lw=1.6, ls=style, label=key)
    ax2.set_ylabel("requests")
    ax2.set_xlabel("engine step")
    top = max(max(t[k], default=0) for k in ("running", "waiting", "swapped"))
    ax2.set_ylim(-0.05 * max(top, 1), max(top, 1) * 1.15)
    ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    ax2.set_xlim(steps[0], steps[-1])
    from matplotlib.ticker import MaxNLocator

    for a in (ax, ax2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(True, color="#e6e6e6", lw=0.6)
        a.set_axisbelow(True)
        for side in ("top", "right"):
            a.spines[side].set_visible(False)
    return _save(fig, path)
