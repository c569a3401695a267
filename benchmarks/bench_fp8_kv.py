"""FP8 KV cache against the 16-bit cache: decode attention, and long-context decode end to end.

1. Kernel: the Triton backend's decode attention over a bf16 cache and over an fp8 (e4m3) cache
   of the same values (scale amax / 448 per tensor), batch x context from ``--shapes`` (default
   32 x 16384), Hq/Hkv/D from ``--heads`` (default Llama-3's 32/8/128), pages of 16 tokens with
   shuffled block ids.  Times are medians of ``triton.testing.do_bench``; GB/s counts the K/V
   bytes read; the error is against fp32 SDPA over each cache's dequantized pages, and the fp8
   result's against the bf16 result.
2. End to end (``--e2e``): decode throughput of the engine with ``kv_cache_dtype="auto"`` (bf16)
   and ``"fp8"``, each in a fresh process: a Llama-3.2-1B-shaped model (random weights from its
   config, ``load_format="dummy"``), ``--e2e-batch`` requests of ``--e2e-context`` random
   prompt tokens (prefix caching off), EOS ignored, greedy.  Decode tokens/s is the batch over
   the median time of the engine steps that gave every request a token (the whole batch
   decoding at the full context), after every request has its first token.  (Dividing
   ``batch x --e2e-new`` by the time after the first tokens overstated it: prompts prefilled
   early have decoded part of their tokens by then.)

Prints a table and writes every number as JSON (``--out``).

    python benchmarks/bench_fp8_kv.py --out fp8_kv.json [--shapes 32x16384,64x4096] [--e2e] [--sweep]
    python benchmarks/bench_fp8_kv.py --e2e --no-kernel --device cpu --smoke   # a CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_common import child_result, git_commit, run_child

PAGE = 16
# Llama-3.2-1B's shape: 16 layers of 32 query and 8 KV heads of 64 dims; long contexts make its
# decode steps read far more KV bytes than weight bytes.
LLAMA_1B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
)
# A CPU check of the same code paths: a tiny Llama.
TINY = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            bos_token_id=1, eos_token_id=2)
E2E_BUDGET = 8192  # the engine's token budget per step in the end-to-end runs


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [(int(b), int(c)) for b, c in (s.split("x") for s in text.split(","))]
    except ValueError:
        raise ValueError(f"shapes: expected BxL,BxL,... (e.g. 32x16384), got {text!r}") from None
    if not shapes or any(b < 1 or c < PAGE for b, c in shapes):
        raise ValueError(f"shapes: batch >= 1 and context >= {PAGE} each, got {text!r}")
    return shapes


def parse_heads(text: str) -> tuple[int, int, int]:
    try:
        hq, hkv, d = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"heads: expected HQ/HKV/D (e.g. 32/8/128), got {text!r}") from None
    if min(hq, hkv, d) < 1 or hq % hkv:
        raise ValueError(f"heads: HQ a multiple of HKV, all >= 1, got {text!r}")
    return hq, hkv, d


# ---------------------------------------------------------------------- 1. the kernel
def kernel_row(batch: int, ctx: int, heads: tuple[int, int, int], quick: bool, sweep: bool = False,
               device: str = "cuda") -> dict[str, Any]:
    import torch.nn.functional as F
    import triton

    from pagedattn.attention import AttentionLayerSpec, AttentionMetadata
    from pagedattn.attention.backend import KVScales
    from pagedattn.attention.triton_backend import TritonBackend
    from pagedattn.cache.kv_pool import FP8_KV_MAX, dequantize, quantize_fp8

    hq, hkv, d = heads
    g = torch.Generator().manual_seed(0)
    per_seq = -(-ctx // PAGE)
    n_blocks = batch * per_seq
    tables = torch.randperm(n_blocks, generator=g).view(batch, per_seq).tolist()
    meta = AttentionMetadata.build([1] * batch, [ctx] * batch, tables, PAGE, device=device)
    layer = AttentionLayerSpec(hq, hkv, d, d**-0.5)
    caches = {"bf16": tuple(torch.randn(n_blocks, PAGE, hkv, d, device=device, dtype=torch.bfloat16)
                            for _ in range(2))}
    k16, v16 = caches["bf16"]
    scales = KVScales(*(c.abs().amax().float().view(1) / FP8_KV_MAX for c in (k16, v16)))
    caches["fp8"] = (quantize_fp8(k16, scales.k), quantize_fp8(v16, scales.v))
    q = torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16)
    backend = TritonBackend()
    idx = meta.block_tables.long()
    row: dict[str, Any] = {"batch": batch, "ctx": ctx, "heads": list(heads)}
    outs = {}
    for name, (kc, vc) in caches.items():
        sc = scales if name == "fp8" else None
        outs[name] = backend.attend(q, kc, vc, meta, layer, sc)
        ms = triton.testing.do_bench(lambda kc=kc, vc=vc, sc=sc: backend.attend(q, kc, vc, meta, layer, sc),
                                     warmup=10 if quick else 25, rep=40 if quick else 200, return_mode="median")
        # fp32 oracle over this cache's dequantized pages, [B, Hkv, L, D]
        k, v = (dequantize(c, None if sc is None else s)[idx].view(batch, -1, hkv, d)[:, :ctx].transpose(1, 2)
                for c, s in ((kc, scales.k), (vc, scales.v)))
        ref = F.scaled_dot_product_attention(q.float().view(batch, hq, 1, d), k, v, enable_gqa=True)
        kv_bytes = 2 * batch * ctx * hkv * d * kc.element_size()
        row[name] = {"us": ms * 1e3, "gbps": kv_bytes / (ms * 1e-3) / 1e9,
                     "max_err_vs_own_ref": (outs[name].float() - ref.view(batch, hq, d)).abs().max().item()}
        del k, v, ref
    row["fp8"]["max_diff_vs_bf16"] = (outs["fp8"].float() - outs["bf16"].float()).abs().max().item()
    row["speedup"] = row["bf16"]["us"] / row["fp8"]["us"]
    if sweep:
        row["sweep"] = sweep_fp8(q, caches["fp8"], scales, meta, layer)
    return row


def sweep_fp8(q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], scales: Any, meta: Any,
              layer: Any) -> list[dict[str, Any]]:
    """The decode kernel alone over the fp8 pages: tile configs x split counts (a tuning aid:
    an e4m3 tile takes half the shared memory of a bf16 one, so larger tiles or more stages may
    pay off)."""
    import triton

    from pagedattn.attention import triton_ops as ops

    out = torch.empty_like(q)
    rows: list[dict[str, Any]] = []
    for block_n in (32, 64, 128):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                cfg = ops.DecodeConfig(block_n, warps, stages)
                for splits in (1, 2, 4, 8):
                    def run(cfg: Any = cfg, splits: int = splits) -> None:
                        ops.decode_attention(q, cache[0], cache[1], meta.block_tables, meta.seq_lens, layer.scale,
                                             None, out, splits, config=cfg, k_scale=scales.k, v_scale=scales.v)
                    try:
                        us = triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median") * 1e3
                    except Exception as e:  # out of shared memory etc.
                        rows.append({"block_n": block_n, "num_warps": warps, "num_stages": stages, "splits": splits,
                                     "error": str(e)[:120]})
                        continue
                    rows.append({"block_n": block_n, "num_warps": warps, "num_stages": stages, "splits": splits,
                                 "us": us})
    return rows


# ---------------------------------------------------------------------- 2. end to end
def prefill_steps(prompts: list[list[int]], budget: int) -> int:
    """Prompts prefilled early decode while later ones prefill: every request gets this many
    tokens more than ``new``, so that ``new`` steps decode the whole batch."""
    return -(-sum(map(len, prompts)) // budget) + 1


def stepped(engine: Any, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """All prompts at once, greedy, until at least ``new`` steps have decoded the whole batch.
    Returns the seconds until every request has its first token, the decode after that (seconds
    and tokens), the median seconds of the steps that gave every request a token (the full batch
    decoding at the full context: the figure compared) and each request's first ``new + 1``
    tokens."""
    from pagedattn import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=new + prefill_steps(prompts, engine.config.max_num_batched_tokens),
                        ignore_eos=True)
    ids = [engine.add_request(p, sp) for p in prompts]
    tokens: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    t_first = None
    at_first = 0
    full: list[float] = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        for out in outs:
            tokens[out.request_id] = list(out.outputs[0].token_ids)
        if t_first is None and len(tokens) == len(ids) and all(tokens.values()):
            t_first = time.perf_counter()
            at_first = sum(map(len, tokens.values()))
        elif t_first is not None and len(outs) == len(ids):
            full.append(dt)
    t_end = time.perf_counter()
    assert t_first is not None
    decode_tokens = sum(map(len, tokens.values())) - at_first
    return {"to_first_token_s": t_first - t0, "decode_s": max(t_end - t_first, 1e-9), "decode_tokens": decode_tokens,
            "full_batch_steps": len(full), "full_batch_step_s": statistics.median(full) if full else None,
            "tokens": [tokens[i][:new + 1] for i in ids]}


def e2e_run(cfg: dict[str, Any]) -> dict[str, Any]:
    """One engine (``cfg["kv_cache_dtype"]``), the long prompts to ``new + 1`` tokens (see
    :func:`stepped`); returns the times and the decode throughput."""
    from pagedattn import LLM, SamplingParams

    batch, ctx, new = cfg["batch"], cfg["context"], cfg["new"]
    rng = random.Random(0)
    vocab = cfg["model_config"]["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(ctx)] for _ in range(batch)]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "config.json").write_text(json.dumps(cfg["model_config"]))
        t0 = time.perf_counter()
        with LLM(folder, load_format="dummy", device=cfg["device"], kv_cache_dtype=cfg["kv_cache_dtype"],
                 max_model_len=ctx + new + prefill_steps(prompts, E2E_BUDGET), max_num_seqs=batch,
                 max_num_batched_tokens=E2E_BUDGET, enable_prefix_caching=False,
                 **cfg.get("engine", {})) as llm:
            start_s = time.perf_counter() - t0
            pool = llm.engine.executor.worker.pool
            assert pool is not None
            info = {"kv_dtype": str(pool.kv.dtype), "kv_blocks": pool.num_blocks,
                    "kv_gib": pool.nbytes / 2**30, "bytes_per_token": pool.spec.bytes_per_token}

            llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # allocator, first launches
            run = stepped(llm.engine, prompts, new)
            preempted = llm.get_metrics()["num_preemptions"]
    step_s = run["full_batch_step_s"]
    # Decode throughput: the full batch's steps (every request decoding at its full context),
    # else (too few tokens for any such step) the decode phase's tokens over its time.
    rate = batch / step_s if step_s else run["decode_tokens"] / run["decode_s"]
    return {**info, "start_s": start_s, **run, "full_s": run["to_first_token_s"] + run["decode_s"],
            "decode_tok_s": rate, "preemptions": preempted}


def e2e(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {"batch": args.e2e_batch, "context": args.e2e_context, "new": args.e2e_new, "device": args.device,
           "model_config": TINY if args.smoke else LLAMA_1B,
           "engine": {"num_kv_blocks": 64 * args.e2e_batch, "block_size": 4} if args.smoke else {}}
    runs = {kv: run_child(__file__, {**cfg, "kv_cache_dtype": kv}, timeout=3600, verbose=args.verbose)
            for kv in ("auto", "fp8")}
    a, f = runs["auto"]["tokens"], runs["fp8"]["tokens"]
    agree = sum(x == y for s, t in zip(a, f) for x, y in zip(s, t)) / max(1, sum(map(len, a)))
    for r in runs.values():
        r.pop("tokens")
    return {**runs, "config": {k: v for k, v in cfg.items() if k != "model_config"},
            "speedup": runs["fp8"]["decode_tok_s"] / runs["auto"]["decode_tok_s"], "token_agreement": agree}


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write all numbers as JSON here")
    ap.add_argument("--shapes", default="32x16384", help="kernel: batch x context, BxL,BxL,...")
    ap.add_argument("--heads", default="32/8/128", help="kernel: query heads / KV heads / head_dim")
    ap.add_argument("--quick", action="store_true", help="kernel: fewer timing repetitions")
    ap.add_argument("--sweep", action="store_true", help="kernel: also sweep the fp8 decode kernel's tile configs")
    ap.add_argument("--no-kernel", dest="kernel", action="store_false", help="skip the kernel comparison")
    ap.add_argument("--e2e", action="store_true", help="also compare the engine's long-context decode throughput")
    ap.add_argument("--e2e-batch", type=int, default=32, help="end to end: requests")
    ap.add_argument("--e2e-context", type=int, default=16384, help="end to end: prompt tokens per request")
    ap.add_argument("--e2e-new", type=int, default=128, help="end to end: new tokens timed per request")
    ap.add_argument("--device", default="cuda", help="end to end: the engine's device (cpu only with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="end to end on a tiny model (a CPU check of the code)")
    ap.add_argument("--verbose", action="store_true", help="show the engine runs' logs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def check_args(args: argparse.Namespace) -> None:
    parse_shapes(args.shapes)
    parse_heads(args.heads)
    for name in ("e2e_batch", "e2e_context", "e2e_new"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    if args.kernel and not torch.cuda.is_available():
        raise ValueError("the kernel comparison needs a CUDA GPU (the Triton kernels); use --no-kernel")
    if not args.kernel and not args.e2e:
        raise ValueError("nothing to run: --no-kernel without --e2e")
    if args.e2e and args.device != "cuda" and not args.smoke:
        raise ValueError("device: the end-to-end comparison is a GPU benchmark; a CPU runs it only with --smoke")


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['device']}  torch {result['torch']}  commit {result['commit']}")
    if result["kernel"]:
        print(f"{'B':>4} {'L':>6} | {'bf16 us':>9} {'GB/s':>6} | {'fp8 us':>9} {'GB/s':>6} | {'speedup':>7} | "
              f"{'err bf16':>8} {'err fp8':>8} {'fp8-bf16':>8}")
        for r in result["kernel"]:
            b, f = r["bf16"], r["fp8"]
            print(f"{r['batch']:>4} {r['ctx']:>6} | {b['us']:9.1f} {b['gbps']:6.0f} | "
                  f"{f['us']:9.1f} {f['gbps']:6.0f} | {r['speedup']:7.2f} | "
                  f"{b['max_err_vs_own_ref']:8.1e} {f['max_err_vs_own_ref']:8.1e} "
                  f"{f['max_diff_vs_bf16']:8.1e}")
            ok = sorted((x for x in r.get("sweep", []) if "us" in x), key=lambda x: x["us"])
            if ok:
                print("  fp8 sweep, best: " + "; ".join(f"bn{x['block_n']} w{x['num_warps']} s{x['num_stages']} "
                                                        f"sp{x['splits']} {x['us']:.0f}us" for x in ok[:4]))
    if result["e2e"]:
        e = result["e2e"]
        c = e["config"]
        print(f"\nend to end: {c['batch']} requests x {c['context']} prompt tokens, {c['new']} new tokens each")
        print(f"{'cache':>6} | {'blocks':>7} {'GiB':>6} | {'full-batch steps':>16} {'ms/step':>8} {'tok/s':>9} | "
              f"{'preempt':>7}")
        for kv in ("auto", "fp8"):
            r = e[kv]
            ms = f"{1e3 * r['full_batch_step_s']:8.2f}" if r["full_batch_step_s"] else f"{'-':>8}"
            print(f"{kv:>6} | {r['kv_blocks']:7d} {r['kv_gib']:6.2f} | {r['full_batch_steps']:16d} {ms} "
                  f"{r['decode_tok_s']:9.1f} | {r['preemptions']:7d}")
        print(f"decode speedup fp8/auto: {e['speedup']:.2f}x; greedy tokens equal: {100 * e['token_agreement']:.0f}%")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.child is not None:
        child_result(e2e_run(json.loads(args.child)))
        return {}
    check_args(args)
    on_cuda = torch.cuda.is_available()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu",
                              "torch": torch.__version__, "python": platform.python_version(),
                              "commit": git_commit(), "kernel": [], "e2e": None}
    if args.kernel:
        heads = parse_heads(args.heads)
        for b, c in parse_shapes(args.shapes):
            result["kernel"].append(kernel_row(b, c, heads, args.quick, args.sweep))
            torch.cuda.empty_cache()
    if args.e2e:
        result["e2e"] = e2e(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
