"""KVCachePool: layout, dtypes, sizing from a byte budget, slot writes, CoW copies and swaps."""

from __future__ import annotations

import pytest
import torch

from pagedattn.attention.metadata import AttentionMetadata
from pagedattn.cache.kv_pool import KVCachePool, KVCacheSpec

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_pool(dtype: torch.dtype = torch.float32, num_blocks: int = 8, num_cpu_blocks: int = 6,
              layers: int = 3, heads: int = 2, head_dim: int = 8, block_size: int = 4, seed: int = 0) -> KVCachePool:
    """A pool filled with random data, so no test can pass by reading zeros."""
    spec = KVCacheSpec(layers, heads, head_dim, block_size, dtype)
    pool = KVCachePool(spec, num_blocks, "cpu", num_cpu_blocks)
    g = torch.Generator().manual_seed(seed)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g))
    pool.cpu_kv.copy_(torch.randn(pool.cpu_kv.shape, generator=g))
    return pool


# ---------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_layout_and_dtype(dtype: torch.dtype) -> None:
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=dtype)
    pool = KVCachePool(spec, num_blocks=5, num_cpu_blocks=2)
    assert pool.kv.shape == (3, 2, 5, 4, 2, 8)
    assert pool.cpu_kv.shape == (3, 2, 2, 4, 2, 8)
    assert pool.kv.dtype == pool.cpu_kv.dtype == dtype
    assert pool.kv.is_contiguous()
    assert torch.count_nonzero(pool.kv) == 0, "a new pool holds zeros (finite), never garbage"
    pool.kv[2, 1, 4].fill_(1.5)  # writable, and only what was written changes
    assert torch.count_nonzero(pool.kv) == 4 * 2 * 8
    k, v = pool.layer(1)
    assert k.shape == v.shape == (5, 4, 2, 8)
    assert k.data_ptr() == pool.kv[1, 0].data_ptr(), "layer() returns views, not copies"
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert spec.bytes_per_block == 2 * 3 * 4 * 2 * 8 * itemsize
    assert pool.nbytes == 5 * spec.bytes_per_block


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"num_kv_heads": -1}, "num_kv_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 6}, "block_size"),
        ({"dtype": torch.int8}, "dtype"),
    ],
)
def test_spec_rejects_bad_fields(kwargs: dict, field: str) -> None:
    args = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 4, **kwargs}
    with pytest.raises(ValueError, match=field):
        KVCacheSpec(**args)


def test_pool_rejects_bad_block_counts() -> None:
    spec = KVCacheSpec(1, 1, 4, 4)
    with pytest.raises(ValueError, match="num_blocks"):
        KVCachePool(spec, 0)
    with pytest.raises(ValueError, match="num_cpu_blocks"):
        KVCachePool(spec, 2, num_cpu_blocks=-1)


# ---------------------------------------------------------------------------------- sizing
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_from_budget_sizes_both_pools(dtype: torch.dtype) -> None:
    spec = KVCacheSpec(2, 2, 8, 4, dtype)
    per = spec.bytes_per_block
    pool = KVCachePool.from_budget(spec, 7 * per + per - 1, cpu_budget_bytes=3 * per)
    assert pool.num_blocks == 7 and pool.num_cpu_blocks == 3
    assert pool.nbytes <= 7 * per + per - 1


def test_budget_below_one_block_is_a_helpful_error() -> None:
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)
    with pytest.raises(ValueError) as info:
        KVCachePool.from_budget(spec, spec.bytes_per_block - 1)
    msg = str(info.value)
    assert "smaller than one KV block" in msg
    assert str(spec.bytes_per_block) in msg and "4 layers" in msg and "16 tokens" in msg
    with pytest.raises(ValueError, match="smaller than one KV block"):
        spec.blocks_for_bytes(0)


