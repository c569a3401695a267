"""Find host-device synchronisations in overlapped decode steps (torch profiler)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from bench_throughput import QWEN3_0_6B, make_model, workload
from torch.profiler import ProfilerActivity, profile

from pagedattn import LLM, SamplingParams


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="qwen3-sync-"))
    del_model = make_model(folder, torch.bfloat16)
    del del_model
    torch.cuda.empty_cache()
    llm = LLM(str(folder), device="cuda", dtype="bfloat16", max_model_len=2064, gpu_memory_utilization=0.85)
    eng = llm.engine
    prompts, _ = workload(256, 100, 1024, QWEN3_0_6B["vocab_size"])
    sp = SamplingParams(temperature=0.6, max_tokens=200, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, sp, stream=False)
    for _ in range(40):
        eng.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        eng.step()
    torch.cuda.synchronize()
    print(f"20 steps: {1e3 * (time.perf_counter() - t) / 20:.2f} ms/step; inflight={eng._inflight is not None}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            eng.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
