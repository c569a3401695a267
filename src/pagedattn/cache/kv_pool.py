"""The KV pool: one preallocated tensor per device holding every layer's pages.

Layout ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``: per layer, K and V
are ``[num_blocks, block_size, Hkv, D]`` views, the layout the kernels read (a page of one
head is ``block_size`` rows of ``head_dim`` contiguous elements).

With ``kv_cache_dtype="fp8"`` the pages are ``torch.float8_e4m3fn``: one byte an element, so
the same memory holds twice the tokens of a 16-bit pool.  A page then holds ``x / scale``
(clamped to e4m3's +-448 and rounded to nearest even), read back as ``page * scale``, with one
float32 scale per layer for K and one for V (the attention layers own them; 1.0 unless the
checkpoint has ``k_scale``/``v_scale`` tensors).  Block moves (copy-on-write, swaps, zeroing)
go through byte views, so they are the same code whatever the element type.

The CPU pool has the same layout, in pinned memory when the device is CUDA, and receives
swapped-out pages.  Swaps are batched (one gather + one transfer + one scatter for any number
of blocks) and, on CUDA, run on a side stream that the compute stream waits on only where it
must.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # e4m3fn's largest finite value (it has no infinity: 480 would be NaN)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` as e4m3 pages hold it: ``clamp(x / scale, -448, 448)`` rounded to nearest even
    (the clamp keeps outliers finite: a cast of a larger value would give NaN)."""
    return (x.float() / scale).clamp_(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)


def dequantize(pages: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Pages (any dtype) as float32: fp8 ones times their ``scale`` (None: 1.0)."""
    out = pages.float()
    return out * scale if is_fp8(pages.dtype) and scale is not None else out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A one-byte-element tensor as uint8 (the same memory): torch's CPU index ops
    (index_copy_, index_fill_) have no float8 kernels, and moving pages needs none."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def gather_pages(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """``cache.index_select(0, pages)``, through bytes for one-byte (fp8) pages."""
    raw = as_bytes(cache)
    out = raw.index_select(0, pages)
    return out if raw is cache else out.view(cache.dtype)  # one op less per call where no bytes were viewed


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    """One scatter per tensor: ``cache.view(N*bs, H, D)[slot_mapping] = k``; into fp8 caches
    ``quantize_fp8(k, k_scale)`` (scales None: 1.0)."""
    n, bs, h, d = k_cache.shape
    if is_fp8(k_cache.dtype):
        one = torch.ones((), device=k.device)
        k = as_bytes(quantize_fp8(k, one if k_scale is None else k_scale))
        v = as_bytes(quantize_fp8(v, one if v_scale is None else v_scale))
    elif k.dtype != k_cache.dtype:
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    as_bytes(k_cache).view(n * bs, h, d).index_copy_(0, slot_mapping, k)
    as_bytes(v_cache).view(n * bs, h, d).index_copy_(0, slot_mapping, v)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not self.dtype.is_floating_point or (self.itemsize == 1 and not is_fp8(self.dtype)):
            raise ValueError(f"KV cache dtype must be a float type (of 8 bits: {FP8_KV_DTYPE}), got {self.dtype}")

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer: what a pool of ``n`` bytes holds ``n /`` of."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    def blocks_for_bytes(self, budget_bytes: int, what: str = "KV cache budget") -> int:
        """How many blocks fit in ``budget_bytes``; a budget below one block is an error."""
        n = int(budget_bytes) // self.bytes_per_block
        if n < 1:
            raise ValueError(
                f"{what} of {int(budget_bytes)} bytes is smaller than one KV block "
                f"({self.bytes_per_block} bytes = 2 x {self.num_layers} layers x {self.block_size} tokens "
                f"x {self.num_kv_heads} heads x {self.head_dim} dims x {self.dtype})"
            )
        return n


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros``, but on the CPU without writing the memory: the pages come from the
    kernel already zero (calloc) and are touched only when used, so a pool of gigabytes costs
    nothing at start-up (torch.zeros spent 1.6 s on 2 GiB on a 2-core CPU)."""
    one_byte = torch.empty((), dtype=dtype).element_size() == 1
    if device.type != "cpu":  # one-byte (fp8) elements are zeroed as bytes: no fill kernel needs the type
        return torch.zeros(shape, dtype=torch.uint8 if one_byte else dtype, device=device).view(dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, np.uint8)).view(dtype).view(shape)


