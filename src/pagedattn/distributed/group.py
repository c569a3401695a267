"""Process groups of a tensor-parallel engine and the channel rank 0 drives the others through.

Two groups join the ranks:

* the default ``torch.distributed`` group (NCCL on CUDA, gloo on the CPU) carries the model's
  collectives -- the all-reduces and all-gathers of the sharded layers -- and the device-side
  input ids of overlapped decode steps;
* a gloo **control** group carries Python objects from rank 0 (the worker configuration, one
  :class:`~pagedattn.runtime.model_runner.StepInput` per step, shutdown) and the small host-side
  collectives of start-up (barriers, the KV pool size).  Workers wait on it for their next step
  for as long as the engine is idle, so it never times out; a peer that dies closes its
  sockets, which fails a pending wait at once.

A rank that fails writes its traceback into the rendezvous store before it exits, so rank 0
can say what went wrong rather than only that a connection closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..models.layers import AllReduce
from .all_reduce import P2PAllReduce, p2p_max_bytes

logger = logging.getLogger(__name__)

# Idle workers wait on the control group indefinitely; dead peers are noticed through their sockets.
_CONTROL_TIMEOUT = timedelta(days=365)
_ERROR_KEY = "pagedattn/error/"
_ALIVE_KEY = "pagedattn/alive/"
_FIRST_MESSAGE_BYTES = 16 << 10  # a step of ~250 decodes; larger messages grow the buffer


@dataclass(frozen=True)
class TorchrunEnv:
    """This process's place in a ``torchrun`` launch (from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def detect(cls, environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
        """The launch described by the environment, or None when not launched by torchrun."""
        env = os.environ if environ is None else environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
        except ValueError:
            raise ValueError(
                f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got RANK={env.get('RANK')!r} "
                f"WORLD_SIZE={env.get('WORLD_SIZE')!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}"
            ) from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ValueError(f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got {rank=} {world=} {local=}")
        return cls(rank, world, local)

    @classmethod
    def for_tensor_parallel(cls, tp_size: int) -> TorchrunEnv | None:
        """The torchrun launch whose ranks form this tensor-parallel group, or None (not launched
        by torchrun, or ``tp_size`` 1: then every torchrun process runs an engine of its own)."""
        env = cls.detect() if tp_size > 1 else None
        if env is None or env.world_size == 1:
            return None
        if env.world_size != tp_size:
            raise ValueError(f"tensor_parallel_size: {tp_size} but torchrun started WORLD_SIZE={env.world_size} "
                             "processes; they must be equal")
        return env


@dataclass(frozen=True)
class Rendezvous:
    """Where workers started by the engine find rank 0's store."""

    host: str
    port: int


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """The device a rank computes on: ``cuda:<local_rank>``, or the CPU."""
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


class TPGroup:
    """This process's membership of the tensor-parallel group (made by :func:`init_tp_group`).

    Also the :class:`~pagedattn.runtime.worker.Collectives` of worker start-up: barriers and
    the minimum go over the control group, ``wait_device`` synchronises the device.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, control: dist.ProcessGroup,
                 store: dist.Store | None, timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.control = control
        self.store = store
        self.timeout = timedelta(seconds=timeout_s)
        self._msg_buf = torch.zeros(_FIRST_MESSAGE_BYTES, dtype=torch.uint8)  # see broadcast_object

    # ------------------------------------------------------------------ rank 0 -> workers
    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends ``obj``; every other rank receives and returns it (blocks until it comes).

        One message a step, so it is made cheap: the pickle travels in a buffer of a size both
        sides know (its first 8 bytes give the length), one broadcast in all, where
        ``broadcast_object_list`` needs two plus tensor conversions.  A larger pickle follows in
        a second broadcast of the announced length, and both sides grow the buffer to fit the
        next one."""
        buf = self._msg_buf
        head = buf.numpy()
        data = b""
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            head[:8].view(np.int64)[0] = len(data)
            if len(data) <= buf.numel() - 8:
                head[8:8 + len(data)] = np.frombuffer(data, dtype=np.uint8)
        dist.broadcast(buf, src=0, group=self.control)
        n = int(head[:8].view(np.int64)[0])
        if n <= buf.numel() - 8:
            payload = head[8:8 + n]
        else:
            big = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 \
                else torch.empty(n, dtype=torch.uint8)
            dist.broadcast(big, src=0, group=self.control)
            payload = big.numpy()
            self._msg_buf = torch.zeros(1 << (n + 8 - 1).bit_length(), dtype=torch.uint8)
        return obj if self.rank == 0 else pickle.loads(payload.data)

    def broadcast_tensor(self, tensor: torch.Tensor) -> None:
        """Rank 0's ``tensor`` into every rank's (same shape and dtype) over the default group:
        on CUDA an NCCL broadcast queued on the stream, with no host synchronisation."""
        dist.broadcast(tensor, src=0)

    # ------------------------------------------------------------------ Collectives
    def barrier(self) -> None:
        # monitored: a rank that never arrives is named, within the timeout
        dist.monitored_barrier(group=self.control, timeout=self.timeout, wait_all_ranks=True)

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def wait_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fast_all_reduce(self, dtype: torch.dtype, decode_bytes: int) -> AllReduce | None:
        """On CUDA, the one-shot P2P all-reduce (up to :func:`.all_reduce.p2p_max_bytes`) when
        every rank can use it (see :mod:`.all_reduce`); None elsewhere."""
        if self.device.type != "cuda":
            return None
        return P2PAllReduce.create(self.device, dtype, max_bytes=p2p_max_bytes(self.world_size, decode_bytes))

    # ------------------------------------------------------------------ failure reports
    def report_error(self, text: str) -> None:
        """Leave ``text`` (a traceback) for rank 0; best effort."""
        report_error(self.store, self.rank, text)

    def reported_errors(self) -> dict[int, str]:
        """The failure reports other ranks left, by rank."""
        return read_error_reports(self.store, self.world_size, self.rank)

    def destroy(self, timeout_s: float = 60.0) -> None:
        """Leave the group (both process groups); idempotent.  Falls back to :meth:`abort` if
        the orderly teardown does not finish within ``timeout_s`` (a peer gone, or a captured
        graph still holding the NCCL communicator)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.device.type != "cuda":
            dist.destroy_process_group()
            return
        if not _run_bounded(dist.destroy_process_group, timeout_s, "leaving the tensor-parallel process group"):
            self.abort()

    def abort(self, timeout_s: float = 10.0) -> None:
        """Tear the groups down after a failure without waiting on peers that may be gone.

        On CUDA a collective whose peer died may never finish, and tearing its communicator
        down may block as well: that is given ``timeout_s`` on a daemon thread and then left
        behind, so the caller can report the failure."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.device.type != "cuda":
            try:
                dist.destroy_process_group()
            except Exception as e:
                logger.warning("tearing down the tensor-parallel process group failed: %r", e)
            return
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None) or dist.destroy_process_group
        _run_bounded(abort, timeout_s, "aborting the tensor-parallel process group")


