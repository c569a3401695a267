"""The fused Triton MoE against the PyTorch reference (transformers' expert loop).

Without CUDA the kernels run under the Triton interpreter on small shapes (sizes that are not
multiples of the tiles, so every mask is exercised); with CUDA the same tests run at
Qwen3-30B-A3B's layer shape, plus the ``gpu``-marked CUDA-graph test.  Routing is random and
skewed: some experts get no token, one expert gets many (several blocks of rows), and batches
of one token.
"""

from __future__ import annotations

import pytest
import torch

from .triton_interpreter import CUDA, DEVICE, rerun_in_fresh_process, seeded_generator, skip_unless_runnable

pytest.importorskip("triton")

from pagedattn.models import moe_ops as mo

# (tokens, hidden, intermediate, experts, top_k): Qwen3-30B-A3B's layer on the GPU (decode batches
# and a prefill chunk); tiny, odd sizes under the interpreter, which runs programs one by one.
if CUDA:
    SHAPES = [(1, 2048, 768, 128, 8), (64, 2048, 768, 128, 8), (600, 2048, 768, 128, 8)]
    CFG = None
else:
    SHAPES = [(1, 48, 40, 6, 2), (9, 48, 40, 6, 3)]
    CFG = mo.MoEConfig(block_m=16, block_n=16, block_k=16)
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 1e-2, "rtol": 1e-2},
       torch.bfloat16: {"atol": 6e-2, "rtol": 3e-2}}


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_moe_kernels_in_fresh_interpreter_process")


def test_moe_kernels_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


def _skewed_routing(g: torch.Generator, tokens: int, experts: int, top_k: int, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits where expert 0 is favoured (many tokens share it) and the last expert is
    never chosen, through the model's own routing."""
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 0] += 2.0
    logits[:, -1] = -1e4
    weights, ids = mo.route(logits.to(dtype), top_k, renormalize=bool(tokens % 2), fp32_weights=False)
    return weights.to(DEVICE), ids.to(DEVICE)


