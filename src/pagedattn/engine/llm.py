"""The offline API, shaped like vLLM's: ``LLM(...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any, cast

from tqdm.auto import tqdm

from ..config import EngineConfig
from .generation_defaults import log_defaults
from .llm_engine import LLMEngine, PromptInput
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """Load a model (the embedded default when ``model`` is None) and generate with it.

    Every keyword is a field of :class:`~pagedattn.config.EngineConfig` (the same names as the
    command line's flags; ``pagedattn generate --help`` lists them with their defaults), checked
    before anything loads.  The main ones:

    * ``device=None`` picks CUDA when present; ``dtype`` float32 (default), bfloat16 or float16.
    * ``num_kv_blocks=None`` sizes the KV pool from ``gpu_memory_utilization`` on a GPU (after a
      warm-up measures peak activation memory) or from ``cpu_kv_space_gib`` on the CPU;
      ``swap_space_gib`` of CPU memory holds swapped-out blocks (``preemption_mode="swap"``).
    * On CUDA, decode batches up to ``min(max_num_seqs, cuda_graph_max_batch)`` run as captured
      CUDA graphs (``enforce_eager=True``: none); larger ones run eagerly.
    * ``tensor_parallel_size=N`` shards the model over N ranks (N GPUs ``cuda:0..N-1``, or N CPU
      processes): the engine's process is rank 0 and starts the others itself, unless it was
      launched by ``torchrun`` with ``WORLD_SIZE=N`` (then ranks 1.. serve rank 0 from inside
      this constructor, which never returns on them).  Memory budgets are per rank.  Call
      :meth:`shutdown` (or use the object as a context manager) to stop the workers; they are
      also stopped at interpreter exit.
    * ``load_format="dummy"`` fills the model with seeded random weights and needs only the
      folder's ``config.json``.
    * ``model`` may be a Hub id (``"Qwen/Qwen3-0.6B"``), fetched through huggingface_hub's cache
      (``download_dir`` overrides its place); a local path of the same spelling wins.
    * ``generation_config="auto"``: the model's ``generation_config.json`` sampling values are the
      defaults (:meth:`get_default_sampling_params`, used when ``sampling_params`` is None).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        names = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: not an engine option; the options are {', '.join(sorted(names))}")
        self._attach(LLMEngine(EngineConfig(model=model, **kwargs)))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """An ``LLM`` over an engine of ``config`` (e.g. the command line's, already checked)."""
        self = cls.__new__(cls)
        self._attach(LLMEngine(config))
        return self

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._sampling_defaults = log_defaults(engine.source.generation_defaults, engine.config.generation_config)

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's name: SamplingParams with the model's generation_config.json values where it has
        them (``generation_config="none"``: plain SamplingParams()); a fresh object each call."""
        return SamplingParams(**self._sampling_defaults)

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a no-op for one rank); idempotent."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        ids = self._add_all(prompts, sampling_params, stream=False)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req")
        try:
            pending = set(ids)
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        results[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
            self.engine.settle()  # return with the engine idle
        except BaseException:
            for rid in ids:  # leave nothing half-done in the engine
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def stream(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield a :class:`RequestOutput` every time a request gains tokens: its text and token
        ids so far, or with ``SamplingParams(output_kind=RequestOutputKind.DELTA)`` only those
        that are new (FINAL_ONLY: one output, at the end).  Closing the iterator early aborts
        the requests still running."""
        ids = self._add_all(prompts, sampling_params)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
            self.engine.settle()
        finally:
            for rid in pending:
                self.engine.abort_request(rid)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate.
        ``chat_template_kwargs`` are the template's own variables (Qwen3: ``enable_thinking``);
        ``tools`` (OpenAI's function definitions) go to the template, which tells the model how
        to call them; the calls come back as the model writes them, in the output text (the
        server parses them into ``tool_calls``)."""
        if messages and isinstance(messages[0], dict):
            convs = [messages]
        else:
            convs = cast(list[list[dict[str, Any]]], messages)
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt, chat_template_kwargs, tools)}
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template_kwargs: dict[str, Any] | None = None,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this model has no chat template")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ValueError(f"tools must be a list of dicts (OpenAI function definitions), got {tools!r:.80}")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       tools=cast(Any, tools or None), **(chat_template_kwargs or {}))
        return tok.encode(text, add_special_tokens=False)

    # ------------------------------------------------------------------ misc
    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_metrics(self) -> dict[str, float | int]:
        return self.engine.get_metrics()

    def _add_all(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None, stream: bool = True) -> list[str]:
        plist = _as_prompt_list(prompts)
        if sampling_params is None:
            params = [self.get_default_sampling_params()] * len(plist)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(plist)
        elif isinstance(sampling_params, (list, tuple)) and all(isinstance(p, SamplingParams) for p in sampling_params):
            params = list(sampling_params)
            if len(params) != len(plist):
                raise ValueError(f"sampling_params: got {len(params)} for {len(plist)} prompts")
        else:
            raise ValueError("sampling_params: must be a SamplingParams or a list of them, "
                             f"got {type(sampling_params).__name__}")
        # Validate everything before queueing anything: a bad prompt must not leave others half-run.
        tokenized = []
        for i, (p, sp) in enumerate(zip(plist, params)):
            try:
                text, ids = self.engine.inputs.prepare(p, sp)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            tokenized.append(({"prompt": text, "prompt_token_ids": ids}, sp))
        return [self.engine.add_request(p, sp, stream=stream) for p, sp in tokenized]


def _as_prompt_list(prompts: Any) -> list[PromptInput]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts: empty list")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise ValueError(f"prompts must be a string, token ids, a dict or a list of them; got {type(prompts).__name__}")
