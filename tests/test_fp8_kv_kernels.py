"""FP8 (e4m3) KV cache: the Triton kernels against the torch reference on the same fp8 pages.

Without CUDA the kernels run under the Triton interpreter (it loads float8e4nv pages and
upcasts them exactly; its fp32 -> e4m3 cast rounds wrongly, which the store kernel works around
there, see ``store._round_to_e4m3``).  Scales are powers of two and not 1, so a kernel that
drops one is off by that factor; a scale that clamps (K's) makes saturation part of the test.
Every slot no kernel may read holds NaN (e4m3fn has a NaN, and no infinity).
"""

from __future__ import annotations

import pytest
import torch

from .triton_interpreter import (
    CUDA,
    DEVICE,
    attention_tolerance,
    randn,
    rerun_in_fresh_process,
    seeded_generator,
    skip_unless_runnable,
)

pytest.importorskip("triton")
if CUDA and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("e4m3 loads in Triton need compute capability 8.9+ (Ada, Hopper)", allow_module_level=True)

from pagedattn.attention import AttentionLayerSpec, paged_attention_ref, store_kv_ref
from pagedattn.attention import triton_ops as ops
from pagedattn.attention.backend import KVScales
from pagedattn.attention.triton_backend import TritonBackend
from pagedattn.cache.kv_pool import FP8_KV_DTYPE, FP8_KV_MAX, quantize_fp8

from .test_cascade_attention import _MIXED, HKV, D, _cascade_inputs, _shared_batch
from .test_triton_kernels import SIZE, PagedBatch, _paged_batch, _ragged_lens

FP8 = FP8_KV_DTYPE
# K's scale puts |k| > 448 * 0.015625 = 7 (rare for N(0, 1) x 2) at the clamp; V's does not clamp.
K_SCALE, V_SCALE = 0.015625, 0.5
Q_DTYPES = (torch.float32, torch.bfloat16)
EXT_CFG = None if CUDA else ops.ExtendConfig(block_m=16, block_n=16)
DEC_CFG = None if CUDA else ops.DecodeConfig(block_n=16)
PREFIX_CFG = None if CUDA else ops.PrefixConfig(block_n=16, num_warps=4, num_stages=1)


@pytest.fixture(autouse=True)
def _interpreter_available(request: pytest.FixtureRequest) -> None:
    skip_unless_runnable(request, "test_fp8_kernels_in_fresh_interpreter_process")


def test_fp8_kernels_in_fresh_interpreter_process() -> None:
    """When triton was already loaded for a GPU, run this module again in a fresh interpreter."""
    rerun_in_fresh_process(__file__)


def _scales() -> KVScales:
    return KVScales(torch.tensor([K_SCALE], device=DEVICE), torch.tensor([V_SCALE], device=DEVICE))


def _to_fp8(cache: torch.Tensor, scale: float, spread: float = 2.0) -> torch.Tensor:
    """An fp32 cache (NaN where unreadable) as fp8 pages of ``spread * x`` (NaN stays NaN)."""
    return quantize_fp8(cache.float() * spread, torch.tensor(scale, device=cache.device))


def _fp8_batch(batch: PagedBatch) -> PagedBatch:
    return PagedBatch(batch.meta, _to_fp8(batch.k_cache, K_SCALE), _to_fp8(batch.v_cache, V_SCALE),
                      batch.block_size)


def _clean(cache: torch.Tensor) -> torch.Tensor:
    """fp8 pages with NaN slots zeroed (what the reference, which reads whole pages, sees)."""
    x = cache.float()
    return torch.where(x.isnan(), 0.0, x).to(FP8)


def _reference(q: torch.Tensor, batch: PagedBatch, layer: AttentionLayerSpec) -> torch.Tensor:
    m = batch.meta
    return paged_attention_ref(q, _clean(batch.k_cache), _clean(batch.v_cache), m.block_tables, m.query_lens_cpu,
                               m.seq_lens_cpu, layer.scale, layer.sliding_window, softcap=layer.logit_softcap,
                               scales=_scales())


