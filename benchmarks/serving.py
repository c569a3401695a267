"""Online serving benchmark: requests arrive at a given rate against a running server.

Arrivals are a Poisson process (``--request-rate`` requests/s, ``inf`` sends them all at once),
optionally capped at ``--max-concurrency`` in flight.  Every request streams
(``stream_options.include_usage`` supplies the exact token counts).  Prompts are either
random (``--input-len`` words, ``--output-len`` tokens, both spread by ``--range-ratio``, EOS
ignored so outputs have exactly the asked length) or read from a JSON-lines file whose lines
hold ``{"prompt": ..., "max_tokens": ...}``.

Reported: request and token throughput over the whole run; time to first token (TTFT),
inter-token latency (ITL: gaps between streamed chunks), time per output token after the
first (TPOT) and end-to-end latency, each as mean / p50 / p90 / p99.  A table is printed last;
``--out`` writes everything (with per-request records) as JSON.

    pagedattn serve --port 8000 &
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --num-requests 32 --request-rate 1 \\
        --out serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_common import git_commit

_WORD_TEXT = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community "
         "name president team minute idea kid body information back parent face others level office door health "
         "person art war history party result change morning reason research girl guy moment air teacher force "
         "education")
WORDS = _WORD_TEXT.split()


@dataclass
class RequestSpec:
    prompt: str
    max_tokens: int


@dataclass
class RequestRecord:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from send to the first streamed text
    latency: float = 0.0  # seconds from send to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    start: float = 0.0
    error: str = ""


# ====================================================================== workload
def random_workload(n: int, input_len: int, output_len: int, ratio: float, seed: int) -> list[RequestSpec]:
    rng = random.Random(seed)

    def spread(x: int) -> int:
        return max(1, rng.randint(int(x * (1 - ratio)), int(x * (1 + ratio))))

    return [RequestSpec(" ".join(rng.choice(WORDS) for _ in range(spread(input_len))), spread(output_len))
            for _ in range(n)]


def dataset_workload(path: Path, n: int, default_max_tokens: int, seed: int) -> list[RequestSpec]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"--dataset: {path} has no prompts")
    specs = [RequestSpec(str(r["prompt"]), int(r.get("max_tokens", default_max_tokens))) for r in rows]
    random.Random(seed).shuffle(specs)
    return [specs[i % len(specs)] for i in range(n)]


# ====================================================================== one request
def _body(spec: RequestSpec, model: str, chat: bool, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    if chat:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


def _text_of(chunk: dict[str, Any]) -> str:
    out = []
    for c in chunk.get("choices", ()):
        out.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    return "".join(out)


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestRecord:
    rec = RequestRecord(ok=False, start=time.perf_counter())
    last = rec.start
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = str(chunk["error"])
                    return rec
                now = time.perf_counter()
                if _text_of(chunk):
                    if rec.ttft == 0.0:
                        rec.ttft = now - rec.start
                    else:
                        rec.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
        rec.latency = time.perf_counter() - rec.start
        rec.ok = rec.ttft > 0.0
        if not rec.ok:
            rec.error = "no text streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def run(args: argparse.Namespace, specs: list[RequestSpec], model: str) -> tuple[list[RequestRecord], float]:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    url = args.base_url.rstrip("/") + path
    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(args.max_concurrency or len(specs))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:

        async def limited(spec: RequestSpec) -> RequestRecord:
            async with sem:
                return await send(client, url, _body(spec, model, args.endpoint == "chat", not args.keep_eos))

        for _ in range(args.warmup):
            await send(client, url, _body(RequestSpec("warm up", 4), model, args.endpoint == "chat", True))
        tasks = []
        t0 = time.perf_counter()
        for spec in specs:
            tasks.append(asyncio.create_task(limited(spec)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        records = await asyncio.gather(*tasks)
        return list(records), time.perf_counter() - t0


# ====================================================================== report
def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(records: list[RequestRecord], duration: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "ttft_s": _stats([r.ttft for r in ok]),
        "itl_s": _stats([g for r in ok for g in r.itl]),
        "tpot_s": _stats(tpot),
        "e2e_latency_s": _stats([r.latency for r in ok]),
    }


def table(summary: dict[str, Any], args: argparse.Namespace) -> str:
    rate = "inf" if not math.isfinite(args.request_rate) else f"{args.request_rate:g}"
    lines = [
        f"{'requests (ok / failed)':<28}{summary['completed']} / {summary['failed']}",
        f"{'request rate (req/s)':<28}{rate}",
        f"{'duration (s)':<28}{summary['duration_s']:.2f}",
        f"{'throughput (req/s)':<28}{summary['request_throughput']:.3f}",
        f"{'output tokens/s':<28}{summary['output_token_throughput']:.2f}",
        f"{'total tokens/s':<28}{summary['total_token_throughput']:.2f}",
        f"{'input / output tokens':<28}{summary['total_input_tokens']} / {summary['total_output_tokens']}",
        "",
        f"{'latency (ms)':<16}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for label, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_latency_s")):
        s = summary[key]
        lines.append(f"{label:<16}" + "".join(f"{s[k] * 1e3:>10.1f}" for k in ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)


# ====================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second (inf: all)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--input-len", type=int, default=64, help="random prompts: words per prompt")
    p.add_argument("--output-len", type=int, default=64, help="random prompts: max_tokens")
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths are uniform in len * (1 +- ratio)")
    p.add_argument("--dataset", type=Path, default=None, help="JSON lines with 'prompt' and optional 'max_tokens'")
    p.add_argument("--keep-eos", action="store_true", help="let EOS end a request early (default: ignore it)")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) before the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.num_requests < 1:
        p.error("--num-requests must be >= 1")
    if not args.request_rate > 0:
        p.error("--request-rate must be > 0 (or inf)")
    if not 0 <= args.range_ratio < 1:
        p.error("--range-ratio must be in [0, 1)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        models = httpx.get(args.base_url.rstrip("/") + "/v1/models", timeout=30).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        print(f"error: cannot list models at {args.base_url}: {e}", file=sys.stderr)
        return 2
    model = args.model or models[0]["id"]
    if args.dataset is not None:
        specs = dataset_workload(args.dataset, args.num_requests, args.output_len, args.seed)
    else:
        specs = random_workload(args.num_requests, args.input_len, args.output_len, args.range_ratio, args.seed)
    records, duration = asyncio.run(run(args, specs, model))
    summary = summarize(records, duration)
    for r in records:
        if not r.ok:
            print(f"failed request: {r.error}", file=sys.stderr)
    if args.out is not None:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        if not math.isfinite(args.request_rate):
            config["request_rate"] = "inf"
        result = {"model": model, "config": config, "git": git_commit(), "machine": platform.platform(),
                  "date": time.strftime("%Y-%m-%d"), "summary": summary,
                  "requests": [asdict(r) for r in records]}
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(summary, args))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
