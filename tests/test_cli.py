"""The command line, as a user runs it: `python -m pagedattn generate|chat` on the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "pagedattn", *args], input=stdin, capture_output=True, env=env,
                       timeout=600)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


@pytest.mark.usefixtures("default_model_dir")
def test_generate_streams_the_default_model() -> None:
    r = _run(["generate", "The capital of France is", "--max-tokens", "8", "--device", "cpu", "--metrics"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris.")
    metrics = json.loads(r.stderr[r.stderr.index("{"):])
    assert metrics["kv_blocks_used"] == 0 and metrics["num_generated_tokens"] == 8


@pytest.mark.usefixtures("default_model_dir")
def test_generate_prints_nothing_a_stop_string_cuts() -> None:
    """The greedy answer goes on " Paris.\\n\\nThe answer...": with the stop string "\\n\\nThe" the
    two newlines come a token before it completes, and must not reach the terminal."""
    r = _run(["generate", "The capital of France is", "--max-tokens", "12", "--device", "cpu", "--stop", "\n\nThe"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The capital of France is Paris.\n"


@pytest.mark.usefixtures("default_model_dir")
def test_generate_json() -> None:
    r = _run(["generate", "Hello", "-n", "2", "--temperature", "0.8", "--sample-seed", "3", "--max-tokens", "4",
              "--json", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["index"] for x in lines] == [0, 1] and all(len(x["token_ids"]) == 4 for x in lines)


@pytest.mark.usefixtures("default_model_dir")
def test_chat_answers_and_quits_on_empty_line() -> None:
    """A line that is not UTF-8 is refused with a message, and the session goes on."""
    r = _run(["chat", "--device", "cpu", "--max-tokens", "24"],
             stdin=b"caf\xe9 \xff\nWhat is the capital of France?\n\n")
    assert r.returncode == 0, r.stderr
    assert "error: the line is not valid UTF-8 text" in r.stderr and "Traceback" not in r.stderr
    assert "Paris" in r.stdout