def _assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "output has NaN: an element was never written or poison was read"
    torch.testing.assert_close(out.float(), ref.float(), **attention_tolerance(out.dtype))


# --------------------------------------------------------------------------- store


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_store_quantizes_as_the_reference(dtype: torch.dtype) -> None:
    """The store kernel writes the reference's bytes (clamped, rounded to nearest even) and
    skips padding slots; read back, the error is e4m3's half step (2^-4 relative) or the clamp."""
    g = seeded_generator("fp8-store", dtype)
    h, d, n_blocks, bs, t = SIZE.num_kv_heads, SIZE.head_dim, 7, 4, 20
    scales = _scales()
    k_cache = _to_fp8(randn(g, n_blocks, bs, h, d, dtype=torch.float32), K_SCALE)
    v_cache = _to_fp8(randn(g, n_blocks, bs, h, d, dtype=torch.float32), V_SCALE)
    slots = torch.randperm(n_blocks * bs, generator=g)[:t]
    slots[[2, 11]] = -1  # CUDA-graph padding
    fused = (randn(g, t, 3 * h, d, dtype=torch.float32) * 3).to(dtype)  # some |k| / K_SCALE past 448
    k, v = fused[:, h:2 * h], fused[:, 2 * h:]
    keep = slots >= 0
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_ref(k[keep.to(DEVICE)], v[keep.to(DEVICE)], want_k, want_v, slots[keep].to(DEVICE), *scales)

    ops.store_kv(k, v, k_cache, v_cache, slots.to(DEVICE), *scales)
    if CUDA:  # fp32 division may differ in the last bit: a value at a rounding tie may land one step away
        torch.testing.assert_close(k_cache.float(), want_k.float(), rtol=0.07, atol=2.0**-9)
        torch.testing.assert_close(v_cache.float(), want_v.float(), rtol=0.07, atol=2.0**-9)
    else:
        assert torch.equal(k_cache.view(torch.uint8), want_k.view(torch.uint8))
        assert torch.equal(v_cache.view(torch.uint8), want_v.view(torch.uint8))

    flat = slots[keep].to(DEVICE)
    for x, cache, s in ((k[keep.to(DEVICE)], k_cache, K_SCALE), (v[keep.to(DEVICE)], v_cache, V_SCALE)):
        back = cache.view(-1, h, d)[flat].float() * s
        want = x.float().clamp(-FP8_KV_MAX * s, FP8_KV_MAX * s)
        err = (back - want).abs()
        # Half a step of 3 mantissa bits: 2^-4 of the value, or of 2^-6 * s below the normal range.
        assert (err <= torch.maximum(want.abs(), torch.tensor(2.0**-6 * s)) * 2.0**-4 + 1e-12).all()
    assert (k.float().abs() > FP8_KV_MAX * K_SCALE).any(), "no value reached the clamp"


