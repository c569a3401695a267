"""Tensor parallelism on the CPU: 2 ranks (gloo), the engine's process and one spawned worker.

Greedy tokens with ``tensor_parallel_size=2`` equal those of one rank in fp32, for every model
family, with the engine's memory features at work (prefix caching, preemption by swap and by
recompute, copy-on-write, sliding-window release, overlapped decode).  A worker that fails at
start-up, fails in a step or is killed stops the engine with a clear error on rank 0 and
leaves no process behind.  One engine per family serves all of its checks.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedattn import LLM, SamplingParams, envs
from pagedattn.distributed import TorchrunEnv, WorkerError
from pagedattn.distributed import executor as executor_mod
from pagedattn.distributed import group as group_mod
from pagedattn.distributed.group import init_tp_group
from pagedattn.distributed.worker_loop import spawn_main
from pagedattn.models.loader import load_model

from .engine_models import FAMILIES, make_model_dir

MAX_NEW = 16


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    return {f: make_model_dir(root, f, seed=3) for f in FAMILIES}


def _prompts(seed: int, lens: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in lens]


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]


def _llm(path: Path, **kw: object) -> LLM:
    kw = {"device": "cpu", "block_size": 4, "num_kv_blocks": 256, "swap_space_gib": 0.01, **kw}
    return LLM(str(path), **kw)  # type: ignore[arg-type]


def _both(path: Path, prompts: list[list[int]], params: SamplingParams, **kw: object
          ) -> tuple[list[list[list[int]]], list[list[list[int]]], dict[str, float | int]]:
    """Tokens with one rank, tokens with two (same engine settings), the 2-rank metrics."""
    ref = _tokens(_llm(path, **kw), prompts, params)
    with _llm(path, tensor_parallel_size=2, **kw) as tp:
        got = _tokens(tp, prompts, params)
        metrics = tp.get_metrics()
        tp.engine.check_integrity()
    return ref, got, metrics


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def _shared_prefix_prompts() -> list[list[int]]:
    shared = _prompts(7, (21,))[0]
    return [shared + p for p in _prompts(8, (3, 9, 1, 14))] + _prompts(9, (11, 30))


def test_gqa_prefix_cache_swap_preemption_and_overlapped_decode(model_dirs: dict[str, Path]) -> None:
    """2 KV heads, one per rank; a pool small enough to swap sequences out and back; the
    shared prompt prefix hits the cache; decode steps overlap (their input ids go from rank 0's
    device to the worker with a broadcast)."""
    ref, got, m = _both(model_dirs["llama3_untied_gqa"], _shared_prefix_prompts(), GREEDY,
                        num_kv_blocks=16, preemption_mode="swap", async_scheduling=True)
    assert got == ref
    assert m["num_swap_preemptions"] > 0 and m["num_swapped_in_blocks"] > 0
    assert m["prefix_cache_hit_tokens"] >= 3 * 20
    assert m["kv_blocks_used"] == 0


def test_window_recompute_preemption_and_chunked_prefill(model_dirs: dict[str, Path]) -> None:
    ref, got, m = _both(model_dirs["mistral_window"], _shared_prefix_prompts(), GREEDY, num_kv_blocks=20,
                        preemption_mode="recompute", enable_prefix_caching=False, max_num_batched_tokens=13)
    assert got == ref
    assert m["num_recompute_preemptions"] > 0 and m["num_window_released_blocks"] > 0


def test_mqa_replicated_kv_head_and_copy_on_write(model_dirs: dict[str, Path]) -> None:
    """One KV head for two ranks: each holds a replica.  Seeded samples forked from one prompt
    write into their shared partial block (copy-on-write runs on both ranks)."""
    params = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=MAX_NEW, ignore_eos=True)
    ref, got, m = _both(model_dirs["llama_mqa_tied"], _prompts(3, (10, 23)), params)
    assert got == ref
    assert m["num_cow_copies"] >= 2


def test_overlapped_decode_takes_greedy_ids_locally_and_broadcasts_sampled_ones(model_dirs: dict[str, Path]) -> None:
    """Overlapped decode steps whose previous step was greedy take their input ids from each
    rank's own copy of that step's tokens (also when finished rows drop out); after a step with
    sampled rows rank 0 broadcasts them.  Either way the tokens equal one rank's."""
    path = model_dirs["llama3_untied_gqa"]
    prompts = _prompts(12, (7, 19, 4, 30, 11))
    greedy = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (9, 16, 5, 12, 16)]
    mixed = [*greedy[:4], SamplingParams(temperature=0.9, seed=5, max_tokens=7, ignore_eos=True)]
    kw = {"async_scheduling": True}

    def run(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    one = _llm(path, **kw)
    ref = [run(one, greedy), run(one, mixed)]
    with _llm(path, tensor_parallel_size=2, **kw) as tp:
        group = tp.engine.executor.group
        sent: list[int] = []
        send = group.broadcast_tensor
        group.broadcast_tensor = lambda t: (sent.append(t.numel()), send(t))[1]  # type: ignore[method-assign]
        assert run(tp, greedy) == ref[0]
        assert sent == []  # every overlapped step followed a greedy one
        assert run(tp, mixed) == ref[1]
        assert sent and max(sent) == 5  # steps after the sampled row's: the ids came from rank 0
        tp.engine.check_integrity()


@pytest.mark.parametrize("family", ["qwen2_bias_tied", "qwen3_qknorm",
                                    pytest.param("gemma2_softcap", marks=pytest.mark.slow),
                                    pytest.param("gemma3_local_rope", marks=pytest.mark.slow)])
def test_bias_and_qk_norm_families(model_dirs: dict[str, Path], family: str) -> None:
    ref, got, _ = _both(model_dirs[family], _prompts(1, (5, 16, 17, 40)), GREEDY, async_scheduling=True)
    assert got == ref


@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_moe_families_shard_each_experts_ffn(model_dirs: dict[str, Path], family: str) -> None:
    """Each rank holds half of every expert's intermediate features and routes every token
    itself (the router is replicated); the norm after the layer sums the experts' partial
    outputs.  With a pool small enough to swap and the shared prefix cached."""
    ref, got, m = _both(model_dirs[family], _shared_prefix_prompts(), GREEDY, num_kv_blocks=16,
                        preemption_mode="swap")
    assert got == ref
    assert m["num_swap_preemptions"] > 0 and m["prefix_cache_hit_tokens"] > 0


# ---------------------------------------------------------------------- bad input and failures
def test_tp_size_that_does_not_divide_the_heads_is_a_value_error_before_spawning(
        model_dirs: dict[str, Path]) -> None:
    path = model_dirs["qwen3_qknorm"]  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*num_heads \(4\) is not divisible"):
        _llm(path, tensor_parallel_size=3)
    with pytest.raises(ValueError, match=r"^tensor_parallel_size: must be in \[1, inf\]"):
        _llm(path, tensor_parallel_size=0)
    assert multiprocessing.active_children() == []


def _assert_gone(pids: list[int]) -> None:
    assert pids
    assert multiprocessing.active_children() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_killed_worker_stops_the_engine_with_a_clear_error(model_dirs: dict[str, Path]) -> None:
    llm = _llm(model_dirs["llama_mqa_tied"], tensor_parallel_size=2)
    prompts = _prompts(4, (6, 9))
    assert len(_tokens(llm, prompts, GREEDY)) == 2
    pids = llm.engine.executor.worker_pids
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"rank 1 exited unexpectedly \(killed by SIGKILL\)"):
        _tokens(llm, prompts, GREEDY)
    _assert_gone(pids)
    with pytest.raises(WorkerError, match="stopped after an error: tensor-parallel rank 1 exited"):
        _tokens(llm, prompts, GREEDY)
    llm.shutdown()  # harmless after the failure


