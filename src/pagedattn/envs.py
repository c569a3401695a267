"""The project's environment variables, all read here.

Switches (``PAGEDATTN_DISABLE_*``, for A/B measurements) are read once, the first time anything
asks (:func:`switches`, at engine start-up), so a hot path reads a field, not the environment;
:func:`reload` re-reads them (tests that change them).  ``PAGEDATTN_CACHE_DIR`` is a location,
read where it is needed (:func:`cache_dir`), and so is ``PAGEDATTN_API_KEY`` (:func:`api_key`).

| variable | effect |
| --- | --- |
| ``PAGEDATTN_CACHE_DIR`` | where converted GGUF models are cached (default ``~/.cache/pagedattn``) |
| ``PAGEDATTN_API_KEY`` | the key of ``pagedattn serve`` unless ``--api-key`` gives one (not in the process list) |
| ``PAGEDATTN_DISABLE_CASCADE=1`` | no cascade (shared-prefix) decode attention |
| ``PAGEDATTN_DISABLE_FUSED=1`` | the torch path instead of the fused Triton norm/rotary/activation kernels |
| ``PAGEDATTN_DISABLE_P2P_ALL_REDUCE=1`` | NCCL for every tensor-parallel all-reduce |
| ``PAGEDATTN_FAIL_ON_COMPILE`` | a Triton kernel compiling after start-up: ``1`` raises, ``warn`` logs |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

API_KEY = "PAGEDATTN_API_KEY"
CACHE_DIR = "PAGEDATTN_CACHE_DIR"
DISABLE_CASCADE = "PAGEDATTN_DISABLE_CASCADE"
DISABLE_FUSED = "PAGEDATTN_DISABLE_FUSED"
DISABLE_P2P_ALL_REDUCE = "PAGEDATTN_DISABLE_P2P_ALL_REDUCE"
FAIL_ON_COMPILE = "PAGEDATTN_FAIL_ON_COMPILE"


def _on(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _compile_check(environ: Mapping[str, str]) -> str:
    """``PAGEDATTN_FAIL_ON_COMPILE``: "raise" (1/true/yes/on/raise), "warn" (warn/log), else "off"."""
    value = environ.get(FAIL_ON_COMPILE, "").strip().lower()
    if value in ("warn", "log"):
        return "warn"
    return "raise" if value == "raise" or _on(environ, FAIL_ON_COMPILE) else "off"


@dataclass(frozen=True)
class Switches:
    disable_cascade: bool = False
    disable_fused: bool = False
    disable_p2p_all_reduce: bool = False
    compile_check: str = "off"  # what a kernel compiled after start-up does: "off" | "warn" | "raise"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Switches:
        return cls(_on(environ, DISABLE_CASCADE), _on(environ, DISABLE_FUSED), _on(environ, DISABLE_P2P_ALL_REDUCE),
                   _compile_check(environ))


_switches: Switches | None = None


def switches() -> Switches:
    """The switches, read from the environment the first time."""
    global _switches
    if _switches is None:
        _switches = Switches.from_environ()
    return _switches


def reload() -> Switches:
    """Read the switches again (after the environment changed)."""
    global _switches
    _switches = None
    return switches()


def triton_interpreted() -> bool:
    """Triton's own ``TRITON_INTERPRET``: its kernels run on CPU tensors (the kernel tests)."""
    return _on(os.environ, "TRITON_INTERPRET")


def cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagedattn"


def api_key() -> str | None:
    """The server's API key from the environment (None when unset or empty)."""
    return os.environ.get(API_KEY) or None
