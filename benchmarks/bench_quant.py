"""W4A16 (int4 weights, AWQ layout) and FP8 (e4m3) weights against bf16 on an 8B-class shape: memory, decode throughput,
greedy agreement.

The Llama-3-8B architecture with dummy weights (``load_format="dummy"``): the bf16 model draws
its weights from seeded generators; the W4A16 model's config adds an AWQ ``quantization_config``
(group size 128), and its dummy weights are the *same* draws rounded to nearest on AWQ's grid and
packed as AutoAWQ packs them, then loaded through the AWQ path like a checkpoint.  The FP8 model's
config is llm-compressor's FP8_DYNAMIC (compressed-tensors ``float-quantized``, per-channel e4m3
weights, dynamic per-token activations; ``--fp8-strategy block`` for ``[128, 128]`` blocks), its
dummy weights the same draws rounded to e4m3 in that layout.  So the models differ only by their
rounding and their greedy tokens can be compared.  ``--variants`` picks the quantized ones.

Reported per variant: weight memory (parameters and buffers of the model on the device) and KV
blocks the engine could allocate; decode throughput at each batch size (default 1, 16, 256):
``B`` requests of ``--prompt-len`` random tokens each run to ``T1`` and to ``T2`` new tokens,
greedy, EOS ignored; decode tokens/s = ``B (T2 - T1) / (t2 - t1)`` (prefill cancels out);
greedy agreement: the share of the bf16 model's first ``--agree-tokens`` tokens that a quantized
model reproduces before its first divergence, over ``--agree-prompts`` prompts.  Targets: W4A16
decode at batch 1 >= 2.5x bf16; FP8 weights within 10% of their bytes on disk (the e4m3 weights,
one float32 scale per output row, the bf16 embedding and LM head: what the model holds).  A
table is printed last; ``--out`` writes the JSON.

A third column (``--gguf-type``, default Q4_K on a GPU): the same shape with every linear weight,
the LM head and the embedding held as GGUF blocks of that type, random bytes with
half-precision scales of a weight's size, run by the Triton kernels of
``pagedattn.kernels.gguf_matmul`` -- what ``gguf_quantized`` does with a GGUF file, without
writing and converting a 5 GB one.  The blocks replace the dummy dense weights as the model
loads (before CUDA graphs are captured).  Its weight bytes are reported against the bytes a
GGUF file of that type takes for those matrices; greedy agreement is not (its weights are not
the bf16 model's).

    python benchmarks/bench_quant.py [--batches 1,16,256] [--out result.json]
    python benchmarks/bench_quant.py --device cpu --smoke     # a tiny Llama on the CPU, seconds

With ``--smoke`` on the CPU the int4 and FP8 weights are dequantized at load (the CPU path), so
its figures check the script, not the kernels.  The FP8 GEMM needs compute capability 8.9 or
newer (Ada, Hopper); older GPUs dequantize at load too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from bench_common import git_commit

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001, hidden_act="silu", torch_dtype="bfloat16",
)
TINY = {**LLAMA3_8B, "vocab_size": 320, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": 2}
# --smoke replaces these defaults (explicit flags still win).
SMOKE = dict(batches="1,2", prompt_len=8, t1=2, t2=6, agree_prompts=2, agree_tokens=6, max_num_seqs=4)


def awq_config(group_size: int) -> dict[str, Any]:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


def fp8_config(strategy: str) -> dict[str, Any]:
    """llm-compressor's FP8_DYNAMIC (per-channel) or FP8_BLOCK scheme."""
    block = strategy == "block"
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               "block_structure": [128, 128] if block else None}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
            "strategy": "group" if block else "token", "group_size": 128 if block else None}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "format": "float-quantized"}}}


VARIANTS = {"w4a16": ("w4a16 (awq)", lambda a: awq_config(a.group_size)),
            "fp8": ("fp8 e4m3", lambda a: fp8_config(a.fp8_strategy))}


