"""The CPU one-liner as a user meets it: ``pagedattn generate "The capital of France is"``.

Each run is a fresh process.  Two measurements per run:

* the whole command, from the shell to its exit (``python -m pagedattn generate ...``);
* the phases, in a fresh process that does what the command does, timing each: interpreter and
  imports, building the engine (model load, tokenizer, KV pool), the first token, the rest.

Prints a table (median over ``--runs``) and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "The capital of France is"

# Runs in a fresh interpreter; prints one JSON line of phase times.
PHASES = r"""
import json, sys, time
t0 = float(sys.argv[1])
t_start = time.time()
from pagedattn.entrypoints import cli  # what the command imports
from pagedattn import LLM, SamplingParams
t_import = time.time()
llm = LLM()
t_build = time.time()
first = None
n = 0
for out in llm.stream([sys.argv[2]], SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3]))):
    first = first or time.time()
    n = len(out.outputs[0].token_ids)
t_end = time.time()
print(json.dumps({"interpreter": t_start - t0, "imports": t_import - t_start, "engine build": t_build - t_import,
                  "first token": first - t_build, "rest": t_end - first, "tokens": n}))
"""


def run_command(max_tokens: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pagedattn", "generate", PROMPT, "--max-tokens", str(max_tokens)],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0


def run_phases(max_tokens: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PHASES, repr(time.time()), PROMPT, str(max_tokens)], check=True,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64, help="the command's default")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run_command(1)  # the first run after installing converts the GGUF once; not what is measured
    totals = [run_command(args.max_tokens) for _ in range(args.runs)]
    phases = [run_phases(args.max_tokens) for _ in range(args.runs)]
    keys = [k for k in phases[0] if k != "tokens"]
    med = {k: statistics.median(p[k] for p in phases) for k in keys}
    print(f"pagedattn generate {PROMPT!r}, {os.cpu_count()} CPUs, median of {args.runs} fresh processes")
    print("| phase | seconds |\n| --- | --- |")
    for k in keys:
        print(f"| {k} | {med[k]:.2f} |")
    print(f"| sum of phases ({phases[0]['tokens']} tokens) | {sum(med.values()):.2f} |")
    print(f"| **whole command, shell to exit** | **{statistics.median(totals):.2f}** |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command_s": totals, "phases": phases}, f, indent=2)


if __name__ == "__main__":
    main()
