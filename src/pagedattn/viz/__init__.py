"""See the cache: record what the block pool does and draw it.

``TraceRecorder`` / ``load_trace`` / ``snapshot`` / ``check_trace_path`` need nothing beyond the
standard library.
The drawing functions need matplotlib (the ``viz`` extra) and import it only when used.
"""

from __future__ import annotations

from typing import Any

from .trace import (
    PoolState,
    Trace,
    TraceRecorder,
    TraceWarning,
    check_trace_path,
    load_trace,
    snapshot,
    split_seq_id,
)

_LAZY = {
    "draw_memory_map": "draw",
    "draw_timeline": "draw",
    "render_html": "html",
    "add_viz_parser": "cli",
    "run_viz": "cli",
}

__all__ = [
    "PoolState",
    "Trace",
    "TraceRecorder",
    "TraceWarning",
    "add_viz_parser",
    "check_trace_path",
    "draw_memory_map",
    "draw_timeline",
    "load_trace",
    "render_html",
    "run_viz",
    "snapshot",
    "split_seq_id",
]


def __getattr__(name: str) -> Any:
    # Keeps `import pagedattn.viz` (done by the engine when tracing) free of matplotlib.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