def _experts(g: torch.Generator, hidden: int, inter: int, experts: int, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
    scale = hidden ** -0.5
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * scale
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5
    return w13.to(dtype=dtype, device=DEVICE), w2.to(dtype=dtype, device=DEVICE)


def test_align_groups_pairs_by_expert_in_padded_blocks() -> None:
    g = seeded_generator("align")
    tokens, experts, top_k, block = 13, 7, 3, 4
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 2] += 3.0  # expert 2: nearly every token (several blocks)
    logits[:, [4, 6]] = -1e4  # experts 4 and 6: none
    ids = torch.topk(logits, top_k, dim=-1).indices.to(DEVICE)
    sorted_ids, expert_ids, num_rows = (t.cpu() for t in mo.moe_align_block_size(ids, experts, block))
    pairs = tokens * top_k
    flat = ids.flatten().cpu()
    counts = torch.bincount(flat, minlength=experts)
    assert counts[2] > block and counts[4] == counts[6] == 0
    used = int(((counts + block - 1) // block * block).sum())
    assert num_rows.tolist() == [used]
    assert sorted_ids.numel() == mo.max_padded_rows(pairs, experts, block) >= used
    assert sorted_ids.numel() == expert_ids.numel() * block
    real = sorted_ids[sorted_ids < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # every pair exactly once
    assert (sorted_ids[used:] == pairs).all()
    for b in range(expert_ids.numel()):
        rows = sorted_ids[b * block:(b + 1) * block]
        rows = rows[rows < pairs]
        if b * block >= used:
            assert expert_ids[b] == -1
            continue
        assert (flat[rows.long()] == expert_ids[b]).all()
        assert rows.tolist() == sorted(rows.tolist())  # stable: pairs keep their order within an expert
    assert set(expert_ids[expert_ids >= 0].tolist()) == set(counts.nonzero().flatten().tolist())


@pytest.mark.parametrize(("tokens", "experts", "top_k", "block"), [(13, 7, 3, 4), (1, 20, 8, 16), (300, 20, 2, 16)])
def test_triton_align_matches_the_torch_grouping(tokens: int, experts: int, top_k: int, block: int) -> None:
    """The kernels' grouping (one program for counts and offsets, an atomic scatter) gives the
    same blocks, experts and rows in use as the torch one; within an expert's run the pairs
    may come in another order (the atomics'), the set is the same."""
    g = seeded_generator("triton-align", tokens)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 1] += 2.0  # a crowded expert
    logits[:, -2:] = -1e4  # two empty ones
    ids = torch.topk(logits, top_k, dim=-1).indices.to(DEVICE)
    ref = mo.moe_align_block_size(ids, experts, block)
    got = mo.moe_align_block_size_triton(ids, experts, block)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    owner = ref[1].repeat_interleave(block)  # the expert of every row
    for e in range(-1, experts):
        assert torch.equal(got[0][owner == e].sort().values, ref[0][owner == e].sort().values)


def test_padded_rows_bound_holds_for_the_worst_routing() -> None:
    # Every pair on its own expert: each pads a whole block.
    ids = torch.arange(12, device=DEVICE).view(6, 2)
    sorted_ids, expert_ids, num_rows = mo.moe_align_block_size(ids, 16, 16)
    assert int(num_rows) == 12 * 16 == sorted_ids.numel()
    assert expert_ids.tolist() == list(range(12))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_moe_matches_reference(shape: tuple[int, int, int, int, int], dtype: torch.dtype) -> None:
    if not CUDA and dtype == torch.float16 and shape[0] > 1:
        pytest.skip("interpreter time: fp16 runs at one size")
    tokens, hidden, inter, experts, top_k = shape
    g = seeded_generator("moe", shape, dtype)
    x = torch.randn(tokens, hidden, generator=g).to(dtype=dtype, device=DEVICE)
    w13, w2 = _experts(g, hidden, inter, experts, dtype)
    weights, ids = _skewed_routing(g, tokens, experts, top_k, dtype)
    ref = mo.fused_moe_ref(x.float(), w13.float(), w2.float(), weights.float(), ids)
    out = torch.full_like(x, float("nan"))
    got = mo.fused_moe_triton(x, w13, w2, weights, ids, out=out, config=CFG)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.float(), ref, **TOL[dtype])


def test_fused_moe_in_chunks_and_fp32_router_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch longer than a chunk runs as several; Mixtral's fp32 routing weights with 16-bit
    activations."""
    tokens, hidden, inter, experts, top_k = 7, 32, 24, 5, 2
    monkeypatch.setattr(mo, "MAX_TOKENS_PER_CHUNK", 3)
    g = seeded_generator("chunks")
    x = torch.randn(tokens, hidden, generator=g).to(dtype=torch.bfloat16, device=DEVICE)
    w13, w2 = _experts(g, hidden, inter, experts, torch.bfloat16)
    weights, ids = mo.route(torch.randn(tokens, experts, generator=g).to(DEVICE), top_k, True, fp32_weights=True)
    assert weights.dtype == torch.float32
    ref = mo.fused_moe_ref(x, w13, w2, weights, ids)
    got = mo.fused_moe_triton(x, w13, w2, weights, ids, config=CFG)
    torch.testing.assert_close(got.float(), ref.float(), **TOL[torch.bfloat16])


def test_fused_moe_rejects_bad_shapes() -> None:
    x = torch.randn(3, 16, device=DEVICE)
    w13, w2 = torch.randn(4, 20, 16, device=DEVICE), torch.randn(4, 16, 10, device=DEVICE)
    ids = torch.zeros(3, 2, dtype=torch.long, device=DEVICE)
    w = torch.ones(3, 2, device=DEVICE)
    with pytest.raises(ValueError, match="expert shapes disagree"):
        mo.fused_moe_triton(x, w13, w2[:, :, :8], w, ids)
    with pytest.raises(ValueError, match="top_k"):
        mo.fused_moe_triton(x, w13, w2, w[:2], ids)
    with pytest.raises(ValueError, match="share a dtype"):
        mo.fused_moe_triton(x, w13.half(), w2, w, ids)
    with pytest.raises(ValueError, match="power of two"):
        mo.MoEConfig(block_m=24)


@pytest.mark.gpu
def test_gpu_fused_moe_replays_in_a_cuda_graph_with_new_routing() -> None:
    """Captured once at a decode batch, replayed with other tokens and other experts: nothing
    in the launch depends on the routing."""
    if not CUDA:
        pytest.skip("needs CUDA")
    tokens, hidden, inter, experts, top_k = 64, 2048, 768, 128, 8
    g = seeded_generator("graph")
    w13, w2 = _experts(g, hidden, inter, experts, torch.bfloat16)
    x = torch.randn(tokens, hidden, generator=g).to(dtype=torch.bfloat16, device=DEVICE)
    weights, ids = _skewed_routing(g, tokens, experts, top_k, torch.bfloat16)
    out = torch.empty_like(x)
    mo.fused_moe_triton(x, w13, w2, weights, ids, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mo.fused_moe_triton(x, w13, w2, weights, ids, out=out)
    for seed in range(3):
        g2 = seeded_generator("replay", seed)
        x.copy_(torch.randn(tokens, hidden, generator=g2).to(torch.bfloat16))
        new_w, new_ids = mo.route(torch.randn(tokens, experts, generator=g2).to(DEVICE, torch.bfloat16), top_k,
                                  True, False)
        weights.copy_(new_w), ids.copy_(new_ids)
        graph.replay()
        ref = mo.fused_moe_ref(x.float(), w13.float(), w2.float(), weights.float(), ids)
        torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])
