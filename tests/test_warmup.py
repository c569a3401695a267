"""Nothing compiles on the request path: start-up's warm-up launches every kernel variant a
workload's steps launch, and step-varying launch values do not multiply the variants.

A Triton kernel compiles once per *specialisation key*: its constexprs, options, argument
types and what Triton specialises on (ints equal to 1 or divisible by 16, pointers aligned to
16 bytes).  Under the interpreter nothing compiles, but the key of every launch can still be
computed with Triton's own binder (``specialization_key``), so these tests run on a CPU: a
launch after start-up whose key start-up never saw is a compile on the request path on a GPU.
"""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from .triton_interpreter import CUDA, rerun_in_fresh_process, skip_unless_runnable

pytest.importorskip("triton")

from triton.backends.compiler import BaseBackend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import KernelParam, create_function_from_signature

from pagedattn import LLM, SamplingParams
from pagedattn.attention.cascade import WORK_WIDTH, CascadeConfig
from pagedattn.attention.metadata import HostBatch
from pagedattn.runtime import compile_guard
from pagedattn.runtime.warmup import LONG_CONTEXT, WarmupLimits, used_blocks, warmup_phases

from .engine_models import make_model_dir


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_warmup_in_fresh_interpreter_process")


def test_warmup_in_fresh_interpreter_process() -> None:
    rerun_in_fresh_process(__file__)


# ---------------------------------------------------------------------- specialisation keys
class _Specialiser:
    """What Triton's binder asks a backend while computing a launch's key (the base backend's
    rules, the ones every GPU backend keeps)."""

    get_int_specialization = staticmethod(BaseBackend.get_int_specialization)
    get_tensor_specialization = staticmethod(BaseBackend.get_tensor_specialization)


_binders: dict[int, Any] = {}


def specialization_key(fn: InterpretedFunction, args: tuple, kwargs: dict) -> tuple[str, str]:
    """``(kernel name, key)``: what selects a compiled variant of ``fn`` for this launch."""
    if id(fn) not in _binders:
        sig = inspect.signature(fn.fn)
        dns = fn.kwargs.get("do_not_specialize") or ()
        dna = fn.kwargs.get("do_not_specialize_on_alignment") or ()
        params = [KernelParam(i, p, i in dns or p.name in dns, i in dna or p.name in dna)
                  for i, p in enumerate(sig.parameters.values())]
        _binders[id(fn)] = create_function_from_signature(sig, params, _Specialiser)
    _, spec, options = _binders[id(fn)](*args, **kwargs)
    return fn.fn.__qualname__, repr((spec, sorted(options.items())))


class LaunchRecorder:
    """Records the key of every interpreted kernel launch; ``execute=False`` skips running them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, execute: bool = True) -> None:
        if CUDA:
            pytest.skip("launch keys under the interpreter are the CPU suite's check; on a GPU, the compile watch's")
        self.keys: list[tuple[str, str]] = []
        run = InterpretedFunction.run
        recorder = self

        def recording_run(fn: InterpretedFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            recorder.keys.append(specialization_key(fn, args, kwargs))
            return run(fn, *args, grid=grid, warmup=warmup, **kwargs) if execute else None

        monkeypatch.setattr(InterpretedFunction, "run", recording_run)

    def variants(self, name: str) -> set[str]:
        return {k for n, k in self.keys if n == name}


# ---------------------------------------------------------------------- kernels alone
def test_step_varying_values_do_not_multiply_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode, merge, prefix and extend launches over many batch sizes, table widths, split
    counts and cascade plans: the variants are those of the flags that change the code (split,
    cascade), nothing more."""
    from pagedattn.attention import triton_ops as ops

    rec = LaunchRecorder(monkeypatch, execute=False)
    g = torch.Generator().manual_seed(7)
    hkv, d, gqa, page = 2, 32, 2, 16
    k_cache = torch.randn(64, page, hkv, d, generator=g)
    v_cache = torch.randn(64, page, hkv, d, generator=g)
    for b, width, splits in [(1, 1, 1), (1, 3, 2), (2, 16, 5), (3, 17, 16), (16, 32, 3), (5, 2, 64), (7, 9, 33)]:
        q = torch.randn(b, hkv * gqa, d, generator=g)
        tables = torch.randint(0, 64, (b, width), dtype=torch.int32, generator=g)
        lens = torch.randint(1, width * page + 1, (b,), dtype=torch.int32, generator=g)
        out = torch.empty_like(q)
        ops.decode_attention(q, k_cache, v_cache, tables, lens, 0.3, None, out, splits)
        for parts, rows in [(1, b), (3, b + 1), (16, b)]:  # cascade plans of any size, packed at any offset
            packed = torch.zeros(3 * rows + WORK_WIDTH * 4, dtype=torch.int32)
            tail, pre, members = packed[:rows], packed[rows:2 * rows], packed[2 * rows:3 * rows]
            work = packed[3 * rows:].view(4, WORK_WIDTH)
            casc = ops.CascadeInputs(tail, pre, members, work, parts, 16)
            ops.decode_attention(q, k_cache, v_cache, tables, lens, 0.3, None, out, splits, cascade=casc)
        qx = torch.randn(b + 40, hkv * gqa, d, generator=g)
        qsl = torch.tensor([0, *range(1, b), b + 40][: b + 1], dtype=torch.int32)
        ops.extend_attention(qx, k_cache, v_cache, tables, lens, qsl, 0.3, None, torch.empty_like(qx),
                             seq_offset=b - 1, num_seqs=1, max_query_len=41)
    assert len(rec.variants("_decode_kernel")) == 4  # split x cascade
    assert len(rec.variants("_merge_splits_kernel")) == 2  # plain, cascade
    assert len(rec.variants("_prefix_kernel")) == 1
    assert len(rec.variants("_extend_kernel")) == 1