class KVCachePool:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str = "cpu",
                 num_cpu_blocks: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be >= 0, got {num_cpu_blocks}")
        self.spec = spec
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        self.num_cpu_blocks = num_cpu_blocks
        shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        # Zeroed, so no slot ever holds NaN/Inf: kernels may load unwritten slots under a mask.
        self.kv = _zeros(shape, spec.dtype, self.device)
        on_cuda = self.device.type == "cuda"
        cpu_shape = (spec.num_layers, 2, num_cpu_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.cpu_kv = torch.empty(cpu_shape, dtype=spec.dtype, pin_memory=on_cuda and num_cpu_blocks > 0)
        # Byte views of both pools (the same memory): every block move goes through them.
        self._kv_bytes, self._cpu_bytes = as_bytes(self.kv), as_bytes(self.cpu_kv)
        self._swap_stream = torch.cuda.Stream(self.device) if on_cuda else None
        # Host-side scatters that wait for a device->host transfer still in flight.
        self._pending_out: list[tuple[torch.cuda.Event, torch.Tensor, torch.Tensor]] = []
        self._keepalive: list[tuple[torch.cuda.Event, torch.Tensor]] = []

    @classmethod
    def from_budget(cls, spec: KVCacheSpec, budget_bytes: int, device: torch.device | str = "cpu",
                    cpu_budget_bytes: int = 0) -> KVCachePool:
        num_cpu = int(cpu_budget_bytes) // spec.bytes_per_block
        return cls(spec, spec.blocks_for_bytes(budget_bytes), device, num_cpu)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of layer ``i``, each ``[num_blocks, block_size, Hkv, D]``."""
        return self.kv[i, 0], self.kv[i, 1]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # ------------------------------------------------------------------ writes
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """Store new K/V ``[T, Hkv, D]`` into their slots: one scatter per tensor (fp8 pages:
        quantized with the scales, see :func:`store_kv_ref`)."""
        kc, vc = self.layer(layer)
        store_kv_ref(k, v, kc, vc, slot_mapping, k_scale, v_scale)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: ``dst <- src`` for every pair, all layers, one gather + one scatter."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        self._kv_bytes.index_copy_(2, dst, self._kv_bytes.index_select(2, src))

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero these device blocks in every layer (after throwaway writes: the start-up warm-up)."""
        if blocks:
            self._kv_bytes.index_fill_(2, torch.tensor(blocks, device=self.device), 0)

    def read_block(self, block: int, on_cpu: bool = False) -> torch.Tensor:
        """All layers' K and V of one block (a copy), ``[L, 2, bs, Hkv, D]``; for tests and viz."""
        self.sync_swaps()
        return (self.cpu_kv if on_cpu else self.kv)[:, :, block].clone()

    # ------------------------------------------------------------------ swaps
    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to CPU blocks, ``(gpu_block, cpu_block)`` pairs.

        On CUDA the gather and the transfer run on the swap stream; the compute stream waits
        for the gather only (so the device blocks can be reused at once), and the host scatter
        into the CPU pool is finished lazily by :meth:`sync_swaps`.
        """
        if not pairs:
            return
        gidx = torch.tensor([p[0] for p in pairs], device=self.device)
        cidx = torch.tensor([p[1] for p in pairs])
        if self._swap_stream is None:
            self._cpu_bytes.index_copy_(2, cidx, self._kv_bytes.index_select(2, gidx).cpu())
            return
        main = torch.cuda.current_stream(self.device)
        self._swap_stream.wait_stream(main)  # the pages must be fully written first
        with torch.cuda.stream(self._swap_stream):
            staged = self._kv_bytes.index_select(2, gidx)
            gathered = torch.cuda.Event()
            gathered.record()
            host = torch.empty(staged.shape, dtype=staged.dtype, pin_memory=True)
            host.copy_(staged, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        staged.record_stream(self._swap_stream)
        main.wait_event(gathered)
        self._pending_out.append((done, host, cidx))

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy CPU blocks back to device blocks, ``(cpu_block, gpu_block)`` pairs."""
        if not pairs:
            return
        self.sync_swaps()
        cidx = torch.tensor([p[0] for p in pairs])
        gidx = torch.tensor([p[1] for p in pairs], device=self.device)
        if self._swap_stream is None:
            self._kv_bytes.index_copy_(2, gidx, self._cpu_bytes.index_select(2, cidx).to(self.device))
            return
        host = torch.empty(
            (self.cpu_kv.shape[0], 2, len(pairs), *self.cpu_kv.shape[3:]), dtype=self._cpu_bytes.dtype,
            pin_memory=True
        )
        torch.index_select(self._cpu_bytes, 2, cidx, out=host)
        main = torch.cuda.current_stream(self.device)
        self._swap_stream.wait_stream(main)  # the destination blocks may have been in use
        with torch.cuda.stream(self._swap_stream):
            dev = host.to(self.device, non_blocking=True)
            self._kv_bytes.index_copy_(2, gidx, dev)
            done = torch.cuda.Event()
            done.record()
        dev.record_stream(self._swap_stream)
        main.wait_event(done)
        self._keepalive.append((done, host))

    def sync_swaps(self) -> None:
        """Finish host-side work of transfers still in flight (cheap if they are done)."""
        for done, host, cidx in self._pending_out:
            done.synchronize()
            self._cpu_bytes.index_copy_(2, cidx, host)
        self._pending_out.clear()
        self._keepalive = [(e, t) for e, t in self._keepalive if not e.query()]
