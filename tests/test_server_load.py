"""A bounded load test of the server on loopback: many concurrent streams, some abandoned.

72 streaming requests (completions and chat, some with ``n=2``) arrive at once at a server
whose KV pool is too small to hold them all, so the scheduler must preempt and resume while
a quarter of the clients hang up mid-stream.  Every other request must finish with its
finish_reason and exact token count, nothing may answer 5xx, and once the dust settles no KV
block may still be in use.  Bounded in count and in time (hard timeout), on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .server_harness import TINY_MODEL_NAME, make_async_engine, start_server, tiny_chat_model

NUM_REQUESTS = 72
TIME_LIMIT_S = 120.0  # generous for a loaded 2-core machine; it usually takes a few seconds
WORDS = ("amber", "basket", "cloud", "delta", "ember", "fable", "grove", "harbor", "island", "jungle", "kettle",
         "lantern", "meadow", "needle", "orchard", "pebble", "quartz", "ribbon", "saddle", "timber", "violet")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return tiny_chat_model(tmp_path_factory, default_model_dir)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    # 96 blocks of 16 tokens hold about a third of the peak demand: preemption is certain.
    engine = make_async_engine(tiny_model_dir, num_kv_blocks=96, swap_space_gib=0.05)
    srv = start_server(engine)
    yield srv
    srv.stop()


@dataclass
class Plan:
    chat: bool
    prompt: str
    max_tokens: int
    n: int
    close_after: int | None  # chunks to read before hanging up; None: read to the end


@dataclass
class Result:
    closed: bool
    finish_reasons: dict[int, str | None]
    completion_tokens: int | None


def _plans(rng: random.Random) -> list[Plan]:
    plans = []
    for i in range(NUM_REQUESTS):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        plans.append(Plan(chat=i % 2 == 1, prompt=prompt, max_tokens=rng.randint(8, 40),
                          n=2 if i % 5 == 0 else 1, close_after=rng.randint(1, 4) if i % 4 == 0 else None))
    rng.shuffle(plans)
    return plans


async def _run_one(client: openai.AsyncOpenAI, plan: Plan, seed: int) -> Result:
    common: dict[str, Any] = dict(model=TINY_MODEL_NAME, max_tokens=plan.max_tokens, n=plan.n, temperature=0.8,
                                  seed=seed, stream=True, stream_options={"include_usage": True},
                                  extra_body={"ignore_eos": True})
    if plan.chat:
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": plan.prompt}], **common)
    else:
        stream = await client.completions.create(prompt=plan.prompt, **common)
    finish: dict[int, str | None] = {}
    usage = None
    seen = 0
    async for chunk in stream:
        seen += 1
        for c in chunk.choices:
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if plan.close_after is not None and seen >= plan.close_after:
            await stream.close()
            return Result(True, finish, usage)
    return Result(False, finish, usage)


def _gauges(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_concurrent_streams_with_disconnects(server, tiny_model_dir: Path) -> None:
    rng = random.Random(time.time_ns())
    plans = _plans(rng)
    base_url = server.base_url

    async def main() -> list[Result | BaseException]:
        limits = httpx.Limits(max_connections=NUM_REQUESTS + 8, max_keepalive_connections=NUM_REQUESTS + 8)
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=90,
                                      http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as client:
            return await asyncio.gather(*(_run_one(client, p, rng.randrange(1 << 30)) for p in plans),
                                        return_exceptions=True)

    t0 = time.monotonic()
    results = asyncio.run(asyncio.wait_for(main(), TIME_LIMIT_S))
    elapsed = time.monotonic() - t0

    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    done = 0
    for plan, res in zip(plans, results):
        assert isinstance(res, Result)
        if res.closed:
            continue
        done += 1
        assert res.finish_reasons == dict.fromkeys(range(plan.n), "length"), plan
        assert res.completion_tokens == plan.max_tokens * plan.n, plan
    assert done == NUM_REQUESTS - sum(p.close_after is not None for p in plans)

    # Aborts reach the engine within a pass or two; then nothing may hold a block.
    deadline = time.monotonic() + 15
    while True:
        m = _gauges(base_url)
        busy = sum(m[f"pagedattn_{k}"] for k in ("kv_blocks_used", "requests_running", "requests_waiting",
                                                  "requests_swapped", "cpu_blocks_used"))
        if busy == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert m["pagedattn_kv_blocks_used"] == 0 and m["pagedattn_cpu_blocks_used"] == 0, m
    assert m["pagedattn_requests_running"] == m["pagedattn_requests_waiting"] == m["pagedattn_requests_swapped"] == 0
    assert m["pagedattn_preemptions_total"] > 0  # the pool was too small: the batch was really shared
    errors_5xx = [s for f in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
                  for s in f.samples if s.name == "pagedattn_request_errors_total" and int(s.labels["status"]) >= 500]
    assert not errors_5xx
    asyncio.run(server.engine.run_in_engine(lambda e: e.check_integrity()))
    print(f"{NUM_REQUESTS} streams in {elapsed:.1f}s, {int(m['pagedattn_preemptions_total'])} preemptions")
