"""Shared by the server tests: a tiny chat model, the real server in a thread, ``pagedattn serve`` processes.

The tiny model is a random ``LlamaForCausalLM`` (hidden 64, 2 layers) with the default model's
real tokenizer and chat template, so the server's text paths (detokenisation, stop strings,
chat templates) run for real while a step costs milliseconds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import transformers

from pagedattn.engine.async_engine import AsyncLLMEngine
from pagedattn.engine.llm import LLM
from pagedattn.entrypoints.access import ServerAccess
from pagedattn.entrypoints.server import ServerLimits, create_app, make_server

TINY_MODEL_NAME = "tiny-chat"
TINY_CONTEXT = 2048
_BUILT: dict[Path, Path] = {}


def make_tiny_chat_model(root: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with ``tokenizer_dir``'s tokenizer, saved to ``root/tiny-chat``."""
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=TINY_CONTEXT, initializer_range=0.5,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        # Sharper (tied) output embeddings: greedy margins of >= 1e-2 so batching never flips a
        # choice, while sampling at temperature 1 stays clearly random (top token p ~ 0.7).
        model.get_input_embeddings().weight.mul_(4.0)
    out = root / TINY_MODEL_NAME
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Build the tiny model once per test session, whichever module asks first."""
    if tokenizer_dir not in _BUILT:
        _BUILT[tokenizer_dir] = make_tiny_chat_model(tmp_path_factory.mktemp("server-model"), tokenizer_dir)
    return _BUILT[tokenizer_dir]


def make_async_engine(model_dir: Path | str, **kw: object) -> AsyncLLMEngine:
    kw = {"device": "cpu", "block_size": 16, "num_kv_blocks": 512, "swap_space_gib": 0.05, **kw}
    return AsyncLLMEngine.from_factory(lambda: LLM(str(model_dir), **kw).engine)  # type: ignore[arg-type]


class ServerThread:
    """The server of ``pagedattn serve`` for ``app`` on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.server = make_server(app)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self) -> AsyncLLMEngine:
        """The engine behind the app."""
        return self.server.config.app.state.server.engine

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("the test server did not stop")


def start_server(engine: AsyncLLMEngine, name: str = TINY_MODEL_NAME,
                 limits: ServerLimits | None = None, access: ServerAccess | None = None) -> ServerThread:
    return ServerThread(create_app(engine, name, limits, access=access)).start()


# ====================================================================== ``pagedattn serve`` processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``pagedattn serve`` for ``model_dir`` on 127.0.0.1 in a subprocess.

    ``prelude`` is Python run in the process before the command (e.g. to patch in a failure).
    Output goes to files, so that a chatty server never blocks on a full pipe."""

    def __init__(self, model_dir: Path | str, tmp: Path, *flags: str, prelude: str = "",
                 env: dict[str, str] | None = None, preexec_fn: Callable[[], None] | None = None) -> None:
        self.port = free_port()
        code = f"{prelude}\nimport sys\nfrom pagedattn.entrypoints.cli import main\nsys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", code, "serve", "--model", str(model_dir), "--port", str(self.port),
               "--device", "cpu", "--num-kv-blocks", "512", "--swap-space-gib", "0.01", *flags]
        self.out, self.err = tmp / f"serve-{self.port}.out", tmp / f"serve-{self.port}.err"
        src = str(Path(__file__).resolve().parents[1] / "src")
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": src, **(env or {})}
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env, preexec_fn=preexec_fn)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.stderr()
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def __enter__(self) -> ServeProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
