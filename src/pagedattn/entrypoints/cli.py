"""``pagedattn`` command line: generate, chat, serve, viz."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ..viz.trace import check_trace_path


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2-135M)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--swap-space-gib", type=float, default=4)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--preemption-mode", choices=["swap", "recompute"], default="swap")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto")
    g.add_argument("--enforce-eager", action="store_true", help="never capture CUDA graphs")
    g.add_argument("--cuda-graph-max-batch", type=int, default=1024,
                   help="largest decode batch run as a CUDA graph (capped by --max-num-seqs); larger ones run eagerly")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                   help="shard the model over N ranks: N GPUs (cuda:0..N-1) or N CPU processes; started here, "
                        "or by torchrun (--nproc-per-node N, WORLD_SIZE must equal N)")
    g.add_argument("--distributed-timeout", type=float, default=None,
                   help="seconds a tensor-parallel start-up or step may take before it is an error (default 600)")
    g.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: seeded random weights from config.json alone (benchmarks)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def build_llm(args: argparse.Namespace) -> Any:
    from ..engine.llm import LLM

    extra = {} if args.distributed_timeout is None else {"distributed_timeout_s": args.distributed_timeout}
    return LLM(
        args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        swap_space_gib=args.swap_space_gib, enable_prefix_caching=not args.no_prefix_caching,
        preemption_mode=args.preemption_mode, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
        cuda_graph_max_batch=args.cuda_graph_max_batch, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format, **extra,
    )


def _sampling_params(args: argparse.Namespace, n: int = 1) -> Any:
    from ..engine.sampling_params import SamplingParams

    return SamplingParams(
        n=n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.sample_seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    if args.trace:  # a bad path fails now, not after loading the model and generating
        check_trace_path(args.trace)
    with build_llm(args) as llm:
        return _generate(llm, args)


def _generate(llm: Any, args: argparse.Namespace) -> int:
    params = _sampling_params(args, args.n)
    tracer = None
    if args.trace:
        from ..viz.trace import TraceRecorder

        tracer = TraceRecorder(args.trace)
        llm.engine.attach_tracer(tracer)
    prompts = args.prompt or ["The capital of France is"]
    if args.chat:
        prompts = [{"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": p}])} for p in prompts]
    if len(prompts) == 1 and args.n == 1 and not args.json:
        printed = 0
        print(prompts[0] if isinstance(prompts[0], str) else "", end="", flush=True)
        for out in llm.stream(prompts, params):
            text = out.outputs[0].text if out.outputs else ""
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
        print()
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
        for o in outs:
            for c in o.outputs:
                if args.json:
                    print(json.dumps({"prompt": o.prompt, "index": c.index, "text": c.text,
                                      "token_ids": c.token_ids, "finish_reason": c.finish_reason}))
                else:
                    print(f"--- prompt: {o.prompt!r} [sample {c.index}, {c.finish_reason}]\n{o.prompt or ''}{c.text}")
    if tracer is not None:
        llm.engine.detach_tracer()
        print(f"trace written to {args.trace}", file=sys.stderr)
    if args.metrics:
        print(json.dumps(llm.get_metrics(), indent=2), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    with build_llm(args) as llm:
        return _chat(llm, args)


def _chat(llm: Any, args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("pagedattn chat: empty line or Ctrl-D to quit, /reset to clear the history", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = llm.apply_chat_template(history)
        printed = 0
        text = ""
        for out in llm.stream([{"prompt_token_ids": ids}], params):
            text = out.outputs[0].text if out.outputs else ""
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
        print()
        history.append({"role": "assistant", "content": text})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import run_server

    return run_server(args)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagedattn", description="PagedAttention LLM inference engine")
    p.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompt", nargs="*", help="prompt text (default: 'The capital of France is')")
    g.add_argument("-n", type=int, default=1, help="samples per prompt")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON line per sample")
    g.add_argument("--trace", default=None, help="record a block-pool trace (JSON lines) to this file")
    g.add_argument("--metrics", action="store_true", help="print engine metrics to stderr at the end")
    _engine_args(g)
    _sampling_args(g, max_tokens=64)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("--system", default=None, help="system prompt")
    _engine_args(c)
    _sampling_args(c, max_tokens=256)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish on SIGTERM/SIGINT")
    # Defaults (None) are ServerLimits' own.
    s.add_argument("--max-connections", type=int, default=None, help="open connections; more get a 503 (2048)")
    s.add_argument("--max-body-bytes", type=int, default=None, help="request body size; larger gets a 413 (4 MiB)")
    s.add_argument("--header-timeout", type=float, default=None, help="seconds a request's headers may take (10)")
    s.add_argument("--body-timeout", type=float, default=None, help="seconds a request's body may take (30)")
    s.add_argument("--enable-docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    _engine_args(s)
    s.set_defaults(func=cmd_serve)

    try:
        from ..viz.cli import add_viz_parser, run_viz

        v = add_viz_parser(sub)
        v.set_defaults(func=run_viz)
    except ImportError:  # matplotlib missing: the other commands still work
        pass
    return p


def _serve_as_torchrun_worker(args: argparse.Namespace) -> bool:
    """Under ``torchrun``, ranks other than 0 serve rank 0's engine instead of running the
    command (which only rank 0 does: reading prompts, printing, listening on the port)."""
    if args.command not in ("generate", "chat", "serve") or args.tensor_parallel_size == 1:
        return False
    from ..config import resolve_device
    from ..distributed import DEFAULT_TIMEOUT_S, TorchrunEnv, run_torchrun_worker

    env = TorchrunEnv.detect()
    if env is None or env.world_size == 1 or env.rank == 0:
        return False
    if args.tensor_parallel_size != env.world_size:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size} but torchrun started "
                         f"WORLD_SIZE={env.world_size} processes; they must be equal")
    run_torchrun_worker(env, resolve_device(args.device).type, args.distributed_timeout or DEFAULT_TIMEOUT_S)
    return True


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if _serve_as_torchrun_worker(args):
            return 0
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
