"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess


def git_commit() -> str:
    """The commit the figures belong to: ``GIT_COMMIT`` when set (a machine that has the files but
    stale or no git metadata), else ``git rev-parse --short HEAD``, else "unknown"."""
    if env := os.environ.get("GIT_COMMIT"):
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"
