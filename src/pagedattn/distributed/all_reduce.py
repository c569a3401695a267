"""The all-reduce of the row-parallel layers, and a faster one for small tensors on NVLink.

A decode step of a tensor-parallel model all-reduces two activations of ``[tokens, hidden]``
per layer; at decode sizes (a few hundred KiB) an NCCL all-reduce is latency-bound (~20 us on
an H200 pair, whatever the size), which is a large share of a step that is itself only a few
milliseconds.  :class:`P2PAllReduce` does the **one-shot** algorithm instead: every rank copies
its tensor into a buffer the other GPUs can address (torch's symmetric memory, peer-to-peer
over NVLink), waits at a barrier of signal flags, and reads and sums all the buffers itself.
One kernel, one barrier, ``world_size - 1`` peer reads: the least latency there is, at the cost
of every rank reading everything, so it is used up to ``max_bytes`` and NCCL above.  It does
not use NVLink multicast (``multimem`` instructions).

Both are captured by CUDA graphs.  One buffer serves every call: the kernel ends with a second
barrier, so no rank's next call overwrites its buffer while a peer is still reading it.
"""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

from ..models.layers import AllReduce, process_group_all_reduce

logger = logging.getLogger(__name__)

# A/B switch: the engine keeps NCCL for every all-reduce when set.
DISABLE_ENV = "PAGEDATTN_DISABLE_P2P_ALL_REDUCE"
# One-shot reads world_size x the bytes on every rank; past a few MiB NCCL's ring is faster.
DEFAULT_MAX_BYTES = 4 << 20
_DTYPES = (torch.float32, torch.bfloat16)
_ALIGN = 16  # bytes: the one-shot kernel moves 16-byte vectors
# torch pairs the ranks of a symmetric-memory rendezvous by a per-process sequence number, so
# ranks must have made equally many: a second engine in a process whose first one used P2P
# memory has fresh workers, which could never pair with it (they fall back to NCCL instead).
_rendezvous_count = 0


class P2PAllReduce:
    """One-shot all-reduce through peer-to-peer symmetric memory for tensors of ``dtype`` up to
    ``max_bytes``; anything else goes to ``fallback``.  Build it with :meth:`create`."""

    def __init__(self, buffer: torch.Tensor, group_name: str, fallback: AllReduce = process_group_all_reduce) -> None:
        self.buffer = buffer  # 1-D, in symmetric memory
        self.group_name = group_name
        self.max_bytes = buffer.numel() * buffer.element_size()
        self.dtype = buffer.dtype
        self.fallback = fallback

    @classmethod
    def create(cls, device: torch.device, dtype: torch.dtype,
               max_bytes: int = DEFAULT_MAX_BYTES) -> P2PAllReduce | None:
        """Collective over the default group: every rank gets a working instance, or every rank
        gets None (with the reason logged) and keeps NCCL."""
        world_size = dist.get_world_size()
        places: list[tuple[str, int, int] | None] = [None] * world_size
        here = (socket.gethostname(), device.index if device.type == "cuda" else -1, _rendezvous_count)
        dist.all_gather_object(places, here)
        reason = _unsupported_reason(device, dtype, places)
        inst: P2PAllReduce | None = None
        if reason is None:
            try:
                inst = cls._allocate(device, dtype, max_bytes)
                if not inst.self_test():
                    reason = "its self-test disagreed with NCCL"
            except Exception as e:  # no P2P mapping between these GPUs, a torch without symmetric memory...
                reason = repr(e)
        # Every rank must take the same path, or the collectives no longer pair up.
        flag = torch.tensor([int(reason is None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 1:
            logger.info("all-reduce: one-shot over P2P memory up to %d KiB (%s, %d ranks), NCCL above",
                        max_bytes >> 10, dtype, world_size)
            return inst
        logger.info("all-reduce stays on NCCL: %s", reason or "another rank cannot use P2P memory")
        return None

    @classmethod
    def _allocate(cls, device: torch.device, dtype: torch.dtype, max_bytes: int) -> P2PAllReduce:
        import torch.distributed._symmetric_memory as symm_mem

        global _rendezvous_count

        group = dist.group.WORLD
        assert group is not None
        buf = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        _rendezvous_count += 1
        symm_mem.rendezvous(buf, group)
        return cls(buf, group.group_name)

    def supports(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (x.dtype == self.dtype and x.is_cuda and x.is_contiguous() and 0 < nbytes <= self.max_bytes
                and nbytes % _ALIGN == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.supports(x):
            return self.fallback(x)
        # The copy of x into the shared buffer happens inside the kernel, before its barrier.
        out = torch.ops.symm_mem.one_shot_all_reduce_copy(self.buffer[: x.numel()], x.view(-1), "sum", self.group_name)
        return out.view_as(x)

    def self_test(self) -> bool:
        """One reduction of rank-dependent random data against NCCL's; True if they agree."""
        device = self.buffer.device
        gen = torch.Generator(device=device).manual_seed(1234 + dist.get_rank())
        x = torch.randn(3, 1024, generator=gen, device=device).to(self.dtype)
        got = self(x.clone())
        want = process_group_all_reduce(x.float())
        return bool(torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2))


def _unsupported_reason(device: torch.device, dtype: torch.dtype,
                        places: list[tuple[str, int, int] | None]) -> str | None:
    """Why this rank cannot take part in a one-shot all-reduce (None if it can); ``places``
    holds every rank's (host name, CUDA device index, symmetric-memory rendezvous made so far)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"{DISABLE_ENV} is set"
    if device.type != "cuda":
        return "not on CUDA"
    if dtype not in _DTYPES:
        return f"one-shot all-reduce supports {', '.join(map(str, _DTYPES))}, not {dtype}"
    if not 2 <= len(places) <= 8:
        return f"{len(places)} ranks (one-shot needs 2..8)"
    if len({p[0] for p in places if p is not None}) != 1:
        return "the ranks span several hosts"
    if len({p[2] for p in places if p is not None}) != 1:
        return ("an earlier tensor-parallel engine in this process used P2P memory, and torch cannot pair "
                "its rendezvous with new workers")
    if not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
        return "this torch has no symmetric-memory all-reduce"
    me = device.index if device.index is not None else torch.cuda.current_device()
    others = [p[1] for p in places if p is not None and p[1] != me]
    if not all(torch.cuda.can_device_access_peer(me, o) for o in others):
        return "the GPUs cannot access each other's memory (no P2P)"
    return None
