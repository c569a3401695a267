"""Count the machine instructions of a decode GEMV's main loop, compiled for a Hopper GPU on any
machine (no GPU needed: Triton's own ptxas, nvdisasm and cuobjdump).

Each kernel is launched by its wrapper as the engine would launch it at one activation row on an
H100 (132 SMs: the default launch config), but the launch is recorded instead of run; the
recorded arguments are compiled for sm90 with the specialisations Triton's JIT would give them
(16-byte aligned pointers, integers divisible by 16), and the loop that streams the weights is
found in the SASS (the longest backward branch).  Printed: its instruction count, the weights a
thread multiplies a turn, the count a weight, the registers a thread and stack bytes (spills)
ptxas allocated, and the most frequent opcodes.  See
docs/kernel_notes.md, "The GEMV's instructions, counted".

    python benchmarks/kernel_sass.py [--kernels w4a16,Q4_K,Q6_K] [--shape 28672x4096] [--out sass.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv"}
SMS = 132  # an H100's SM count: the wrappers' default launch for that card
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def record_launches(call) -> list[tuple[Any, tuple, dict]]:
    """Run ``call()`` with every ``kernel[grid](...)`` recorded instead of launched: each
    launch's ``(kernel, args, kwargs)``."""
    import triton.runtime.jit as jit

    launches: list[tuple[Any, tuple, dict]] = []
    original = jit.JITFunction.__getitem__
    jit.JITFunction.__getitem__ = lambda self, grid: lambda *a, **k: launches.append((self, a, k))
    try:
        call()
    finally:
        jit.JITFunction.__getitem__ = original
    return launches


def arg_type(value: Any) -> str:
    """Triton's signature type of a run-time kernel argument; a bool or None there is a wrapper's
    mistake (a flag passed where a constexpr belongs), so it raises."""
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool) or value is None:
        raise TypeError(f"a runtime argument of {value!r}")
    return "fp32" if isinstance(value, float) else ("i64" if abs(value) >= 2**31 else "i32")


def launch_source(fn, args: tuple, kwargs: dict, specialise: bool = True):
    """A recorded launch as Triton's compiler input (``ASTSource``); ``specialise``: with the
    alignment hints the JIT would give it (16-byte aligned pointers, integers divisible by 16,
    but for the kernel's ``do_not_specialize`` arguments)."""
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    assert sorted(values) == sorted(names), (fn.__name__, sorted(set(names) ^ set(values)))
    consts = {n: v for n, v in values.items() if fn.params[names.index(n)].is_constexpr}
    types = {n: "constexpr" if n in consts else arg_type(values[n]) for n in names}
    attrs = {}
    for i, (n, param) in enumerate(zip(names, fn.params)):
        v = values[n]
        aligned = isinstance(v, torch.Tensor) or (isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0)
        if specialise and n not in consts and aligned and not param.do_not_specialize:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, types, consts, attrs)


def compile_sm90(fn, args: tuple, kwargs: dict):
    """The recorded launch compiled for sm90, specialised as the JIT would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget

    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    return triton.compile(launch_source(fn, args, kwargs), target=GPUTarget("cuda", 90, 32), options=options)


def main_loop(sass: str) -> str:
    """The SASS between a label and the branch back to it that spans the most instructions."""
    best = ""
    for label in re.findall(r"^(\.L_x_\d+):", sass, re.M):
        start = sass.index(label + ":")
        end = sass.find(f"BRA `({label})", start)
        if end > 0 and len(INSTRUCTION.findall(sass[start:end])) > len(INSTRUCTION.findall(best)):
            best = sass[start:end]
    return best


def _cuda_tool(kernel, tool: str, *args: str) -> str:
    """The output of one of Triton's bundled CUDA tools run on ``kernel``'s cubin."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([os.fspath(path), *args, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(kernel) -> str:
    return _cuda_tool(kernel, "nvdisasm", "-c")


def resources(kernel) -> dict[str, int]:
    """Registers a thread and stack bytes (register spills) as ptxas allocated them: registers
    bound how many programs an SM holds at once, a stack means values went to local memory."""
    usage = _cuda_tool(kernel, "cuobjdump", "-res-usage")
    return {key.lower(): int(v) for key, v in re.findall(r"\b(REG|STACK):(\d+)", usage)}


def gemv_launch(kind: str, n: int, k: int):
    """``(call, weights a thread multiplies per loop turn)`` of ``kind``'s GEMV at one bf16 row."""
    from pagedattn.kernels import gguf_matmul, w4a16

    x = torch.randn(1, k).to(torch.bfloat16)
    cuda = torch.device("cuda")
    if kind == "w4a16":
        qw = torch.randint(0, 2**31 - 1, (k // 8, n), dtype=torch.int32)
        s = torch.rand(k // 128, n).to(torch.bfloat16)
        cfg = w4a16.choose_config(1, n, k, 128, cuda, sms=SMS)
        per_thread = cfg.block_k * cfg.block_n / (32 * cfg.num_warps)
        return (lambda: w4a16.w4a16_linear(x, qw, s, s, 128, config=cfg)), per_thread
    blocks = torch.zeros(n, gguf_matmul.row_bytes(kind, k), dtype=torch.uint8)
    cfg = gguf_matmul.choose_config(1, n, k, cuda, sms=SMS, kind=kind)
    per_turn = gguf_matmul.gemv_step(kind, cfg) * cfg.block_n
    return (lambda: gguf_matmul.gguf_linear(x, blocks, kind, config=cfg)), per_turn / (32 * cfg.num_warps)


def count(kind: str, n: int, k: int) -> dict[str, Any]:
    call, weights = gemv_launch(kind, n, k)
    fn, args, kwargs = record_launches(call)[-1]
    kernel = compile_sm90(fn, args, kwargs)
    loop = main_loop(disassemble(kernel))
    ops = collections.Counter(INSTRUCTION.findall(loop))
    total = sum(ops.values())
    return dict(kernel=fn.__name__, kind=kind, n=n, k=k, loop_instructions=total, weights_per_thread=weights,
                per_weight=total / weights, **resources(kernel), opcodes=dict(ops.most_common()))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="w4a16,Q4_K")
    ap.add_argument("--shape", default="28672x4096", help="N x K (outputs x inputs); default: the 8B gate_up")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones
    n, k = (int(v) for v in args.shape.split("x"))
    rows = [count(kind, n, k) for kind in args.kernels.split(",")]
    print(f"sm90 SASS of the GEMV's main loop, {n} x {k}, one bf16 row, launch for {SMS} SMs")
    print("| kernel | format | loop instructions | weights a thread a turn | per weight | registers | stack bytes "
          "| top opcodes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        top = ", ".join(f"{op} {c}" for op, c in list(r["opcodes"].items())[:6])
        print(f"| {r['kernel']} | {r['kind']} | {r['loop_instructions']} | {r['weights_per_thread']:.0f} | "
              f"{r['per_weight']:.2f} | {r['reg']} | {r['stack']} | {top} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
