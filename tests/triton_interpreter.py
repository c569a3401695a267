"""Running Triton kernels in tests: on CUDA for real, elsewhere under the Triton interpreter.

Import this module before anything imports triton: without CUDA it sets ``TRITON_INTERPRET``.
If triton was already loaded in compiled mode (``torch._dynamo``, which transformers imports,
does that), the interpreter cannot run in this process; kernel test modules then skip their
tests and re-run themselves once in a fresh process (:func:`rerun_in_fresh_process`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _triton_loaded_for_gpu() -> bool:
    """True if triton was imported before TRITON_INTERPRET was set: its library functions are
    then compiled-mode only."""
    if "triton" not in sys.modules:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(tl.cdiv, InterpretedFunction)


NEEDS_FRESH_PROCESS = not CUDA and _triton_loaded_for_gpu()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def skip_unless_runnable(request: pytest.FixtureRequest, rerun_test: str) -> None:
    """In a process where the interpreter cannot run, skip everything but ``rerun_test``."""
    if NEEDS_FRESH_PROCESS and request.node.originalname != rerun_test:
        pytest.skip("triton was loaded before TRITON_INTERPRET was set: run by the fresh-process test")


def rerun_in_fresh_process(module_file: str) -> None:
    """Run a test module's CPU tests again in a fresh interpreter process; fail if they fail."""
    if not NEEDS_FRESH_PROCESS:
        pytest.skip("kernels run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", module_file]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def seeded_generator(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh inputs per case, the same in every
    process (a digest of ``repr(key)``, not ``hash``, which Python salts per process)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=4).digest(), "little"))
    return g


def dot_terms_max(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
    """The largest ``sum |x w| (+ |b|)`` of the outputs of ``x W^T + b`` (``weight [N, K]``): what a
    floating-point dot product's error is bounded by.  A test holding a kernel to this, not to the
    largest output, does not fail on one output that is a near-cancelling sum of its terms."""
    terms = x.float().abs() @ weight.float().abs().t()
    if bias is not None:
        terms += bias.float().abs()
    return terms.max().item()


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Standard-normal values from ``g`` (drawn on the CPU, so the same on every device) on DEVICE."""
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def attention_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``assert_close`` tolerances of an attention kernel's output against the fp32 reference
    (one rounding of the output, plus 16-bit operands of the dots)."""
    return {torch.float32: {"atol": 1e-4, "rtol": 1e-4},
            torch.float16: {"atol": 4e-3, "rtol": 4e-3},
            torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}[dtype]