def test_failed_engine_is_freed_when_dropped(model_dirs: dict[str, Path]) -> None:
    """A failed engine holds nothing in a reference cycle: dropping it frees its KV pool at once
    (on a GPU, most of the memory) rather than whenever the garbage collector runs."""
    gc.collect()
    gc.disable()
    try:
        llm = _llm(model_dirs["llama_mqa_tied"], tensor_parallel_size=2)
        prompts = _prompts(4, (6, 9))
        _tokens(llm, prompts, GREEDY)
        os.kill(llm.engine.executor.worker_pids[0], signal.SIGKILL)
        for _ in range(2):  # the failure, then the refusal of a stopped engine
            with pytest.raises(WorkerError):
                _tokens(llm, prompts, GREEDY)
        pool = weakref.ref(llm.engine.kv_pool)
        del llm
        assert pool() is None
    finally:
        gc.enable()


# Worker entry points with a fault planted inside the worker process (the spawned process
# imports this module to find them; the engine's own rank is untouched).
def _spawn_main_failing_load(*args: object) -> None:
    import pagedattn.runtime.worker as worker

    def broken_load(*a: object, **k: object) -> None:
        raise OSError("planted: cannot read the weights on this rank")

    worker.load_model = broken_load  # type: ignore[assignment]
    spawn_main(*args)  # type: ignore[arg-type]


