"""The server against clients that misbehave, and against its own engine failing.

Servers run on 127.0.0.1 only: in a thread of this process with small limits (so that a few
sockets reach them), and as ``pagedattn serve`` processes where an exit status or a
process-wide limit is what is checked.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedattn.entrypoints.server import ServerLimits, create_app

from .server_harness import (
    TINY_MODEL_NAME,
    ServeProcess,
    ServerThread,
    make_async_engine,
    start_server,
    tiny_chat_model,
)

MODEL = TINY_MODEL_NAME
SMALL = ServerLimits(max_body_bytes=4096, max_connections=8, header_timeout_s=60, body_timeout_s=60)
QUICK = ServerLimits(header_timeout_s=0.5, body_timeout_s=0.5)
# Two of these fill 250 blocks of 16 tokens, and no machine runs 2000 steps within the graces used here.
LONG = {"model": MODEL, "prompt": "hello", "max_tokens": 2000, "ignore_eos": True}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return tiny_chat_model(tmp_path_factory, default_model_dir)


@pytest.fixture(scope="module")
def small(tiny_model_dir: Path) -> Iterator[ServerThread]:
    srv = start_server(make_async_engine(tiny_model_dir, num_kv_blocks=128), limits=SMALL)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def quick(tiny_model_dir: Path) -> Iterator[ServerThread]:
    srv = start_server(make_async_engine(tiny_model_dir, num_kv_blocks=128), limits=QUICK)
    yield srv
    srv.stop()


def _connect(srv: ServerThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket timeout)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _wait_for(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _cut(base_url: str) -> dict[str, float]:
    """``pagedattn_connections_cut_total`` by reason."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "pagedattn_connections_cut_total"}


def _completion_ok(base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/completions", json={**LONG, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ====================================================================== request bodies
def _body_of_size(n: int) -> bytes:
    """A valid completion request of exactly ``n`` bytes (padded with JSON whitespace)."""
    core = json.dumps({**LONG, "max_tokens": 2}).encode()
    assert len(core) <= n
    return core[:-1] + b" " * (n - len(core)) + b"}"


def test_body_limit_is_413_declared_or_streamed(small: ServerThread) -> None:
    url = f"{small.base_url}/v1/completions"
    limit = SMALL.max_body_bytes
    hdrs = {"content-type": "application/json"}
    assert httpx.post(url, content=_body_of_size(limit), headers=hdrs, timeout=60).status_code == 200
    # Declared too large: refused before the body is read.
    err = _error(httpx.post(url, content=_body_of_size(limit + 1), headers=hdrs, timeout=60), 413)
    assert err["code"] == "request_too_large" and str(limit) in err["message"]
    # No length declared (chunked): refused once the bytes counted pass the limit.
    def chunks(n: int) -> Iterator[bytes]:
        body = _body_of_size(n)
        yield from (body[i:i + 1000] for i in range(0, len(body), 1000))

    assert httpx.post(url, content=chunks(limit), headers=hdrs, timeout=60).status_code == 200
    _error(httpx.post(url, content=chunks(50 * limit), headers=hdrs, timeout=60), 413)
    _completion_ok(small.base_url)


# ====================================================================== connections
def test_connections_beyond_the_cap_get_503(small: ServerThread) -> None:
    connections = small.server.server_state.connections
    _wait_for(lambda: not connections)  # earlier tests' kept-alive connections are gone
    held = [_connect(small) for _ in range(SMALL.max_connections)]
    try:
        for s in held:  # partial headers: uvicorn alone would wait for the rest forever
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        _wait_for(lambda: len(connections) == SMALL.max_connections)
        r = httpx.get(f"{small.base_url}/health", timeout=30)
        err = _error(r, 503)
        assert err["code"] == "too_many_connections" and r.headers["connection"] == "close"
        with _connect(small) as extra:  # the refusal comes at once, before any request
            assert _read_all(extra).startswith(b"HTTP/1.1 503 ")
        with _connect(small) as extra:  # and survives a request sent after it (no reset destroys it)
            extra.sendall(_body_of_size(1000))
            time.sleep(0.3)
            assert _read_all(extra).startswith(b"HTTP/1.1 503 ")
        held.pop().close()
        _wait_for(lambda: len(connections) < SMALL.max_connections)
        assert httpx.get(f"{small.base_url}/health", timeout=30).status_code == 200
        assert _cut(small.base_url)["too_many_connections"] == 3
    finally:
        for s in held:
            s.close()


def test_slow_headers_and_bodies_are_cut(quick: ServerThread) -> None:
    before = _cut(quick.base_url)
    socks = [_connect(quick) for _ in range(3)]
    socks[1].sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-ty")  # headers never end
    socks[2].sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"model\": ")  # the body never ends
    for s in socks:  # socks[0] sends nothing at all
        with s:
            assert _read_all(s) == b""  # closed, with no answer
    # A keep-alive connection's next request is held to the same deadline.
    with _connect(quick) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        got = b""
        while not got.endswith(b'{"status":"ok"}'):
            got += s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 ")
        s.sendall(b"GET /health HTTP/1.1\r\nhost")
        assert _read_all(s) == b""
    # Clients that are quick enough are served.
    _completion_ok(quick.base_url)
    after = _cut(quick.base_url)
    assert after["header_timeout"] - before.get("header_timeout", 0) == 3
    assert after["body_timeout"] - before.get("body_timeout", 0) == 1


