"""The KV pool: one preallocated tensor per device holding every layer's pages.

Layout ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``: per layer, K and V
are ``[num_blocks, block_size, Hkv, D]`` views, the layout the kernels read (a page of one
head is ``block_size`` rows of ``head_dim`` contiguous elements).

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


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """One scatter per tensor: ``cache.view(N*bs, H, D)[slot_mapping] = k``."""
    n, bs, h, d = k_cache.shape
    if k.dtype != k_cache.dtype:
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(n * bs, h, d).index_copy_(0, slot_mapping, k)
    v_cache.view(n * bs, h, d).index_copy_(0, slot_mapping, v)


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
        if not self.dtype.is_floating_point:
            raise ValueError(f"KV cache dtype must be a float type, got {self.dtype}")

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

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
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
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
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new K/V ``[T, Hkv, D]`` into their slots: one scatter per tensor."""
        kc, vc = self.layer(layer)
        store_kv_ref(k, v, kc, vc, slot_mapping)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: ``dst <- src`` for every pair, all layers, one gather + one scatter."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        self.kv.index_copy_(2, dst, self.kv.index_select(2, src))

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero these device blocks in every layer (after throwaway writes: the start-up warm-up)."""
        if blocks:
            self.kv.index_fill_(2, torch.tensor(blocks, device=self.device), 0)

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
            self.cpu_kv.index_copy_(2, cidx, self.kv.index_select(2, gidx).cpu())
            return
        main = torch.cuda.current_stream(self.device)
        self._swap_stream.wait_stream(main)  # the pages must be fully written first
        with torch.cuda.stream(self._swap_stream):
            staged = self.kv.index_select(2, gidx)
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
            self.kv.index_copy_(2, gidx, self.cpu_kv.index_select(2, cidx).to(self.device))
            return
        host = torch.empty(
            (self.cpu_kv.shape[0], 2, len(pairs), *self.cpu_kv.shape[3:]), dtype=self.cpu_kv.dtype, pin_memory=True
        )
        torch.index_select(self.cpu_kv, 2, cidx, out=host)
        main = torch.cuda.current_stream(self.device)
        self._swap_stream.wait_stream(main)  # the destination blocks may have been in use
        with torch.cuda.stream(self._swap_stream):
            dev = host.to(self.device, non_blocking=True)
            self.kv.index_copy_(2, gidx, dev)
            done = torch.cuda.Event()
            done.record()
        dev.record_stream(self._swap_stream)
        main.wait_event(done)
        self._keepalive.append((done, host))

    def sync_swaps(self) -> None:
        """Finish host-side work of transfers still in flight (cheap if they are done)."""
        for done, host, cidx in self._pending_out:
            done.synchronize()
            self.cpu_kv.index_copy_(2, cidx, host)
        self._pending_out.clear()
        self._keepalive = [(e, t) for e, t in self._keepalive if not e.query()]
