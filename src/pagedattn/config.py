"""The engine's configuration: one dataclass, the single source of truth.

``LLM(model, **kw)`` fills :class:`EngineConfig`; the command line's engine flags and their help
are generated from its fields (:func:`add_engine_args`); the workers' configuration is derived
from it.  Every field is checked here, once, when the config is built: a bad value is a
``ValueError`` that names the field, before any model is loaded.  Checks that need the model
(the context length, the pool's size in bytes) run in the engine right after the model's
config.json is read, still before its weights are.
"""

from __future__ import annotations

import argparse
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch

from .envs import triton_interpreted

DEFAULT_TIMEOUT_S = 600.0  # tensor-parallel start-up and step bound
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """The torch dtype ``dtype`` names, or None for ``"auto"`` (decided once the checkpoint's
    config is read: :func:`resolve_dtype`)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() == "auto":
        return None
    if not isinstance(dtype, str) or dtype.lower() not in _DTYPES:
        raise ValueError(f"dtype: must be one of auto, float32, bfloat16, float16; got {dtype!r}")
    return _DTYPES[dtype.lower()]


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device, checkpoint: torch.dtype | None,
                  bf16_supported: bool | None = None) -> torch.dtype:
    """The dtype an engine runs in.

    An explicit ``dtype`` is used as given.  ``"auto"``: float32 on a CPU (its fp32 GEMMs are
    the fast ones, and fp32 matches HF bit for bit); on a GPU the checkpoint's own 16-bit type
    (``checkpoint``: config.json's ``dtype``/``torch_dtype``, a GGUF's float type), and for a
    float32 or unnamed checkpoint bfloat16 (float16 where the GPU has no bfloat16, as for a
    bfloat16 checkpoint there).  ``bf16_supported`` None: ask the current CUDA device."""
    explicit = parse_dtype(dtype)
    if explicit is not None:
        return explicit
    if torch.device(device).type != "cuda":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    if checkpoint == torch.float16 or (checkpoint in (torch.bfloat16, torch.float32, None) and not bf16_supported):
        return torch.float16
    return torch.bfloat16


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device: must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} was requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} but only {torch.cuda.device_count()} CUDA devices exist")
    return dev


# ====================================================================== fields
def _opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False, choices: tuple[str, ...] | None = None, flags: tuple[str, ...] = ()) -> Any:
    """A config field: its default, its help for the command line, its range or choices, and
    (where they differ from ``--field-name``) its flags."""
    meta = dict(help=help, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices, flags=flags)
    return field(default=default, metadata=meta)


@dataclass
class EngineConfig:
    """Everything that shapes an engine (vLLM's names where vLLM has the same knob)."""

    # ---------------------------------------------------------------- model
    model: str | None = _opt(None, "HF model folder, .gguf file or Hugging Face Hub id such as Qwen/Qwen3-0.6B "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    download_dir: str | None = _opt(None, "Hugging Face cache for models given by Hub id (default: huggingface_hub's "
                                    "own, from HF_HUB_CACHE or HF_HOME)")
    load_format: str = _opt("auto", "'dummy': seeded random weights from config.json alone (benchmarks)",
                            choices=("auto", "dummy"))
    dtype: str | torch.dtype = _opt("auto", "weights and activations: auto, float32, bfloat16 or float16; 'auto': "
                                    "float32 on a CPU, on a GPU the checkpoint's 16-bit type (bfloat16 for a "
                                    "float32 checkpoint)")
    device: str | torch.device | None = _opt(None, "cpu, cuda or cuda:N (default: cuda when available)")
    gguf_quantized: bool | None = _opt(None, "keep a GGUF model's quantized linear weights quantized: on a GPU its "
                                       "Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K blocks as stored, in Triton kernels "
                                       "(other types are an error); on the CPU Q4_0, Q4_1, Q4_K and Q8_0 in torch's "
                                       "int4 kernels, in the model's dtype (float32 keeps the exact values but is "
                                       "slow on x86; bfloat16 is fast and rounds weights and activations to "
                                       "bfloat16) (default: on a GPU when the kernels cover the file's types; on "
                                       "the CPU for a GGUF in bfloat16)")
    seed: int = _opt(0, "seed of the sampler's shared generator (and of dummy weights)", lo=_I64_MIN, hi=_I64_MAX)
    max_model_len: int | None = _opt(None, "context length in tokens (default and upper bound: the model's)", lo=2)
    generation_config: str = _opt("auto", "'auto': the sampling values of the model's generation_config.json "
                                  "(temperature, top_p, top_k, min_p, max_new_tokens) are the defaults of requests "
                                  "that leave them unset; 'none': the API's own defaults", choices=("auto", "none"))
    # ---------------------------------------------------------------- KV cache
    block_size: int = _opt(16, "tokens per KV block: a power of two up to 256", lo=1, hi=256)
    num_kv_blocks: int | None = _opt(None, "KV blocks per rank (default: sized from memory)", lo=1)
    kv_cache_dtype: str = _opt("auto", "element type of the KV cache: 'auto' is the model's dtype; 'fp8' stores "
                               "float8 e4m3 (1 byte: twice the tokens in the same memory) as x / scale, with "
                               "per-layer K and V scales from the checkpoint's k_scale/v_scale tensors, else 1.0",
                               choices=("auto", "fp8"))
    gpu_memory_utilization: float = _opt(0.9, "share of the GPU's memory the engine may use", lo=0, hi=1,
                                         lo_open=True)
    cpu_kv_space_gib: float = _opt(2.0, "KV pool size on a CPU device, GiB per rank", lo=0, lo_open=True)
    swap_space_gib: float = _opt(4.0, "CPU memory for swapped-out KV blocks, GiB per rank", lo=0)
    enable_prefix_caching: bool = _opt(True, "reuse the KV blocks of prompt prefixes seen before",
                                       flags=("--enable-prefix-caching", "--prefix-caching"))
    watermark: float = _opt(0.01, "share of the KV pool kept free when admitting new requests", lo=0, hi=1,
                            hi_open=True)
    # ---------------------------------------------------------------- scheduling
    preemption_mode: str = _opt("swap", "what a preempted request loses: swap its blocks to the CPU, or "
                                "recompute them later", choices=("swap", "recompute"))
    max_num_seqs: int = _opt(256, "most sequences in one step's batch", lo=1)
    max_num_batched_tokens: int = _opt(4096, "token budget of one step", lo=1)
    enable_chunked_prefill: bool = _opt(True, "split a long prompt over several steps")
    async_scheduling: bool | None = _opt(None, "overlap the host's work with the device's: decode step k+1 is "
                                         "launched from step k's samples on the device (default: on with CUDA)")
    # ---------------------------------------------------------------- execution
    attention_backend: str = _opt("auto", "attention kernels: Triton on CUDA, the torch reference elsewhere",
                                  choices=("auto", "torch", "triton"))
    enforce_eager: bool = _opt(False, "never capture CUDA graphs")
    warmup: bool | None = _opt(None, "at start-up, run a tiny step down every path the scheduler can produce, so "
                               "every kernel variant compiles before the first request (default: where kernels "
                               "compile: CUDA or the Triton backend)")
    cuda_graph_max_batch: int = _opt(1024, "largest decode batch run as a CUDA graph (capped by max_num_seqs); "
                                     "larger ones run eagerly", lo=1)
    tensor_parallel_size: int = _opt(1, "shard the model over N ranks: N GPUs (cuda:0..N-1) or N CPU processes; "
                                     "started here, or by torchrun (WORLD_SIZE must equal N)", lo=1,
                                     flags=("-tp", "--tensor-parallel-size"))
    distributed_timeout_s: float = _opt(DEFAULT_TIMEOUT_S, "seconds a tensor-parallel start-up or step may take "
                                        "before it is an error", lo=0, lo_open=True, flags=("--distributed-timeout",))

    def __post_init__(self) -> None:
        for name in ("model", "download_dir"):  # paths may come as Path objects
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        for f in fields(self):
            _check_field(self, f.name, _field_type(f.name), f.metadata)
        if self.model is not None and not self.model.strip():
            raise ValueError("model: empty; leave it out (None) for the embedded default model")
        bs = self.block_size
        if bs & (bs - 1):
            raise ValueError(f"block_size: must be a power of two in [1, 256], got {bs!r}")
        self.torch_device = resolve_device(self.device)
        # None for "auto": the engine resolves it (resolved_dtype) once the checkpoint's config is read.
        self.torch_dtype = parse_dtype(self.dtype)
        if self.gguf_quantized and self.load_format == "dummy":
            raise ValueError("gguf_quantized: dummy weights have no GGUF blocks; use load_format='auto'")
        if self.kv_cache_dtype == "fp8" and self.torch_device.type == "cuda" and self.attention_backend != "torch" \
                and torch.cuda.get_device_capability(self.torch_device) < (8, 9):
            raise ValueError("kv_cache_dtype: 'fp8' through the Triton kernels needs a GPU of compute capability "
                             "8.9 or more (Ada, Hopper: e4m3 loads); use attention_backend='torch' or "
                             "kv_cache_dtype='auto'")
        if self.attention_backend == "triton" and self.torch_device.type != "cuda" and not triton_interpreted():
            raise ValueError("attention_backend: 'triton' needs a CUDA device (or Triton's interpreter, "
                             "TRITON_INTERPRET=1); use 'auto' or 'torch' on the CPU")


    def resolved_dtype(self, checkpoint: torch.dtype | None) -> torch.dtype:
        """The engine's dtype for a checkpoint of dtype ``checkpoint`` (see :func:`resolve_dtype`)."""
        return resolve_dtype(self.dtype, self.torch_device, checkpoint)


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's element type: the model's (``"auto"``) or float8 e4m3 (``"fp8"``)."""
    if kv_cache_dtype == "fp8":
        return torch.float8_e4m3fn
    if kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype: must be 'auto' or 'fp8'; got {kv_cache_dtype!r}")
    return model_dtype


_HINTS: dict[str, Any] = {}


def _field_type(name: str) -> Any:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(EngineConfig))
    return _HINTS[name]


def _base_type(tp: Any) -> tuple[type, bool]:
    """``int | None`` -> ``(int, True)``: the field's plain type and whether None is allowed."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _check_field(cfg: EngineConfig, name: str, tp: Any, meta: Any) -> None:
    value = getattr(cfg, name)
    base, optional = _base_type(tp)
    if value is None and optional:
        return
    if isinstance(value, (torch.dtype, torch.device)) and name in ("dtype", "device"):
        return  # checked with the rest of their parsing
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, int) and not isinstance(value, bool) if base is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) if base is float
          else isinstance(value, base))
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[base]
        raise ValueError(f"{name}: must be {kind}{' or None' if optional else ''}, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, choices))}; got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    below = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
    above = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    if below or above:
        left, right = "(" if meta.get("lo_open") else "[", ")" if meta.get("hi_open") else "]"
        raise ValueError(f"{name}: must be in {left}{_fmt(lo, '-inf')}, {_fmt(hi, 'inf')}{right}, got {value!r}")


def _fmt(bound: float | None, none: str) -> str:
    return none if bound is None else f"{bound:g}" if isinstance(bound, float) else str(bound)


# ====================================================================== the command line
def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`EngineConfig` field, with its help and default.  Flags left out are
    absent from the parsed namespace, so the dataclass's defaults stay the only defaults."""
    g = parser.add_argument_group("engine")
    for f in fields(EngineConfig):
        base, _ = _base_type(_field_type(f.name))
        meta = f.metadata
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        default = f.default if f.default is not MISSING else None
        help_text = f"{meta['help']} (default: {default})" if default is not None else meta["help"]
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            g.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        else:
            g.add_argument(*flags, type=base, choices=meta["choices"], metavar=None if meta["choices"] else
                           f.name.upper().removesuffix("_S").removesuffix("_GIB"), **kw)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The :class:`EngineConfig` of the engine flags given on the command line."""
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)})
