"""Tensor parallelism on 2 GPUs (NCCL): token parity with one GPU in fp32, with CUDA graphs
(collectives captured inside) and without, and a killed worker on the GPU path."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
import torch

from pagedattn import LLM, SamplingParams
from pagedattn.distributed import WorkerError

from .engine_models import make_model_dir
from .test_engine import _prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

# NVLink multicast stays off (it can take shared GPUs out of service).
for _var, _val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_var, _val)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


@pytest.mark.parametrize("family", ["llama3_untied_gqa", "llama_mqa_tied", "qwen3_qknorm"])
def test_gpu_tp2_greedy_matches_tp1(tmp_path, family):
    path = make_model_dir(tmp_path, family)
    shared = _prompts(7, lens=(40,))[0]
    prompts = _prompts(1) + [shared + p for p in _prompts(8, lens=(3, 9, 1))]
    kw = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=64, max_num_seqs=16, swap_space_gib=0.01)
    expected = _greedy(LLM(str(path), **kw), prompts)
    for eager in (False, True):
        with LLM(str(path), tensor_parallel_size=2, enforce_eager=eager, **kw) as llm:
            assert (llm.engine.runner.graphs is None) == eager
            assert _greedy(llm, prompts) == expected, f"eager={eager}"
            assert llm.get_metrics()["prefix_cache_hit_tokens"] > 0


def test_gpu_tp2_pool_sized_from_memory_and_preemption(tmp_path):
    path = make_model_dir(tmp_path, "llama3_untied_gqa")
    prompts = _prompts(2, lens=(30, 41, 17, 52))
    expected = _greedy(LLM(str(path), device="cuda", dtype="float32", num_kv_blocks=256, swap_space_gib=0.01), prompts)
    with LLM(str(path), device="cuda", dtype="float32", tensor_parallel_size=2, gpu_memory_utilization=0.3) as llm:
        assert llm.get_metrics()["kv_blocks_total"] > 64
        assert _greedy(llm, prompts) == expected
    with LLM(str(path), device="cuda", dtype="float32", tensor_parallel_size=2, block_size=4, num_kv_blocks=24,
             swap_space_gib=0.01, max_num_batched_tokens=16) as llm:
        assert _greedy(llm, prompts) == expected
        assert llm.get_metrics()["num_preemptions"] > 0


def test_gpu_killed_worker_is_a_clear_error(tmp_path):
    path = make_model_dir(tmp_path, "llama_mqa_tied")
    llm = LLM(str(path), device="cuda", tensor_parallel_size=2, num_kv_blocks=64, swap_space_gib=0.01)
    _greedy(llm, _prompts(3, lens=(5, 9)))
    pids = llm.engine.executor.worker_pids
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(WorkerError, match="rank 1"):
        _greedy(llm, _prompts(3, lens=(5, 9)))
    assert multiprocessing.active_children() == []
    llm.shutdown()


# ---------------------------------------------------------------------- one-shot P2P all-reduce
def _p2p_all_reduce_worker(rank: int, world: int, rdzv: str) -> None:
    import torch.distributed as dist

    from pagedattn.distributed.all_reduce import P2PAllReduce

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{rdzv}", rank=rank, world_size=world, device_id=device)
    try:
        gen = torch.Generator(device=device).manual_seed(100 + rank)
        for dtype in (torch.bfloat16, torch.float32):
            ar = P2PAllReduce.create(device, dtype, max_bytes=1 << 20)
            assert ar is not None, "P2P all-reduce unavailable on GPUs that NCCL connects"
            limit = (1 << 20) // dtype.itemsize
            shapes = [(8,), (3, 1024), (64, 4096 // dtype.itemsize), (limit,), (limit + 8,)]
            xs = [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes]
            want = [x.clone() for x in xs]
            for w in want:
                dist.all_reduce(w)
            # eager; the last shape is past max_bytes and goes to NCCL
            for x, w in zip(xs, want, strict=True):
                got = ar(x.clone())
                assert got.shape == x.shape and torch.equal(got, w), (dtype, x.shape)
            # many calls back to back inside one CUDA graph, replayed on fresh inputs
            static = [x.clone() for x in xs[:4]] * 3
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = [ar(x) for x in static]
            for _ in range(3):
                fresh = [torch.randn(x.shape, generator=gen, device=device).to(dtype) for x in xs[:4]]
                for x, f in zip(static[:4], fresh, strict=True):
                    x.copy_(f)
                graph.replay()
                for f in fresh:
                    dist.all_reduce(f)
                for out, w in zip(outs, fresh * 3, strict=True):
                    assert torch.equal(out, w), (dtype, out.shape)
            del graph
    finally:
        dist.destroy_process_group()


def _nccl_then_norm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    import torch.distributed as dist

    from pagedattn.models.fused_ops import fused_add_rms_norm

    summed = partial.clone()
    dist.all_reduce(summed)
    return fused_add_rms_norm(summed, residual, weight, 1e-6)


def _fused_chain_in_graph(ar: object, weight: torch.Tensor, gen: torch.Generator, same: torch.Generator,
                          rows: int = 64, n_calls: int = 12) -> None:
    """A decoder's worth of fused reductions captured in one graph (slots alternating, the
    residual carried from one to the next), replayed on fresh inputs against NCCL + norm."""
    device, dtype, cols = weight.device, weight.dtype, weight.numel()
    bufs = [ar.partials_buffer(rows, cols, dtype) for _ in range(n_calls)]  # type: ignore[attr-defined]
    parts = [torch.empty(rows, cols, device=device, dtype=dtype) for _ in range(n_calls)]
    res0 = torch.empty(rows, cols, device=device, dtype=dtype)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        residual, outs = res0, []
        for buf, part in zip(bufs, parts, strict=True):
            buf.copy_(part)  # stands in for the row-parallel GEMM writing its output there
            normed, residual = ar.add_rms_norm(buf, residual, weight, 1e-6)  # type: ignore[attr-defined]
            outs += [normed, residual]
    for _ in range(3):
        for t in parts:
            t.copy_(torch.randn(t.shape, generator=gen, device=device))
        res0.copy_(torch.randn(res0.shape, generator=same, device=device))
        graph.replay()
        residual, want = res0, []
        for part in parts:
            normed, residual = _nccl_then_norm(part, residual, weight)
            want += [normed, residual]
        assert all(torch.equal(o, w) for o, w in zip(outs, want, strict=True)), dtype
    del graph


def _p2p_fused_worker(rank: int, world: int, rdzv: str) -> None:
    import torch.distributed as dist

    from pagedattn.distributed.all_reduce import P2PAllReduce

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{rdzv}", rank=rank, world_size=world, device_id=device)
    try:
        gen = torch.Generator(device=device).manual_seed(200 + rank)  # partial sums differ per rank
        same = torch.Generator(device=device).manual_seed(7)  # residual stream and weights are replicated
        for dtype in (torch.bfloat16, torch.float32):
            # 4 MiB: up to 512 / 256 rows, more than an SM each (the in-kernel barrier caps the grid)
            ar = P2PAllReduce.create(device, dtype, max_bytes=4 << 20)
            assert ar is not None
            cols = 4096
            limit = (4 << 20) // (dtype.itemsize * cols)
            weight = (torch.rand(cols, generator=same, device=device) + 0.5).to(dtype)
            for rows in (1, 37, limit, limit + 1):
                partial = torch.randn(rows, cols, generator=gen, device=device).to(dtype)
                residual = torch.randn(rows, cols, generator=same, device=device).to(dtype)
                want = _nccl_then_norm(partial, residual, weight)
                buf = ar.partials_buffer(rows, cols, dtype)
                assert (buf is None) == (rows > limit), (rows, limit)
                src = partial.clone() if buf is None else buf.copy_(partial)
                got = ar.add_rms_norm(src, residual, weight, 1e-6)
                assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), (dtype, rows)
            for rows in (64, 200):
                _fused_chain_in_graph(ar, weight, gen, same, rows=rows)
    finally:
        dist.destroy_process_group()


def test_p2p_fused_add_rms_norm_equals_nccl_then_norm(tmp_path):
    """Two ranks: the sum fused with the residual add and RMSNorm equals NCCL's all-reduce followed
    by the add + RMSNorm kernel bit for bit, eagerly and as a chain of reductions alternating
    between the buffer slots in one CUDA graph replayed on fresh inputs, with the kernel's own
    barrier (grids capped at the SM count, so some programs take several rows); past the buffer
    it falls back."""
    torch.multiprocessing.spawn(_p2p_fused_worker, args=(2, str(tmp_path / "rdzv")), nprocs=2, join=True)


def test_p2p_all_reduce_equals_nccl_eager_and_in_graphs(tmp_path):
    """Two ranks: the one-shot sum is bitwise NCCL's (a + b in the tensor's dtype), at sizes up
    to its limit and past it (NCCL fallback), eagerly and as many calls captured in one graph."""
    torch.multiprocessing.spawn(_p2p_all_reduce_worker, args=(2, str(tmp_path / "rdzv")), nprocs=2, join=True)


_ENGINE_SCRIPT = """
import json, sys
from pagedattn import LLM, SamplingParams
from pagedattn.distributed.all_reduce import P2PAllReduce
from pagedattn.models.layers import RMSNorm, RowParallelLinear

