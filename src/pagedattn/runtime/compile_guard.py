"""Watching for Triton kernels that compile after start-up.

Start-up compiles (or loads from Triton's cache) every kernel variant the engine can launch:
the warm-up steps and the graph captures (see :mod:`.warmup`).  A kernel that still compiles
later does so on the request path: the request that first needs it waits for the compiler
(seconds, not milliseconds).  Every such compile is recorded here (:func:`late_compiles`);
with ``PAGEDATTN_FAIL_ON_COMPILE=warn`` it is also logged as a warning, and with
``PAGEDATTN_FAIL_ON_COMPILE=1`` it raises :class:`CompiledAfterStartup` (a debug check that
proves the point on a GPU).

The watch is Triton's ``jit_cache_hook``, which Triton calls when a launch misses its
in-memory kernel cache, before it compiles or loads the kernel; under the interpreter nothing
compiles and it never fires.  Compiles inside :func:`starting_up` are start-up's own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..envs import switches

logger = logging.getLogger(__name__)

_startups = 0  # start-ups in progress in this process (their compiles are expected)
_late: list[str] = []  # what compiled after start-up, in order
_installed = False


class CompiledAfterStartup(RuntimeError):
    """A Triton kernel compiled on the request path (``PAGEDATTN_FAIL_ON_COMPILE=1``)."""


@contextmanager
def starting_up() -> Iterator[None]:
    """A start-up: kernels compiled inside are expected.  The watch is installed on the way out,
    when start-up has loaded Triton (if this process uses it at all)."""
    global _startups
    _startups += 1
    try:
        yield
    finally:
        _startups -= 1
        install()


def late_compiles() -> list[str]:
    """The kernel variants compiled after start-up so far in this process (Triton's own
    description of each: name, options and argument specialisations)."""
    return list(_late)


def on_compile(repr: str, is_manual_warmup: bool = False) -> None:
    """What a kernel compile does here: nothing during start-up, else record it and, as the
    switch says, log or raise."""
    if _startups or is_manual_warmup:
        return
    _late.append(repr)
    mode = switches().compile_check
    msg = f"Triton kernel compiled after start-up (on the request path): {repr}"
    if mode == "raise":
        raise CompiledAfterStartup(msg)
    if mode == "warn":
        logger.warning(msg)
    else:
        logger.debug(msg)


def install() -> None:
    """Chain :func:`on_compile` into Triton's ``jit_cache_hook`` once per process, if triton is
    loaded (an engine that never imported it compiles nothing, and importing it costs start-up
    time on a CPU)."""
    global _installed
    if _installed or "triton" not in sys.modules:
        return
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - a triton without knobs
        return
    previous: Callable[..., Any] | None = knobs.runtime.jit_cache_hook

    def hook(**kw: Any) -> Any:
        on_compile(kw["repr"], bool(kw.get("is_manual_warmup")))
        return previous(**kw) if previous is not None else None

    knobs.runtime.jit_cache_hook = hook
    _installed = True
