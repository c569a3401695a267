"""Loading a GGUF with ``gguf_quantized``: the kept layers get their form straight from the
blocks, before anything else is loaded, and their dense weights are never made.

The oracle is the other order, which holds the dense model first: load it, then replace its
linears (``keep_gguf_quantized`` / ``keep_gguf_blocks`` on the loaded model).  Both must give
the same model to the bit: every buffer of every kept form, every dense parameter, the tied
head's sharing, and (on the CPU) the logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")  # the blocks' module (kernels.gguf_matmul) is imported by the GPU form's tests

from pagedattn.models import loader
from pagedattn.models.gguf import convert_gguf
from pagedattn.models.gguf_quant import keep_gguf_blocks, keep_gguf_quantized
from pagedattn.models.layers.quantized import QuantizedWeight
from pagedattn.models.loader import load_model
from pagedattn.models.testing import PagedHarness
from tests.test_gguf_blocks import SIZES as BLOCK_SIZES
from tests.test_gguf_blocks import _q4_k_m, write_mixed_gguf
from tests.test_gguf_quant import MODEL_CASES, SIZES, _model_gguf, write_quantized_gguf
from tests.test_loader import _random_hf

gguf = pytest.importorskip("gguf")


class _Allocations(TorchDispatchMode):
    """Every tensor an aten op returns, as ``(shape, dtype, device type)``."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[tuple[int, ...], torch.dtype, str]] = []
        self.read_shapes: set[tuple[int, ...]] = set()  # of the tensors read (their copies are made too)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.made.append((tuple(t.shape), t.dtype, t.device.type))
        return out


def _load_watched(path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any
                  ) -> tuple[torch.nn.Module, Any, _Allocations, list[str]]:
    """``load_model`` recording every tensor made and every tensor read from the float folder (the
    file converted beforehand: the conversion dequantizes every tensor once)."""
    convert_gguf(path)
    read: list[str] = []
    read_shapes: set[tuple[int, ...]] = set()
    real = loader.iter_safetensors

    def spy(files: Iterable[Path], skip: Any = ()) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in real(files, skip):
            read.append(name)
            read_shapes.add(tuple(t.shape))
            yield name, t

    monkeypatch.setattr(loader, "iter_safetensors", spy)
    with _Allocations() as made:
        model, source = load_model(path, torch.float32, "cpu", **kw)
    monkeypatch.setattr(loader, "iter_safetensors", real)
    made.read_shapes = read_shapes
    return model, source, made, read


def _kept(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(getattr(m, "weight", None),
                                                                             QuantizedWeight)}


def _assert_same_model(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """Same modules, same kept forms, same tensors to the bit."""
    assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in want.named_modules()]
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert list(got_sd) == list(want_sd)
    for name, t in want_sd.items():
        assert got_sd[name].dtype == t.dtype and got_sd[name].device == t.device, name
        assert torch.equal(got_sd[name], t), name


def _check_never_dense(model: torch.nn.Module, made: _Allocations, read: list[str], dense_names: set[str]) -> None:
    """No tensor of a kept layer's dense shape in the model's dtype was made (on a real device),
    and none of its checkpoint tensors was read from the float32 folder."""
    shapes = {tuple(w.shape) for w in _kept(model).values()}
    dense_shapes = {tuple(p.shape) for p in model.parameters()} | made.read_shapes  # the dense layers' own
    watched = shapes - dense_shapes
    assert watched  # the check below can fail
    made_dense = {(s, d) for s, d, dev in made.made if dev != "meta" and d == torch.float32 and s in watched}
    assert not made_dense
    assert not set(read) & dense_names


def _kept_checkpoint_names(model: torch.nn.Module, dense: torch.nn.Module) -> set[str]:
    return set(dense.checkpoint_names()) - set(model.checkpoint_names())  # type: ignore[operator]