def main():
    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    with LLM(path, device="cuda", dtype="bfloat16", tensor_parallel_size=2, num_kv_blocks=64,
             swap_space_gib=0.01) as llm:
        rows = [m for m in llm.engine.executor.worker.model.modules() if isinstance(m, (RowParallelLinear, RMSNorm))]
        p2p = [isinstance(m.all_reduce, P2PAllReduce) for m in rows]
        sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    print(json.dumps({"p2p": p2p, "tokens": tokens}))

if __name__ == "__main__":
    main()
"""


def test_gpu_engine_uses_p2p_all_reduce_unless_disabled(tmp_path):
    """Each engine in a fresh process (a process can pair P2P memory with one set of workers)."""
    import json
    import subprocess
    import sys

    from pagedattn.distributed.all_reduce import DISABLE_ENV

    path = make_model_dir(tmp_path, "llama3_untied_gqa")
    script = tmp_path / "engine.py"
    script.write_text(_ENGINE_SCRIPT)
    prompts = json.dumps(_prompts(4, lens=(12, 30)))
    runs = {}
    for disabled in (False, True):
        env = {**os.environ, DISABLE_ENV: "1" if disabled else "0"}
        proc = subprocess.run([sys.executable, str(script), str(path), prompts], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[disabled] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs[False]["p2p"] and all(runs[False]["p2p"])
    assert runs[True]["p2p"] and not any(runs[True]["p2p"])
    assert runs[False]["tokens"] == runs[True]["tokens"]  # two ranks: the same a + b either way