def write_model(root: Path, name: str, shape: dict[str, Any], quant: dict[str, Any] | None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(shape) if quant is None else {**shape, "quantization_config": quant}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def weight_bytes(llm: Any) -> int:
    model = llm.engine.executor.worker.model
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(llm: Any, batch: list[list[int]], max_tokens: int, device: str) -> tuple[float, list[list[int]]]:
    from pagedattn import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    sync(device)
    t = time.perf_counter()
    out = llm.generate(batch, params, use_tqdm=False)
    sync(device)
    return time.perf_counter() - t, [list(r.outputs[0].token_ids) for r in out]


def decode_tok_s(llm: Any, batch: list[list[int]], t1: int, t2: int, device: str) -> float:
    """Decode tokens/s of a batch: the difference of two runs that differ only in output length."""
    timed_generate(llm, batch, t1, device)  # warm-up: kernels of this batch size compiled, graphs replayed
    a, _ = timed_generate(llm, batch, t1, device)
    b, _ = timed_generate(llm, batch, t2, device)
    if b <= a:  # a timing too noisy to difference (tiny smoke runs): the longer run's overall rate
        return len(batch) * t2 / b
    return len(batch) * (t2 - t1) / (b - a)


def random_gguf_blocks(kind: str, n: int, k: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """uint8 ``[n, row bytes]`` GGUF blocks of ``kind``: random codes and sub-scales, the
    half-precision scales (d, dmin, m) of a weight's size (so the activations stay finite)."""
    from pagedattn.kernels.gguf_matmul import GGUF_BLOCKS, row_bytes

    elems, nbytes = GGUF_BLOCKS[kind]
    blocks = torch.randint(0, 256, (n, k // elems, nbytes), generator=gen, dtype=torch.uint8)
    halves = {"Q6_K": (208,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2)}.get(kind, (0,))
    for at in halves:
        scale = (torch.rand(n, k // elems, 1, generator=gen) * 1e-3 + 2e-4).half()
        blocks[..., at:at + 2] = scale.view(torch.uint8)
    return blocks.reshape(n, row_bytes(kind, k)).to(device)


def gguf_block_bytes(model: Any) -> int:
    from pagedattn.models.layers.quantized import GGUFBlockWeight

    return sum(m.nbytes for m in model.modules() if isinstance(m, GGUFBlockWeight))


@contextlib.contextmanager
def gguf_blocks_at_load(kind: str, seed: int) -> Iterator[None]:
    """While active, every model the worker loads has its linear weights and embedding replaced
    by random ``kind`` blocks (:class:`GGUFBlockWeight`) right after loading, before warm-up and
    graphs."""
    import pagedattn.runtime.worker as worker
    from pagedattn.models.layers import ColumnParallelLinear, RowParallelLinear
    from pagedattn.models.layers.quantized import GGUFBlockWeight, set_quantized_weight
    from pagedattn.models.layers.vocab import VocabParallelEmbedding

    original = worker.load_model

    def load(*args: Any, **kwargs: Any) -> Any:
        model, source = original(*args, **kwargs)
        gen = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, ColumnParallelLinear | RowParallelLinear | VocabParallelEmbedding):
                n, k = module.weight.shape
                blocks = random_gguf_blocks(kind, n, k, module.weight.device, gen)
                set_quantized_weight(module, GGUFBlockWeight([(kind, blocks)], k, model.dtype))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return model, source

    worker.load_model = load
    try:
        yield
    finally:
        worker.load_model = original


def run_variant(folder: Path, args: argparse.Namespace, shape: dict[str, Any], gguf_type: str | None = None
                ) -> dict[str, Any]:
    from pagedattn import LLM

    t0 = time.perf_counter()
    with gguf_blocks_at_load(gguf_type, args.seed) if gguf_type else contextlib.nullcontext():
        llm = LLM(str(folder), load_format="dummy", device=args.device, dtype=args.dtype, seed=0,
                  max_model_len=args.prompt_len + args.t2 + max(args.agree_tokens, 16),
                  max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
                  enforce_eager=args.enforce_eager)
    try:
        res: dict[str, Any] = {"init_seconds": time.perf_counter() - t0, "weight_bytes": weight_bytes(llm),
                               "kv_blocks": llm.get_metrics()["kv_blocks_total"], "decode_tok_per_s": {}}
        for b in args.batch_sizes:
            batch = prompts(b, args.prompt_len, shape["vocab_size"], seed=b)
            res["decode_tok_per_s"][str(b)] = decode_tok_s(llm, batch, args.t1, args.t2, args.device)
        if gguf_type:
            res["gguf_block_bytes"] = gguf_block_bytes(llm.engine.executor.worker.model)
        elif args.agree_prompts:
            agree = prompts(args.agree_prompts, args.prompt_len, shape["vocab_size"], seed=12345)
            res["greedy"] = timed_generate(llm, agree, args.agree_tokens, args.device)[1]
    finally:
        llm.shutdown()
        del llm
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return res


def matrix_file_bytes(shape: dict[str, Any], kind: str) -> int:
    """The bytes a GGUF file of ``kind`` takes for the shape's matrices: the linear weights, the
    LM head and the embedding."""
    from pagedattn.kernels.gguf_matmul import row_bytes

    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    per_layer = (h + 2 * kv + h + 2 * i) * row_bytes(kind, h) + h * row_bytes(kind, i)
    return shape["num_hidden_layers"] * per_layer + 2 * v * row_bytes(kind, h)


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    """Share of the reference tokens reproduced before the first divergence, and first-token agreement."""
    prefix = []
    for r, g in zip(ref, got, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), len(r))
        prefix.append(n / len(r))
    first = sum(r[0] == g[0] for r, g in zip(ref, got, strict=True)) / len(ref)
    return {"prefix_share": sum(prefix) / len(prefix), "first_token": first}


def table(res: dict[str, Any], variants: list[str]) -> str:
    """One column per model, each quantized one followed by its ratio to bf16."""
    bf = res["bf16"]
    cols = [(VARIANTS[v][0], v) for v in variants] + ([(f"gguf {res['gguf_type']}", "gguf")] if "gguf" in res else [])
    head = f"{'':24}{'bf16':>14}" + "".join(f"{name:>14}{'ratio':>9}" for name, _ in cols)
    # (label, value, format, ratio as bf16 / quantized: the memory saved)
    rows = [("weights MiB", lambda r: r["weight_bytes"] / 2**20, ".1f", True),
            ("KV blocks", lambda r: r["kv_blocks"], "d", False)]
    rows += [(f"decode tok/s, batch {b}", lambda r, b=b: r["decode_tok_per_s"][b], ".1f", False)
             for b in bf["decode_tok_per_s"]]
    lines = [head]
    for label, get, fmt, inverse in rows:
        line = f"{label:24}{get(bf):>14{fmt}}"
        for _, key in cols:
            q = get(res[key])
            line += f"{q:>14{fmt}}{(get(bf) / q if inverse else q / get(bf)):>8.2f}x"
        lines.append(line)
    for v, a in res["greedy_agreement"].items():
        lines.append(f"{VARIANTS[v][0]} greedy agreement with bf16: {a['prefix_share']:.1%} of tokens before the "
                     f"first divergence, first token {a['first_token']:.0%}")
    if "gguf" in res:
        g = res["gguf"]
        lines.append(f"gguf {res['gguf_type']}: {g['gguf_block_bytes'] / 2**20:.1f} MiB of blocks, "
                     f"{g['gguf_block_bytes'] / g['gguf_file_bytes']:.3f}x a file's bytes for those matrices; "
                     f"all weights {g['weight_bytes'] / g['gguf_file_bytes']:.3f}x (target <= 1.10x)")
    if "w4a16" in res["speedup_batch1"]:
        lines.append(f"target: w4a16 decode at batch 1 >= 2.5x bf16: {res['speedup_batch1']['w4a16']:.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="activations and dense weights (default: bfloat16; float32 "
                    "with --smoke on the CPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny Llama and workload (a CPU check in seconds)")
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--t1", type=int, default=16, help="output tokens of the shorter run")
    ap.add_argument("--t2", type=int, default=144, help="output tokens of the longer run")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--variants", default="w4a16,fp8", help="quantized models to compare with bf16: "
                    f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--fp8-strategy", choices=("channel", "block"), default="channel")
    ap.add_argument("--agree-prompts", type=int, default=16, help="prompts of the greedy agreement check (0: none)")
    ap.add_argument("--agree-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--gguf-type", default=None, help="GGUF block type of the third column (Q4_0, Q4_1, Q8_0, Q4_K, "
                    "Q5_K, Q6_K; 'none': no column; default: Q4_K on a GPU, none on the CPU, where the kernels "
                    "need Triton's interpreter)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random GGUF blocks")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.agree_prompts < 0 or args.agree_tokens < 1:
        ap.error("--agree-prompts must be >= 0 and --agree-tokens >= 1")
    if args.smoke:
        for name, value in SMOKE.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.gguf_type is None:
        args.gguf_type = "none" if args.device == "cpu" else "Q4_K"
    from pagedattn.kernels.gguf_matmul import GGUF_BLOCKS

    if args.gguf_type != "none" and args.gguf_type not in GGUF_BLOCKS:
        ap.error(f"--gguf-type: one of {', '.join(GGUF_BLOCKS)} or none")
    args.batch_sizes = [int(b) for b in args.batches.split(",")]
    args.variant_names = [v for v in args.variants.split(",") if v]
    if not args.variant_names or any(v not in VARIANTS for v in args.variant_names):
        ap.error(f"--variants must name some of {', '.join(VARIANTS)}")
    if max(args.batch_sizes) > args.max_num_seqs or not 0 < args.t1 < args.t2:
        ap.error("need every batch <= --max-num-seqs and 0 < --t1 < --t2")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --smoke")
    shape = TINY if args.smoke else LLAMA3_8B
    res: dict[str, Any] = {"commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                           "shape": "tiny llama" if args.smoke else "Llama-3-8B", "dtype": args.dtype,
                           "group_size": args.group_size, "fp8_strategy": args.fp8_strategy,
                           "prompt_len": args.prompt_len, "t1": args.t1, "t2": args.t2}
    variants = args.variant_names
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        res["bf16"] = run_variant(write_model(root, "dense", shape, None), args, shape)
        for v in variants:
            res[v] = run_variant(write_model(root, v, shape, VARIANTS[v][1](args)), args, shape)
        if args.gguf_type != "none":
            res["gguf_type"] = args.gguf_type
            res["gguf"] = run_variant(root / "dense", args, shape, args.gguf_type)
            res["gguf"]["gguf_file_bytes"] = matrix_file_bytes(shape, args.gguf_type)
    ref = res["bf16"].pop("greedy", None)  # None: --agree-prompts 0
    res["greedy_agreement"] = {v: agreement(ref, res[v].pop("greedy")) for v in variants} if ref else {}
    # The target's ratio; empty when batch 1 was not run (no other batch stands in for it).
    res["speedup_batch1"] = {v: res[v]["decode_tok_per_s"]["1"] / res["bf16"]["decode_tok_per_s"]["1"]
                             for v in variants} if 1 in args.batch_sizes else {}
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print(table(res, variants))
    return res


if __name__ == "__main__":
    main()