def _run_bounded(fn: Callable[[], None], timeout_s: float, what: str) -> bool:
    """``fn()`` on a daemon thread, waiting at most ``timeout_s``; False if it failed or is
    still running (it is then left to finish, or not, on its own)."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=call, name="pagedattn-tp-teardown", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive() or errors:
        logger.warning("%s %s", what, f"failed: {errors[0]!r}" if errors else f"did not finish in {timeout_s:.0f} s")
        return False
    return True


def report_error(store: dist.Store | None, rank: int, text: str) -> None:
    """Leave a failure report (the end of ``text``) for rank 0 in the store; best effort."""
    if store is None:
        return
    # The store's host (rank 0) may be gone: then nobody is left to tell.
    with contextlib.suppress(Exception):
        store.set(f"{_ERROR_KEY}{rank}", text[-8000:])


def read_error_reports(store: dist.Store | None, world_size: int, exclude_rank: int = 0) -> dict[int, str]:
    """Failure reports left in ``store``, by rank."""
    out: dict[int, str] = {}
    if store is None:
        return out
    for r in range(world_size):
        key = f"{_ERROR_KEY}{r}"
        try:
            if r != exclude_rank and store.check([key]):
                out[r] = store.get(key).decode(errors="replace")
        except Exception:  # the store itself may be gone with its host
            break
    return out


def mark_alive(store: dist.Store, rank: int) -> None:
    """A spawned worker has started and reached the store (before the slower group set-up)."""
    store.set(f"{_ALIVE_KEY}{rank}", str(os.getpid()))


def is_alive_marked(store: dist.Store, rank: int) -> bool:
    return store.check([f"{_ALIVE_KEY}{rank}"])


def make_store(rendezvous: Rendezvous | None, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0 (``rendezvous=None``) hosts a store on a free local port; workers connect to it."""
    timeout = timedelta(seconds=timeout_s)
    if rendezvous is None:
        return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
    return dist.TCPStore(rendezvous.host, rendezvous.port, world_size, is_master=False, timeout=timeout)


def init_tp_group(rank: int, world_size: int, local_rank: int, device_type: str, timeout_s: float,
                  store: dist.Store | None = None) -> TPGroup:
    """Join the group: the default process group (NCCL on CUDA, gloo on the CPU) and the gloo
    control group.  ``store=None`` rendezvouses through ``env://`` (torchrun's variables)."""
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised in this process: only one tensor-parallel engine "
            "can run per process (shut the other one down first)"
        )
    device = rank_device(device_type, local_rank)
    kwargs: dict[str, Any] = dict(rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs.update(backend="nccl", device_id=device)
    else:
        kwargs.update(backend="gloo")
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = "env://"
    dist.init_process_group(**kwargs)
    try:
        control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
    except BaseException:
        dist.destroy_process_group()
        raise
    if store is None:  # torchrun: failure reports go through the rendezvous store when it is reachable
        get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
        try:
            store = get_store() if get_store is not None else None
        except Exception:
            store = None
    return TPGroup(rank, world_size, device, control, store, timeout_s)
