"""The decode GEMVs and the sampling kernels compile for a Hopper GPU, checked on any machine.

The Triton interpreter runs a kernel's Python and never type-checks a branch a launch does not
take: the split-K finish of a GEMV compiled its atomics on whatever pointer an unsplit launch
passed as counters, which the interpreter accepted and an H100 refused (a bf16 pointer).  So
the front end of Triton's CUDA compiler (kernel -> Triton IR, for sm90, no GPU needed) runs
here on each kernel with the arguments its wrapper launches it with (the launches are recorded,
not run: bf16, fp16 and fp32 activations, split and unsplit, with and without bias, every GGUF
type), in a subprocess without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json
import sys
import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton._C.libtriton import ir
sys.path.insert(0, sys.argv[1])  # benchmarks/: kernel_sass.py records launches and builds their signatures
from kernel_sass import arg_type, launch_source, record_launches
from pagedattn.kernels import fp8, gguf_matmul as gm, sampling, w4a16

target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
options = backend.parse_options({})


def compile_front(fn, args, kwargs):
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    launch_source(fn, args, kwargs, specialise=False).make_ir(
        target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)


def wrapper_calls():
    g = torch.Generator().manual_seed(0)
    n, k = 96, 512
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(1, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        for split in (1, 4):
            for b in (None, bias):
                qw = torch.randint(0, 2**31 - 1, (k // 8, n), generator=g, dtype=torch.int32)
                s = torch.rand(k // 128, n, generator=g).to(dtype)
                for zeros, g_idx in ((s, None), (None, None), (s, torch.arange(k, dtype=torch.int32) // 128)):
                    w4a16.w4a16_linear(x, qw, s, zeros, 128, g_idx=g_idx, bias=b,
                                       config=w4a16.W4A16Config(1, 32, 128, split, gemv=True))
                w4a16.w4a16_linear(torch.cat([x, x], 1), qw, s, s, 128, bias=b, silu_gated=True,
                                   config=w4a16.W4A16Config(1, 32, 128, split, gemv=True))
                w8 = torch.randn(n, k, generator=g).to(torch.float8_e4m3fn)
                fp8._fp8_gemv(x, w8, torch.rand(n, 1, generator=g), fp8.row_group(k), b, torch.empty(1, n, dtype=dtype),
                              split=split)
                for kind in gm.GGUF_BLOCKS:
                    blocks = torch.zeros(n, gm.row_bytes(kind, k), dtype=torch.uint8)
                    gm.gguf_linear(x, blocks, kind, b, config=gm.GGUFMatmulConfig(1, 32, 256, split, gemv=True))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # the int4 GEMM: half math in bf16/fp16
        x = torch.randn(3, k, generator=g).to(dtype)
        qw = torch.randint(0, 2**31 - 1, (k // 8, n), generator=g, dtype=torch.int32)
        s = torch.rand(k // 128, n, generator=g).to(dtype)
        for zeros, g_idx in ((s, None), (None, None), (s, torch.arange(k, dtype=torch.int32) // 128)):
            w4a16.w4a16_linear(x, qw, s, zeros, 128, g_idx=g_idx, config=w4a16.W4A16Config(16, 128, 64, 1))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(3, 1000).to(dtype)
        for floor in (None, torch.randn(3)):
            sampling.race_sample(x, torch.rand(3), torch.tensor([-1, 5, -1, 9]), floor)
        sampling.filter_floor(x, torch.rand(3), torch.randn(3), torch.rand(3), torch.rand(3))
        sampling.argmax(x, splits=1)


results = {}
for fn, args, kwargs in record_launches(wrapper_calls):
    key = f"{fn.__name__} {[arg_type(a) if not isinstance(a, bool) else a for a in args[:8]]} " \
          f"{sorted((k, v) for k, v in kwargs.items() if isinstance(v, (bool, int)))}"
    try:
        compile_front(fn, args, kwargs)
        results[key] = "ok"
    except Exception as e:
        results[key] = f"{type(e).__name__}: {str(e)[-400:]}"
print(json.dumps(results))
"""

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_quantized_matmul_and_sampling_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, BENCHMARKS], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0 and ("triton.backends.nvidia" in proc.stderr or "ASTSource" in proc.stderr):
        pytest.skip(f"this triton has no CUDA front end to compile with: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {k: v for k, v in results.items() if v != "ok"}
    kernels = {key.split()[0] for key in results}
    assert kernels == {"_w4a16_gemv_kernel", "_w4a16_gemm_kernel", "_fp8_gemv_kernel", "_q4k_gemv_kernel",
                       "_q6k_gemv_kernel", "_q32_gemv_kernel", "_race_kernel", "_filter_floor_kernel",
                       "_argmax_kernel"}, kernels
    assert not failed, failed


def test_kernel_sass_counts_the_gemv_main_loop(tmp_path) -> None:
    """``benchmarks/kernel_sass.py`` compiles the decode GEMVs down to sm90 machine code here and
    finds their main loop: every weight a thread multiplies in a turn has its FMA in it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(root, "src"), env.get("PYTHONPATH", "")])
    out = tmp_path / "sass.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_sass.py"), "--shape", "512x1024",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0 and ("triton.backends.nvidia" in proc.stderr or "nvdisasm" in proc.stderr):
        pytest.skip(f"this triton cannot compile for CUDA here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["kernel"] for r in rows] == ["_w4a16_gemv_kernel", "_q4k_gemv_kernel"]
    for r in rows:
        assert r["opcodes"].get("FFMA", 0) >= r["weights_per_thread"] > 0, r
        assert r["loop_instructions"] == sum(r["opcodes"].values())
        assert 0 < r["reg"] <= 255 and r["stack"] >= 0, r  # ptxas's allocation, read back from the cubin