def test_accept_failures_at_the_fd_limit_are_logged_once(tmp_path: Path) -> None:
    """A real EMFILE storm: a loop with a few descriptors to spare and hundreds of clients."""
    script = tmp_path / "accept.py"
    script.write_text(ACCEPT_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": _src_path()})
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(200)]
        time.sleep(2.5)  # two retries of asyncio's accept loop (one a second)
        out, err = proc.communicate(input="", timeout=60)  # closing stdin ends the script
        for c in clients:
            c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    accepted, suppressed = map(int, out.split())
    assert accepted < 200 and suppressed > 100  # the limit was really hit, many times
    assert "cannot accept connections" in err and "Too many open files" in err
    assert len(err.splitlines()) <= 2 and "Traceback" not in err, err[:2000]


ACCEPT_SCRIPT = """
import asyncio, os, resource, sys
from pagedattn.entrypoints.server import AcceptErrorLog

async def main():
    loop = asyncio.get_running_loop()
    log = AcceptErrorLog()
    loop.set_exception_handler(log)
    held = []
    server = await loop.create_server(lambda: Hold(held), "127.0.0.1", 0, backlog=256)
    open_fds = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds + 16, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(server.sockets[0].getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    print(len(held), log.suppressed, flush=True)

class Hold(asyncio.Protocol):
    def __init__(self, held):
        self.held = held
    def connection_made(self, transport):
        self.held.append(transport)

asyncio.run(main())
"""


def _src_path() -> str:
    return str(Path(__file__).resolve().parents[1] / "src")


# ====================================================================== the engine failing, shutdown
def _stream_lines(client: httpx.Client, body: dict[str, Any], started: threading.Event) -> list[str]:
    """The SSE lines of a streaming completion; ``started`` is set on its first chunk."""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = []
        for line in r.iter_lines():
            if line:
                lines.append(line)
                started.set()
        return lines


def _sse_error(lines: list[str]) -> dict[str, Any]:
    """The error event that must end a cut stream, just before ``[DONE]``."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert all(ln.startswith("data: ") for ln in lines)
    err = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _running(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return next(float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("pagedattn_requests_running "))


def _two_long_requests(base_url: str, then: Any, body: dict[str, Any] = LONG) -> tuple[list[str], httpx.Response]:
    """A stream and a plain request that cannot finish soon; ``then()`` once both run."""
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=base_url, timeout=60) as c1, \
            httpx.Client(base_url=base_url, timeout=60) as c2:
        stream = pool.submit(_stream_lines, c1, body, started)
        plain = pool.submit(c2.post, "/v1/completions", json=body)
        _wait_for(lambda: started.is_set() and _running(base_url) == 2)
        then()
        return stream.result(60), plain.result(60)


def test_a_failed_engine_fails_running_requests_and_stops_the_server(tiny_model_dir: Path) -> None:
    engine = make_async_engine(tiny_model_dir, num_kv_blocks=256)
    failing = threading.Event()
    real_step = engine.engine.step

    def step() -> Any:
        if failing.is_set():
            raise RuntimeError("CUDA error: an illegal memory access at 0x7f3a9c")
        return real_step()

    engine.engine.step = step  # type: ignore[method-assign]
    app = create_app(engine, MODEL)
    srv = ServerThread(app).start()
    try:
        lines, plain = _two_long_requests(srv.base_url, failing.set)
        assert _sse_error(lines)["code"] == "engine_unavailable"
        assert _error(plain, 503)["code"] == "engine_unavailable"
        assert "0x7f3a9c" not in plain.text + "".join(lines)  # the cause stays in the log
        srv.thread.join(30)  # the server stops by itself
        assert not srv.thread.is_alive() and srv.server.engine_failed
    finally:
        srv.stop()

    async def probe() -> list[httpx.Response]:  # the app itself, now that its server is gone
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as c:
            return [await c.get("/health"), await c.post("/v1/completions", json=LONG), await c.get("/metrics")]

    health, late, metrics = asyncio.run(probe())
    assert _error(health, 503)["code"] == _error(late, 503)["code"] == "engine_unavailable"
    assert metrics.status_code == 200


def test_shutdown_answers_what_outlasts_the_grace(tiny_model_dir: Path) -> None:
    srv = start_server(make_async_engine(tiny_model_dir, num_kv_blocks=256),
                       limits=ServerLimits(shutdown_grace_s=0.5))
    stopper = threading.Thread(target=srv.stop)
    lines, plain = _two_long_requests(srv.base_url, stopper.start)
    stopper.join(60)
    assert not srv.thread.is_alive()
    assert _sse_error(lines)["code"] == "server_shutting_down"
    assert _error(plain, 503)["code"] == "server_shutting_down"
    assert len(lines) > 2  # the stream ran until the grace ended


# ====================================================================== the app
def test_prompts_are_tokenized_off_the_event_loop(small: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = small.server.state.engine
    threads: list[str] = []
    real_prepare = engine.prepare

    def prepare(prompt: Any, params: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_prepare(prompt, params)

    monkeypatch.setattr(engine, "prepare", prepare)
    _completion_ok(small.base_url)
    r = httpx.post(f"{small.base_url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
    assert len(threads) >= 2 and small.thread.name not in threads


def test_openapi_pages_are_off_unless_asked_for(small: ServerThread) -> None:
    engine = small.server.state.engine

    async def status(app: Any, path: str) -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as c:
            return (await c.get(path)).status_code

    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{small.base_url}{path}", timeout=30).status_code == 404
        assert asyncio.run(status(create_app(engine, MODEL, enable_docs=True), path)) == 200


# ====================================================================== ``pagedattn serve`` processes
INJECTED_FAILURE = """
import os
from pagedattn.engine.llm_engine import LLMEngine

