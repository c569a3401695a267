"""One configuration: ``EngineConfig`` checks every field once, ``LLM`` and the command line
fill it, and a bad value is a ``ValueError`` naming the field before any model loads."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from pagedattn import LLM
from pagedattn.config import EngineConfig, add_engine_args, config_from_args, resolve_dtype
from pagedattn.entrypoints import cli

from .engine_models import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models"), "llama_mqa_tied")


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading weights fails the test: every check below must come first."""
    import pagedattn.runtime.worker as worker

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model's weights must not load for a bad configuration")

    monkeypatch.setattr(worker, "load_model", refuse)


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(swap_space_gib=math.nan), "swap_space_gib"), (dict(swap_space_gib=math.inf), "swap_space_gib"),
    (dict(cpu_kv_space_gib=math.nan), "cpu_kv_space_gib"), (dict(cpu_kv_space_gib=0), "cpu_kv_space_gib"),
    (dict(gpu_memory_utilization="0.5"), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"), (dict(seed="abc"), "seed"),
    (dict(seed=2**63), "seed"),
    (dict(device="xyz"), "device"), (dict(device=3), "device"), (dict(model=123), "model"), (dict(model=""), "model"),
    (dict(model="  "), "model"), (dict(block_size=True), "block_size"), (dict(block_size=3), "block_size"),
    (dict(block_size=512), "block_size"), (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(max_model_len=1), "max_model_len"),
    (dict(num_kv_blocks=0), "num_kv_blocks"), (dict(num_kv_blocks=2.0), "num_kv_blocks"),
    (dict(preemption_mode="drop"), "preemption_mode"), (dict(load_format="pt"), "load_format"),
    (dict(attention_backend="flash"), "attention_backend"), (dict(enable_prefix_caching=1), "enable_prefix_caching"),
    (dict(async_scheduling="yes"), "async_scheduling"), (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(distributed_timeout_s=0), "distributed_timeout_s"), (dict(watermark=1.0), "watermark"),
    (dict(dtype="int8"), "dtype"), (dict(cuda_graph_max_batch=True), "cuda_graph_max_batch"),
])
def test_engine_config_refuses_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        EngineConfig(**kwargs)


