"""Fused elementwise ops of the decoder: torch references, Triton kernels and the dispatcher.

A decode step of a small model is memory-light but launch-heavy: written as torch ops, one
layer's RMSNorms, residual adds, q/k norms, rotary and SiLU-and-mul are ~50 kernels, each
reading and writing a few hundred KB.  Here each group is one kernel:

* :func:`fused_add_rms_norm` -- ``residual = x + residual; normed = rms_norm(residual)`` in
  one pass (the vLLM layout: the decoder carries the residual stream separately), and plain
  :func:`rms_norm`;
* :func:`qk_norm_rope` -- per-head RMSNorm of q and k (Qwen3; skipped for the other
  families) and NeoX rotary, reading the fused qkv projection output;
* :func:`silu_and_mul` -- ``silu(gate) * up`` over the fused gate/up output;
* Gemma's RMSNorm, ``x / rms(x) * (1 + weight)`` with one rounding at the end
  (:func:`gemma_rms_norm`, :func:`fused_add_gemma_rms_norm`, and ``unit_offset`` of
  :func:`qk_norm_rope`): the same kernels with the weight taken as an offset from one;
* :func:`gelu_and_mul` -- ``gelu(gate) * up`` (GeGLU), the same kernel as SiLU's with another
  activation.

Numerics.  The torch references are the model's original code (HF-exact in fp32 on the CPU).
The kernels do their math in fp32 but round to the activation dtype wherever the torch code
materialises a tensor in that dtype (the normalised value before the weight multiply, each
rotary product, the SiLU before the multiply), so with bf16/fp16 they agree with the torch
code to the last bit except where fp32 summation order or ``rsqrt``/``exp`` ulps tip a
rounding; in fp32 they agree to a few ulps.

Dispatch: the Triton kernels run when the tensor is on CUDA, triton imports and
``PAGEDATTN_DISABLE_FUSED`` is unset (``1`` gives the torch path, for A/B timing); everything
else (the CPU path above all) runs the torch references.  The kernels run on CPU tensors only
under the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported), for tests.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..envs import DISABLE_FUSED, switches

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the torch references serve every call
    triton = None
    tl = None

DISABLE_ENV = DISABLE_FUSED


# ---------------------------------------------------------------------- dispatch
def fused_kernels_enabled() -> bool:
    """Triton is importable and the fused kernels are not switched off by the environment."""
    if triton is None:
        return False
    return not switches().disable_fused


def use_triton(x: torch.Tensor) -> bool:
    """Whether the ops below run their Triton kernel on ``x`` (CUDA tensors only)."""
    return x.is_cuda and fused_kernels_enabled()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` over the last dim."""
    return rms_norm_triton(x, weight, eps) if use_triton(x) else rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``."""
    if use_triton(x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * (1 + weight)`` over the last dim, in fp32, rounded once."""
    if use_triton(x):
        return _launch_rms_norm(x, None, weight, eps, unit_offset=True)[0]
    return gemma_rms_norm_ref(x, weight, eps)


def fused_add_gemma_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gemma_rms_norm(x + residual), x + residual)``."""
    if use_triton(x):
        out, res_out = _launch_rms_norm(x, residual, weight, eps, unit_offset=True)
        assert res_out is not None
        return out, res_out
    residual = x + residual
    return gemma_rms_norm_ref(residual, weight, eps), residual


def qk_norm_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[T, Hq, D]`` and k ``[T, Hkv, D]`` from ``qkv [T, (Hq + 2 Hkv) D]``: per-head RMSNorm
    when the weights are given (Gemma's with ``unit_offset``), then rotary with ``cos``/``sin``
    ``[T, 1, R/2]`` on the first ``R`` features of each head (``R < D``: partial rotary, which
    only the torch code does)."""
    if use_triton(qkv) and 2 * cos.shape[-1] * (num_heads + 2 * num_kv_heads) == qkv.shape[1]:
        return qk_norm_rope_triton(qkv, cos, sin, num_heads, num_kv_heads, q_weight, k_weight, eps, unit_offset)
    return qk_norm_rope_ref(qkv, cos, sin, num_heads, num_kv_heads, q_weight, k_weight, eps, unit_offset)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for the fused gate/up output ``[T, 2I]``."""
    return silu_and_mul_triton(x) if use_triton(x) else silu_and_mul_ref(x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(x[..., :I]) * x[..., I:]`` (GeGLU; ``approximate`` as ``F.gelu``'s: "tanh", as
    ``gelu_pytorch_tanh`` computes it, or "none") for the fused gate/up output ``[T, 2I]``."""
    return gelu_and_mul_triton(x, approximate) if use_triton(x) else gelu_and_mul_ref(x, approximate)