def _spawn_main_failing_third_step(*args: object) -> None:
    from pagedattn.runtime.model_runner import ModelRunner

    real = ModelRunner.execute
    calls = iter(range(1_000_000))

    def flaky(self: ModelRunner, *a: object, **k: object) -> object:
        if next(calls) == 2:
            raise RuntimeError("planted: the third step fails on this rank")
        return real(self, *a, **k)  # type: ignore[arg-type]

    ModelRunner.execute = flaky  # type: ignore[method-assign]
    spawn_main(*args)  # type: ignore[arg-type]


@pytest.fixture
def planted_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    yield monkeypatch
    assert multiprocessing.active_children() == []


def test_worker_failing_at_start_up_is_reported_with_its_traceback(model_dirs: dict[str, Path],
                                                                   planted_worker: pytest.MonkeyPatch) -> None:
    planted_worker.setattr(executor_mod, "spawn_main", _spawn_main_failing_load)
    with pytest.raises(WorkerError, match=r"(?s)rank 1 failed.*OSError: planted: cannot read the weights"):
        _llm(model_dirs["llama_mqa_tied"], tensor_parallel_size=2)


def test_worker_failing_in_a_step_is_reported_with_its_traceback(model_dirs: dict[str, Path],
                                                                 planted_worker: pytest.MonkeyPatch) -> None:
    planted_worker.setattr(executor_mod, "spawn_main", _spawn_main_failing_third_step)
    llm = _llm(model_dirs["llama_mqa_tied"], tensor_parallel_size=2)
    pids = llm.engine.executor.worker_pids
    with pytest.raises(WorkerError, match=r"(?s)rank 1 failed.*RuntimeError: planted: the third step fails"):
        _tokens(llm, _prompts(5, (6, 9)), GREEDY)
    _assert_gone(pids)
    assert llm.engine.requests == {}  # the failed generate aborted its requests


# ---------------------------------------------------------------------- torchrun
TORCHRUN_SCRIPT = """
import json, sys
from pagedattn import LLM, SamplingParams

if __name__ == "__main__":
    # Every rank runs this; on ranks 1.. the constructor serves rank 0 and exits the process.
    with LLM(sys.argv[1], device="cpu", block_size=4, num_kv_blocks=64, swap_space_gib=0.01,
             tensor_parallel_size=2) as llm:
        outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)
        print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def test_torchrun_launch_rank0_runs_the_engine_the_other_rank_serves_it(model_dirs: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    path = model_dirs["qwen3_qknorm"]
    prompts = _prompts(6, (7, 12))
    ref = [t[0] for t in _tokens(_llm(path, num_kv_blocks=64), prompts,
                                 SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))]
    script = tmp_path / "tp_script.py"
    script.write_text(TORCHRUN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(path), json.dumps(prompts)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS ")]
    assert len(lines) == 1  # printed by rank 0 only
    assert json.loads(lines[0].removeprefix("TOKENS ")) == ref


def _payload_of_pickled_size(size: int, seed: int) -> bytes:
    """Random bytes whose pickle is exactly ``size`` bytes long."""
    n = size
    while len(pickle.dumps(bytes(n), protocol=pickle.HIGHEST_PROTOCOL)) > size:
        n -= 1
    assert len(pickle.dumps(bytes(n), protocol=pickle.HIGHEST_PROTOCOL)) == size
    return random.Random(seed).randbytes(n)


def _control_messages(seed: int) -> list[object]:
    first = group_mod._FIRST_MESSAGE_BYTES
    msgs: list[object] = [_payload_of_pickled_size(s, seed + i) for i, s in enumerate(
        (first - 8, first - 7, 5 * first, 100, 5 * first + 3, 9 * first))]
    msgs.insert(3, {"nested": [list(range(50)), "text"], "seed": seed})
    return msgs


def _exchange_control_messages(rank: int, port: int, seed: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    group = init_tp_group(rank, 2, rank, "cpu", 60.0)
    try:
        for want in _control_messages(seed):
            got = group.broadcast_object(want if rank == 0 else None)
            assert got == want, f"rank {rank}: a {len(pickle.dumps(want))}-byte message arrived changed"
    finally:
        group.destroy()


def test_control_messages_of_any_size_arrive_intact() -> None:
    """Step messages travel in a buffer of a size both ranks know; pickles that fill it exactly,
    overflow it by one byte or are several times larger (growing it) arrive unchanged."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_exchange_control_messages, args=(port, random.randrange(1 << 30)), nprocs=2)


