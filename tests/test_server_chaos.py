"""A chaos test of a ``pagedattn serve`` process on loopback: a crowd of clients, many of them
misbehaving, then SIGTERM in the middle of a load.

The crowd, all at once, against a server with a small KV pool (so the scheduler preempts), a
connection cap below the crowd's size and short header/body deadlines: streaming clients that
hang up at random, slow readers on a tiny receive buffer (some hanging up too), plain requests,
malformed and oversized bodies, partial headers that never end, bytes that are not HTTP.  Every
answer must be well-formed (a complete result, or an OpenAI-style JSON error of the expected
kind), no request may fail inside the server (no 5xx counted by the app), and afterwards no KV
block may be held and the greedy answer must be the one given before the crowd came.  Then a
second load is cut by SIGTERM: what outlasts the grace gets an error event plus ``[DONE]`` or a
503 JSON, and the process exits with status 0.  Bounded in count and in time; 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .server_harness import ServeProcess, tiny_chat_model

MAX_BODY = 65536
PHASE_LIMIT_S = 120.0  # a hang guard; the crowd usually takes seconds
FLAGS = ("--num-kv-blocks", "96", "--max-body-bytes", str(MAX_BODY), "--shutdown-timeout", "2")
# Each step takes 5 ms more: 2000 steps outlast the grace of 2 s on any machine.
SLOW_STEPS = """
import time
from pagedattn.engine.llm_engine import LLMEngine

_step = LLMEngine.step

def step(self):
    time.sleep(0.005)
    return _step(self)

LLMEngine.step = step
"""
WORDS = ("amber", "basket", "cloud", "delta", "ember", "fable", "grove", "harbor", "island", "jungle", "kettle")
JSON_HEADERS = {"content-type": "application/json"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return tiny_chat_model(tmp_path_factory, default_model_dir)


# ====================================================================== checking answers
def _json_error(status: int, headers: Any, body: bytes, allowed: set[int]) -> str:
    """The ``code`` (or type) of a well-formed OpenAI-style error answer."""
    assert status in allowed, (status, body[:300])
    assert headers.get("content-type") == "application/json", (status, body[:300])
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return str(err["code"] or err["type"])


def _refused(status: int, headers: Any, body: bytes) -> bool:
    """True for the cap's answer: this client got no further (which is well-formed too)."""
    if status != 503:
        return False
    assert _json_error(status, headers, body, {503}) in ("too_many_connections", "server_shutting_down")
    return True


def _check_sse(text: str, n: int, max_tokens: int, chat: bool, cut_ok: bool = False) -> str:
    """A complete stream: JSON events, every choice finished by length, exact usage, ``[DONE]``;
    or, when ``cut_ok``, one cut by shutdown with an error event before ``[DONE]``."""
    events = [e for e in text.split("\n\n") if e]
    assert events and all(e.startswith("data: ") for e in events), text[-500:]
    assert events[-1] == "data: [DONE]", text[-500:]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    if chunks and "error" in chunks[-1]:
        assert cut_ok and chunks[-1]["error"]["code"] == "server_shutting_down", chunks[-1]
        return "cut"
    finish = {c["index"]: c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]}
    assert finish == dict.fromkeys(range(n), "length"), finish
    assert chunks[-1]["usage"]["completion_tokens"] == n * max_tokens
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert all(ch["object"] == kind for ch in chunks)
    return "done"


