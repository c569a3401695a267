"""The KV-cache benchmarks start and produce sane figures on the CPU (``--smoke``, a tiny model).

They are GPU benchmarks; this only checks that the code paths run end to end and that the
numbers they report are consistent, not how fast anything is.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from .engine_models import make_model_dir

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models"), "qwen3_qknorm")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """Import a benchmark script as a module (they import each other by bare name)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a busy machine

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    try:
        yield load
    finally:
        torch.set_num_threads(threads)
        for name in ("bench_memory", "bench_prefix_cache", "bench_throughput", "bench_first_batch",
                     "bench_prefix_family", "bench_common", "bench_quant", "bench_fp8_kv", "bench_single_stream",
                     "bench_moe", "bench_gguf_load", "profile_steps", "bench_host_step", "bench_server_host",
                     "serving", "bench_sampler", "bench_cascade_decode", "bench_decode_attention"):
            sys.modules.pop(name, None)


def test_prefix_cache_smoke_reports_hits_only_with_caching(bench, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefix.json"
    res = bench("bench_prefix_cache").main(
        ["--device", "cpu", "--smoke", "--model-dir", str(model_dir), "--out", str(out)])
    assert json.loads(out.read_text())["throughput_ratio"] == pytest.approx(res["throughput_ratio"])
    off, on = res["off"], res["on"]
    for r in (off, on):
        assert r["output_tokens"] == 6 * 4
        assert r["output_tok_per_s"] > 0 and r["total_tok_per_s"] > r["output_tok_per_s"]
        t = r["ttft_ms"]
        assert 0 < t["p50"] <= t["p90"] and t["mean"] > 0
    assert off["prefix_cache_hit_rate"] == 0.0 and off["prompt_tokens_computed"] == off["prompt_tokens"]
    # Requests admitted after the first prefill reuse the 48-token prefix (3 blocks of 16).
    assert on["prefix_cache_hit_rate"] > 0 and on["prefix_cache_hit_tokens"] % 16 == 0
    assert on["prompt_tokens_computed"] < off["prompt_tokens_computed"]
    assert res["commit"] and res["date"] and res["device"]


def test_memory_smoke_waste_and_capacity_are_consistent(bench, model_dir: Path) -> None:
    # Async scheduling on the CPU exercises the tracer's in-flight accounting that CUDA uses.
    res = bench("bench_memory").main(["--device", "cpu", "--smoke", "--model-dir", str(model_dir),
                                      "--async-scheduling", "on"])
    w = res["waste"]
    # Random prompts share no blocks: held slots never fall below the tokens they store, and
    # the unused part is at most the last partial block of each sequence.
    assert 0 <= w["paged_best"] <= w["paged_time_avg"] <= w["paged_worst"] < 1
    assert w["paged_time_avg"] < w["contiguous_oracle_time_avg"] + 0.1
    assert w["contiguous_oracle_time_avg"] < w["contiguous_max_len_time_avg"]
    model = res["capacity"]["model"]
    assert model["contiguous_max_len"]["seqs"] == pytest.approx(256 / 48)
    assert model["contiguous_max_len"]["seqs"] < model["paged_final"]["seqs"] < model["paged_steady"]["seqs"]
    eng = res["capacity"]["engine"]
    assert eng["num_kv_blocks"] == 256 // 16 and eng["memory_bound_steps"] > 0
    assert eng["seqs_mean"] > model["contiguous_max_len"]["seqs"]


def test_bad_arguments_raise_before_any_work(bench) -> None:
    with pytest.raises(ValueError, match="suffix_max"):
        bench("bench_prefix_cache").main(["--device", "cpu", "--smoke", "--suffix-min", "9", "--suffix-max", "3"])
    with pytest.raises(ValueError, match="capacity_steps"):
        bench("bench_memory").main(["--device", "cpu", "--smoke", "--capacity-steps", "10"])
    with pytest.raises(ValueError, match="model_dir"):
        bench("bench_memory").main(["--device", "cpu", "--smoke", "--model-dir", "/nonexistent"])


def test_first_batch_smoke_times_build_first_and_second_in_a_fresh_process(bench, model_dir: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "first.json"
    res = bench("bench_first_batch").main(["--device", "cpu", "--smoke", "--model-dir", str(model_dir), "--shapes",
                                           "shared", "--triton-cache", "empty", "--out", str(out)])
    assert json.loads(out.read_text())["runs"] == res["runs"]
    (run,) = res["runs"]
    assert run["shape"] == "shared" and run["triton_cache"] == "empty"
    assert run["build_s"] > 0 and run["first_s"] > 0 and run["second_s"] > 0
    assert run["ratio"] == pytest.approx(run["first_s"] / run["second_s"])
    # Start-up's phases come from the child's engine; on a CPU with the torch backend nothing
    # compiles, before or after start-up.
    assert {"load weights", "memory profile", "KV pool", "graph capture"} <= set(run["startup_phases"])
    assert run["late_compiles_first"] == 0 and run["late_compiles_second"] == 0
    assert run["prompt_tokens"] > 6 * 40  # six requests on a 40-token shared prefix
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| shared | empty |")  # the table comes last


def test_prefix_family_smoke_caching_hits_only_when_on(bench, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "family.json"
    res = bench("bench_prefix_family").main(["--device", "cpu", "--smoke", "--model-dir", str(model_dir),
                                             "--system-prompts", "2", "--prompt-lens", "48", "--num-requests", "6",
                                             "--out", str(out)])
    assert json.loads(out.read_text())["points"] == res["points"]
    (point,) = res["points"]
    off, on = point["off"], point["on"]
    assert point["num_system"] == 2 and point["system_len"] == 48
    assert point["speedup"] == pytest.approx(off["seconds"] / on["seconds"])
    assert off["prefix_cache_hit_rate"] == 0.0 < on["prefix_cache_hit_rate"]
    assert off["output_tokens"] == on["output_tokens"] and off["prompt_tokens"] == on["prompt_tokens"]
    assert on["ttft_ms"]["mean"] > 0


def test_new_benchmarks_refuse_bad_arguments(bench) -> None:
    with pytest.raises(ValueError, match="shapes"):
        bench("bench_first_batch").main(["--device", "cpu", "--smoke", "--shapes", "nope"])
    with pytest.raises(ValueError, match="system_prompts"):
        bench("bench_prefix_family").main(["--device", "cpu", "--smoke", "--system-prompts", "0"])


def test_quant_smoke_compares_dense_int4_and_fp8_models(bench, tmp_path: Path) -> None:
    """bench_quant on a tiny Llama: the int4 and FP8 models (dequantized at load on the CPU) hold
    as many weight bytes as the dense one, all decode, and the agreements are shares."""
    out = tmp_path / "quant.json"
    res = bench("bench_quant").main(["--device", "cpu", "--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["speedup_batch1"] == pytest.approx(res["speedup_batch1"])
    dense, int4, fp8 = res["bf16"], res["w4a16"], res["fp8"]
    assert dense["weight_bytes"] == int4["weight_bytes"] == fp8["weight_bytes"] > 0
    for r in (dense, int4, fp8):
        assert set(r["decode_tok_per_s"]) == {"1", "2"} and min(r["decode_tok_per_s"].values()) > 0
    for a in res["greedy_agreement"].values():
        assert 0 <= a["prefix_share"] <= 1 and 0 <= a["first_token"] <= 1
    assert set(res["greedy_agreement"]) == set(res["speedup_batch1"]) == {"w4a16", "fp8"}
    assert res["shape"] == "tiny llama" and res["commit"]
    # Without the agreement check: decode figures only, no agreement row.
    res = bench("bench_quant").main(["--device", "cpu", "--smoke", "--variants", "w4a16", "--batches", "1",
                                     "--agree-prompts", "0"])
    assert res["greedy_agreement"] == {} and res["speedup_batch1"]["w4a16"] > 0
    # Without batch 1 the target's ratio is not reported (another batch's would read as it).
    res = bench("bench_quant").main(["--device", "cpu", "--smoke", "--variants", "w4a16", "--batches", "2",
                                     "--agree-prompts", "0"])
    assert res["speedup_batch1"] == {} and set(res["w4a16"]["decode_tok_per_s"]) == {"2"}


def test_fp8_kv_bench_parses_and_runs_its_engine_part_on_the_cpu(bench) -> None:
    """bench_fp8_kv: the kernel part needs CUDA (refused here with a clear error); the engine
    part runs in-process on a tiny model with both caches, and its figures are consistent."""
    mod = bench("bench_fp8_kv")
    args = mod.build_parser().parse_args(["--shapes", "32x16384,8x4096", "--heads", "32/8/128", "--e2e"])
    assert mod.parse_shapes(args.shapes) == [(32, 16384), (8, 4096)] and mod.parse_heads(args.heads) == (32, 8, 128)
    for bad in (["--shapes", "32by16"], ["--heads", "32/6/128"], ["--e2e-new", "0", "--no-kernel", "--e2e"],
                ["--no-kernel"], ["--no-kernel", "--e2e", "--device", "cpu"]):
        with pytest.raises(ValueError):
            mod.main(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            mod.main([])
    cfg = {"batch": 3, "context": 24, "new": 5, "device": "cpu", "model_config": mod.TINY,
           "engine": {"num_kv_blocks": 64, "block_size": 4, "swap_space_gib": 0.01}}
    runs = {kv: mod.e2e_run({**cfg, "kv_cache_dtype": kv}) for kv in ("auto", "fp8")}
    assert runs["fp8"]["kv_dtype"] == "torch.float8_e4m3fn" and runs["auto"]["kv_dtype"] == "torch.float32"
    assert runs["auto"]["bytes_per_token"] == 4 * runs["fp8"]["bytes_per_token"]
    for r in runs.values():
        assert [len(t) for t in r["tokens"]] == [6] * 3 and r["decode_tok_s"] > 0 and r["preemptions"] == 0
        assert r["full_s"] > r["to_first_token_s"] > 0
        # Every request decodes past the prefill's steps, so that at least ``new`` steps decode all three.
        assert r["decode_tokens"] > 0 and r["full_batch_steps"] >= 5 and r["full_batch_step_s"] > 0


@pytest.mark.parametrize("workload", ["throughput", "family"])
def test_profile_steps_charges_every_step_once(bench, model_dir: Path, tmp_path: Path, workload: str) -> None:
    """profile_steps: every step of the run is charged to one kind, the steps' time fits in
    the run's, and the prompt steps come before the table's decode rows."""
    mod = bench("profile_steps")
    with pytest.raises(ValueError, match="together"):
        mod.main(["--smoke", "--device", "cpu"])
    out = tmp_path / "steps.json"
    res = mod.main(["--device", "cpu", "--smoke", "--model-dir", str(model_dir), "--workload", workload,
                    "--prompt-len", "12", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    kinds = res["kinds"]
    assert next(iter(kinds)) == "with prompt tokens" and any(k.startswith("decode") for k in kinds)
    assert 0 < res["steps_s"] <= res["wall_s"] and res["outside_steps_s"] >= 0
    assert sum(r["seconds"] for r in kinds.values()) == pytest.approx(res["steps_s"])
    assert all(0 <= r["waiting_s"] <= r["seconds"] for r in kinds.values())
    assert res["prefix_caching"] == (workload == "family") and res["bound_s"] > 0
    # One token per request and step: the run took at least as many steps as its longest output.
    assert sum(r["steps"] for r in kinds.values()) == res["num_steps"] >= res["longest_output"]


def test_profile_steps_charges_its_own_work_to_no_step(bench, model_dir: Path, monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """Describing a batch (its distinct K/V blocks: a loop over every block of every row) is the
    profiler's work, done after the run: were it inside the timed step, a slow description would
    show as the engine's host time (each step here would take over 0.2 s)."""
    mod = bench("profile_steps")
    real = mod.batch_of

    def slow_batch_of(*a: Any, **k: Any) -> Any:
        time.sleep(0.2)
        return real(*a, **k)

    monkeypatch.setattr(mod, "batch_of", slow_batch_of)
    res = mod.main(["--device", "cpu", "--smoke", "--model-dir", str(model_dir), "--workload", "family",
                    "--prompt-len", "12"])
    assert res["num_steps"] >= 6 and res["steps_s"] < 0.1 * res["num_steps"]


@pytest.mark.parametrize(("workload", "stream"), [("throughput", False), ("family", True)])
def test_host_step_times_every_step_and_phase(bench, tmp_path: Path, workload: str, stream: bool) -> None:
    """bench_host_step: every step falls in one band, each phase's median is within the whole
    step's (a phase is part of every step it runs in), prompt steps come first."""
    with pytest.raises(ValueError, match="at least 1"):  # before any work
        bench("bench_host_step").main(["--smoke", "--system-prompts", "0"])
    out = tmp_path / "host.json"
    res = bench("bench_host_step").main(["--smoke", "--workload", workload, "--prompt-len", "12",
                                         "--out", str(out), *(["--stream"] if stream else [])])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    bands = res["bands_ms"]
    assert next(iter(bands)) == "with prompt tokens" and any(b.startswith("decode") for b in bands)
    assert sum(r["steps"] for r in bands.values()) == res["num_steps"]
    phases = [p for p in bench("bench_host_step").PHASES if p != "step"]
    assert all(0 <= r[p] <= r["step"] for r in bands.values() for p in phases)
    assert res["prefix_caching"] == (workload == "family") and res["stream"] == stream


def test_server_host_runs_each_way_to_the_last_token(bench, tmp_path: Path) -> None:
    """bench_server_host: the engine, the async engine and the HTTP server (with serving.py as
    its client) each serve every output token of the same requests; the figures are consistent."""
    with pytest.raises(ValueError, match="unknown ways"):  # before any work
        bench("bench_server_host").main(["--smoke", "--ways", "engine,grpc"])
    out = tmp_path / "server_host.json"
    res = bench("bench_server_host").main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert list(res["ways"]) == ["engine", "async engine", "http server"]
    assert res["output_tokens"] == 4 * 6
    for r in res["ways"].values():
        assert r["steps"] >= 6 and r["seconds"] > 0 and r["cpu_s"] > 0
        assert r["tok_per_s"] == pytest.approx(res["output_tokens"] / r["seconds"])
    client = res["ways"]["http server"]["client"]
    assert client["completed"] == 4 and client["failed"] == 0 and client["total_output_tokens"] == 4 * 6
    assert client["client_cpu_s"] > 0


def test_single_stream_smoke_reports_its_share_of_the_roofline(bench, tmp_path: Path) -> None:
    """bench_single_stream on a tiny Llama: decode rates and a roofline from the measured copy
    bandwidth and the model's weight bytes, the same in the JSON as returned."""
    out = tmp_path / "single.json"
    res = bench("bench_single_stream").main(["--device", "cpu", "--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == pytest.approx(res)
    assert res["weight_bytes"] > 0 and res["copy_bandwidth_GBps"] > 0
    assert res["roofline_tok_s"] == pytest.approx(res["copy_bandwidth_GBps"] * 1e9 / res["weight_bytes"])
    assert 0 < res["first_tok_s"] <= res["best_tok_s"]


@pytest.mark.slow  # three fresh processes, each importing torch
def test_gguf_load_bench_measures_both_orders(bench, tmp_path: Path) -> None:
    """bench_gguf_load on a tiny random Q4_K GGUF: each load in its own process, the quantized
    ones holding less than the dense one."""
    rows = bench("bench_gguf_load").main(["--random", "--layers", "2", "--hidden", "256", "--intermediate", "512",
                                          "--vocab", "512", "--heads", "4", "--kv-heads", "2", "--dtype", "float32",
                                          "--work-dir", str(tmp_path)])
    by_order = {r["order"]: r for r in rows}
    assert set(by_order) == {"dense", "dense-first", "forms-first"}
    assert by_order["forms-first"]["held_mib"] == by_order["dense-first"]["held_mib"] < by_order["dense"]["held_mib"]
    assert all(r["peak_rss_mib"] >= 0 for r in rows)
    with pytest.raises(ValueError, match="unknown orders"):
        bench("bench_gguf_load").main(["--orders", "nope"])


def test_profile_steps_counts_a_shared_block_once(bench) -> None:
    """The bound's K/V: two sequences sharing two full blocks and one of its own each read
    2 * 4 + 3 + 1 tokens; a block read partly by one and fully by another counts full."""
    count = bench("profile_steps").distinct_kv_tokens
    assert count([([7, 8, 1], 11), ([7, 8, 2], 9)], 4) == 2 * 4 + 3 + 1
    assert count([([7, 8], 6), ([7, 8, 3], 9)], 4) == 2 * 4 + 1
    assert count([([5, 6, 9], 5)], 4) == 5  # blocks past the context are not read


def test_profile_steps_replay_costs_the_real_models_steps(bench) -> None:
    """--replay: the schedule of a tiny workload through the one-layer stand-in, every step
    costed for Qwen3-0.6B's shapes (a bound of at least its weights' read per step)."""
    mod = bench("profile_steps")
    with pytest.raises(ValueError, match="bandwidth"):
        mod.main(["--replay", "--smoke"])
    res = mod.main(["--replay", "--smoke", "--workload", "family", "--prompt-len", "12", "--bandwidth-gbps", "3000",
                    "--tflops", "700"])
    weights = mod.arch_limits(mod.QWEN3_0_6B, 3e12, 7e14).weight_bytes
    assert 1.1e9 < weights < 1.3e9  # Qwen3-0.6B in bf16, the tied head once
    assert res["prefix_caching"] and res["num_steps"] == sum(r["steps"] for r in res["kinds"].values())
    # Every step with a batch (the overlapped loop's first launch waits on none) reads the weights.
    assert all(r["bound_s"] >= r["steps"] * weights / 3e12 for k, r in res["kinds"].items() if k != "first launch")


def test_sampler_bench_times_every_mode_and_batch(bench, tmp_path: Path) -> None:
    """bench_sampler on the CPU with a small vocabulary: a time for every (batch, mode), the
    bound of one read of the logits growing with the batch, the JSON as returned."""
    out = tmp_path / "sampler.json"
    res = bench("bench_sampler").main(["--device", "cpu", "--vocab", "700", "--batches", "1,3", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    got = {(r["batch"], r["mode"]) for r in res["rows"]}
    assert got == {(b, m) for b in (1, 3) for m in ("greedy", "temperature", "seeded", "top_p")}
    assert all(r["us"] > 0 for r in res["rows"])
    bound = {r["batch"]: r["bound_us"] for r in res["rows"]}
    assert bound[3] == pytest.approx(3 * bound[1])


def test_linear_kernel_sweeps_include_the_int4_gemms_own_launch(bench) -> None:
    """``bench_linear_kernels.py --sweep w4a16:M`` times the launch the heuristic picks on the 8B
    shapes (an H100's 132 SMs) among its alternatives, so a sweep can say whether it is the
    fastest; past 256 rows the calls dequantize first (no GEMM launch to sweep)."""
    from pagedattn.kernels import w4a16

    lk = bench("bench_linear_kernels")
    for m in (2, 16, 33, 64, 100, 128, 200, 256):
        swept = set(lk.sweep_configs("w4a16", m))
        for n, k in lk.SHAPES.values():
            cfg = w4a16.choose_config(m, n, k, lk.GROUP, torch.device("cpu"), sms=132)
            assert w4a16.dequantizes_first(m, n, k, cfg) or cfg in swept, (m, n, k, cfg)


def test_cascade_bench_builds_groups_of_rows_with_tails_of_their_own(bench, capsys: pytest.CaptureFixture[str]
                                                                    ) -> None:
    """``bench_cascade_decode.py``'s chat shape (``BxPREFIX+LO..HI/GROUPS``): rows round robin
    over the groups' prefix blocks, own tails drawn from the range in blocks of their own, and a
    reference that attends each row's own length."""
    cd = bench("bench_cascade_decode")
    assert cd.parse_shape("256x992+30..900/2") == (256, 992, (30, 900), 2)
    assert cd.parse_shape("128x2048+64") == (128, 2048, (64, 64), 1)
    p = cd.build(12, 64, (5, 40), groups=3, device="cpu")
    shared = 64 // cd.PAGE
    assert not p.uniform and p.tails.min() >= 5 and p.tails.max() <= 40
    for r in range(12):
        assert (p.tables[r, :shared] == p.tables[r % 3, :shared]).all()
    prefixes = {tuple(p.tables[g, :shared]) for g in range(3)}
    own = [b for r in range(12) for b in p.tables[r, shared:shared + -(-int(p.tails[r]) // cd.PAGE)]]
    assert len(prefixes) == 3 and len(own) == len(set(own))
    assert not set(own) & {b for pre in prefixes for b in pre}
    assert p.bytes_unique < p.bytes_attended
    ref = cd.reference(p)
    k, v = cd.row_kv(p, 4)
    assert k.shape == (1, cd.HKV, 64 + int(p.tails[4]), cd.D)
    scores = torch.einsum("hgd,hld->hgl", p.q[4].float().view(cd.HKV, -1, cd.D), k[0].float()) * cd.D ** -0.5
    want = torch.einsum("hgl,hld->hgd", scores.softmax(-1), v[0].float()).reshape(cd.HQ, cd.D)
    torch.testing.assert_close(ref[4], want, atol=1e-4, rtol=1e-4)
    plans = cd.sweep_configs()  # --sweep times the default plan among the others
    assert cd.CascadeConfig() in plans and len(set(plans)) == len(plans) > 1
    rows = [{"config": vars(c), "us": 100.0 - i, "max_err": 1e-3} for i, c in enumerate(plans)][::-1]
    cd.print_sweep({"device": "a GPU", "copy_gbps": 3000.0, "shapes": [{"shape": "256x992+30..900/2", "sweep": rows}]})
    out = capsys.readouterr().out
    assert "default plan" in out and "x the default's speed" in out
