"""Single-stream CPU decode: pagedattn (dense and with the GGUF's weights kept quantized) against
llama.cpp on the same GGUF, in the same run.

Workload: one chat prompt (the same token ids for every engine), greedy, 128 new tokens with EOS
ignored, 2 threads, the embedded default model's GGUF (SmolLM2-135M-Instruct, Q4_1 linears and
a Q8_0 embedding) unless ``--gguf`` names another.  Decode tok/s is ``(new - 1) / (t_new - t_1)``:
a run of 1 token (prefill and first sample) is subtracted from a run of ``new`` tokens, for
every engine alike.  Configurations run in turn, ``--repeat`` rounds; the table shows each
one's median and best round (on a shared machine the best is the least disturbed).

llama.cpp comes from ``llama-cpp-python``, an optional extra never needed by the tests; it is run
by the Python given with ``--llamacpp-python`` (a virtual environment of its own, since
``pip install llama-cpp-python`` builds llama.cpp from source), in a child process.

    python benchmarks/bench_cpu_llamacpp.py [--llamacpp-python /path/to/venv/bin/python] [--repeat 3]
                                            [--new-tokens 128] [--threads 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_common import git_commit

from pagedattn import LLM, SamplingParams
from pagedattn.models.gguf import default_gguf_path

PROMPT = "Explain in a few paragraphs how a paged KV cache lets an inference server batch many requests."
# name -> (dtype, gguf_quantized)
OURS = {
    "pagedattn float32 dense": ("float32", False),
    "pagedattn float32 quantized (exact)": ("float32", True),
    "pagedattn bfloat16 dense": ("bfloat16", False),
    "pagedattn bfloat16 quantized": ("bfloat16", True),
}

# Run by the llama-cpp-python interpreter: reads {gguf, ids, new, threads, rounds} as JSON on
# stdin, prints {"seconds_1": [...], "seconds_new": [...], "tokens": [...]} as JSON.
_LLAMACPP = r"""
import json, sys, time
import llama_cpp
a = json.load(sys.stdin)
llm = llama_cpp.Llama(a["gguf"], n_ctx=512, n_threads=a["threads"], n_threads_batch=a["threads"], verbose=False,
                      logits_all=False)
eos = llm.token_eos()
def run(n):
    llm.reset()
    out = []
    t = time.perf_counter()
    for tok in llm.generate(a["ids"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True,
                            logits_processor=llama_cpp.LogitsProcessorList([lambda ids, s: _no_eos(s)])):
        out.append(int(tok))
        if len(out) == n:
            break
    return time.perf_counter() - t, out
def _no_eos(scores):
    scores[eos] = -float("inf")
    return scores
run(8)
res = {"seconds_1": [], "seconds_new": [], "tokens": []}
for _ in range(a["rounds"]):
    res["seconds_1"].append(run(1)[0])
    dt, toks = run(a["new"])
    res["seconds_new"].append(dt)
    res["tokens"] = toks
print(json.dumps(res))
"""


def decode_rate(new: int, t1: float, tn: float) -> float:
    return (new - 1) / (tn - t1)


def bench_ours(gguf: Path, dtype: str, quantized: bool, ids: list[int], new: int, rounds: int
               ) -> tuple[list[float], list[int]]:
    llm = LLM(str(gguf), device="cpu", dtype=dtype, gguf_quantized=quantized, enable_prefix_caching=False)

    def run(n: int) -> tuple[float, list[int]]:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        out = llm.generate([ids], sp, use_tqdm=False)[0]
        return time.perf_counter() - t, list(out.outputs[0].token_ids)

    run(8)  # one-time costs: kernels' first calls, allocator growth
    rates, tokens = [], []
    for _ in range(rounds):
        t1, _ = run(1)
        tn, tokens = run(new)
        rates.append(decode_rate(new, t1, tn))
    llm.shutdown()
    return rates, tokens


def bench_llamacpp(python: str, gguf: Path, ids: list[int], new: int, threads: int, rounds: int
                   ) -> tuple[list[float], list[int]]:
    args = {"gguf": str(gguf), "ids": ids, "new": new, "threads": threads, "rounds": rounds}
    done = subprocess.run([python, "-c", _LLAMACPP], input=json.dumps(args), capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed:\n{done.stderr[-2000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    rates = [decode_rate(new, t1, tn) for t1, tn in zip(res["seconds_1"], res["seconds_new"], strict=True)]
    return rates, res["tokens"]


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--llamacpp-python", default=None, help="a Python with llama-cpp-python (omit: skip llama.cpp)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated subset of our configurations (by name)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    if args.repeat < 1 or args.new_tokens < 2 or args.threads < 1:
        raise ValueError("--repeat and --threads must be >= 1, --new-tokens >= 2")
    if args.llamacpp_python and not Path(args.llamacpp_python).is_file():
        raise ValueError(f"--llamacpp-python: no such file {args.llamacpp_python}")
    configs = {k: v for k, v in OURS.items() if args.only is None or k in args.only.split(",")}
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = Path(args.gguf) if args.gguf else default_gguf_path()

    tok_llm = LLM(str(gguf), device="cpu", gguf_quantized=False)
    assert tok_llm.engine.tokenizer is not None, "the benchmark's prompt needs the GGUF's tokenizer"
    tokenizer = tok_llm.engine.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = list(tokenizer.encode(str(text), add_special_tokens=False))
    tok_llm.shutdown()

    results: dict[str, dict] = {}
    for name, (dtype, quantized) in configs.items():
        rates, tokens = bench_ours(gguf, dtype, quantized, ids, args.new_tokens, args.repeat)
        results[name] = {"tok_per_s": rates, "tokens": tokens}
    if args.llamacpp_python:
        rates, tokens = bench_llamacpp(args.llamacpp_python, gguf, ids, args.new_tokens, args.threads, args.repeat)
        results["llama.cpp (llama-cpp-python)"] = {"tok_per_s": rates, "tokens": tokens}

    ref = results.get("pagedattn float32 dense", next(iter(results.values())))["tokens"]
    print(f"\n{'engine':38s} {'median tok/s':>12s} {'best tok/s':>10s} {'same tokens as fp32 dense':>26s}")
    for name, r in results.items():
        r["median"], r["best"] = statistics.median(r["tok_per_s"]), max(r["tok_per_s"])
        r["agreement_with_float32_dense"] = agreement(r["tokens"], ref)
        print(f"{name:38s} {r['median']:12.1f} {r['best']:10.1f} {r['agreement_with_float32_dense']:>19d}/"
              f"{args.new_tokens}")
    if args.out:
        out = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
            "commit": git_commit(),
            "gguf": gguf.name,
            "prompt_tokens": len(ids),
            "workload": vars(args),
            "results": results,
        }
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