def test_triton_attention_needs_cuda_or_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"^attention_backend: 'triton' needs a CUDA device"):
        EngineConfig(device="cpu", attention_backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert EngineConfig(device="cpu", attention_backend="triton").attention_backend == "triton"


def test_llm_refuses_unknown_options_and_checks_before_loading(model_dir: Path, no_weights: None) -> None:
    with pytest.raises(ValueError, match=r"^max_num_batch_tokens: not an engine option"):
        LLM(str(model_dir), max_num_batch_tokens=64)
    # The model's own limits, from config.json alone.
    with pytest.raises(ValueError, match=r"^max_model_len: 1000000 is more than the model's context of 512"):
        LLM(str(model_dir), device="cpu", max_model_len=10**6)
    # Pools larger than this machine's memory (a KV block of this model is 1 KiB).
    with pytest.raises(ValueError, match=r"^num_kv_blocks: .* host memory"):
        LLM(str(model_dir), device="cpu", num_kv_blocks=2**40)
    with pytest.raises(ValueError, match=r"^swap_space_gib: .* host memory"):
        LLM(str(model_dir), device="cpu", swap_space_gib=2.0**20)
    with pytest.raises(ValueError, match=r"^cpu_kv_space_gib: .* host memory"):
        LLM(str(model_dir), device="cpu", cpu_kv_space_gib=2.0**20)
    with pytest.raises(ValueError, match=r"^model: "):
        LLM(str(model_dir / "missing"), device="cpu")


def test_the_command_line_is_generated_from_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert config_from_args(parser.parse_args([])) == EngineConfig()  # the dataclass's defaults, nothing else
    args = parser.parse_args(["--no-enable-prefix-caching", "--max-num-seqs", "7", "-tp", "1", "--dtype", "bf16",
                              "--distributed-timeout", "5", "--async-scheduling", "--preemption-mode", "recompute"])
    cfg = config_from_args(args)
    got = (cfg.enable_prefix_caching, cfg.max_num_seqs, cfg.dtype, cfg.distributed_timeout_s)
    assert got == (False, 7, "bf16", 5.0)
    assert cfg.async_scheduling is True and cfg.preemption_mode == "recompute"
    assert config_from_args(parser.parse_args(["--no-prefix-caching"])).enable_prefix_caching is False
    help_text = parser.format_help()
    for f in fields(EngineConfig):  # every field has a flag, with its help
        assert f.metadata["help"].split()[0] in help_text, f.name


@pytest.mark.parametrize(("argv", "needle"), [
    (["generate", "hi", "--temperature", "nan"], "SamplingParams.temperature"),
    (["generate", "hi", "--max-tokens", "0"], "SamplingParams.max_tokens"),
    (["generate", "hi", "-n", "0"], "SamplingParams.n"),
    (["generate", "hi", "--swap-space-gib", "nan"], "swap_space_gib"),
    (["generate", "hi", "--cuda-graph-max-batch", "0"], "cuda_graph_max_batch"),
    (["generate", "hi", "--max-num-batched-tokens", "0"], "max_num_batched_tokens"),
    (["generate", "hi", "--device", "xyz"], "device"),
    (["chat", "--top-p", "0"], "SamplingParams.top_p"),
    (["serve", "--block-size", "3"], "block_size"),
    (["serve", "--max-connections", "0"], "max_connections"),
])
def test_command_line_errors_come_before_the_model(argv: list[str], needle: str, no_weights: None,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "build_llm", lambda config: pytest.fail("the model must not load"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_refuses_a_bad_port_at_once(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--port", port])
    assert e.value.code == 2 and "--port" in capsys.readouterr().err


# ---------------------------------------------------------------------- dtype="auto"
@pytest.mark.parametrize(("device", "checkpoint", "bf16", "want"), [
    ("cpu", torch.bfloat16, True, torch.float32),  # a CPU always computes in float32
    ("cpu", None, True, torch.float32),
    ("cuda", torch.bfloat16, True, torch.bfloat16),  # a GPU: the checkpoint's 16-bit type
    ("cuda:1", torch.float16, True, torch.float16),
    ("cuda", torch.float32, True, torch.bfloat16),  # float32 or unnamed checkpoints: bfloat16 ...
    ("cuda", None, True, torch.bfloat16),
    ("cuda", torch.bfloat16, False, torch.float16),  # ... or float16 where the GPU has no bfloat16
    ("cuda", None, False, torch.float16),
])
def test_auto_dtype_resolution(device: str, checkpoint: torch.dtype | None, bf16: bool, want: torch.dtype) -> None:
    assert resolve_dtype("auto", device, checkpoint, bf16_supported=bf16) == want
    assert resolve_dtype("AUTO", torch.device(device), checkpoint, bf16_supported=bf16) == want


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_explicit_dtype_is_used_as_given(device: str) -> None:
    assert resolve_dtype("fp16", device, torch.bfloat16, bf16_supported=True) == torch.float16
    assert resolve_dtype(torch.float32, device, torch.bfloat16, bf16_supported=True) == torch.float32
    with pytest.raises(ValueError, match="dtype: must be one of auto"):
        resolve_dtype("int8", device, None)


def test_auto_is_the_default_and_resolves_from_the_checkpoint(model_dir: Path) -> None:
    assert EngineConfig().dtype == "auto" and EngineConfig().torch_dtype is None
    cfg = EngineConfig(device="cpu")
    assert cfg.resolved_dtype(torch.bfloat16) == torch.float32
    with LLM(str(model_dir), device="cpu", num_kv_blocks=8) as llm:  # config.json says float32; the CPU runs float32
        assert llm.engine.dtype == torch.float32
        assert {p.dtype for p in llm.engine.model.parameters()} == {torch.float32}
    args = argparse.ArgumentParser()
    add_engine_args(args)
    assert config_from_args(args.parse_args(["--dtype", "auto"])).dtype == "auto"
    assert "auto" in args.format_help()


@pytest.mark.parametrize(("types", "want"), [
    (["F32", "BF16", "BF16"], "bfloat16"), (["F32", "F16"], "float16"), (["F32", "F32"], "float32"),
    (["F32", "Q4_1", "Q6_K"], "float16"), (["F16", "Q8_0"], "float16"),
])
def test_gguf_names_its_float_type(types: list[str], want: str) -> None:
    from pagedattn.models.gguf import gguf_float_dtype

    assert gguf_float_dtype(types) == want