# ====================================================================== the crowd
class Crowd:
    def __init__(self, base_url: str, model: str, rng: random.Random) -> None:
        self.base_url, self.model, self.rng = base_url, model, rng
        self.port = int(base_url.rsplit(":", 1)[1])

    def client(self) -> httpx.AsyncClient:
        """A client of its own per actor (its own connections), without TLS verification: the
        crowd speaks plain HTTP, and loading the certificate store takes ~0.1 s of the event
        loop per client.  With it, a crowd of 300 held the loop for tens of seconds, so that
        clients whose sockets had connected sent their requests after the server's header
        deadline and were rightly cut."""
        return httpx.AsyncClient(base_url=self.base_url, timeout=PHASE_LIMIT_S, verify=False)

    def prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(2, 24)))

    def request(self, chat: bool, stream: bool, max_tokens: int, n: int = 1, **extra: Any) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "n": n, "temperature": 0.8,
                                "ignore_eos": True, "stream": stream, **extra}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if chat:
            return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": self.prompt()}]}
        return "/v1/completions", {**body, "prompt": self.prompt()}

    # ------------------------------------------------------------------ well-behaved, or hanging up
    async def stream(self, cut_ok: bool = False, max_tokens: int | None = None) -> str:
        rng = self.rng
        chat, n = rng.random() < 0.5, rng.choice((1, 1, 2))
        max_tokens = max_tokens or rng.randint(4, 24)
        hang_up = rng.randint(1, 4) if rng.random() < 0.3 and not cut_ok else None
        path, body = self.request(chat, True, max_tokens, n)
        async with self.client() as c, \
                c.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                raw = await r.aread()
                assert _refused(r.status_code, r.headers, raw), (r.status_code, raw[:300])
                return "refused"
            text, events = "", 0
            async for piece in r.aiter_text():
                text += piece
                events = text.count("\n\n")
                if hang_up is not None and events >= hang_up:
                    return "hung up"
        return _check_sse(text, n, max_tokens, chat, cut_ok)

    async def plain(self, cut_ok: bool = False, max_tokens: int | None = None) -> str:
        chat, n = self.rng.random() < 0.5, self.rng.choice((1, 2))
        max_tokens = max_tokens or self.rng.randint(2, 16)
        path, body = self.request(chat, False, max_tokens, n)
        async with self.client() as c:
            r = await c.post(path, json=body)
        if r.status_code != 200:
            if cut_ok and r.status_code == 503:
                assert _json_error(503, r.headers, r.content, {503}) in ("server_shutting_down",
                                                                         "too_many_connections")
                return "cut"
            assert _refused(r.status_code, r.headers, r.content), (r.status_code, r.text[:300])
            return "refused"
        out = r.json()
        assert out["usage"]["completion_tokens"] == n * max_tokens
        assert sorted(c["index"] for c in out["choices"]) == list(range(n))
        assert all(c["finish_reason"] == "length" for c in out["choices"])
        return "done"

    async def slow_reader(self) -> str:
        """A stream read a few hundred bytes at a time through a 4 KiB receive buffer (so the
        server's writes back up), parsed by h11; a third of them hang up midway."""
        rng = self.rng
        hang_up = rng.randint(2, 6) if rng.random() < 0.33 else None
        path, body = self.request(False, True, 24, logprobs=5)  # logprobs: fat chunks
        status, headers, payload = await self._raw(path, json.dumps(body).encode(), read=256, pause=0.005,
                                                   hang_up_after=hang_up)
        if status is None:
            return "hung up"
        if status != 200:
            assert _refused(status, headers, payload), (status, payload[:300])
            return "refused"
        return _check_sse(payload.decode(), 1, 24, chat=False)

    # ------------------------------------------------------------------ bad input
    async def malformed(self) -> str:
        model = self.model
        bodies = [
            b"{not json", b"[1, 2]", b"", b'{"prompt": "hi"}', b'{"model": "' + model.encode() + b'"}',
            json.dumps({"model": model, "prompt": "hi", "max_tokens": -1}).encode(),
            json.dumps({"model": model, "prompt": "hi", "temperature": "hot"}).encode(),
            json.dumps({"model": model, "prompt": "\ud800 hi"}).encode(),  # ASCII JSON: a lone surrogate
            json.dumps({"model": model, "messages": [{"role": "user", "content": "x\udfff"}]}).encode(),
            json.dumps({"model": model, "prompt": [[-5, 3]]}).encode(),
            json.dumps({"model": model, "prompt": "word " * 3000, "max_tokens": 4}).encode(),  # over the context
            json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(),
            json.dumps({"model": model, "prompt": "hi", "max_tokens": 10**30}).encode(),
        ]
        body = self.rng.choice(bodies)
        path = "/v1/chat/completions" if b"messages" in body else self.rng.choice(
            ("/v1/completions", "/v1/chat/completions"))
        async with self.client() as c:
            r = await c.post(path, content=body, headers=JSON_HEADERS)
        if _refused(r.status_code, r.headers, r.content):
            return "refused"
        _json_error(r.status_code, r.headers, r.content, {400, 404})
        return "rejected"

    async def oversized(self) -> str:
        body = json.dumps({"model": self.model, "prompt": "x" * (MAX_BODY + self.rng.randint(1, 4 * MAX_BODY))})
        data = body.encode()

        async def chunked() -> Any:
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        content: Any = data if self.rng.random() < 0.5 else chunked()
        async with self.client() as c:
            try:
                r = await c.post("/v1/completions", content=content, headers=JSON_HEADERS)
            except httpx.WriteError:  # refused (the cap) while still sending
                return "refused"
        if _refused(r.status_code, r.headers, r.content):
            return "refused"
        assert _json_error(r.status_code, r.headers, r.content, {413}) == "request_too_large"
        return "rejected"

    async def slowloris(self) -> str:
        """Headers that never end: the server must hang up (or refuse at once)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: appl")
            rest = await reader.read()  # until the server closes
        finally:
            writer.close()
        assert rest == b"" or rest.startswith(b"HTTP/1.1 503 "), rest[:200]
        return "cut" if rest == b"" else "refused"

    async def not_http(self) -> str:
        # A TLS hello, say, followed by line ends so that it is whole.
        status, headers, payload = await self._raw_bytes(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")
        if status == 503:
            assert _refused(status, headers, payload)
            return "refused"
        _json_error(status, headers, payload, {400})
        return "rejected"

    # ------------------------------------------------------------------ raw HTTP (h11 parses)
    async def _raw(self, path: str, data: bytes, read: int = 65536, pause: float = 0.0,
                   hang_up_after: int | None = None) -> tuple[int | None, dict[str, str], bytes]:
        conn = h11.Connection(h11.CLIENT)
        head = h11.Request(method="POST", target=path, headers=[("host", "x"), ("content-type", "application/json"),
                                                                  ("content-length", str(len(data)))])
        return await self._exchange(conn, conn.send(head) + conn.send(h11.Data(data=data)) + conn.send(
            h11.EndOfMessage()), read, pause, hang_up_after)

    async def _raw_bytes(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))  # so h11 expects an answer;
        conn.send(h11.EndOfMessage())  # ``data`` is what is really sent
        status, headers, payload = await self._exchange(conn, data, 65536, 0.0, None)
        assert status is not None
        return status, headers, payload

    async def _exchange(self, conn: h11.Connection, request: bytes, read: int, pause: float,
                        hang_up_after: int | None) -> tuple[int | None, dict[str, str], bytes]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        status, headers, payload, reads = None, {}, b"", 0
        try:
            writer.write(request)
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await reader.read(read))
                    reads += 1
                    if hang_up_after is not None and reads > hang_up_after and status == 200:
                        return None, headers, payload
                    if pause:
                        await asyncio.sleep(pause)
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                    headers = {k.decode(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, h11.Data):
                    payload += bytes(ev.data)
                elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, headers, payload
        finally:
            writer.close()

    async def random_actor(self) -> str:
        actors = [self.stream] * 6 + [self.plain] * 3 + [self.slow_reader] * 2 + [
            self.malformed, self.malformed, self.oversized, self.slowloris, self.not_http]
        actor = self.rng.choice(actors)
        try:
            return f"{actor.__name__}: {await actor()}"
        except Exception as e:
            raise AssertionError(f"{actor.__name__}: {e!r}") from e


# ====================================================================== the server's state
def _metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def _app_5xx(base_url: str) -> list[Any]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "pagedattn_request_errors_total" and int(s.labels["status"]) >= 500]


def _wait_idle(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(base_url)
        busy = sum(m[f"pagedattn_{k}"] for k in ("kv_blocks_used", "cpu_blocks_used", "requests_running",
                                                  "requests_waiting", "requests_swapped"))
        if busy == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def _greedy(base_url: str, model: str) -> str:
    body = {"model": model, "prompt": "The harbor at dawn", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def _gather(coros: list[Awaitable[str]]) -> Counter[str]:
    results = await asyncio.wait_for(asyncio.gather(*coros, return_exceptions=True), PHASE_LIMIT_S)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    return Counter(r for r in results if isinstance(r, str))


# ====================================================================== the test
# Header and body deadlines: short, so that partial headers are cut soon, but long enough for a
# client whose own event loop is busy with the whole crowd.
@pytest.mark.parametrize(("clients", "deadline_s"), [(60, 3), pytest.param(300, 10, marks=pytest.mark.slow)])
def test_chaos_then_sigterm(tiny_model_dir: Path, tmp_path: Path, clients: int, deadline_s: int) -> None:
    seed = time.time_ns()
    rng = random.Random(seed)
    print(f"seed {seed}")
    model = str(tiny_model_dir)
    # A third of the crowd finds the cap full: few enough that each refused one gets its 503
    # (beyond as many as the cap, refused connections are reset).
    cap = clients * 2 // 3
    flags = (*FLAGS, "--max-connections", str(cap), "--header-timeout", str(deadline_s), "--body-timeout",
             str(deadline_s))
    with ServeProcess(tiny_model_dir, tmp_path, *flags, prelude=SLOW_STEPS) as srv:
        crowd = Crowd(srv.base_url, model, rng)
        before = _greedy(srv.base_url, model)

        t0 = time.monotonic()
        tally = asyncio.run(_gather([crowd.random_actor() for _ in range(clients)]))
        print(f"crowd ({time.monotonic() - t0:.1f} s):", dict(sorted(tally.items())))
        m = _wait_idle(srv.base_url)
        assert m["pagedattn_kv_blocks_used"] == m["pagedattn_cpu_blocks_used"] == 0, m
        assert m["pagedattn_requests_running"] == m["pagedattn_requests_waiting"] == 0, m
        assert m["pagedattn_requests_swapped"] == 0, m
        assert not _app_5xx(srv.base_url)
        assert _greedy(srv.base_url, model) == before

        async def load_then_sigterm() -> Counter[str]:
            # Fewer than the KV pool holds, so that all of them run when the signal comes.
            tasks = [asyncio.ensure_future(crowd.stream(cut_ok=True, max_tokens=600)) for _ in range(3)]
            tasks += [asyncio.ensure_future(crowd.plain(cut_ok=True, max_tokens=600)) for _ in range(2)]
            deadline = time.monotonic() + PHASE_LIMIT_S
            while (await asyncio.to_thread(_metrics, srv.base_url))["pagedattn_requests_running"] < 5:
                assert time.monotonic() < deadline and not any(t.done() for t in tasks)
                await asyncio.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            return await _gather(tasks)

        t0 = time.monotonic()
        cut = asyncio.run(load_then_sigterm())
        print(f"at SIGTERM ({time.monotonic() - t0:.1f} s):", dict(cut))
        assert cut["cut"] == 5  # 600 slowed steps outlast the grace
        rc = srv.wait(60)
        print(f"exit after {time.monotonic() - t0:.1f} s")
    err = srv.stderr()
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
