"""``pagedattn`` command line: generate, chat, serve, viz."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import sys
from typing import Any

from ..config import EngineConfig, add_engine_args, config_from_args
from ..viz.trace import check_trace_path
from .chat_output import REASONING_PARSERS, TOOL_CALL_PARSERS


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


def build_llm(config: EngineConfig) -> Any:
    from ..engine.llm import LLM

    return LLM.from_config(config)


def _sampling_params(args: argparse.Namespace, n: int = 1) -> Any:
    from ..engine.sampling_params import SamplingParams

    return SamplingParams(
        n=n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.sample_seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace, config: EngineConfig) -> int:
    params = _sampling_params(args, args.n)  # bad flags fail now, not after loading the model
    if args.trace:
        check_trace_path(args.trace)
    with build_llm(config) as llm:
        return _generate(llm, args, params)


def _generate(llm: Any, args: argparse.Namespace, params: Any) -> int:
    tracer = None
    if args.trace:
        from ..viz.trace import TraceRecorder

        tracer = TraceRecorder(args.trace)
        llm.engine.attach_tracer(tracer)
    prompts = args.prompt or ["The capital of France is"]
    if args.chat:
        prompts = [{"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": p}])} for p in prompts]
    if len(prompts) == 1 and args.n == 1 and not args.json:
        print(prompts[0] if isinstance(prompts[0], str) else "", end="", flush=True)
        _print_stream(llm, prompts[0], params)
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


def cmd_chat(args: argparse.Namespace, config: EngineConfig) -> int:
    params = _sampling_params(args)
    with build_llm(config) as llm:
        return _chat(llm, args, params)


def _chat(llm: Any, args: argparse.Namespace, params: Any) -> int:
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("pagedattn chat: empty line or Ctrl-D to quit, /reset to clear the history", file=sys.stderr)
    # Undecodable input bytes arrive as lone surrogates, which the engine refuses (below), so a
    # mistyped line costs that line, not the session.
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
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
        try:
            history.append({"role": "user", "content": line})
            text = _chat_turn(llm, history, params)
        except ValueError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": text})
    return 0


def _chat_turn(llm: Any, history: list[dict[str, str]], params: Any) -> str:
    for m in history[-1:]:
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the line is not valid UTF-8 text; type it again") from None
    ids = llm.apply_chat_template(history)
    return _print_stream(llm, {"prompt_token_ids": ids}, params)


def _print_stream(llm: Any, prompt: Any, params: Any) -> str:
    """Print one sample's text as it comes and return it.  Deltas: the engine holds back what
    may begin a stop string, so nothing printed is cut later."""
    from ..engine.sampling_params import RequestOutputKind

    text = ""
    for out in llm.stream([prompt], dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)):
        for c in out.outputs:
            sys.stdout.write(c.text)
            sys.stdout.flush()
            text += c.text
    print()
    return text


def cmd_serve(args: argparse.Namespace, config: EngineConfig) -> int:
    from .server import ChatParsing, ServerLimits, run_server

    limits = ServerLimits(**{f: getattr(args, flag) for f, flag in _SERVE_LIMITS.items()
                             if getattr(args, flag) is not None})
    chat = ChatParsing(tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser)
    return run_server(lambda: build_llm(config).engine, served_model_name=args.served_model_name,
                      model=config.model, host=args.host, port=args.port, limits=limits,
                      enable_docs=args.enable_docs, verbose=args.verbose, access=_access(args), chat=chat)


def _access(args: argparse.Namespace) -> Any:
    """The API key (the flag, else PAGEDATTN_API_KEY) and CORS options of ``serve``."""
    from ..envs import api_key
    from .access import ServerAccess

    key = args.api_key if args.api_key is not None else api_key()
    return ServerAccess(api_key=key, protect_probes=args.protect_probes, allowed_origins=args.allowed_origins,
                        allowed_methods=args.allowed_methods, allowed_headers=args.allowed_headers,
                        allow_credentials=args.allow_credentials)


def _list(text: str) -> tuple[str, ...]:
    from .access import parse_list

    try:
        return parse_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ServerLimits' fields and their flags (None: the field's default).
_SERVE_LIMITS = {"max_body_bytes": "max_body_bytes", "max_connections": "max_connections",
                 "header_timeout_s": "header_timeout", "body_timeout_s": "body_timeout",
                 "shutdown_grace_s": "shutdown_timeout"}


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


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
    add_engine_args(g)
    _sampling_args(g, max_tokens=64)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("--system", default=None, help="system prompt")
    add_engine_args(c)
    _sampling_args(c, max_tokens=256)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--shutdown-timeout", type=float, default=None,
                   help="seconds running requests get to finish on SIGTERM/SIGINT (10)")
    # Defaults (None) are ServerLimits' own.
    s.add_argument("--max-connections", type=int, default=None, help="open connections; more get a 503 (2048)")
    s.add_argument("--max-body-bytes", type=int, default=None, help="request body size; larger gets a 413 (4 MiB)")
    s.add_argument("--header-timeout", type=float, default=None, help="seconds a request's headers may take (10)")
    s.add_argument("--body-timeout", type=float, default=None, help="seconds a request's body may take (30)")
    s.add_argument("--enable-docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    t = s.add_argument_group("chat answers")
    t.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                   help="how tool calls are read from the text for tool_choice 'auto' (hermes: <tool_call> blocks, "
                   "Qwen and SmolLM-style; llama3_json: Llama 3's JSON calls); default: none, 'auto' with tools is "
                   "refused")
    t.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="split <think>...</think> into reasoning_content (qwen3: when the answer opens it; "
                   "deepseek_r1: the template opened it); default: none")
    a = s.add_argument_group("access")
    a.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: "
                   "$PAGEDATTN_API_KEY, which unlike a flag does not show in the process list; none: no key)")
    a.add_argument("--protect-probes", action="store_true", help="with a key, /health and /metrics need it too")
    a.add_argument("--allowed-origins", type=_list, default=(), help="CORS origins, a JSON list or comma-separated "
                   "(e.g. '[\"https://app.example\"]', or '*' for all; default: none, CORS off)")
    a.add_argument("--allowed-methods", type=_list, default=("*",), help="CORS methods (default: all)")
    a.add_argument("--allowed-headers", type=_list, default=("*",), help="CORS request headers (default: all)")
    a.add_argument("--allow-credentials", action="store_true", help="CORS: allow cookies and credentials")
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)

    try:
        from ..viz.cli import add_viz_parser, run_viz

        v = add_viz_parser(sub)
        v.set_defaults(func=run_viz)
    except ImportError:  # matplotlib missing: the other commands still work
        pass
    return p


def _serve_as_torchrun_worker(config: EngineConfig) -> bool:
    """Under ``torchrun``, ranks other than 0 serve rank 0's engine instead of running the
    command (which only rank 0 does: reading prompts, printing, listening on the port)."""
    from ..distributed import TorchrunEnv, run_torchrun_worker

    env = TorchrunEnv.for_tensor_parallel(config.tensor_parallel_size)
    if env is None or env.rank == 0:
        return False
    run_torchrun_worker(env, config.torch_device.type, config.distributed_timeout_s)
    return True


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "viz":
            return int(args.func(args) or 0)
        config = config_from_args(args)  # every engine flag checked before anything loads
        if _serve_as_torchrun_worker(config):
            return 0
        return int(args.func(args, config) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