def test_torchrun_environment_is_read_and_checked() -> None:
    assert TorchrunEnv.detect({}) is None
    assert TorchrunEnv.detect({"RANK": "1", "WORLD_SIZE": "4"}) == TorchrunEnv(1, 4, 1)
    assert TorchrunEnv.detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == TorchrunEnv(5, 8, 1)
    with pytest.raises(ValueError, match="must be integers"):
        TorchrunEnv.detect({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        TorchrunEnv.detect({"RANK": "2", "WORLD_SIZE": "2"})


# ---------------------------------------------------------------------- dummy weights
def test_dummy_weights_shard_into_the_same_model_for_every_tp_size(model_dirs: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """``load_format="dummy"`` reads only config.json; rank r's shards are slices of the tensors
    one rank gets, so TP sizes are comparable (and seeds reproducible)."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(model_dirs["llama3_untied_gqa"] / "config.json", folder)
    full, _ = load_model(folder, torch.float32, "cpu", load_format="dummy", seed=5)
    shards = [load_model(folder, torch.float32, "cpu", tp_rank=r, tp_size=2, load_format="dummy", seed=5)[0]
              for r in range(2)]
    fp = dict(full.named_parameters())
    sp = [dict(m.named_parameters()) for m in shards]
    torch.testing.assert_close(torch.cat([p["lm_head.weight"] for p in sp]), fp["lm_head.weight"], rtol=0, atol=0)
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(torch.cat([p[o_proj] for p in sp], dim=1), fp[o_proj], rtol=0, atol=0)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"  # [q | k | v] per rank
    q_full, k_full, _ = fp[qkv].split([64, 32, 32])
    parts = [p[qkv].split([32, 16, 16]) for p in sp]
    torch.testing.assert_close(torch.cat([q for q, _, _ in parts]), q_full, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([k for _, k, _ in parts]), k_full, rtol=0, atol=0)
    assert torch.equal(fp["model.norm.weight"], torch.ones(64))
    assert 0.015 < fp[o_proj].std().item() < 0.025
    again, _ = load_model(folder, torch.float32, "cpu", load_format="dummy", seed=5)
    other, _ = load_model(folder, torch.float32, "cpu", load_format="dummy", seed=6)
    assert torch.equal(dict(again.named_parameters())[o_proj], fp[o_proj])
    assert not torch.equal(dict(other.named_parameters())[o_proj], fp[o_proj])
    with pytest.raises(ValueError, match="load_format"):
        load_model(folder, torch.float32, "cpu", load_format="npz")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        load_model(folder, torch.float32, "cpu")


def test_cli_passes_the_tensor_parallel_size_and_reports_a_bad_one(model_dirs: dict[str, Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pagedattn.entrypoints.cli import main

    rc = main(["generate", "--model", str(model_dirs["qwen3_qknorm"]), "--device", "cpu", "-tp", "3"])
    assert rc == 2
    assert "tensor_parallel_size=3" in capsys.readouterr().err
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_benchmark_smoke_runs_both_sizes_and_agrees(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``benchmarks/bench_tensor_parallel.py --smoke``: a tiny Qwen3 on the CPU, TP=1 and TP=2
    each in its own process."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_tensor_parallel

    out = tmp_path / "tp.json"
    res = bench_tensor_parallel.run(["--smoke", "--num-requests", "4,2", "--repeat", "2", "--out", str(out)])
    assert res["failures"] == {} and json.loads(out.read_text())["runs"].keys() == {"4", "2"}
    for n in (4, 2):
        run = res["runs"][str(n)]
        assert run["results"].keys() == {"1", "2"} and run["decode_speedup"]["1"] == 1.0
        assert run["greedy_agreement"]["2"]["identical_requests"] == n
        assert run["first_token_logprobs"]["2"]["same_top1"] == n
        assert run["near_tie_agreement"]["2"]["identical"] == n
        for tp in ("1", "2"):
            r = run["results"][tp]
            assert len(r["full_seconds_per_repeat"]) == 2 and r["repeats_identical"]
            assert r["full_seconds"] == statistics.median(r["full_seconds_per_repeat"])
            # The pure decode run starts its clock after every request's first token (8 each).
            assert 0 < r["decode_phase_tokens"] <= n * 7 and r["decode_phase_steps"] >= 1
            assert r["decode_phase_tok_per_s"] > 0 and r["full_gc_count"] >= 0
            # Its full-batch window: the steps up to the first finish, all n sequences decoding.
            assert r["full_batch_size"] == n and 1 <= r["full_batch_steps"] <= r["decode_phase_steps"]
            assert r["full_batch_tok_per_s"] > 0 and isinstance(r["triton_compiles_in_timed_runs"], list)
        assert run["decode_phase_speedup"]["1"] == 1.0 and run["full_batch_speedup"]["1"] == 1.0


def test_benchmark_near_tie_check_tells_near_ties_from_mismatches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_tensor_parallel import near_tie_agreement

    def run(tokens: list[int], tops: list[dict[int, float]]) -> dict:
        return {"tokens": tokens, "top5": [{str(k): v for k, v in t.items()} for t in tops]}

    same = [{5: -0.1, 6: -2.0}, {7: -0.2, 8: -1.9}]
    ref = [run([5, 7], same), run([5, 7], same), run([5, 7], same)]
    got = [
        run([5, 7], same),  # identical
        run([5, 8], [same[0], {8: -0.21, 7: -0.22}]),  # second token: each in the other's top 5
        run([6, 7], [{6: -0.3, 9: -0.4}, same[1]]),  # first token: 5 is not in this run's top 5
    ]
    res = near_tie_agreement(ref, got)
    assert (res["identical"], res["near_ties"], res["mismatches"]) == (1, 1, [{"request": 2, "token": 0}])
    assert res["near_tie_gap_max"] == pytest.approx(-0.2 - -1.9)


def test_p2p_sums_cover_the_decode_graphs_with_two_ranks_only() -> None:
    from pagedattn.distributed.all_reduce import DEFAULT_MAX_BYTES, p2p_max_bytes

    eight_mib = 1024 * 4096 * 2  # 1024 decode rows of a 4096-wide bf16 model
    assert p2p_max_bytes(2, eight_mib) == eight_mib
    assert p2p_max_bytes(2, 0) == p2p_max_bytes(2, 1000) == DEFAULT_MAX_BYTES  # never below the default
    assert p2p_max_bytes(2, DEFAULT_MAX_BYTES + 3) % 16 == 0  # the one-shot kernel's 16-byte vectors
    assert p2p_max_bytes(4, eight_mib) == p2p_max_bytes(8, eight_mib) == DEFAULT_MAX_BYTES


def test_p2p_all_reduce_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedattn.distributed.all_reduce import DISABLE_ENV, _unsupported_reason

    gpu, one_host = torch.device("cuda", 0), [("node0", 0, 0, True, 132), ("node0", 1, 0, True, 132)]
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    envs.reload()
    assert "not on CUDA" in str(_unsupported_reason(torch.device("cpu"), torch.float32, one_host))
    assert "float16" in str(_unsupported_reason(gpu, torch.float16, one_host))
    assert "1 ranks" in str(_unsupported_reason(gpu, torch.bfloat16, one_host[:1]))
    assert "9 ranks" in str(_unsupported_reason(gpu, torch.bfloat16, [("node0", i, 0, True, 132) for i in range(9)]))
    two_hosts = [("node0", 0, 0, True, 132), ("node1", 0, 0, True, 132)]
    assert "several hosts" in str(_unsupported_reason(gpu, torch.bfloat16, two_hosts))
    second = [("n", 0, 1, True, 132), ("n", 1, 0, True, 132)]
    assert "earlier tensor-parallel engine" in str(_unsupported_reason(gpu, torch.bfloat16, second))
    mixed = [("n", 0, 0, True, 132), ("n", 1, 0, False, 132)]
    assert "PAGEDATTN_DISABLE_FUSED" in str(_unsupported_reason(gpu, torch.bfloat16, mixed))
    monkeypatch.setenv(DISABLE_ENV, "1")
    envs.reload()
    assert DISABLE_ENV in str(_unsupported_reason(gpu, torch.bfloat16, one_host))


def test_every_cross_rank_sum_goes_through_the_installed_all_reduce(model_dirs: dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``set_all_reduce`` reaches every layer that sums across ranks, and a forward pass of a
    shard sums exactly the embedding and, through the norm after each, the two row-parallel
    projections of every layer; their partial sums land in the buffers the all-reduce hands out,
    one buffer per reduction."""
    from pagedattn.attention.selector import get_attention_backend
    from pagedattn.models.config import ModelArchConfig
    from pagedattn.models.layers import AllReduce, RMSNorm, RowParallelLinear, VocabParallelEmbedding, vocab
    from pagedattn.models.registry import build_model
    from pagedattn.models.testing import PagedHarness

    cfg = ModelArchConfig.from_hf_config(json.loads((model_dirs["llama3_untied_gqa"] / "config.json").read_text()))
    model = build_model(cfg, torch.float32, "cpu", tp_rank=0, tp_size=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))

    class Recording(AllReduce):
        """A world whose other ranks contribute zeros; it hands out its own partial-sum buffers."""

        def __init__(self) -> None:
            self.sums: list[tuple[int, ...]] = []
            self.buffers: list[torch.Tensor] = []
            self.reduced = 0

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            self.sums.append(tuple(x.shape))
            return x

        def partials_buffer(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor | None:
            assert self.reduced == len(self.buffers), "a buffer asked for before the last one was reduced"
            self.buffers.append(torch.full((rows, cols), float("nan"), dtype=dtype))
            return self.buffers[-1]

        def add_rms_norm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
            assert partial.data_ptr() == self.buffers[-1].data_ptr(), "partial sums not in the buffer handed out"
            self.reduced += 1
            return super().add_rms_norm(partial, residual, weight, eps)

    record = Recording()
    monkeypatch.setattr(vocab, "all_gather_last_dim", lambda x, n: torch.cat([x] * n, dim=-1))  # the LM head's
    n = model.set_all_reduce(record)
    assert n == sum(isinstance(m, (RowParallelLinear, VocabParallelEmbedding, RMSNorm)) for m in model.modules())
    h = PagedHarness(model, num_blocks=8, block_size=4, device=torch.device("cpu"),
                     backend=get_attention_backend("cpu", "torch"))
    logits = torch.cat(h.step([("a", [3, 1, 4, 1, 5]), ("b", [9, 2])]))
    assert torch.isfinite(logits).all()
    layers = cfg.num_layers
    assert record.sums == [(7, cfg.hidden_size)] * (2 * layers + 1)  # the embedding, then two per layer
    assert record.reduced == len(record.buffers) == 2 * layers
    row = next(m for m in model.modules() if isinstance(m, RowParallelLinear))
    x = torch.randn(3, row.input_size_per_partition, generator=g)
    torch.testing.assert_close(row(x), torch.nn.functional.linear(x, row.weight), rtol=0, atol=0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["take", "reduce", "plain"]), max_size=80))
def test_p2p_slot_turns_never_hand_out_a_slot_a_peer_may_still_read(ops: list[str]) -> None:
    """Partial sums are written after the previous reduction (one buffer at a time): two fused
    reductions with no other all-reduce between them use different slots, and after one (a
    full barrier) with nothing pending the turns restart at slot 0."""
    from pagedattn.distributed.all_reduce import SlotTurns

    turns = SlotTurns()
    pending: int | None = None  # the slot handed out and not reduced yet
    last: int | None = None  # the slot of the latest reduction since the latest barrier
    for op in ops:
        if op == "take" and pending is None:
            pending = turns.take()
        elif op == "reduce" and pending is not None:
            turns.reduced()
            assert pending != last
            pending, last = None, pending
        elif op == "plain":
            turns.barrier()
            last = None
            assert pending is not None or turns.next == 0


def test_p2p_all_reduce_fills_the_same_slots_in_every_forward_pass(model_dirs: dict[str, Path],
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """Rank 0 of a shard through :class:`P2PAllReduce`, seen in a world of one (CPU buffers stand
    in for symmetric memory, the fused kernel for the reference add + norm): every forward pass
    writes o_proj's partial sums into slot 0 and down_proj's into slot 1, layer after layer,
    whatever ran before (the CUDA graphs captured those slots), and the logits are those of the
    process group's all-reduce."""
    import torch.distributed as dist

    from pagedattn.attention.selector import get_attention_backend
    from pagedattn.distributed.all_reduce import P2PAllReduce
    from pagedattn.models.config import ModelArchConfig
    from pagedattn.models.fused_ops import fused_add_rms_norm_ref
    from pagedattn.models.layers import vocab
    from pagedattn.models.registry import build_model
    from pagedattn.models.testing import PagedHarness

    slots: list[int] = []

    class Recorded(P2PAllReduce):
        def supports(self, x: torch.Tensor) -> bool:
            return False  # plain sums through the process group

        def _reduce(self, slot: int, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
            slots.append(slot)
            start = (1 + slot) * self.slot_numel
            partial = self.buffer[start : start + residual.numel()].view_as(residual)
            return fused_add_rms_norm_ref(partial, residual, weight, eps)

    cfg = ModelArchConfig.from_hf_config(json.loads((model_dirs["llama3_untied_gqa"] / "config.json").read_text()))
    model = build_model(cfg, torch.float32, "cpu", tp_rank=0, tp_size=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    monkeypatch.setattr(vocab, "all_gather_last_dim", lambda x, n: torch.cat([x] * n, dim=-1))
    buffer, flags = torch.zeros(3 * 64 * cfg.hidden_size), torch.zeros(1, dtype=torch.int64)
    handle = SimpleNamespace(rank=0, buffer_ptrs=[buffer.data_ptr(), 0])
    p2p = Recorded(buffer, handle, "world", flags, SimpleNamespace(buffer_ptrs=[flags.data_ptr(), 0]), 1)
    batches = ([("a", [3, 1, 4, 1, 5]), ("b", [9, 2])], [("a", [6]), ("b", [5])], [("c", [2, 7])])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        def run() -> list[torch.Tensor]:
            h = PagedHarness(model, num_blocks=8, block_size=4, backend=get_attention_backend("cpu", "torch"))
            return [torch.cat(h.step(b)) for b in batches]

        want = run()
        model.set_all_reduce(p2p)
        one = torch.ones(1, cfg.hidden_size)
        p2p.add_rms_norm(p2p.partials_buffer(1, cfg.hidden_size, torch.float32), one, one[0], 1e-6)  # a turn before
        got = run()
    finally:
        dist.destroy_process_group()
    assert slots == [0] + [0, 1] * cfg.num_layers * len(batches)
    for a, b in zip(got, want, strict=True):  # the GEMM into a buffer (torch.mm) rounds like a CPU linear, nearly
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- greedy tokens from vocabulary slices
def _greedy_tokens_rank(rank: int, world: int, rdzv: str) -> None:
    import torch.distributed as dist

    from pagedattn.models.layers import ParallelLMHead

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        vocab = 37  # not a multiple of the ranks: the last slice is padded
        head = ParallelLMHead(vocab, 8, tp_rank=rank, tp_size=world)
        per = head.num_embeddings_per_partition
        g = torch.Generator().manual_seed(5)  # every rank draws the same full logits
        full = (torch.randn(9, vocab, generator=g) * 2).round()  # coarse grid: ties within a slice
        full[1, 3] = full[1, 30] = full[1].max() + 1  # a tie across slices: the lower id
        full[2, 25] = float("nan")  # NaN counts as the maximum
        full[3] = float("-inf")  # nothing but -inf: id 0
        full[4, 36] = full[4].max() + 1  # the maximum in the last slice, just before its padding
        full[5, 10] = full[5, 12] = float("nan")  # the first NaN
        padded = torch.cat([full, torch.full((9, per * world - vocab), 1e9)], dim=1)  # padding never wins
        local = padded[:, rank * per:(rank + 1) * per].contiguous()
        got = head.greedy_tokens(local)
        want = full.argmax(dim=-1)
        assert torch.equal(got, want), (got.tolist(), want.tolist())
        torch.testing.assert_close(head.gather(local), full, rtol=0, atol=0, equal_nan=True)
        assert got[1] == 3 and got[2] == 25 and got[3] == 0 and got[4] == 36 and got[5] == 10
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_greedy_tokens_from_vocabulary_slices_equal_the_full_argmax(tmp_path: Path, world: int) -> None:
    """Each rank reduces its slice of the logits to (maximum, id) and the ranks exchange those:
    the same ids as the argmax of the gathered logits, with ties across slices, NaN, rows of
    -inf and the padded last slice."""
    torch.multiprocessing.spawn(_greedy_tokens_rank, args=(world, str(tmp_path / "rdzv")), nprocs=world, join=True)
