"""Peak memory of loading a GGUF model with ``gguf_quantized`` on the CPU.

Two orders of the same load, each in a fresh process (its peak RSS, ``VmHWM``, minus the RSS it
had before loading, after its imports; Linux only):

* ``dense-first``: the whole model loaded dense from the converted float32 folder, then its
  linears replaced by their int4/int8 forms (``keep_gguf_quantized`` on the loaded model): what
  the engine did before the forms were built first;
* ``forms-first``: ``load_model(..., gguf_quantized=True)``, the engine's load: the forms made
  straight from the blocks, and only the other tensors read;
* ``dense``: the plain dense load (``gguf_quantized=False``), for scale.

Each line also gives the bytes the loaded model holds (parameters and buffers).  The model is
the embedded default (SmolLM2-135M, Q4_1) or, with ``--random``, a random Q4_K Llama GGUF of
the shape given (written and converted once into ``--work-dir``; its Q4_K blocks are random
bytes with half-precision scales of a weight's size, Q8_0 for the embedding and LM head).

    python benchmarks/bench_gguf_load.py [--dtype bfloat16] [--random --layers 8 --hidden 2048]
        [--mmap-threshold 65536]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ORDERS = ("dense", "dense-first", "forms-first")


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux: ``5`` to clear_refs); ``ru_maxrss`` would
    not do, it carries the parent's peak across fork and exec."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def child(path: str, order: str, dtype_name: str) -> dict[str, Any]:
    """One load in this process: its peak RSS above the RSS before it, in MiB."""
    import torch

    from pagedattn.models.gguf_quant import keep_gguf_quantized
    from pagedattn.models.loader import load_model

    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    _reset_peak()
    base = _status_kib("VmRSS")
    if order == "forms-first":
        model, _ = load_model(path, dtype, "cpu", gguf_quantized=True)
    else:
        model, source = load_model(path, dtype, "cpu")
        if order == "dense-first":
            keep_gguf_quantized(model, source.model_dir)
    peak = _status_kib("VmHWM")
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"order": order, "dtype": dtype_name, "peak_rss_mib": (peak - base) / 1024, "held_mib": held / 2**20,
            "base_rss_mib": base / 1024}


def write_random_gguf(path: Path, layers: int, hidden: int, intermediate: int, vocab: int, heads: int,
                      kv_heads: int, seed: int = 0) -> Path:
    """A Llama GGUF: Q4_K linears, Q8_0 embedding and LM head, F32 norms (random blocks)."""
    import gguf

    rng = np.random.default_rng(seed)
    T = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)

    def half(n: int) -> np.ndarray:
        return (rng.uniform(0.5, 2.0, n) * 1e-3).astype(np.float16).view(np.uint8).reshape(n, 2)

    def q4_k(rows: int, cols: int) -> np.ndarray:
        n = rows * cols // 256
        blocks = np.concatenate([half(n), half(n), rng.integers(0, 256, (n, 140), dtype=np.uint8)], axis=1)
        return blocks.reshape(rows, cols // 256 * 144)

    def q8_0(rows: int, cols: int) -> np.ndarray:
        n = rows * cols // 32
        return np.concatenate([half(n), rng.integers(0, 256, (n, 32), dtype=np.uint8)], axis=1).reshape(rows, -1)

    head = hidden // heads
    w.add_tensor("token_embd.weight", q8_0(vocab, hidden), raw_dtype=T.Q8_0)
    for i in range(layers):
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", kv_heads * head, hidden),
                                 ("attn_v", kv_heads * head, hidden), ("attn_output", hidden, hidden),
                                 ("ffn_gate", intermediate, hidden), ("ffn_up", intermediate, hidden),
                                 ("ffn_down", hidden, intermediate)):
            w.add_tensor(f"blk.{i}.{name}.weight", q4_k(rows, cols), raw_dtype=T.Q4_K)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("output.weight", q8_0(vocab, hidden), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--orders", default=",".join(ORDERS))
    p.add_argument("--random", action="store_true", help="a random Q4_K Llama GGUF instead of the default model")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--work-dir", default=None, help="where the random GGUF and its conversion go (default: a temp dir)")
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="glibc's MALLOC_MMAP_THRESHOLD_ for the loads (e.g. 65536: every large buffer its own "
                        "mapping, returned when freed, so the peak is the live bytes' and not the heap's)")
    p.add_argument("--child", nargs=3, metavar=("PATH", "ORDER", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return []
    orders = args.orders.split(",")
    if bad := [o for o in orders if o not in ORDERS]:
        raise ValueError(f"unknown orders {bad}; choose from {', '.join(ORDERS)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        from pagedattn.models.gguf import convert_gguf, default_gguf_path

        if args.random:
            path = work / f"random-q4_k-{args.layers}x{args.hidden}x{args.intermediate}.gguf"
            if not path.is_file():
                write_random_gguf(path, args.layers, args.hidden, args.intermediate, args.vocab, args.heads,
                                  args.kv_heads)
        else:
            path = default_gguf_path()
        convert_gguf(path)  # once, before any measured load
        rows = []
        env = dict(os.environ)
        if args.mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        for order in orders:
            out = subprocess.run([sys.executable, __file__, "--child", str(path), order, args.dtype],
                                 check=True, capture_output=True, text=True, env=env).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    size = path.stat().st_size / 2**20
    malloc = f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold is not None else ""
    print(f"{path.name} ({size:.0f} MiB), {args.dtype}, CPU{malloc}")
    print(f"{'order':<12} {'peak RSS above start (MiB)':>27} {'model holds (MiB)':>18}")
    for r in rows:
        print(f"{r['order']:<12} {r['peak_rss_mib']:>27.0f} {r['held_mib']:>18.0f}")
    return rows


if __name__ == "__main__":
    main()
