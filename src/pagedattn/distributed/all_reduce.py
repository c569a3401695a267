"""The all-reduce of the row-parallel layers, and a faster one for small tensors on NVLink.

A decode step of a tensor-parallel model all-reduces two activations of ``[tokens, hidden]``
per layer; at decode sizes (a few hundred KiB) an NCCL all-reduce is latency-bound (~14 us in a
CUDA graph on an H200 pair, whatever the size), which is a large share of a step that is itself
only a few milliseconds.  :class:`P2PAllReduce` works on buffers every GPU of the group can
address (torch's symmetric memory, peer-to-peer over NVLink; no NVLink multicast) in two ways:

* **plain sums** (the embedding's): torch's one-shot all-reduce, one kernel that copies the
  tensor into this rank's buffer, waits at a barrier of signal flags, reads and sums every
  rank's buffer, and waits at a second barrier before the buffer can be reused;
* **sums fused with the residual add and RMSNorm** after a row-parallel layer
  (:meth:`P2PAllReduce.add_rms_norm`): the layer's GEMM writes its partial sums straight into
  this rank's buffer (:meth:`P2PAllReduce.partials_buffer`), and one Triton kernel
  (:func:`reduce_add_rms_norm_triton`) waits until every rank's partial sums are in place,
  reads them all from the buffers, sums them in rank order (the same bits on every rank), adds
  the residual and normalises.  No copy, one kernel for what was an all-reduce and a norm.
  The wait is inside the kernel: program ``i`` of each rank announces itself to program ``i``
  of every other rank through flags in symmetric memory and waits for their announcements
  (``_rank_barrier``), which saves the separate barrier kernel of torch's symmetric memory.
  Consecutive fused reductions alternate between two slots of the buffer (:class:`SlotTurns`),
  so one barrier per reduction suffices: a rank can only be writing slot ``s`` again after the
  barrier of the reduction in between, which every peer passes only once done reading slot
  ``s`` (its kernels run in stream order).

Every rank reads every rank's data, so the P2P paths serve tensors up to ``max_bytes`` (plain
sums: ``plain_max_bytes``) and NCCL the larger ones (prefills).  All of it is captured by CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import logging
import socket

import torch
import torch.distributed as dist

from ..envs import DISABLE_P2P_ALL_REDUCE, switches
from ..models.fused_ops import as_rows, check_last_dim, check_weight, fused_kernels_enabled, norm_warps, require_triton
from ..models.layers import AllReduce, process_group_all_reduce

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: no P2P all-reduce (it needs CUDA anyway)
    triton = None
    tl = None

logger = logging.getLogger(__name__)

# A/B switch: the engine keeps NCCL for every all-reduce when set.
DISABLE_ENV = DISABLE_P2P_ALL_REDUCE
# One-shot reads world_size x the bytes on every rank; past a few MiB NCCL's ring is faster
# (with more than two ranks, see p2p_max_bytes).
DEFAULT_MAX_BYTES = 4 << 20
_DTYPES = (torch.float32, torch.bfloat16)
_ALIGN = 16  # bytes: the one-shot kernel moves 16-byte vectors
# torch pairs the ranks of a symmetric-memory rendezvous by a per-process sequence number, so
# ranks must have made equally many: a second engine in a process whose first one used P2P
# memory has fresh workers, which could never pair with it (they fall back to NCCL instead).
_rendezvous_count = 0


def p2p_max_bytes(world_size: int, decode_bytes: int) -> int:
    """The largest tensor the P2P paths take, for decode activations of up to ``decode_bytes``.

    With two ranks a one-shot sum moves as many bytes over each direction of the link as NCCL's
    ring all-reduce (each rank needs the other's whole tensor either way) and the fused path
    saves NCCL's copies and the separate norm kernel, so it takes every decode step the graphs
    capture (at 1024 rows of 4096, bf16: 31.8 us against 57.3 for NCCL and the norm, 2x H200).
    The plain sums stay at DEFAULT_MAX_BYTES whatever this says (torch's one-shot kernel, with
    its copy-in and two barriers, took 74 us at 8 MiB against NCCL's 54).  With more ranks
    one-shot reads ``world_size - 1`` times the tensor on every rank against the ring's
    ``2 (world_size - 1) / world_size``: it stays at DEFAULT_MAX_BYTES."""
    if world_size == 2:
        return max(DEFAULT_MAX_BYTES, -(-decode_bytes // _ALIGN) * _ALIGN)
    return DEFAULT_MAX_BYTES


class SlotTurns:
    """Which of the two slots of the fused reductions the next partial sums go to.

    The fused kernel's barrier only tells a rank that every peer has *arrived*, not that a peer
    is done reading: a rank may write its next partial sums while a peer still reads the
    previous ones, so consecutive fused reductions take turns between two slots.  Any other
    all-reduce in between is a full barrier (it cannot finish before every peer's earlier
    kernels have), after which both slots are free: once no partial sums are waiting for their
    reduction, the turns start again at slot 0.  So every forward pass, which opens with the
    embedding's plain sum, hands out the same slots whatever ran before it -- the ones its
    CUDA graphs captured."""

    def __init__(self) -> None:
        self.next = 0
        self.pending = 0  # handed out, not reduced yet

    def take(self) -> int:
        slot, self.next = self.next, self.next ^ 1
        self.pending += 1
        return slot

    def reduced(self) -> None:
        self.pending = max(0, self.pending - 1)

    def barrier(self) -> None:
        if not self.pending:
            self.next = 0


class P2PAllReduce(AllReduce):
    """All-reduce through peer-to-peer symmetric memory for tensors of ``dtype`` up to
    ``max_bytes`` (see the module notes); anything else goes to the process group's all-reduce
    (NCCL).  Build it with :meth:`create`.

    ``buffer`` (1-D, in symmetric memory, ``3 * max_bytes``) holds three slots: the plain sums'
    and the two of the fused reductions, which it hands out in turns (:class:`SlotTurns`);
    ``handle`` is its rendezvous handle.  ``flags`` (int64 ``[world, max_programs]``, in
    symmetric memory, zeroed before its rendezvous) and its handle serve the fused kernel's own
    barrier, whose grid is at most ``max_programs`` (the smallest SM count of the group: every
    rank must launch the same grid)."""

    def __init__(self, buffer: torch.Tensor, handle: object, group_name: str, flags: torch.Tensor,
                 flags_handle: object, max_programs: int) -> None:
        self.buffer = buffer
        self.handle = handle
        self.group_name = group_name
        self.dtype = buffer.dtype
        self.turns = SlotTurns()
        self._flags = flags  # held: peers write into it for as long as this instance serves
        flag_ptrs: list[int] = list(flags_handle.buffer_ptrs)  # type: ignore[attr-defined]
        self._barrier = RankBarrier(torch.tensor(flag_ptrs, dtype=torch.int64, device=buffer.device),
                                    handle.rank, max_programs)  # type: ignore[attr-defined]
        self.slot_numel = buffer.numel() // 3
        self.max_bytes = self.slot_numel * buffer.element_size()
        self.plain_max_bytes = min(self.max_bytes, DEFAULT_MAX_BYTES)  # see p2p_max_bytes
        slot_bytes = self.max_bytes
        # Where each rank's slots 0 and 1 of the fused reductions are, as this GPU addresses
        # them: the same offset into every rank's allocation (that is what symmetric means).
        ptrs: list[int] = list(handle.buffer_ptrs)  # type: ignore[attr-defined]
        offset = buffer.data_ptr() - ptrs[handle.rank]  # type: ignore[attr-defined]
        self._fused_ptrs = [[p + offset + (1 + s) * slot_bytes for p in ptrs] for s in (0, 1)]
        self._fused_tables = torch.tensor(self._fused_ptrs, dtype=torch.int64, device=buffer.device)  # [2, world]

    @classmethod
    def create(cls, device: torch.device, dtype: torch.dtype,
               max_bytes: int = DEFAULT_MAX_BYTES) -> P2PAllReduce | None:
        """Collective over the default group: every rank gets a working instance, or every rank
        gets None (with the reason logged) and keeps NCCL."""
        world_size = dist.get_world_size()
        places: list[tuple[str, int, int, bool, int] | None] = [None] * world_size
        on_cuda = device.type == "cuda"
        here = (socket.gethostname(), device.index if on_cuda else -1, _rendezvous_count, fused_kernels_enabled(),
                torch.cuda.get_device_properties(device).multi_processor_count if on_cuda else 0)
        dist.all_gather_object(places, here)
        reason = _unsupported_reason(device, dtype, places)
        inst: P2PAllReduce | None = None
        if reason is None:
            try:
                inst = cls._allocate(device, dtype, max_bytes, min(p[4] for p in places if p is not None))
                if not inst.self_test():
                    reason = "its self-test disagreed with NCCL"
            except Exception as e:  # no P2P mapping between these GPUs, a torch without symmetric memory...
                reason = repr(e)
        # Every rank must take the same path, or the collectives no longer pair up.
        flag = torch.tensor([int(reason is None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 1:
            logger.info("all-reduce: over P2P memory up to %d KiB (%s, %d ranks; fused with add + RMSNorm after "
                        "row-parallel layers), NCCL above", max_bytes >> 10, dtype, world_size)
            return inst
        logger.info("all-reduce stays on NCCL: %s", reason or "another rank cannot use P2P memory")
        return None

    @classmethod
    def _allocate(cls, device: torch.device, dtype: torch.dtype, max_bytes: int, max_programs: int) -> P2PAllReduce:
        import torch.distributed._symmetric_memory as symm_mem

        global _rendezvous_count

        group = dist.group.WORLD
        assert group is not None
        numel = max_bytes // dtype.itemsize
        buf = symm_mem.empty(3 * numel, dtype=dtype, device=device)
        flags = symm_mem.empty(group.size() * max_programs, dtype=torch.int64, device=device)
        # Zeroed before the rendezvous, which no rank leaves before every rank has entered it:
        # no peer's first announcement can land before the zeros.
        flags.zero_()
        torch.cuda.synchronize(device)
        _rendezvous_count += 1
        handle = symm_mem.rendezvous(buf, group)
        _rendezvous_count += 1
        flags_handle = symm_mem.rendezvous(flags, group)
        return cls(buf, handle, group.group_name, flags, flags_handle, max_programs)

    def supports(self, x: torch.Tensor) -> bool:
        """Whether the plain sum of ``x`` runs one-shot over P2P memory (else NCCL)."""
        nbytes = x.numel() * x.element_size()
        return (x.dtype == self.dtype and x.is_cuda and x.is_contiguous() and 0 < nbytes <= self.plain_max_bytes
                and nbytes % _ALIGN == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.supports(x):
            out = super().__call__(x)
            self.turns.barrier()  # NCCL's sum is a barrier too
            return out
        # The copy of x into the shared buffer (slot "plain", at offset 0) happens inside the
        # kernel, before its barrier.
        out = torch.ops.symm_mem.one_shot_all_reduce_copy(self.buffer[: x.numel()], x.view(-1), "sum", self.group_name)
        self.turns.barrier()
        return out.view_as(x)

    def partials_buffer(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor | None:
        n = rows * cols
        if dtype != self.dtype or not 0 < n <= self.slot_numel or not fused_kernels_enabled():
            return None
        start = (1 + self.turns.take()) * self.slot_numel
        return self.buffer[start : start + n].view(rows, cols)

    def add_rms_norm(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self._fused_slot(partial)
        if slot is not None:
            self.turns.reduced()
        if slot is None or residual.shape != partial.shape or residual.dtype != partial.dtype:
            return super().add_rms_norm(partial, residual, weight, eps)
        return self._reduce(slot, residual.contiguous(), weight, eps)

    def _reduce(self, slot: int, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused reduction of every rank's partial sums in ``slot``; the kernel waits for the peers."""
        return reduce_add_rms_norm_triton(self._fused_tables[slot], residual, weight, eps, self._barrier)

    def _fused_slot(self, partial: torch.Tensor) -> int | None:
        """The slot ``partial`` was written into by :meth:`partials_buffer` (None: elsewhere)."""
        if partial.dim() != 2 or not partial.is_contiguous() or partial.dtype != self.dtype:
            return None
        ptr = partial.data_ptr()
        mine = self.handle.rank  # type: ignore[attr-defined]
        for slot in (0, 1):
            if ptr == self._fused_ptrs[slot][mine]:
                return slot
        return None

    def self_test(self) -> bool:
        """A plain and a fused reduction of rank-dependent random data against NCCL's; True if
        they agree."""
        device = self.buffer.device
        gen = torch.Generator(device=device).manual_seed(1234 + dist.get_rank())
        x = torch.randn(3, 1024, generator=gen, device=device).to(self.dtype)
        ok = torch.allclose(self(x.clone()).float(), process_group_all_reduce(x.float()), rtol=1e-2, atol=1e-2)
        buf = self.partials_buffer(3, 1024, self.dtype)
        if buf is not None:
            same = torch.Generator(device=device).manual_seed(99)  # the residual stream is replicated
            residual = torch.randn(3, 1024, generator=same, device=device).to(self.dtype)
            weight = torch.rand(1024, generator=same, device=device).to(self.dtype) + 0.5
            buf.copy_(x)
            got = self.add_rms_norm(buf, residual, weight, 1e-6)
            want = process_group_all_reduce.add_rms_norm(x.clone(), residual, weight, 1e-6)
            ok = ok and all(torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2) for g, w in zip(got, want))
        return bool(ok)


def _unsupported_reason(device: torch.device, dtype: torch.dtype,
                        places: list[tuple[str, int, int, bool, int] | None]) -> str | None:
    """Why this rank cannot take part in a P2P all-reduce (None if it can); ``places`` holds every
    rank's (host name, CUDA device index, symmetric-memory rendezvous made so far, whether the
    fused Triton kernels run, SM count)."""
    if switches().disable_p2p_all_reduce:
        return f"{DISABLE_ENV} is set"
    if device.type != "cuda":
        return "not on CUDA"
    if dtype not in _DTYPES:
        return f"one-shot all-reduce supports {', '.join(map(str, _DTYPES))}, not {dtype}"
    if not 2 <= len(places) <= 8:
        return f"{len(places)} ranks (one-shot needs 2..8)"
    if len({p[0] for p in places if p is not None}) != 1:
        return "the ranks span several hosts"
    if len({p[3] for p in places if p is not None}) != 1:
        # One rank reducing through the fused kernel and another through the plain sum would
        # wait for each other at different barriers.
        return "the ranks disagree on whether the fused Triton kernels run (PAGEDATTN_DISABLE_FUSED)"
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


# ---------------------------------------------------------------------- the fused reduction
if triton is not None:
    from ..models.fused_ops import add_rms_norm_row

    @triton.jit
    def _rank_barrier(Flags, pid, ME: tl.constexpr, WORLD: tl.constexpr, MAX_PROGRAMS: tl.constexpr):
        """Program ``pid`` meets program ``pid`` of every other rank: it returns once each of
        them has reached this point in the same reduction, so what they wrote before (their
        partial sums) is visible here.

        ``Flags`` holds WORLD addresses of every rank's int64 ``[WORLD, MAX_PROGRAMS]`` flags.  In
        rank ``me``'s flags, row ``s != me`` holds the latest epoch rank ``s``'s programs
        announced, and row ``me`` its own programs' epoch counters: every reduction bumps the
        counter of each program that runs.  The ranks launch the same grids in the same order,
        so program ``pid``'s epoch agrees across ranks, and a flag that has moved past the
        epoch awaited (a fast peer already in its next reduction) also means "arrived".  The
        counter lives in device memory, not in a kernel argument, so a CUDA graph replays this
        correctly.  The release store (after the CTA barrier, so it covers every thread's
        earlier writes) and the acquire loads are at system scope: the flags are written over
        NVLink."""
        mine = tl.load(Flags + ME).to(tl.pointer_type(tl.int64))
        epoch = tl.load(mine + ME * MAX_PROGRAMS + pid) + 1
        tl.store(mine + ME * MAX_PROGRAMS + pid, epoch)
        tl.debug_barrier()
        for r in tl.static_range(WORLD):
            if r != ME:
                peer = tl.load(Flags + r).to(tl.pointer_type(tl.int64))
                tl.atomic_xchg(peer + ME * MAX_PROGRAMS + pid, epoch, sem="release", scope="sys")
        for r in tl.static_range(WORLD):
            if r != ME:
                while tl.atomic_add(mine + r * MAX_PROGRAMS + pid, 0, sem="acquire", scope="sys") < epoch:
                    pass
        tl.debug_barrier()

    # The row count is the step's token count: unspecialised, one compile for every step size.
    @triton.jit(do_not_specialize=("n_rows",))
    def _reduce_add_rms_norm_kernel(
        Parts, Flags, Res, W, Out, ResOut,
        n_rows, stride_r, stride_o, stride_ro,
        n_cols, eps,
        WORLD: tl.constexpr, BLOCK: tl.constexpr,
        SYNC: tl.constexpr, ME: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    ):
        # ``Parts`` holds WORLD addresses of contiguous ``[rows, n_cols]`` partial sums (the
        # ranks' buffers, peers' ones mapped into this GPU's address space).  They are summed
        # in fp32 in rank order, so every rank computes the same bits, and rounded to the
        # activation dtype as an all-reduce's result is, before the residual add.  With SYNC
        # the grid is at most one program per SM (all resident at once, so the spin-waits of
        # the barrier cannot starve a peer's program of its turn) and each program takes rows
        # pid, pid + grid, ...; without it, one program per row.
        pid = tl.program_id(0)
        if SYNC:
            _rank_barrier(Flags, pid, ME, WORLD, MAX_PROGRAMS)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        dtype = Res.dtype.element_ty
        # int64 rows (from an int64 start): offsets past 2**31 elements stay right.
        for row64 in range(pid.to(tl.int64), n_rows, tl.num_programs(0)):
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for r in tl.static_range(WORLD):
                part = tl.load(Parts + r).to(tl.pointer_type(dtype))
                acc += tl.load(part + row64 * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
            add_rms_norm_row(acc.to(dtype), Res, W, Out, ResOut, row64, offs, mask, stride_r, stride_o, stride_ro,
                             n_cols, eps, True, False)


@dataclasses.dataclass(frozen=True)
class RankBarrier:
    """What :func:`reduce_add_rms_norm_triton` needs to wait for the other ranks itself: ``flags``
    (int64 ``[world]`` on the device: the address of every rank's int64 ``[world,
    max_programs]`` flags, zeroed before first use, as every GPU addresses them), this rank's
    index, and the grid's cap (at most the number of SMs, so all programs are resident)."""

    flags: torch.Tensor
    rank: int
    max_programs: int

    def __post_init__(self) -> None:
        if self.flags.dim() != 1 or self.flags.dtype != torch.int64:
            raise ValueError(f"flags must be a 1-D int64 tensor of addresses, got {tuple(self.flags.shape)} "
                             f"{self.flags.dtype}")
        if not 0 <= self.rank < self.flags.numel():
            raise ValueError(f"rank {self.rank} is not one of the {self.flags.numel()} ranks")
        if self.max_programs < 1:
            raise ValueError(f"max_programs must be positive, got {self.max_programs}")


def reduce_add_rms_norm_triton(parts: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                               barrier: RankBarrier | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s + residual), s + residual)`` where ``s`` is the sum of the ``[rows, n]``
    tensors (``residual``'s shape and dtype, contiguous) whose addresses ``parts`` (int64
    ``[world]``, on ``residual``'s device) holds: a cross-rank reduction fused with what follows
    it, for tensor-parallel ranks whose partial sums every GPU can read.  Without ``barrier``
    the caller makes sure the partial sums are complete and visible before this runs; with it
    the kernel's programs wait for their peers themselves (see ``_rank_barrier``), every rank
    calling this at the same point with the same shapes."""
    _check_reduction(parts, residual, weight, barrier)
    out = torch.empty(residual.shape, dtype=torch.promote_types(weight.dtype, residual.dtype), device=residual.device)
    res_out = torch.empty_like(residual)
    if residual.numel():
        launch_reduce_add_rms_norm(parts, residual, weight, eps, out, res_out, barrier,
                                   norm_warps(triton.next_power_of_2(residual.shape[-1])))
    return out, res_out


def _check_reduction(parts: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     barrier: RankBarrier | None) -> None:
    require_triton()
    check_last_dim("residual", residual)
    check_weight("weight", weight, residual.shape[-1], residual)
    if parts.dim() != 1 or parts.dtype != torch.int64 or parts.device != residual.device or parts.numel() < 1:
        raise ValueError(f"parts must be a 1-D int64 tensor of addresses on {residual.device}, got "
                         f"{tuple(parts.shape)} {parts.dtype} on {parts.device}")
    if barrier is not None and (barrier.flags.numel() != parts.numel() or barrier.flags.device != parts.device):
        raise ValueError(f"barrier flags must match parts ({parts.numel()} ranks on {parts.device}), got "
                         f"{barrier.flags.numel()} on {barrier.flags.device}")


def launch_reduce_add_rms_norm(parts: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                               out: torch.Tensor, res_out: torch.Tensor, barrier: RankBarrier | None,
                               num_warps: int) -> None:
    """The kernel launch of :func:`reduce_add_rms_norm_triton` on its checked, non-empty
    arguments, into ``out`` and ``res_out``, with ``num_warps`` per program."""
    r2, o2, ro2 = as_rows(residual), as_rows(out), as_rows(res_out)
    rows, n = r2.shape
    grid = rows if barrier is None else min(rows, barrier.max_programs)
    _reduce_add_rms_norm_kernel[(grid,)](
        parts, parts if barrier is None else barrier.flags, r2, weight, o2, ro2,
        rows, r2.stride(0), o2.stride(0), ro2.stride(0),
        n, eps,
        WORLD=parts.numel(), BLOCK=triton.next_power_of_2(n),
        SYNC=barrier is not None, ME=0 if barrier is None else barrier.rank,
        MAX_PROGRAMS=1 if barrier is None else barrier.max_programs,
        num_warps=num_warps,
    )