@pytest.mark.parametrize("case", ["llama_q4_1_tied", "qwen2_q8_0_bias", "llama_q4_k"])
@torch.no_grad()
def test_cpu_forms_are_made_without_the_dense_weights(case: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert case in MODEL_CASES
    path = _model_gguf(case, tmp_path)
    model, source, made, read = _load_watched(path, monkeypatch, gguf_quantized=True)
    want, _ = load_model(path, torch.float32, "cpu")  # the dense model first, then its linears replaced
    assert keep_gguf_quantized(want, source.model_dir) == 4 * want.config.num_layers + 1
    _assert_same_model(model, want)
    kept_names = _kept_checkpoint_names(model, load_model(path, torch.float32, "cpu")[0])
    assert kept_names and all(".mlp." in n or ".self_attn." in n or n == "lm_head.weight" for n in kept_names)
    _check_never_dense(model, made, read, kept_names)
    # the old order does make them: the check is not vacuous
    _, _, old_made, old_read = _load_watched(path, monkeypatch)
    shapes = {tuple(w.shape) for w in _kept(model).values()} - {tuple(p.shape) for p in model.parameters()}
    assert {s for s, d, _ in old_made.made if d == torch.float32} >= shapes and set(old_read) >= kept_names
    ids = torch.randint(3, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    got = PagedHarness(model, num_blocks=16, block_size=4).step([("s", ids)])[0]
    ref = PagedHarness(want, num_blocks=16, block_size=4).step([("s", ids)])[0]
    assert torch.equal(got, ref)


@torch.no_grad()
def test_cpu_forms_of_tensor_parallel_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank places its slice through its layers' ``weight_loader`` on meta weights as on dense ones."""
    hf = _random_hf("LlamaConfig", 6, **{**SIZES, "hidden_size": 192, "intermediate_size": 384,
                                         "num_attention_heads": 6, "num_key_value_heads": 2})
    path = write_quantized_gguf(tmp_path / "m.gguf", hf, "llama", gguf.GGMLQuantizationType.Q4_1)
    for rank in range(2):
        model, source, made, read = _load_watched(path, monkeypatch, tp_rank=rank, tp_size=2, gguf_quantized=True)
        dense, _ = load_model(path, torch.float32, "cpu", tp_rank=rank, tp_size=2)
        kept_names = _kept_checkpoint_names(model, dense)
        want, _ = load_model(path, torch.float32, "cpu", tp_rank=rank, tp_size=2)
        keep_gguf_quantized(want, source.model_dir)
        _assert_same_model(model, want)
        _check_never_dense(model, made, read, kept_names)


@torch.no_grad()
def test_a_q4_k_m_mix_on_the_cpu_keeps_its_q6_k_layers_dense(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Q6_K and Q5_K have no CPU form: their layers (and a fused layer with such a part) are read
    dense from the float folder, the rest kept."""
    hf = _random_hf("LlamaConfig", 11, **{**BLOCK_SIZES, "tie_word_embeddings": True})
    path = write_mixed_gguf(tmp_path / "m.gguf", hf, "llama", _q4_k_m)
    model, source, _, read = _load_watched(path, monkeypatch, gguf_quantized=True)
    want, _ = load_model(path, torch.float32, "cpu")
    kept_names = _kept_checkpoint_names(model, want)
    keep_gguf_quantized(want, source.model_dir)
    _assert_same_model(model, want)
    assert kept_names and not set(read) & kept_names  # (o's shape is q's, which is read: no shape check)
    # o Q4_K; the tied head the Q8_0 embedding; q/k/v with a Q6_K v, gate/up with a Q5_K up, down Q6_K
    assert sorted(_kept(model)) == ["lm_head"] + [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    assert "model.layers.0.mlp.down_proj.weight" in read and "model.layers.0.self_attn.o_proj.weight" not in read


@torch.no_grad()
def test_blocks_are_made_without_the_dense_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's form (the file's blocks), built here on the CPU, for two tensor-parallel ranks:
    the same blocks as replacing a loaded model's weights, the embedding kept too and shared by
    the tied head."""
    tp_size = 2
    hf = _random_hf("LlamaConfig", 11, **{**BLOCK_SIZES, "tie_word_embeddings": True, "hidden_size": 512,
                                          "intermediate_size": 1024})
    path = write_mixed_gguf(tmp_path / "m.gguf", hf, "llama", _q4_k_m)
    for rank in range(tp_size):
        model, source, made, read = _load_watched(path, monkeypatch, tp_rank=rank, tp_size=tp_size,
                                                  gguf_quantized=True, gguf_blocks=True)
        want, _ = load_model(path, torch.float32, "cpu", tp_rank=rank, tp_size=tp_size)
        assert keep_gguf_blocks(want, source.model_dir) == 4 * want.config.num_layers + 1
        _assert_same_model(model, want)
        kept = _kept(model)
        assert kept["lm_head"] is kept["model.embed_tokens"]
        assert not any(p.is_meta for p in model.parameters())
        dense_names = _kept_checkpoint_names(model, load_model(path, torch.float32, "cpu", tp_rank=rank,
                                                               tp_size=tp_size)[0])
        assert "model.embed_tokens.weight" in dense_names
        assert not set(read) & dense_names
        made_dense = {s for s, d, dev in made.made if dev != "meta" and d == torch.float32 and len(s) == 2
                      and s[0] * s[1] >= 128 * 512}  # every kept matrix is at least this large
        assert not made_dense


def test_gguf_quantized_with_dummy_weights_is_refused(tmp_path: Path) -> None:
    path = _model_gguf("llama_q4_0", tmp_path)
    with pytest.raises(ValueError, match="gguf_quantized: dummy weights have no GGUF blocks"):
        load_model(path, torch.float32, "cpu", load_format="dummy", gguf_quantized=True)


@torch.no_grad()
def test_granite_q_k_rows_are_put_back_in_hf_order(tmp_path: Path) -> None:
    """llama.cpp permutes Granite's q/k rows as Llama's: the kept forms hold them in the order of
    the converted float weights (HF's), as the dense model does."""
    hf = _random_hf("GraniteConfig", 13, **{**SIZES, "num_key_value_heads": 2})
    path = write_quantized_gguf(tmp_path / "g.gguf", hf, "granite", gguf.GGMLQuantizationType.Q4_0)
    model, _ = load_model(path, torch.float32, "cpu", gguf_quantized=True)
    dense, _ = load_model(path, torch.float32, "cpu")
    kept = _kept(model)
    assert "model.layers.0.self_attn.qkv_proj" in kept
    for name, w in kept.items():
        assert torch.equal(w.dequantize(), dense.get_submodule(name).weight), name


@pytest.mark.parametrize("rows", [208, 400])
def test_packing_a_slice_at_a_time_gives_the_whole_weights_bytes(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int4 CPU layout is packed (and Q8_0's halves split) a slice of rows at a time; the
    bytes are one call's on the whole weight, and the int8 weights stay exact."""
    from pagedattn.models.layers import quantized

    monkeypatch.setattr(quantized, "PACK_ROWS", 64)
    gen = torch.Generator().manual_seed(rows)
    codes = torch.randint(0, 16, (rows, 96), dtype=torch.uint8, generator=gen)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert torch.equal(quantized._pack_int4(codes), whole)
    int8 = torch.randint(-128, 128, (rows, 96), dtype=torch.int8, generator=gen)
    scales = torch.rand(rows, 3, generator=gen).half().float()
    w = quantized.Int8GroupWeight(int8, scales, 32)
    assert torch.equal(w.dequantize(), int8.float() * scales.repeat_interleave(32, dim=1))