# ---------------------------------------------------------------------- torch references
@functools.cache
def _cpu_scalar(value: float) -> torch.Tensor:
    """``value`` as a 0-dim fp32 CPU tensor, made once: adding it skips wrapping a Python number."""
    return torch.tensor(value, dtype=torch.float32, device="cpu")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm``: normalise in fp32, cast back, then the weight multiply."""
    dtype = x.dtype
    if x.is_cpu and dtype == torch.float32 and weight.dtype == torch.float32:
        # The same ops in fewer calls, for a CPU decode step pays per call, not per element:
        # both casts are no-ops, ``x * x`` is what ``pow(2)`` computes, eps is added from a
        # cached fp32 scalar tensor (the value a Python float is rounded to) in place, and the
        # weight multiplies in place (the same product: multiplication commutes).
        var = (x * x).mean(-1, keepdim=True).add_(_cpu_scalar(eps)).rsqrt_()
        return (x * var).mul_(weight)
    if x.is_cpu and weight.dtype == dtype:
        # ``F.rms_norm`` without a weight is, on the CPU, ``h * rsqrt(mean(h ** 2) + eps)`` on the
        # fp32 ``h``: the lines below (and their bits) in one call.  The weight multiplies after
        # the cast, in place: the same product.
        return F.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps).to(dtype).mul_(weight)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def gemma_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Gemma2RMSNorm``/``Gemma3RMSNorm``: normalise in fp32, multiply by ``1 + weight`` in fp32,
    cast back once (Llama's casts before the weight multiply)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # ``x + residual`` in the activation dtype, the same sum HF's ``residual + hidden`` forms.
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` (NeoX half-split layout, as HF Llama) by ``cos``/``sin`` ``[T, 1, D/2]``.

    HF's ``x * cat(c, c) + rotate_half(x) * cat(s, s)`` with ``rotate_half(x) = cat(-x2, x1)``,
    its sign moved into the table: ``roll(x, D/2) * cat(-s, s)`` holds the same products
    (negation is exact), so the result is bit-identical.  Four kernels on ``x`` and three on
    the small tables, in fewer calls than per-half products and a concatenation: on a CPU, where
    a decode step's tensors are tiny, the call count is the cost.

    Tables narrower than the head (``[T, 1, R/2]``, ``R < D``) rotate the first ``R`` features and
    pass the rest through, as transformers' partial rotary (Phi-3 family) does.
    """
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    cos2 = torch.cat((cos, cos), dim=-1)
    sin2 = torch.cat((-sin, sin), dim=-1)
    return (x * cos2).add_(x.roll(x.shape[-1] // 2, -1).mul_(sin2))


def qk_norm_rope_ref(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    t = qkv.shape[0]
    head_dim = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if q_weight is not None and k_weight is not None:
        norm = gemma_rms_norm_ref if unit_offset else rms_norm_ref
        q = norm(qkv[:, :q_size].view(t, num_heads, head_dim), q_weight, eps)
        k = norm(qkv[:, q_size : q_size + kv_size].view(t, num_kv_heads, head_dim), k_weight, eps)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    # q and k heads are adjacent in the fused output: rotate them in one go.
    qk = apply_rotary(qkv.narrow(1, 0, q_size + kv_size).view(t, num_heads + num_kv_heads, head_dim), cos, sin)
    return qk.narrow(1, 0, num_heads), qk.narrow(1, num_heads, num_kv_heads)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    # In place on SiLU's fresh output: one [T, I] tensor less to allocate (and fault in, for
    # a prefill's megabytes), the same numbers as ``F.silu(gate) * up``.
    return F.silu(x.narrow(-1, 0, n)).mul_(x.narrow(-1, n, n))


def gelu_and_mul_ref(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    n = x.shape[-1] // 2
    # In place on GELU's fresh output, the same numbers as ``act(gate) * up``.
    return F.gelu(x.narrow(-1, 0, n), approximate=approximate).mul_(x.narrow(-1, n, n))


# ---------------------------------------------------------------------- checks shared by the launchers
# (and by the fused all-reduce's, in distributed/all_reduce.py)
def require_triton() -> None:
    if triton is None:
        raise ImportError("the fused Triton kernels need triton; install it or run on the CPU path")


def check_last_dim(name: str, x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dim, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim")


def check_weight(name: str, weight: torch.Tensor, size: int, x: torch.Tensor) -> None:
    if tuple(weight.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{name} is on {weight.device}, the activations on {x.device}")
    if not weight.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, n]`` (a view whenever the leading dims allow it)."""
    return x.reshape(-1, x.shape[-1])


def norm_warps(block: int) -> int:
    # ~8 elements per thread up to 16 warps: 16-byte vector loads of bf16, no spills.
    return min(16, max(4, block // 256))


# ---------------------------------------------------------------------- Triton kernels
if triton is not None:
    from ..kernels.w4a16 import silu_mul

    @triton.jit
    def _round(x, DTYPE: tl.constexpr):
        """``x`` (fp32) rounded to ``DTYPE`` and back: where the torch code stores an
        intermediate tensor in the activation dtype (a no-op for fp32)."""
        return x.to(DTYPE).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(
        X, Res, W, Out, ResOut,
        stride_x, stride_r, stride_o, stride_ro,
        n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, UNIT_OFFSET: tl.constexpr,
    ):
        # One program per row: the row stays in registers between the sum of squares and the
        # scaling, so it is read once and written once (twice with the residual).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
        add_rms_norm_row(x, Res, W, Out, ResOut, row, offs, mask, stride_r, stride_o, stride_ro, n_cols, eps,
                          HAS_RESIDUAL, UNIT_OFFSET)

    @triton.jit
    def add_rms_norm_row(
        x, Res, W, Out, ResOut, row, offs, mask, stride_r, stride_o, stride_ro, n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr,
    ):
        """Row ``row`` of ``(rms_norm(x + residual), x + residual)`` from ``x`` (``[BLOCK]``, the
        activation dtype) already in registers; with ``UNIT_OFFSET`` Gemma's norm (the weight an
        offset from one, the normalised value kept in fp32 through the multiply)."""
        if HAS_RESIDUAL:
            r = tl.load(Res + row * stride_r + offs, mask=mask, other=0.0)
            # The sum rounded to the activation dtype: the residual stream the torch code keeps.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(ResOut + row * stride_ro + offs, x, mask=mask)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=0) / n_cols
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        if UNIT_OFFSET:
            h = h * tl.rsqrt(var + eps)
            w = 1.0 + w
        else:
            h = _round(h * tl.rsqrt(var + eps), x.dtype)
        tl.store(Out + row * stride_o + offs, (w * h).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_heads(
        Src, Dst, W, c, s, n_heads, eps,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
        NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr, DTYPE: tl.constexpr,
    ):
        """RMSNorm (if NORM; Gemma's with UNIT_OFFSET) then rotary of ``n_heads`` consecutive
        heads ``[n_heads, 2 HALF]`` at ``Src``, written to ``Dst``.  ``c``/``s`` are the token's
        ``[BLOCK_HALF]`` cos/sin."""
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_HALF)
        d_mask = offs_d < HALF
        mask = (offs_h < n_heads)[:, None] & d_mask[None, :]
        at = offs_h[:, None] * (2 * HALF) + offs_d[None, :]
        x1 = tl.load(Src + at, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(Src + at + HALF, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
            r = tl.rsqrt(var + eps)[:, None]
            w1 = tl.load(W + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            w2 = tl.load(W + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            if UNIT_OFFSET:  # (x / rms) * (1 + w) in fp32, rounded once
                x1 = _round(x1 * r * (1.0 + w1), DTYPE)
                x2 = _round(x2 * r * (1.0 + w2), DTYPE)
            else:
                x1 = _round(w1 * _round(x1 * r, DTYPE), DTYPE)
                x2 = _round(w2 * _round(x2 * r, DTYPE), DTYPE)
        # Each product and each sum rounded, as the torch ops (x1*cos - x2*sin, ...) store them.
        o1 = _round(x1 * c, DTYPE) - _round(x2 * s, DTYPE)
        o2 = _round(x2 * c, DTYPE) + _round(x1 * s, DTYPE)
        tl.store(Dst + at, o1.to(DTYPE), mask=mask)
        tl.store(Dst + at + HALF, o2.to(DTYPE), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(
        QKV, Cos, Sin, QW, KW, Out,
        stride_qkv, stride_cos, stride_sin, stride_out,
        num_heads, num_kv_heads, eps,
        HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
        NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr,
    ):
        # One program per token: its q heads then its k heads (adjacent in qkv and in Out).
        tok = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_HALF)
        d_mask = offs_d < HALF
        c = tl.load(Cos + tok * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        s = tl.load(Sin + tok * stride_sin + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        src = QKV + tok * stride_qkv
        dst = Out + tok * stride_out
        k_off = num_heads * 2 * HALF
        dtype = Out.dtype.element_ty
        _norm_rope_heads(src, dst, QW, c, s, num_heads, eps, HALF, BLOCK_HQ, BLOCK_HALF, NORM, UNIT_OFFSET, dtype)
        _norm_rope_heads(src + k_off, dst + k_off, KW, c, s, num_kv_heads, eps, HALF, BLOCK_HK, BLOCK_HALF,
                         NORM, UNIT_OFFSET, dtype)

    @triton.jit
    def _gelu(x, TANH: tl.constexpr):
        """F.gelu in fp32: the tanh approximation (``gelu_pytorch_tanh``) or the exact erf form.
        tanh is written with exp (no libdevice, so the interpreter runs it too) as
        ``sign(u) (1 - e) / (1 + e)`` with ``e = exp(-2 |u|)``, which never overflows."""
        if TANH:
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) (x + 0.044715 x^3)
            e = tl.exp(-2.0 * tl.abs(u))
            t = (1.0 - e) / (1.0 + e)
            return 0.5 * x * (1.0 + tl.where(u < 0, -t, t))
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _silu_and_mul_kernel(X, Out, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, ACT: tl.constexpr):
        # ACT: 0 SiLU, 1 GELU (tanh approximation), 2 GELU (erf).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        # The activation is stored in the activation dtype before the multiply, as act(gate) * up does.
        if ACT == 0:
            res = silu_mul(gate, up, Out.dtype.element_ty)  # the int4 GEMV's gated input too
        else:
            res = (_round(_gelu(gate, ACT == 1), Out.dtype.element_ty) * up).to(Out.dtype.element_ty)
        tl.store(Out + row * stride_o + offs, res, mask=mask)


# ---------------------------------------------------------------------- launchers
def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    require_triton()
    check_last_dim("x", x)
    n = x.shape[-1]
    check_weight("weight", weight, n, x)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)}, {residual.dtype}"
            )
        check_last_dim("residual", residual)
    # The weight multiply promotes like torch's ``weight * h`` (the model keeps both in one dtype);
    # Gemma's norm casts back to the activation dtype.
    dtype = x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    x2 = as_rows(x)
    if x2.shape[0] == 0:
        return out, res_out
    r2 = as_rows(residual) if residual is not None else x2
    o2, ro2 = as_rows(out), (as_rows(res_out) if res_out is not None else x2)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, o2, ro2,
        x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
        n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, UNIT_OFFSET=unit_offset,
        num_warps=norm_warps(block),
    )
    return out, res_out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch_rms_norm(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, res_out = _launch_rms_norm(x, residual, weight, eps)
    assert res_out is not None
    return out, res_out


def _check_qk_norm_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
) -> int:
    """Validates the inputs of :func:`qk_norm_rope_triton`; returns the head dim."""
    if num_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"num_heads and num_kv_heads must be >= 1, got {num_heads}, {num_kv_heads}")
    if qkv.dim() != 2 or qkv.shape[1] % (num_heads + 2 * num_kv_heads):
        raise ValueError(
            f"qkv must be [T, (num_heads + 2 num_kv_heads) * head_dim], got {tuple(qkv.shape)} for "
            f"{num_heads} + 2 x {num_kv_heads} heads"
        )
    check_last_dim("qkv", qkv)
    head_dim = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary, got {head_dim}")
    for name, cs in (("cos", cos), ("sin", sin)):
        if tuple(cs.shape) != (qkv.shape[0], 1, head_dim // 2) or cs.stride(-1) != 1:
            raise ValueError(
                f"{name} must be [T, 1, head_dim / 2] = {(qkv.shape[0], 1, head_dim // 2)} and contiguous in its "
                f"last dim, got {tuple(cs.shape)}"
            )
    if (q_weight is None) != (k_weight is None):
        raise ValueError("q_weight and k_weight must be given together (or neither)")
    if q_weight is not None and k_weight is not None:
        for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
            check_weight(name, w, head_dim, qkv)
            if w.dtype != qkv.dtype:
                raise ValueError(f"{name} dtype {w.dtype} differs from the activations' {qkv.dtype}")
    return head_dim


def qk_norm_rope_triton(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    head_dim = _check_qk_norm_rope(qkv, cos, sin, num_heads, num_kv_heads, q_weight, k_weight)
    t = qkv.shape[0]
    # q and k rows of one token side by side, as the attention backend takes them (strided views).
    out = torch.empty(t, num_heads + num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t:
        norm = q_weight is not None
        half = head_dim // 2
        _qk_norm_rope_kernel[(t,)](
            qkv, cos, sin, q_weight if norm else qkv, k_weight if norm else qkv, out,
            qkv.stride(0), cos.stride(0), sin.stride(0), out.stride(0),
            num_heads, num_kv_heads, eps,
            HALF=half, BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(half), NORM=norm, UNIT_OFFSET=unit_offset,
            num_warps=4,
            # Without this LLVM narrows round(x * c) to a bf16 multiply and then contracts
            # "ext(x * c) - s" into one FMA, dropping the rounding the torch code does
            # (a 1-ulp difference in ~25% of bf16 outputs on an H200).
            enable_fp_fusion=False,
        )
    return out[:, :num_heads], out[:, num_heads:]


SILU_BLOCK = 1024  # columns per program


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    return _launch_act_and_mul(x, 0)


def gelu_and_mul_triton(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return _launch_act_and_mul(x, 1 if approximate == "tanh" else 2)


def _launch_act_and_mul(x: torch.Tensor, act: int) -> torch.Tensor:
    require_triton()
    check_last_dim("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even (gate and up halves), got {x.shape[-1]}")
    n = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    x2, o2 = as_rows(x), as_rows(out)
    if x2.shape[0]:
        block = min(SILU_BLOCK, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
            x2, o2, x2.stride(0), o2.stride(0), n, BLOCK=block, ACT=act, num_warps=4,
        )
    return out
