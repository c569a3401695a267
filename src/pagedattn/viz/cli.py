"""``pagedattn viz TRACE.jsonl [--out DIR] [--step N] [--html]``: pictures of a recorded trace."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from .trace import TraceWarning, load_trace


def add_viz_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``viz`` sub-command on an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser(
        "viz", help="draw the KV block pool from a recorded trace",
        description="Draw the block pool of a trace recorded with --trace: memory_map.png (one step), "
                    "timeline.png (the whole run) and optionally a self-contained trace.html.  Pictures "
                    "show the blocks the run used (low ids come first), not the whole pool.",
    )
    p.add_argument("trace", type=Path, help="trace file (JSON lines) written by the engine")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: the trace file's directory)")
    p.add_argument("--step", type=int, default=None,
                   help="step for memory_map.png (default: the busiest, the first holding the most blocks)")
    p.add_argument("--html", action="store_true", help="also write trace.html, a page to step through")
    p.set_defaults(func=run_viz)
    return p


def run_viz(args: argparse.Namespace) -> int:
    """Write the pictures and print their paths, one per line.

    A bad trace or argument raises ``ValueError`` (the ``pagedattn`` command prints it as
    ``error: ...``); a trace that can be read in part (cut-off last line) warns on stderr.
    """
    from .draw import draw_memory_map, draw_timeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TraceWarning)
        trace = load_trace(args.trace)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    step = trace.busiest_step() if args.step is None else args.step
    if not 0 <= step <= trace.last_step:
        raise ValueError(f"--step must be in [0, {trace.last_step}], got {step}")
    out: Path = args.out if args.out is not None else args.trace.parent
    out.mkdir(parents=True, exist_ok=True)
    written = [
        draw_memory_map(trace.state_at(step), out / "memory_map.png", step=step, extent=trace.extent()),
        draw_timeline(trace, out / "timeline.png"),
    ]
    if args.html:
        from .html import render_html

        written.append(render_html(trace, out / "trace.html"))
    for path in written:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m pagedattn.viz.cli``)."""
    parser = argparse.ArgumentParser(prog="pagedattn")
    add_viz_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as e:  # as the pagedattn command does
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
