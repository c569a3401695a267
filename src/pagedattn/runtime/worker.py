"""One rank's share of the engine: its model shard, its KV pool and the runner over them.

The engine's own process holds rank 0's :class:`Worker`; with tensor parallelism every other
rank holds one in its own process (see :mod:`pagedattn.distributed`).  All ranks build theirs
with :func:`start_worker`, in lockstep: the collectives of sizing the KV pool and capturing
CUDA graphs must line up across ranks.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import torch

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata
from ..attention.selector import get_attention_backend
from ..cache.block_manager import cdiv
from ..cache.kv_pool import KVCachePool, KVCacheSpec
from ..config import EngineConfig, kv_cache_torch_dtype
from ..models.context import ForwardContext
from ..models.gguf_quant import gpu_uncovered_tensors
from ..models.interface import CausalLM
from ..models.layers import AllReduce, pack_linear_weights_for_cpu
from ..models.layers.quantized import KERNEL_DTYPES, cpu_int4_kernel_available
from ..models.loader import ModelSource, load_model
from . import compile_guard
from .model_runner import ModelRunner, StepInput, StepOutput
from .warmup import WarmupLimits, run_warmup, warmup_phases

logger = logging.getLogger(__name__)

_GIB = 1 << 30
_unfreeze_at_exit = False  # see freeze_startup_heap


@dataclass(frozen=True)
class WorkerConfig:
    """What every rank needs to build its shard and KV pool (picklable: workers receive it).

    Budgets (``gpu_memory_utilization``, ``cpu_kv_space_gib``, ``swap_space_gib``) apply to
    each rank; ``num_kv_blocks`` is the count of every rank (they all hold the same block ids).
    """

    model_dir: str  # a resolved HF-style folder (a GGUF file is converted by the engine first)
    dtype: torch.dtype
    device_type: str  # "cpu" | "cuda"
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    num_kv_blocks: int | None = None  # None: sized from memory
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8": float8 e4m3 pages
    gpu_memory_utilization: float = 0.9
    cpu_kv_space_gib: float = 2.0
    swap_space_gib: float = 4.0
    attention_backend: str = "auto"
    enforce_eager: bool = False
    warmup: bool | None = None  # None: where kernels compile (CUDA, or the Triton backend)
    cuda_graph_max_batch: int = 1024
    load_format: str = "auto"
    seed: int = 0
    tp_size: int = 1
    gguf_quantized: bool = False  # replace the linears' float weights by the GGUF conversion's blocks

    @classmethod
    def derive(cls, cfg: EngineConfig, model_dir: str, max_model_len: int, dtype: torch.dtype,
               gguf_file: Path | None = None) -> WorkerConfig:
        """The workers' part of the engine's configuration (same names, resolved values;
        ``dtype``: the resolved one, ``cfg.resolved_dtype``; ``gguf_file``: the model's GGUF, if
        it is one)."""
        own = {"model_dir", "dtype", "device_type", "max_model_len", "tp_size", "gguf_quantized"}
        shared = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name not in own}
        return cls(model_dir=model_dir, dtype=dtype, device_type=cfg.torch_device.type,
                   max_model_len=max_model_len, tp_size=cfg.tensor_parallel_size,
                   gguf_quantized=quantized_gguf(cfg, gguf_file, dtype, model_dir), **shared)

    @property
    def graph_max_batch(self) -> int:
        """The largest decode batch captured as a CUDA graph on a GPU (0: none, eager only)."""
        return 0 if self.enforce_eager else min(self.max_num_seqs, self.cuda_graph_max_batch)

    def check_memory(self, spec: KVCacheSpec) -> None:
        """Refuse, before any weights load, KV pools this machine cannot hold: an explicit
        ``num_kv_blocks`` (or the CPU's ``cpu_kv_space_gib``) and the swap space, for every rank.
        (A pool sized from free GPU memory is sized after the weights load.)"""
        ranks = self.tp_size
        swap = int(self.swap_space_gib * _GIB)
        if self.num_kv_blocks is not None:
            kv, kv_field = self.num_kv_blocks * spec.bytes_per_block, "num_kv_blocks"
        else:
            kv, kv_field = (int(self.cpu_kv_space_gib * _GIB), "cpu_kv_space_gib") if self.device_type == "cpu" \
                else (0, "")
        host = available_host_memory()
        if self.device_type == "cuda" and kv:
            gpu_total = torch.cuda.mem_get_info()[1]
            if kv > gpu_total:
                raise ValueError(f"num_kv_blocks: {self.num_kv_blocks} blocks of {spec.bytes_per_block} bytes need "
                                 f"{kv / _GIB:.1f} GiB per rank, more than the GPU's {gpu_total / _GIB:.1f} GiB")
        on_host = ranks * (swap + (kv if self.device_type == "cpu" else 0))
        if host is not None and on_host > host:
            what = kv_field if self.device_type == "cpu" and kv > swap else "swap_space_gib"
            raise ValueError(
                f"{what}: the KV pool ({kv / _GIB:.2f} GiB) and swap space ({swap / _GIB:.2f} GiB) of "
                f"{ranks} rank(s) need {on_host / _GIB:.2f} GiB of host memory, but only {host / _GIB:.2f} GiB "
                "is available"
                if self.device_type == "cpu" else
                f"swap_space_gib: {ranks} rank(s) x {swap / _GIB:.2f} GiB of swap space is more than the "
                f"{host / _GIB:.2f} GiB of host memory available"
            )


def available_host_memory() -> int | None:
    """Bytes of memory this process could still take: the kernel's MemAvailable, capped by a
    cgroup (container) limit; None where neither can be read."""
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


class Collectives(Protocol):
    """The few cross-rank operations worker start-up needs (no-ops for a single rank)."""

    def barrier(self) -> None:
        """Wait until every rank gets here (raises, naming the rank, if one fails)."""

    def min_int(self, value: int) -> int:
        """The minimum of ``value`` over all ranks."""

    def wait_device(self) -> None:
        """Wait for this rank's queued device work (which may contain collectives)."""

    def fast_all_reduce(self, dtype: torch.dtype, decode_bytes: int) -> AllReduce | None:
        """A faster all-reduce than the process group's for this group's links (collective:
        every rank calls it), or None to keep the process group's.  ``decode_bytes``: the
        largest decode step's activations, which it should cover if that pays on these links."""


class SingleRank:
    """:class:`Collectives` of a world of one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def barrier(self) -> None:
        pass

    def min_int(self, value: int) -> int:
        return value

    def wait_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fast_all_reduce(self, dtype: torch.dtype, decode_bytes: int) -> AllReduce | None:
        return None


def quantized_gguf(cfg: EngineConfig, gguf_file: Path | None, dtype: torch.dtype, model_dir: str) -> bool:
    """Whether the workers keep ``gguf_file``'s quantized linears quantized (``gguf_quantized``;
    ``model_dir``: its conversion).  On a GPU by default when every quantized linear weight has a
    Triton kernel's type.  On the CPU by default for a GGUF model in bfloat16, where torch's int4
    kernel is vectorised; in float32 (exact weights) only when asked: there torch 2.13's kernel
    is a scalar loop on x86."""
    if cfg.gguf_quantized is False:
        return False
    if gguf_file is None or cfg.load_format != "auto":
        if cfg.gguf_quantized:
            raise ValueError("gguf_quantized: the model is not a GGUF file")
        return False
    if cfg.torch_device.type == "cuda":
        return _gpu_blocks_cover(cfg, model_dir)
    if cfg.gguf_quantized:
        if dtype not in KERNEL_DTYPES:
            raise ValueError(f"gguf_quantized: the int4 CPU kernel computes in float32 or bfloat16, not {dtype}")
        if not cpu_int4_kernel_available():
            raise ValueError(f"gguf_quantized: this torch ({torch.__version__}) has no int4 CPU kernel")
        return True
    return cfg.torch_device.type == "cpu" and dtype == torch.bfloat16 and cpu_int4_kernel_available()


def _gpu_blocks_cover(cfg: EngineConfig, model_dir: str) -> bool:
    """Whether the GPU kernels cover the GGUF's quantized linear weights: if not, an error when
    ``gguf_quantized`` was asked for, else the file runs dequantized (with a warning)."""
    from ..kernels.gguf_matmul import GGUF_BLOCKS

    uncovered = gpu_uncovered_tensors(model_dir)
    if not uncovered:
        return True
    names = [f"{name} ({kind})" for name, kind in uncovered.items()]
    listing = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if cfg.gguf_quantized:
        raise ValueError(f"gguf_quantized: GGUF types without a GPU kernel: {listing} (supported: "
                         f"{', '.join(GGUF_BLOCKS)}); use gguf_quantized=False to run the file dequantized")
    logger.warning("GGUF types without a GPU kernel (%s): the model runs dequantized", listing)
    return False


class Worker:
    """A rank's model shard (loaded, sharded while streaming) and, after :meth:`init_cache`,
    its KV pool and :class:`ModelRunner`."""

    def __init__(self, config: WorkerConfig, tp_rank: int, device: torch.device) -> None:
        self.config = config
        self.tp_rank = tp_rank
        self.device = device
        self.source: ModelSource
        # gguf_quantized: the file's blocks and the Triton kernels on CUDA, else exact low-bit
        # weights and their CPU kernels, made from the blocks before the rest is loaded.
        model, self.source = load_model(
            config.model_dir, config.dtype, device, tp_rank=tp_rank, tp_size=config.tp_size,
            load_format=config.load_format, seed=config.seed, gguf_quantized=config.gguf_quantized,
        )
        if device.type == "cpu":
            pack_linear_weights_for_cpu(model)  # the runtime layout of the CPU's GEMMs (of dense weights)
        self.model: CausalLM = model
        # The engine's KV pool is zero-initialised, hence always finite.
        self.backend: AttentionBackend = get_attention_backend(device, config.attention_backend, finite_cache=True)
        self.spec: KVCacheSpec = self.model.kv_cache_spec(
            config.block_size, kv_cache_torch_dtype(config.kv_cache_dtype, config.dtype))
        self.pool: KVCachePool | None = None
        self.runner: ModelRunner | None = None
        self.startup: StartupTimes | None = None  # set by start_worker

    @property
    def num_cpu_blocks(self) -> int:
        return int(self.config.swap_space_gib * _GIB) // self.spec.bytes_per_block

    # ------------------------------------------------------------------ sizing
    def local_num_blocks(self, coll: Collectives) -> int:
        """How many KV blocks fit on this rank (before agreeing with the others)."""
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if self.device.type != "cuda":
            return self.spec.blocks_for_bytes(int(cfg.cpu_kv_space_gib * _GIB), "cpu_kv_space_gib")
        return self.spec.blocks_for_bytes(self._profile_gpu_budget(coll), "free GPU memory for the KV cache "
                                          f"(gpu_memory_utilization={cfg.gpu_memory_utilization})")

    def _profile_gpu_budget(self, coll: Collectives) -> int:
        """Run the largest step once with a throwaway pool to measure peak activation memory.

        Every rank runs it (the forward holds collectives); ``coll.wait_device`` waits for it."""
        cfg, spec, dev = self.config, self.spec, self.device
        n_tok = min(cfg.max_num_batched_tokens, cfg.max_model_len)
        n_blk = cdiv(n_tok, spec.block_size)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        tmp = KVCachePool(spec, n_blk, dev)
        meta = AttentionMetadata.build([n_tok], [n_tok], [list(range(n_blk))], spec.block_size, dev)
        ctx = ForwardContext(meta, [tmp.layer(i) for i in range(spec.num_layers)], self.backend)
        ids = torch.randint(0, self.model.config.vocab_size, (n_tok,), device=dev)
        with torch.inference_mode():
            h = self.model(ids, torch.arange(n_tok, device=dev), ctx)
            self.model.compute_logits(h[-min(n_tok, cfg.max_num_seqs):])
        coll.wait_device()
        peak_act = torch.cuda.max_memory_allocated(dev) - base - tmp.nbytes
        del tmp, ctx, meta, h
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        reserved = torch.cuda.memory_reserved(dev)
        non_torch = total - free - reserved
        weights = torch.cuda.memory_allocated(dev)
        budget = int(total * cfg.gpu_memory_utilization) - non_torch - weights - peak_act
        logger.info("GPU memory (rank %d): total %.1f GiB, weights %.2f GiB, peak activations %.2f GiB, "
                    "other %.2f GiB -> KV budget %.2f GiB", self.tp_rank, total / _GIB, weights / _GIB,
                    peak_act / _GIB, non_torch / _GIB, budget / _GIB)
        if budget <= 0:
            raise ValueError(
                f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves no room for the KV cache "
                f"(model weights {weights / _GIB:.2f} GiB, activations {peak_act / _GIB:.2f} GiB, "
                f"other {non_torch / _GIB:.2f} GiB of {total / _GIB:.1f} GiB); raise it or lower max_num_batched_tokens"
            )
        return budget

    # ------------------------------------------------------------------ cache and steps
    def init_cache(self, num_blocks: int) -> None:
        """Allocate the KV pools and the runner."""
        self.pool = KVCachePool(self.spec, num_blocks, self.device, self.num_cpu_blocks)
        self.runner = ModelRunner(self.model, self.pool, self.backend)

    @property
    def wants_warmup(self) -> bool:
        """Whether start-up runs the warm-up steps: as configured, by default where kernels
        compile (CUDA, or Triton kernels under the interpreter)."""
        w = self.config.warmup
        return w if w is not None else self.device.type == "cuda" or self.backend.name == "triton"

    def warm_up(self, coll: Collectives) -> dict[str, float]:
        """Run the warm-up steps (every rank the same ones); returns each phase's seconds."""
        assert self.runner is not None and self.pool is not None, "init_cache first"
        cfg = self.config
        lim = WarmupLimits(cfg.block_size, cfg.max_model_len, cfg.max_num_batched_tokens, cfg.max_num_seqs,
                           self.pool.num_blocks, self.pool.num_cpu_blocks, self.model.config.vocab_size)
        return run_warmup(self.runner, warmup_phases(lim, cfg.seed), coll.wait_device)

    def capture_graphs(self) -> None:
        """Capture the decode graphs (CUDA, unless eager)."""
        assert self.runner is not None, "init_cache first"
        cfg = self.config
        if self.device.type == "cuda" and cfg.graph_max_batch:
            self.runner.capture_decode_graphs(cfg.graph_max_batch, cfg.max_model_len)

    def execute(self, step: StepInput, prev: torch.Tensor | None = None) -> StepOutput:
        assert self.runner is not None, "init_cache first"
        return self.runner.execute(step, prev)

    def release_graphs(self) -> None:
        """Destroy the captured CUDA graphs (waiting for queued work first).  NCCL cannot destroy
        a communicator while graphs that captured its collectives are alive, so a rank does
        this before leaving its process group."""
        if self.runner is None or self.runner.graphs is None:
            return
        torch.cuda.synchronize(self.device)
        self.runner.graphs = None
        gc.collect()
        torch.cuda.synchronize(self.device)


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive now into the garbage collector's permanent
    generation, as a serving process should after start-up.

    Start-up leaves a few hundred thousand long-lived objects (modules, compiled kernels,
    captured graphs, the libraries behind them); without this, each full collection -- which
    the objects a busy engine creates every step trigger every few seconds -- walks all of them,
    ~0.1 s of host time in which no step is launched and the GPU runs dry.  With tensor
    parallelism every rank's pauses stall every rank.  Objects freed by reference counting
    (everything the engine drops) are unaffected; only cyclic garbage made before the freeze
    would stay, and a collection just before it leaves none.  :func:`release_startup_heap` gives
    the objects back; it runs at shutdown and at exit."""
    global _unfreeze_at_exit
    gc.collect()
    gc.freeze()
    if not _unfreeze_at_exit:
        _unfreeze_at_exit = True
        atexit.register(release_startup_heap)


def release_startup_heap() -> None:
    """Undo :func:`freeze_startup_heap` and collect now: cycles among the frozen objects (CUDA
    graphs, communicators, ...) are finalised while the interpreter is still whole, not during
    its teardown, where destroying them can abort the process."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()


