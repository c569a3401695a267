"""The host's work of serving streams, without a device: the same streaming requests run three ways
with every step's forward replaced by random tokens (``bench_host_step.py``'s stand-in), so each
row is the most a host can serve at this concurrency whatever the GPU does:

* ``engine``: ``LLMEngine.step`` in a loop, every request streaming (a ``RequestOutput`` per
  request and step, text detokenised token by token);
* ``async engine``: ``AsyncLLMEngine`` with one coroutine consuming each stream (the server's
  engine thread and event loop, without HTTP);
* ``http server``: the OpenAI server (``create_app``, uvicorn) in this process, and
  ``serving.py`` as the client in another process, every request streaming ``/v1/completions``.

The first two ask for ``--output-kind`` outputs: ``delta`` (the default, what the server's
streams ask for: each output holds its new tokens) or ``cumulative`` (each holds the output so
far, whose token ids are copied at every step).

The model is the embedded default (its tokenizer and vocabulary; its forward never runs), on
the CPU.  Prompts are ``serving.py``'s random words.  Printed: output tokens/s, engine steps and
milliseconds per step of each way; JSON with ``--out``.

    python benchmarks/bench_server_host.py [--num-requests 256] [--input-len 100] [--output-len 200]
                                           [--output-kind delta|cumulative]
    python benchmarks/bench_server_host.py --smoke      # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from bench_common import git_commit
from bench_host_step import fake_forward
from serving import random_workload

HERE = Path(__file__).resolve().parent


def build_engine(max_seqs: int, blocks: int) -> Any:
    from pagedattn.config import EngineConfig
    from pagedattn.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(device="cpu", max_num_seqs=max_seqs, num_kv_blocks=blocks, block_size=16,
                                    max_num_batched_tokens=16384, async_scheduling=True))
    fake_forward(engine)
    return engine


Timed = tuple[float, float, int]  # wall seconds, this process's CPU seconds, engine steps


def params(n: int, kind: str) -> Any:
    from pagedattn import RequestOutputKind, SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, output_kind=RequestOutputKind[kind.upper()])


def run_engine(prompts: list[str], outs: list[int], max_seqs: int, blocks: int, kind: str) -> Timed:
    engine = build_engine(max_seqs, blocks)
    for p, n in zip(prompts, outs):
        engine.add_request(p, params(n, kind), stream=True)
    t, c = time.perf_counter(), _cpu_seconds()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t, _cpu_seconds() - c, engine.num_steps


def run_async(prompts: list[str], outs: list[int], max_seqs: int, blocks: int, kind: str) -> Timed:
    from pagedattn.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_factory(lambda: build_engine(max_seqs, blocks))

    async def consume(prompt: str, n: int) -> None:
        async for _ in await engine.generate(prompt, params(n, kind)):
            pass

    async def main() -> Timed:
        t, c, s = time.perf_counter(), _cpu_seconds(), engine.engine.num_steps
        await asyncio.gather(*(consume(p, n) for p, n in zip(prompts, outs)))
        return time.perf_counter() - t, _cpu_seconds() - c, engine.engine.num_steps - s

    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


def _cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """CPU seconds this process has used (every thread: engine, event loop, torch), or with
    ``RUSAGE_CHILDREN`` all its children that have ended."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_http(args: argparse.Namespace, max_seqs: int, blocks: int) -> tuple[Timed, dict[str, Any]]:
    """The server in this process, ``serving.py`` in another; the client's duration (first request
    sent to last stream ended), this process's CPU seconds and the engine's steps while the client
    ran, and the client's summary (with its own CPU seconds, start-up included: those of the
    children that ended while it ran, the client alone)."""
    from pagedattn.engine.async_engine import AsyncLLMEngine
    from pagedattn.entrypoints.server import create_app, make_server

    engine = AsyncLLMEngine.from_factory(lambda: build_engine(max_seqs, blocks))
    port = _free_port()
    server = make_server(create_app(engine, "stand-in"), port=port)
    out = Path(tempfile.mkdtemp(prefix="server-host-")) / "client.json"
    cmd = [sys.executable, str(HERE / "serving.py"), "--base-url", f"http://127.0.0.1:{port}",
           "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--range-ratio", "0", "--warmup", "0", "--out", str(out)]

    async def main() -> tuple[float, int, float]:
        serve = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        steps0, cpu0, child0 = engine.engine.num_steps, _cpu_seconds(), _cpu_seconds(resource.RUSAGE_CHILDREN)
        client = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, env=dict(os.environ))
        rc = await client.wait()
        used = (_cpu_seconds() - cpu0, engine.engine.num_steps - steps0,
                _cpu_seconds(resource.RUSAGE_CHILDREN) - child0)
        server.should_exit = True
        await serve
        if rc != 0:
            raise RuntimeError(f"serving.py exited with status {rc}")
        return used

    try:
        # The event loop `pagedattn serve` runs (uvicorn's choice: uvloop where it is installed).
        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            cpu, steps, client_cpu = runner.run(main())
    finally:
        engine.shutdown()
    summary = json.loads(out.read_text())["summary"]
    summary["client_cpu_s"] = client_cpu
    return (summary["duration_s"], cpu, steps), summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=100, help="words per prompt")
    ap.add_argument("--output-len", type=int, default=200, help="tokens per request (EOS ignored)")
    ap.add_argument("--ways", default="engine,async engine,http server")
    ap.add_argument("--output-kind", choices=("delta", "cumulative"), default="delta",
                    help="what each output of the engine and async engine ways holds")
    ap.add_argument("--smoke", action="store_true", help="a tiny run (seconds)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_requests, args.input_len, args.output_len = 4, 8, 6
    ways = [w.strip() for w in args.ways.split(",")]
    unknown = set(ways) - {"engine", "async engine", "http server"}
    if unknown or args.num_requests < 1 or args.output_len < 1 or args.input_len < 1:
        raise ValueError(f"bad arguments: unknown ways {sorted(unknown)} or a count below 1")
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    specs = random_workload(args.num_requests, args.input_len, args.output_len, 0.0, seed=0)
    prompts, outs = [s.prompt for s in specs], [s.max_tokens for s in specs]
    max_seqs = min(256, args.num_requests)
    blocks = args.num_requests * (-(-(4 * args.input_len + args.output_len) // 16) + 1) + 64
    tokens = sum(outs)
    rows: dict[str, dict[str, Any]] = {}
    for way in ways:
        extra: dict[str, Any] = {}
        if way == "engine":
            seconds, cpu, steps = run_engine(prompts, outs, max_seqs, blocks, args.output_kind)
        elif way == "async engine":
            seconds, cpu, steps = run_async(prompts, outs, max_seqs, blocks, args.output_kind)
        else:
            (seconds, cpu, steps), extra = run_http(args, max_seqs, blocks)
            tokens_seen = extra["total_output_tokens"]
            if tokens_seen != tokens:
                raise RuntimeError(f"the client counted {tokens_seen} output tokens, not {tokens}")
        rows[way] = {"seconds": seconds, "steps": steps, "tok_per_s": tokens / seconds, "cpu_s": cpu,
                     "cpu_us_per_token": 1e6 * cpu / tokens,
                     "ms_per_step": 1e3 * seconds / max(1, steps), **({"client": extra} if extra else {})}
    res = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "requests": args.num_requests,
           "input_words": args.input_len, "output_tokens": tokens, "output_kind": args.output_kind, "ways": rows}
    print(f"{args.num_requests} streaming requests, {args.input_len} words in, {args.output_len} tokens out, "
          f"{args.output_kind} outputs, the forward replaced by random tokens (commit {res['commit']})")
    print("| way | seconds | output tok/s | engine steps | ms per step | CPU us per token |")
    print("| --- | --- | --- | --- | --- | --- |")
    for way, r in rows.items():
        print(f"| {way} | {r['seconds']:.2f} | {r['tok_per_s']:.0f} | {r['steps']} | {r['ms_per_step']:.2f} | "
              f"{r['cpu_us_per_token']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
