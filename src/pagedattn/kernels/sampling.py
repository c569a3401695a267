"""Seeded sampling noise: the exponential draws of rows that carry their own seed, all rows in one
launch.

The sampler picks ``argmax(p / q)`` with ``q ~ Exp(1)`` per vocabulary entry.  A seeded row's
``q`` must depend on its seed and on how many tokens it has drawn, never on the batch it runs
in; the shared generator cannot give that, and a generator per row means a launch per row and
step (at batch 256 the host spent more time on those launches than the model on its forward).
So each row's draw has a 63-bit *key* (its seed stream and draw count mixed on the host,
:func:`draw_key`) and its noise is a counter-based function of (key, column):

* **CUDA**: one Triton kernel, Philox-4x32 (``tl.rand``) keyed by the row's key with the column
  as the counter, ``q = -log(1 - u)``.
* **CPU** (and without triton): a ``torch.Generator`` seeded with the key per row, its
  ``exponential_``: the CPU's step is dominated by the model, and the interpreter would be slow.

The two give different (equally valid) streams: a seed reproduces a sample on the same device.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the generator loop runs
    triton = None
    tl = None

_MASK64 = (1 << 64) - 1
BLOCK = 2048  # vocabulary entries per program


def draw_key(stream_key: int, draw: int) -> int:
    """The key of draw number ``draw`` of a seed stream: splitmix64 of the two, 63 bits (a
    valid torch seed and Philox key)."""
    z = (stream_key + 0x9E3779B97F4A7C15 * (draw + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFF_FFFF_FFFF_FFFF


def seeded_exponential_(q: torch.Tensor, rows: list[int], keys: list[int], rows_t: torch.Tensor | None = None,
                        keys_t: torch.Tensor | None = None, use_triton: bool | None = None) -> None:
    """Overwrite rows ``rows`` of ``q [n, V]`` (float32) with Exp(1) noise of their ``keys``.
    ``rows_t`` / ``keys_t``: the same as int64 device tensors (the Triton path; the caller
    uploads them without waiting)."""
    if not rows:
        return
    if use_triton is None:
        use_triton = q.is_cuda and triton is not None
    if not use_triton:
        for i, key in zip(rows, keys):
            q[i].exponential_(generator=torch.Generator(device=q.device).manual_seed(key))
        return
    if rows_t is None or keys_t is None:
        rows_t = torch.tensor(rows, dtype=torch.int64, device=q.device)
        keys_t = torch.tensor(keys, dtype=torch.int64, device=q.device)
    v = q.shape[1]
    _seeded_exponential_kernel[(len(rows), triton.cdiv(v, BLOCK))](q, rows_t, keys_t, v, q.stride(0), BLOCK=BLOCK)


if triton is not None:

    @triton.jit
    def _seeded_exponential_kernel(Q, Rows, Keys, V, stride_q, BLOCK: tl.constexpr):
        """One seeded row (axis 0), ``BLOCK`` of its columns (axis 1)."""
        i = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        row = tl.load(Rows + i)
        key = tl.load(Keys + i)
        u = tl.rand(key, cols)  # [0, 1): 1 - u is never 0
        # Clamped above zero as torch's exponential_ is: q = 0 would make p / q infinite or NaN.
        q = tl.maximum(-tl.log(1.0 - u), 1e-30)
        tl.store(Q + row * stride_q + cols, q, mask=cols < V)