def _decode_bytes(worker: Worker) -> int:
    """Bytes of a decode step's activations ``[rows, hidden]`` at the largest batch captured
    as a CUDA graph (0 without graphs)."""
    cfg = worker.config
    return cfg.graph_max_batch * worker.model.config.hidden_size * cfg.dtype.itemsize


class StartupTimes:
    """Seconds of each start-up phase of a rank, in order, each logged as it ends."""

    def __init__(self, tp_rank: int) -> None:
        self.tp_rank = tp_rank
        self.phases: dict[str, float] = {}
        self.warmup: dict[str, float] = {}  # the warm-up's own phases

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.phases[name] = time.perf_counter() - t0
        logger.info("start-up (rank %d): %s took %.2f s", self.tp_rank, name, self.phases[name])

    def summary(self) -> str:
        text = ", ".join(f"{name} {t:.2f} s" for name, t in self.phases.items())
        if self.warmup:
            text += " (warm-up: " + ", ".join(f"{name} {t:.2f} s" for name, t in self.warmup.items()) + ")"
        return text


def start_worker(config: WorkerConfig, tp_rank: int, device: torch.device, coll: Collectives) -> Worker:
    """Build a rank's worker in lockstep with the other ranks: load the shard, agree on the
    number of KV blocks (the minimum over ranks, so every rank holds every block id), allocate
    the pool, run the warm-up steps (every kernel variant compiles here, not on a request) and
    capture graphs.  The phases' times are logged and kept (``worker.startup``)."""
    times = StartupTimes(tp_rank)
    t0 = time.perf_counter()
    with compile_guard.starting_up():
        with times.phase("load weights"):
            worker = Worker(config, tp_rank, device)
            coll.barrier()  # every shard loaded: a failed load is reported here, before any collective kernel
        if config.tp_size > 1 and (all_reduce := coll.fast_all_reduce(config.dtype, _decode_bytes(worker))) is not None:
            worker.model.set_all_reduce(all_reduce)  # before the warm-up and graph capture use it
        with times.phase("memory profile"):
            local = worker.local_num_blocks(coll)
            coll.barrier()
            num_blocks = coll.min_int(local)
        if num_blocks != local:
            logger.info("rank %d: KV pool of %d blocks (the smallest over ranks; %d fit here)", tp_rank, num_blocks,
                        local)
        with times.phase("KV pool"):
            worker.init_cache(num_blocks)
        if worker.wants_warmup:
            with times.phase("compile and warm-up"):
                times.warmup = worker.warm_up(coll)
        with times.phase("graph capture"):
            worker.capture_graphs()
            coll.barrier()
    worker.startup = times
    logger.info("start-up (rank %d) in %.2f s: %s", tp_rank, time.perf_counter() - t0, times.summary())
    return worker