def test_fused_ops_compile_once_whatever_the_token_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedattn.models import fused_ops as f

    rec = LaunchRecorder(monkeypatch, execute=False)
    g = torch.Generator().manual_seed(11)
    hq, hkv, d, hidden = 4, 2, 32, 64
    w, qw, kw = (torch.randn(n, generator=g) for n in (hidden, d, d))
    for t in (1, 2, 16, 17, 33, 256):
        x, res = torch.randn(t, hidden, generator=g), torch.randn(t, hidden, generator=g)
        f.rms_norm_triton(x, w, 1e-6)
        f.fused_add_rms_norm_triton(x, res, w, 1e-6)
        qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g)
        cos, sin = torch.randn(t, 1, d // 2, generator=g), torch.randn(t, 1, d // 2, generator=g)
        f.qk_norm_rope_triton(qkv, cos, sin, hq, hkv, qw, kw, 1e-6)
        f.silu_and_mul_triton(torch.randn(t, 2 * hidden, generator=g))
    assert len(rec.variants("_rms_norm_kernel")) == 2  # with and without the residual
    assert len(rec.variants("_qk_norm_rope_kernel")) == 1
    assert len(rec.variants("_silu_and_mul_kernel")) == 1


# ---------------------------------------------------------------------- the warm-up's steps
@pytest.mark.parametrize("lim", [
    WarmupLimits(16, 4096, 8192, 256, 4096, 64, 1000),
    WarmupLimits(4, 512, 64, 3, 300, 0, 50),
    WarmupLimits(16, 40, 16, 1, 3, 0, 10),  # one sequence, a tiny pool: multi-row steps cannot happen
])
def test_warmup_steps_are_steps_the_limits_allow(lim: WarmupLimits) -> None:
    phases = warmup_phases(lim, seed=3)
    assert phases and all(ph.steps for ph in phases)
    for ph in phases:
        for s in ph.steps:
            assert len(s.query_lens) <= lim.max_num_seqs and sum(s.query_lens) <= lim.max_num_batched_tokens
            assert all(x <= lim.max_model_len for x in s.seq_lens)
            if s.query_lens:
                HostBatch.build(s.query_lens, s.seq_lens, s.block_tables, lim.block_size)  # valid, or raises
                assert s.token_ids is not None and all(0 <= t < lim.vocab_size for t in s.token_ids)
                assert all(0 <= r < sum(s.query_lens) for r in s.sample_rows)
    assert max(used_blocks(phases)) < lim.num_blocks
    if lim.max_num_seqs == 1:
        assert all(len(s.query_lens) <= 1 for ph in phases for s in ph.steps)


def test_warmup_covers_long_shared_and_mixed_steps() -> None:
    lim = WarmupLimits(16, 4096, 8192, 256, 4096, 64, 1000)
    phases = {ph.name: ph.steps for ph in warmup_phases(lim)}
    assert set(phases) == {"prefill", "prefill with cached context", "prefill and decodes in one step", "decode",
                           "cascade decode", "block copy and swap"}
    assert max(max(s.seq_lens) for s in phases["decode"]) == LONG_CONTEXT  # a split decode
    shared = [sum(a == b for a, b in zip(*s.block_tables)) * 16 for s in phases["cascade decode"]]
    assert min(shared) >= 256 and LONG_CONTEXT - min(shared) >= 512  # a cascade with split own tails too
    ctx = phases["prefill with cached context"][1]
    assert ctx.seq_lens[0] > ctx.query_lens[0]  # the second chunk attends cached context
    mixed = phases["prefill and decodes in one step"][0]
    assert mixed.query_lens[:2] == [1, 1] and mixed.query_lens[2] > 1
    assert {s.greedy for ph in phases.values() for s in ph if s.query_lens} == {True, False}
    kinds = [k for s in phases["block copy and swap"] for k, _ in s.kv_ops]
    assert kinds == ["copy", "swap_out", "swap_in"]


# ---------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models"), "qwen3_qknorm")


def _workload(seed: int) -> tuple[list[list[int]], SamplingParams]:
    """Prompts sharing a prefix long enough for cascade decode (at the thresholds below; the
    later ones hit the prefix cache) and plain ones, chunked by the token budget, with two
    samples each (forked blocks)."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, 320, 72).tolist()
    prompts = [shared + rng.integers(3, 320, int(n)).tolist() for n in (5, 30)]
    prompts += [rng.integers(3, 320, int(n)).tolist() for n in (3, 50)]
    return prompts, SamplingParams(temperature=0.9, top_k=20, max_tokens=4, n=2, seed=1, ignore_eos=True)


@dataclass(frozen=True)
class _SmallCascade(CascadeConfig):
    min_prefix_tokens: int = 32
    min_chunk_tokens: int = 32


@pytest.fixture
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels' and the warm-up's length thresholds divided by 8 (the interpreter runs a
    program in Python: long contexts cost minutes), so short steps take the same paths: split
    decode from 64 keys, cascade from 32 shared tokens, the warm-up's long decode 160 tokens."""
    from pagedattn.attention import triton_backend
    from pagedattn.attention.triton_ops import decode
    from pagedattn.runtime import warmup

    monkeypatch.setattr(decode, "MIN_TOKENS_PER_SPLIT", 32)
    monkeypatch.setattr(triton_backend, "CascadeConfig", _SmallCascade)
    monkeypatch.setattr(warmup, "PREFILL_TOKENS", 24)
    monkeypatch.setattr(warmup, "SHORT_CONTEXT", 12)
    monkeypatch.setattr(warmup, "LONG_CONTEXT", 160)


@pytest.mark.usefixtures("small_thresholds")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_start_up_launches_every_variant_a_workload_launches(monkeypatch: pytest.MonkeyPatch, model_dir: Path,
                                                              caplog: pytest.LogCaptureFixture,
                                                              kv_cache_dtype: str) -> None:
    rec = LaunchRecorder(monkeypatch)
    caplog.set_level(logging.INFO, logger="pagedattn.runtime.worker")
    with LLM(str(model_dir), device="cpu", attention_backend="triton", block_size=16, num_kv_blocks=64,
             max_num_seqs=8, max_num_batched_tokens=48, swap_space_gib=0.01, kv_cache_dtype=kv_cache_dtype) as llm:
        at_start = set(rec.keys)
        startup = llm.engine.executor.worker.startup
        assert startup is not None and set(startup.warmup) >= {"prefill", "decode", "cascade decode"}
        assert len(rec.variants("_decode_kernel")) == 4  # split x cascade, all four reachable here
        # The pool is as it was: the warm-up's blocks are zero again.
        assert not llm.engine.kv_pool.kv.float().any()
        prompts, params = _workload(0)
        llm.generate(prompts, params, use_tqdm=False)
        assert llm.get_metrics()["prefix_cache_hit_tokens"] > 0
    names = {n for n, _ in rec.keys}
    assert {"_store_kv_kernel", "_extend_kernel", "_decode_kernel", "_merge_splits_kernel", "_prefix_kernel"} <= names
    late = [k for k in rec.keys if k not in at_start]
    assert not late, f"{len(late)} launches of variants start-up never launched: {sorted({n for n, _ in late})}"
    text = caplog.text
    for phase in ("load weights", "memory profile", "compile and warm-up", "graph capture"):
        assert f"start-up (rank 0): {phase} took" in text


def test_warmup_off_leaves_the_variants_to_the_requests(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    """The check above can fail: without the warm-up, the requests launch variants start-up never did."""
    rec = LaunchRecorder(monkeypatch, execute=False)
    with LLM(str(model_dir), device="cpu", attention_backend="triton", block_size=16, num_kv_blocks=160,
             max_num_seqs=8, warmup=False, swap_space_gib=0.01) as llm:
        assert not rec.keys and llm.engine.executor.worker.startup is not None
        assert llm.engine.executor.worker.startup.warmup == {}


# ---------------------------------------------------------------------- the debug check
def test_compile_after_start_up_is_recorded_logged_or_raised(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from pagedattn import envs

    before = len(compile_guard.late_compiles())
    with compile_guard.starting_up():
        compile_guard.on_compile("_during_startup[...]")
    assert len(compile_guard.late_compiles()) == before
    monkeypatch.setenv("PAGEDATTN_FAIL_ON_COMPILE", "warn")
    envs.reload()
    with caplog.at_level(logging.WARNING, logger="pagedattn.runtime.compile_guard"):
        compile_guard.on_compile("_late_kernel[num_warps=4](x: *fp32)")
    assert "compiled after start-up" in caplog.text and "_late_kernel" in caplog.text
    monkeypatch.setenv("PAGEDATTN_FAIL_ON_COMPILE", "1")
    envs.reload()
    with pytest.raises(compile_guard.CompiledAfterStartup, match="_later_kernel"):
        compile_guard.on_compile("_later_kernel[num_warps=4]()")
    compile_guard.on_compile("_manual[...]", is_manual_warmup=True)  # kernel.warmup(): a deliberate compile
    assert compile_guard.late_compiles()[before:] == ["_late_kernel[num_warps=4](x: *fp32)",
                                                      "_later_kernel[num_warps=4]()"]
    monkeypatch.delenv("PAGEDATTN_FAIL_ON_COMPILE")
    assert envs.reload().compile_check == "off"


def test_the_watch_is_chained_into_tritons_cache_hook() -> None:
    """Start-up leaves the watch in Triton's ``jit_cache_hook`` (what Triton calls on a cache miss)."""
    from triton import knobs

    with compile_guard.starting_up():
        pass
    hook = knobs.runtime.jit_cache_hook
    assert hook is not None
    before = len(compile_guard.late_compiles())
    assert hook(key="k", repr="_k[num_warps=4]()", fn=None, compile={}, is_manual_warmup=False,
                already_compiled=False) is None  # None: Triton goes on compiling
    assert compile_guard.late_compiles()[before:] == ["_k[num_warps=4]()"]


@pytest.mark.parametrize(("value", "mode"), [("", "off"), ("0", "off"), ("1", "raise"), ("raise", "raise"),
                                              ("warn", "warn"), ("LOG", "warn")])
def test_fail_on_compile_switch(value: str, mode: str) -> None:
    from pagedattn.envs import Switches

    assert Switches.from_environ({"PAGEDATTN_FAIL_ON_COMPILE": value}).compile_check == mode


# ---------------------------------------------------------------------- on a GPU
GPU_RUN = r"""
import sys
from pagedattn import LLM, SamplingParams
from pagedattn.runtime import compile_guard
import numpy as np
rng = np.random.default_rng(0)
shared = rng.integers(3, 320, 300).tolist()
prompts = [shared + rng.integers(3, 320, int(n)).tolist() for n in (5, 40, 90, 17)]
prompts += [rng.integers(3, 320, int(n)).tolist() for n in (3, 150, 60, 200)]
with LLM(sys.argv[1], device="cuda", dtype=sys.argv[2], block_size=16, num_kv_blocks=512, max_num_seqs=32,
         max_num_batched_tokens=256) as llm:
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    llm.generate(prompts[::-1], SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, n=3, seed=1,
                                               logprobs=2, ignore_eos=True), use_tqdm=False)
    llm.generate(prompts[:3], SamplingParams(temperature=0.7, max_tokens=6, seed=2), use_tqdm=False)
    llm.generate(prompts * 4, SamplingParams(temperature=0.7, top_p=0.8, max_tokens=4), use_tqdm=False)  # 32 rows
print("late compiles:", len(compile_guard.late_compiles()))
"""


@pytest.mark.gpu
@pytest.mark.parametrize(("family", "dtype"), [("qwen3_qknorm", "bfloat16"), ("mistral_window", "float32")])
def test_gpu_nothing_compiles_after_start_up(tmp_path: Path, family: str, dtype: str) -> None:
    """A fresh process (Triton's in-memory kernels are per process) with an empty Triton cache,
    ``PAGEDATTN_FAIL_ON_COMPILE=1``: shared prefixes, chunked prompts, mixed steps, parallel
    samples with log-probabilities and filters, plain temperature sampling, a batch large enough
    for the filter kernel, sliding windows, a 16-bit and a float32 model; a kernel compiled after
    start-up raises."""
    if not CUDA:
        pytest.skip("needs CUDA")
    path = make_model_dir(tmp_path, family)
    env = {**os.environ, "PAGEDATTN_FAIL_ON_COMPILE": "1", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    proc = subprocess.run([sys.executable, "-c", GPU_RUN, str(path), dtype], capture_output=True, text=True, env=env,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "late compiles: 0" in proc.stdout