# ---------------------------------------------------------------------------------- write
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_write_via_slot_mapping_matches_a_per_token_loop(dtype: torch.dtype) -> None:
    pool = make_pool(dtype, num_blocks=8, block_size=4, seed=1)
    expected = pool.kv.clone()
    g = torch.Generator().manual_seed(2)
    # Two sequences with scattered, permuted blocks: 6 and 3 new tokens on top of context.
    tables = [[5, 2, 7], [0, 6]]
    meta = AttentionMetadata.build([6, 3], [10, 7], tables, block_size=4)
    t = meta.num_tokens
    layer = 2
    k = torch.randn(t, 2, 8, generator=g).to(dtype)
    v = torch.randn(t, 2, 8, generator=g).to(dtype)
    pool.write(layer, k, v, meta.slot_mapping)
    # The same writes, one token at a time, from positions and the page table.
    i = 0
    for table, ql, sl in zip(tables, [6, 3], [10, 7]):
        for pos in range(sl - ql, sl):
            block, off = table[pos // 4], pos % 4
            expected[layer, 0, block, off] = k[i]
            expected[layer, 1, block, off] = v[i]
            i += 1
    assert torch.equal(pool.kv, expected)


def test_write_casts_to_the_cache_dtype() -> None:
    pool = make_pool(torch.bfloat16, seed=3)
    k = torch.randn(2, 2, 8, dtype=torch.float32)
    v = torch.randn(2, 2, 8, dtype=torch.float32)
    pool.write(0, k, v, torch.tensor([1, 9]))
    assert torch.equal(pool.kv[0, 0, 0, 1], k[0].to(torch.bfloat16))
    assert torch.equal(pool.kv[0, 1, 2, 1], v[1].to(torch.bfloat16))


# ---------------------------------------------------------------------------------- copy-on-write
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_copy_blocks_is_batched_across_layers(dtype: torch.dtype) -> None:
    pool = make_pool(dtype, num_blocks=8, seed=4)
    before = pool.kv.clone()
    pairs = [(1, 4), (3, 0), (6, 5)]
    pool.copy_blocks(pairs)
    expected = before.clone()
    for src, dst in pairs:
        expected[:, :, dst] = before[:, :, src]
    assert torch.equal(pool.kv, expected)


def test_copy_blocks_reads_every_source_before_writing() -> None:
    """A block freed by one CoW can be the destination of the next in the same step."""
    pool = make_pool(num_blocks=6, seed=5)
    before = pool.kv.clone()
    pool.copy_blocks([(2, 3), (4, 2)])
    assert torch.equal(pool.kv[:, :, 3], before[:, :, 2])
    assert torch.equal(pool.kv[:, :, 2], before[:, :, 4])


def test_copy_blocks_empty_is_a_no_op() -> None:
    pool = make_pool(seed=6)
    before = pool.kv.clone()
    pool.copy_blocks([])
    assert torch.equal(pool.kv, before)


def test_read_block_returns_a_copy() -> None:
    pool = make_pool(seed=7)
    blk = pool.read_block(3)
    assert blk.shape == (3, 2, 4, 2, 8)
    assert torch.equal(blk, pool.kv[:, :, 3])
    blk.add_(1)
    assert not torch.equal(blk, pool.kv[:, :, 3])
    assert torch.equal(pool.read_block(1, on_cpu=True), pool.cpu_kv[:, :, 1])


# ---------------------------------------------------------------------------------- swap
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_swap_out_and_in_roundtrip_is_exact(dtype: torch.dtype) -> None:
    pool = make_pool(dtype, num_blocks=8, num_cpu_blocks=6, seed=8)
    original = pool.kv.clone()
    cpu_before = pool.cpu_kv.clone()
    out_pairs = [(7, 2), (1, 0), (4, 5)]
    pool.swap_out(out_pairs)
    for g, c in out_pairs:
        assert torch.equal(pool.cpu_kv[:, :, c], original[:, :, g])
    untouched = [c for c in range(6) if c not in {c for _, c in out_pairs}]
    assert torch.equal(pool.cpu_kv[:, :, untouched], cpu_before[:, :, untouched])
    # The device blocks get reused (overwritten) while the data sits on the CPU.
    pool.kv[:, :, [7, 1, 4]] = torch.randn(3, 2, 3, 4, 2, 8).to(dtype)
    in_pairs = [(2, 3), (0, 6), (5, 1)]
    pool.swap_in(in_pairs)
    assert torch.equal(pool.kv[:, :, 3], original[:, :, 7])
    assert torch.equal(pool.kv[:, :, 6], original[:, :, 1])
    assert torch.equal(pool.kv[:, :, 1], original[:, :, 4])


def test_swaps_with_no_pairs_are_no_ops() -> None:
    pool = make_pool(seed=9)
    kv, ckv = pool.kv.clone(), pool.cpu_kv.clone()
    pool.swap_out([])
    pool.swap_in([])
    pool.sync_swaps()
    assert torch.equal(pool.kv, kv) and torch.equal(pool.cpu_kv, ckv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_swap_roundtrip_on_side_stream(dtype: torch.dtype) -> None:
    spec = KVCacheSpec(4, 2, 64, 16, dtype)
    pool = KVCachePool(spec, 64, "cuda", num_cpu_blocks=32)
    assert pool.cpu_kv.is_pinned()
    g = torch.Generator(device="cuda").manual_seed(10)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g, device="cuda"))
    original = pool.kv.clone()
    out_pairs = [(g_, c) for c, g_ in enumerate(range(40, 56))]
    pool.swap_out(out_pairs)
    # Compute-stream work reuses the swapped-out blocks and allocates scratch right away.
    pool.kv[:, :, 40:56] = -1
    for _ in range(8):
        torch.randn(1 << 20, device="cuda")
    pool.swap_in([(c, g_) for c, g_ in enumerate(range(0, 16))])
    torch.cuda.synchronize()
    assert torch.equal(pool.kv[:, :, 0:16], original[:, :, 40:56])
    assert torch.equal(pool.read_block(3, on_cpu=True), original[:, :, 43].cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_swaps_interleaved_with_compute_keep_contents() -> None:
    """Many swap-outs and swap-ins in flight while the compute stream overwrites the freed
    blocks at once, as an engine does when it preempts and reuses memory in one step."""
    rng = torch.Generator().manual_seed(11)
    spec = KVCacheSpec(2, 2, 32, 16, torch.bfloat16)
    pool = KVCachePool(spec, 48, "cuda", num_cpu_blocks=48)
    pool.kv.copy_(torch.randn(pool.kv.shape, device="cuda"))
    truth_cpu: dict[int, torch.Tensor] = {}
    for _ in range(60):
        n = int(torch.randint(1, 12, (1,), generator=rng))
        gpu = torch.randperm(48, generator=rng)[:n].tolist()
        cpu = torch.randperm(48, generator=rng)[:n].tolist()
        expect = pool.kv[:, :, gpu].cpu()
        pool.swap_out(list(zip(gpu, cpu)))
        pool.kv[:, :, gpu] = torch.randn(pool.kv[:, :, gpu].shape, device="cuda").to(pool.kv.dtype)
        for i, c in enumerate(cpu):
            truth_cpu[c] = expect[:, :, i]
        back = torch.randperm(48, generator=rng)[:n].tolist()
        src = [c for c in truth_cpu if c not in cpu][:n] or cpu
        pool.swap_in(list(zip(src, back[: len(src)])))
        for c, b in zip(src, back):
            assert torch.equal(pool.kv[:, :, b].cpu(), truth_cpu[c])
    pool.sync_swaps()
    for c, t in truth_cpu.items():
        assert torch.equal(pool.cpu_kv[:, :, c], t)
