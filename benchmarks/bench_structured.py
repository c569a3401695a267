"""What structured output costs: decode throughput with every request constrained by xgrammar
(``json_object``, a nested JSON schema) against the same requests unconstrained.

Each mode runs in a fresh process (kernels, grammars and caches start cold, as a user meets
them) after a warm-up of a few tiny *unconstrained* requests, so the first grammar compile is
part of the first timed run; a second run of the same requests shows the steady state.  The
workload: ``--num-requests`` chat-style prompts sampled at temperature 0.8 (the engine's seed),
up to ``--max-tokens`` tokens each.  A constrained request ends where
its grammar is complete, so output lengths differ between modes: throughput is output tokens
per second over the whole run.  Also reported: how many constrained outputs parse as JSON and
(schema mode) validate against the schema; an output cut by ``--max-tokens`` cannot.

    python benchmarks/bench_structured.py [--model DIR] [--load-format dummy] [--out result.json]

The model needs a tokenizer (grammars are compiled against its vocabulary); with
``--load-format dummy`` only its config.json and tokenizer files are read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench_common import child_result, git_commit, run_child

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "role", "address"],
}
MODES = ("none", "json_object", "json_schema")


def run_mode(cfg: dict) -> dict:
    from pagedattn import LLM, SamplingParams
    from pagedattn.engine.structured import StructuredOutputsParams

    llm = LLM(cfg["model"], load_format=cfg["load_format"], dtype=cfg["dtype"], seed=0)
    prompts = [f"Write the user record number {i} of our directory as JSON." for i in range(cfg["num_requests"])]
    constraint = {"none": None, "json_object": StructuredOutputsParams(json_object=True),
                  "json_schema": StructuredOutputsParams(json=SCHEMA)}[cfg["mode"]]
    llm.generate(prompts[:8], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up: unconstrained
    params = SamplingParams(temperature=0.8, max_tokens=cfg["max_tokens"], structured_outputs=constraint)
    runs = [_timed(llm, prompts, params) for _ in range(2)]  # the first compiles its grammar
    texts = [o.outputs[0] for o in runs[0][1]]
    tokens = sum(len(c.token_ids) for c in texts)
    return {"mode": cfg["mode"], "seconds": runs[0][0], "output_tokens": tokens, "tok_s": tokens / runs[0][0],
            "tok_s_second_run": sum(len(o.outputs[0].token_ids) for o in runs[1][1]) / runs[1][0],
            "mean_len": tokens / len(texts), "valid": sum(_valid(c.text, cfg["mode"]) for c in texts),
            "cut": sum(c.finish_reason == "length" for c in texts), "n": len(texts)}


def _timed(llm, prompts: list[str], params) -> tuple[float, list]:
    import torch

    if llm.engine.config.torch_device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def _valid(text: str, mode: str) -> bool:
    if mode == "none":
        return False
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if mode == "json_schema":
        import jsonschema

        try:
            jsonschema.validate(value, SCHEMA)
        except jsonschema.ValidationError:
            return False
    return isinstance(value, dict)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder with a tokenizer (default: the embedded model)")
    ap.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_result(run_mode(json.loads(args.child)))
        return
    base = {"model": args.model, "load_format": args.load_format, "dtype": args.dtype,
            "num_requests": args.num_requests, "max_tokens": args.max_tokens}
    results = [run_child(os.path.abspath(__file__), {**base, "mode": m}) for m in MODES]
    ref = results[0]["tok_s"]
    ref2 = results[0]["tok_s_second_run"]
    print(f"{'mode':12s} {'tok/s':>9s} {'vs none':>8s} {'2nd run':>9s} {'vs none':>8s} {'mean len':>9s} "
          f"{'valid':>7s} {'cut':>5s}")
    for r in results:
        valid = "-" if r["mode"] == "none" else f"{r['valid']}/{r['n']}"
        print(f"{r['mode']:12s} {r['tok_s']:9.0f} {r['tok_s'] / ref:7.2f}x {r['tok_s_second_run']:9.0f} "
              f"{r['tok_s_second_run'] / ref2:7.2f}x {r['mean_len']:9.1f} {valid:>7s} {r['cut']:5d}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"commit": git_commit(), "args": vars(args), "results": results}, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