def test_store_rounds_every_e4m3_interval_as_torch() -> None:
    """Every finite e4m3 value, the midpoints between neighbours (ties: to even), points just
    either side of them, and values past 448 (clamped): the store kernel's bytes are torch's."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].unique()  # sorted, -448 .. 448
    mid = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mid, mid * (1 + 2.0**-12), mid * (1 - 2.0**-12), torch.tensor([500.0, -1e4, 449.0])])
    d = 32
    x = torch.cat([x, x.new_zeros(-len(x) % d)]).view(-1, 1, d).to(DEVICE)  # [T, 1 head, d]
    one = torch.ones(1, device=DEVICE)
    got = torch.zeros(len(x), 1, 1, d, dtype=FP8, device=DEVICE)
    got_v = got.clone()
    ops.store_kv(x, x, got, got_v, torch.arange(len(x), device=DEVICE), one, one)
    want = x.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8).view(got.shape)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(got_v.view(torch.uint8), want.view(torch.uint8))


# --------------------------------------------------------------------------- decode

_DECODE_CASES = [  # (block_size, gqa, window, softcap, splits, q dtype)
    (1, 4, None, None, 1, torch.float32),
    (16, 2, None, None, 3, torch.bfloat16),
    (4, 8, 7, None, 1, torch.bfloat16),
    (8, 1, 7, None, 3, torch.float32),
    (4, 2, None, 2.5, 3, torch.float32),
    (16, 4, 7, 2.5, 1, torch.bfloat16),
]


@pytest.mark.parametrize(("block_size", "gqa", "window", "softcap", "splits", "q_dtype"), _DECODE_CASES)
def test_decode_reads_fp8_as_the_reference(block_size: int, gqa: int, window: int | None, softcap: float | None,
                                           splits: int, q_dtype: torch.dtype) -> None:
    g = seeded_generator("fp8-decode", block_size, gqa, window, softcap, splits, q_dtype)
    hkv, d = SIZE.num_kv_heads, SIZE.head_dim
    seq_lens = _ragged_lens(block_size, SIZE.long_ctx)
    b = len(seq_lens)
    batch = _fp8_batch(_paged_batch(g, [1] * b, seq_lens, block_size, hkv, d, torch.float32, window))
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5, window, softcap)
    q = randn(g, b, hkv * gqa, d, dtype=q_dtype)
    out = torch.full_like(q, float("nan"))
    ops.decode_attention(q, batch.k_cache, batch.v_cache, batch.meta.block_tables, batch.meta.seq_lens,
                         layer.scale, window, out, splits, config=DEC_CFG, softcap=softcap, k_scale=_scales().k,
                         v_scale=_scales().v)
    _assert_matches(out, _reference(q, batch, layer))


# --------------------------------------------------------------------------- extend


@pytest.mark.parametrize(("window", "softcap", "q_dtype"), [(None, None, torch.float32), (9, None, torch.bfloat16),
                                                            (None, 2.5, torch.bfloat16)])
def test_extend_reads_fp8_as_the_reference(window: int | None, softcap: float | None, q_dtype: torch.dtype) -> None:
    """Prefill, chunked prefill (cached context) and decodes in one batch, through the backend."""
    g = seeded_generator("fp8-extend", window, softcap, q_dtype)
    hkv, d, gqa, bs = SIZE.num_kv_heads, SIZE.head_dim, 2, 4
    query_lens = [1, 1, 5, SIZE.long_query, 3]
    seq_lens = [9, SIZE.long_ctx, 5, SIZE.long_query + 11, 30]
    batch = _fp8_batch(_paged_batch(g, query_lens, seq_lens, bs, hkv, d, torch.float32, window))
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5, window, softcap)
    q = randn(g, sum(query_lens), hkv * gqa, d, dtype=q_dtype)
    out = torch.full_like(q, float("nan"))
    nd = 2
    ops.decode_attention(q[:nd], batch.k_cache, batch.v_cache, batch.meta.block_tables[:nd],
                         batch.meta.seq_lens[:nd], layer.scale, window, out[:nd], 1, config=DEC_CFG, softcap=softcap,
                         k_scale=_scales().k, v_scale=_scales().v)
    ops.extend_attention(q, batch.k_cache, batch.v_cache, batch.meta.block_tables, batch.meta.seq_lens,
                         batch.meta.query_start_loc, layer.scale, window, out, seq_offset=nd,
                         num_seqs=len(query_lens) - nd, max_query_len=max(query_lens[nd:]), config=EXT_CFG,
                         softcap=softcap, k_scale=_scales().k, v_scale=_scales().v)
    _assert_matches(out, _reference(q, batch, layer))


# --------------------------------------------------------------------------- cascade


@pytest.mark.parametrize(("splits", "softcap"), [(1, None), (2, None), (2, 1.2)])
def test_cascade_decode_reads_fp8_as_the_reference(splits: int, softcap: float | None) -> None:
    """Rows sharing prefix pages: the shared-prefix kernel and the decode kernel both dequantize
    (the prefix partials must not be scaled twice when the decode kernel folds them in)."""
    g = seeded_generator("fp8-cascade", splits, softcap)
    gqa = 2
    shared = _shared_batch(g, _MIXED[0], _MIXED[1], 4, torch.float32)
    shared.k_cache, shared.v_cache = _to_fp8(shared.k_cache, K_SCALE), _to_fp8(shared.v_cache, V_SCALE)
    cascade, n_groups = _cascade_inputs(shared, gqa)
    assert n_groups == len(_MIXED[1]) and cascade.max_parts > 1
    q = randn(g, len(shared.seq_lens), HKV * gqa, D, dtype=torch.float32)
    out = torch.full_like(q, float("nan"))
    m = shared.meta()
    ops.decode_attention(q, shared.k_cache, shared.v_cache, m.block_tables, m.seq_lens, D**-0.5, None, out, splits,
                         config=DEC_CFG, cascade=cascade, prefix_config=PREFIX_CFG, softcap=softcap,
                         k_scale=_scales().k, v_scale=_scales().v)
    ref = paged_attention_ref(q, _clean(shared.k_cache), _clean(shared.v_cache), m.block_tables, m.query_lens_cpu,
                              m.seq_lens_cpu, D**-0.5, softcap=softcap, scales=_scales())
    _assert_matches(out, ref)


# --------------------------------------------------------------------------- engine


@pytest.mark.skipif(CUDA, reason="a CPU engine runs the Triton kernels only under the interpreter")
def test_engine_on_triton_kernels_gives_the_reference_backends_fp8_tokens(tmp_path) -> None:
    """The whole engine with the fp8 cache on the Triton kernels (stores, prefill, prefix-cache
    hits, decodes) generates the torch reference backend's greedy tokens."""
    import random

    from pagedattn import LLM, SamplingParams

    from .engine_models import make_model_dir

    path = make_model_dir(tmp_path, "llama3_untied_gqa")
    rng = random.Random(3)
    shared = [rng.randrange(3, 320) for _ in range(20)]
    prompts = [shared + [rng.randrange(3, 320) for _ in range(n)] for n in (3, 9)]
    prompts.append([rng.randrange(3, 320) for _ in range(13)])
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(path), device="cpu", block_size=4, num_kv_blocks=128, swap_space_gib=0.01,
                  kv_cache_dtype="fp8", attention_backend=backend, warmup=False)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        assert llm.get_metrics()["prefix_cache_hit_tokens"] >= 16
    assert tokens["triton"] == tokens["torch"]


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("q_dtype", (torch.bfloat16, torch.float16))
def test_fp8_backend_matches_reference_on_cuda(q_dtype: torch.dtype) -> None:
    """Full-size store + attend through the Triton backend on an fp8 cache against the torch
    reference backend fed the same pages (long decodes split, a long prefill)."""
    from pagedattn.attention.metadata import AttentionMetadata

    g = seeded_generator("fp8-gpu", q_dtype)
    hkv, d, gqa, bs = 8, 128, 4, 16
    query_lens, seq_lens = [1, 1, 1, 900], [4000, 17, 2500, 1200]
    n_blocks = sum(-(-s // bs) for s in seq_lens)
    perm = torch.randperm(n_blocks, generator=g).tolist()
    tables, i = [], 0
    for s in seq_lens:
        n = -(-s // bs)
        tables.append(perm[i:i + n])
        i += n
    shape = (n_blocks, bs, hkv, d)
    k8 = _to_fp8(randn(g, *shape, dtype=torch.float32), K_SCALE)
    v8 = _to_fp8(randn(g, *shape, dtype=torch.float32), V_SCALE)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs, device=DEVICE)
    layer = AttentionLayerSpec(hkv * gqa, hkv, d, d**-0.5)
    t = sum(query_lens)
    q = randn(g, t, hkv * gqa, d, dtype=q_dtype)
    kv = randn(g, 2, t, hkv, d, dtype=q_dtype)
    k_ref, v_ref = k8.clone(), v8.clone()
    from pagedattn.attention.torch_ref import TorchReferenceBackend

    ref = TorchReferenceBackend().forward(q, kv[0], kv[1], k_ref, v_ref, meta, layer, _scales())
    out = TritonBackend(cascade=False).forward(q, kv[0], kv[1], k8, v8, meta, layer, _scales())
    torch.testing.assert_close(k8.float(), k_ref.float(), rtol=0.07, atol=2.0**-9)
    _assert_matches(out, ref)