_step = LLMEngine.step

def step(self):
    if os.path.exists(os.environ["FAIL_FILE"]):
        raise RuntimeError("injected device failure at 0x7f3a9c")
    return _step(self)

LLMEngine.step = step
"""


def test_serve_exits_1_when_the_engine_fails(tiny_model_dir: Path, tmp_path: Path) -> None:
    fail_file = tmp_path / "fail"
    with ServeProcess(tiny_model_dir, tmp_path, prelude=INJECTED_FAILURE, env={"FAIL_FILE": str(fail_file)}) as srv:
        lines, plain = _two_long_requests(srv.base_url, fail_file.touch, {**LONG, "model": str(tiny_model_dir)})
        rc = srv.wait(60)
    assert _sse_error(lines)["code"] == _error(plain, 503)["code"] == "engine_unavailable"
    assert "0x7f3a9c" not in plain.text + "".join(lines)
    err = srv.stderr()
    assert rc == 1, err
    assert err.count("RuntimeError: injected device failure at 0x7f3a9c") == 1  # logged once, with its traceback
    assert "exit status 1" in err


def _fd_soft_limit(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith("Max open files"))
    return int(line.split()[3])


SLOW_STEPS = """
import time
from pagedattn.engine.llm_engine import LLMEngine

_step = LLMEngine.step

def step(self):
    time.sleep(0.01)  # 2000 steps then outlast a grace of 3 s on any machine, while 16 fit in it
    return _step(self)

LLMEngine.step = step
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_serve_stops_cleanly_on_signal(tiny_model_dir: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """Running responses get the grace to finish; those that cannot get an error, not a cut."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(hard, 256)  # a soft limit far below the hard one, which start-up must lift

    def lower_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    name = str(tiny_model_dir)
    with ServeProcess(tiny_model_dir, tmp_path, "--shutdown-timeout", "3", prelude=SLOW_STEPS,
                      preexec_fn=lower_fd_limit) as srv:
        assert _fd_soft_limit(srv.proc.pid) == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
        short: list[str] = []

        def signal_during_a_short_stream() -> None:
            body = {"model": name, "prompt": "hello", "max_tokens": 16, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{srv.base_url}/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                short.append(next(lines))
                srv.proc.send_signal(sig)
                short.extend(ln for ln in lines if ln)

        lines, plain = _two_long_requests(srv.base_url, signal_during_a_short_stream, {**LONG, "model": name})
        rc = srv.wait(60)
        with pytest.raises(httpx.TransportError):  # nothing is accepted any more
            httpx.get(f"{srv.base_url}/health", timeout=2)
    assert short[-1] == "data: [DONE]" and '"finish_reason":"length"' in short[-2]  # finished, not cut
    assert _sse_error(lines)["code"] == _error(plain, 503)["code"] == "server_shutting_down"
    err = srv.stderr()
    assert "server stopped" in err and "Traceback" not in err, err
    assert rc == (0 if sig == signal.SIGTERM else 130), (rc, err)
