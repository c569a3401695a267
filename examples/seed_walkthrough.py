"""PagedAttention, step by step, with the real pagedattn classes.

The chapter-15 mini demo ("hand-write a simplified PagedAttention") built a page pool, a
refcounting allocator, two sequences sharing a two-page prefix, and an attention call that
gathers K/V through a page table.  It also listed what it left out: copy-on-write, offloading
pages to the CPU, and a sliding window.  This script replays that scenario -- and the three
extensions -- on the classes the engine actually uses:

* :class:`~pagedattn.cache.BlockManager` decides *which* physical block backs each logical
  block of each sequence (the page tables), with refcounts, a prefix cache, copy-on-write,
  swapping and window release.  It never touches tensors; when data has to move it returns
  ``(src, dst)`` block pairs.
* :class:`~pagedattn.cache.kv_pool.KVCachePool` holds the data: one tensor
  ``[layers, 2 (K/V), blocks, block_size, kv_heads, head_dim]`` on the device and one like it
  on the CPU, and executes those pairs.
* :func:`~pagedattn.attention.torch_ref.paged_attention_ref` attends through the page tables.

Every step prints the page tables and the refcounts, and checks itself.  The attention
results are compared with plain dense attention computed in float64 straight from the
tokens, without looking at the pool at all.  The script exits with status 1 if any check
fails.  Run it with ``python examples/seed_walkthrough.py``.
"""

from __future__ import annotations

import math
import sys

import torch

from pagedattn.attention.metadata import AttentionMetadata
from pagedattn.attention.torch_ref import paged_attention_ref
from pagedattn.cache import NULL_BLOCK, BlockManager
from pagedattn.cache.kv_pool import KVCachePool, KVCacheSpec

BLOCK_SIZE = 4  # tokens per block (a "page"), as in the tutorial
NUM_BLOCKS = 10  # GPU pool
NUM_CPU_BLOCKS = 6  # CPU pool for swapped-out blocks
NUM_HEADS = 2
HEAD_DIM = 16
VOCAB = 100
SCALE = 1.0 / math.sqrt(HEAD_DIM)

# ---------------------------------------------------------------------------------------------
# A stand-in for the model.  In a causal transformer the K/V of a token depends only on the
# tokens up to it -- that is what makes sharing a prefix's pages safe.  Here K/V of the token at
# position p is a fixed function of (token, p): embedding tables, no learning involved.
# ---------------------------------------------------------------------------------------------
_gen = torch.Generator().manual_seed(0)
K_TOKEN = torch.randn(VOCAB, NUM_HEADS, HEAD_DIM, generator=_gen)
V_TOKEN = torch.randn(VOCAB, NUM_HEADS, HEAD_DIM, generator=_gen)
K_POS = 0.1 * torch.randn(512, NUM_HEADS, HEAD_DIM, generator=_gen)
V_POS = 0.1 * torch.randn(512, NUM_HEADS, HEAD_DIM, generator=_gen)


def toy_kv(tokens: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[len(tokens), heads, head_dim]`` of ``tokens`` sitting at positions start..."""
    t = torch.tensor(tokens)
    p = torch.arange(start, start + len(tokens))
    return K_TOKEN[t] + K_POS[p], V_TOKEN[t] + V_POS[p]


# ---------------------------------------------------------------------------------------------
# Checks and pictures
# ---------------------------------------------------------------------------------------------
FAILURES: list[str] = []


def check(ok: bool, what: str, quiet: bool = False) -> None:
    """Record a check; ``quiet`` ones are printed only when they fail."""
    if not ok or not quiet:
        print(f"    [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        FAILURES.append(what)


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def show(bm: BlockManager, names: dict[str, str] | None = None) -> None:
    """Page tables, then one line per device block: refcount and state.

    ``--`` in a table is a released block (sliding window).  Block states: ``held`` by
    sequences (refcount >= 1), ``cached`` (refcount 0 but kept by the prefix cache, reusable
    until evicted), ``free``.
    """
    names = names or {}
    width = max([len(str(names.get(s, s))) for s in bm.seq_ids()] + [4])
    for s in bm.seq_ids():
        where = "cpu" if bm.is_swapped(s) else "gpu"
        table = bm.swapped_block_table(s) if bm.is_swapped(s) else bm.block_table(s)
        cells = " ".join("--" if b == NULL_BLOCK else f"{b:2d}" for b in table)
        print(f"    {names.get(s, s)!s:>{width}} ({where}) -> [ {cells} ]")
    ids = " ".join(f"{b:>3d}" for b in range(bm.num_blocks))
    refs = " ".join(f"{bm.gpu.refcount(b):>3d}" for b in range(bm.num_blocks))
    states = " ".join(
        "  H" if bm.gpu.refcount(b) else ("  C" if bm.cache.is_parked(b) else "  .") for b in range(bm.num_blocks)
    )
    print(f"    {'gpu block':>{width + 6}} {ids}")
    print(f"    {'refcount':>{width + 6}} {refs}")
    print(f"    {'state':>{width + 6}} {states}    (H held, C cached, . free)")
    if bm.cpu.num_blocks:
        cpu_refs = " ".join(f"{bm.cpu.refcount(b):>3d}" for b in range(bm.cpu.num_blocks))
        print(f"    {'cpu refcount':>{width + 6}} {cpu_refs}")


def gather(pool: KVCachePool, table: list[int], n: int, on_cpu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What the tutorial's ``PagedKVCache.gather`` did: K/V of positions 0..n-1 in logical order.
    Released positions come back as NaN so a comparison can never pass by accident."""
    data = pool.cpu_kv if on_cpu else pool.kv
    k = torch.full((n, NUM_HEADS, HEAD_DIM), float("nan"))
    v = torch.full((n, NUM_HEADS, HEAD_DIM), float("nan"))
    for p in range(n):
        b = table[p // BLOCK_SIZE]
        if b != NULL_BLOCK:
            k[p], v[p] = data[0, 0, b, p % BLOCK_SIZE], data[0, 1, b, p % BLOCK_SIZE]
    return k, v


class Runner:
    """The engine's job in miniature: run queued copies, write K/V through the slot mapping,
    tell the block manager what is computed."""

    def __init__(self, bm: BlockManager, pool: KVCachePool) -> None:
        self.bm, self.pool = bm, pool
        self.tokens: dict[str, list[int]] = {}

    def prefill(self, sid: str, prompt: list[int]) -> int:
        """Admit a prompt, reusing whatever prefix the cache holds.  Returns the cached tokens."""
        match = self.bm.match_prefix(prompt)
        ok = self.bm.allocate_slots(sid, match.num_tokens, len(prompt) - match.num_tokens, match) is not None
        check(ok, f"{sid}: {len(prompt)}-token prompt admitted ({match.num_tokens} tokens from the prefix cache)")
        self.tokens[sid] = list(prompt)
        self._compute(sid, match.num_tokens, len(prompt))
        return match.num_tokens

    def append(self, sid: str, token: int) -> list[tuple[int, int]]:
        """One decode step: a slot for one token (maybe a new block, maybe a copy), then write it."""
        toks = self.tokens[sid]
        slots = self.bm.allocate_slots(sid, len(toks), 1)
        check(slots is not None, f"{sid}: slot for token #{len(toks)}", quiet=True)
        copies = list(slots.copies) if slots is not None else []
        self.pool.copy_blocks(copies)  # copy-on-write happens *before* the new K/V is written
        toks.append(token)
        self._compute(sid, len(toks) - 1, len(toks))
        return copies

    def _compute(self, sid: str, start: int, end: int) -> None:
        toks = self.tokens[sid]
        meta = AttentionMetadata.build([end - start], [end], [self.bm.block_table(sid)], BLOCK_SIZE)
        k, v = toy_kv(toks[start:end], start)
        self.pool.write(0, k, v, meta.slot_mapping)  # one scatter: token i -> slot_mapping[i]
        self.bm.commit(sid, toks, end)  # full blocks get hashed into the prefix cache

    def check_contents(self, sid: str) -> None:
        toks = self.tokens[sid]
        on_cpu = self.bm.is_swapped(sid)
        table = self.bm.swapped_block_table(sid) if on_cpu else self.bm.block_table(sid)
        k, v = gather(self.pool, table, len(toks), on_cpu)
        want_k, want_v = toy_kv(toks, 0)
        live = ~k[:, 0, 0].isnan()
        ok = torch.equal(k[live], want_k[live]) and torch.equal(v[live], want_v[live])
        check(ok, f"{sid}: every readable position holds its own token's K/V")


def dense_attention(q: torch.Tensor, tokens: list[int], window: int | None) -> torch.Tensor:
    """The oracle: float64 attention of the last token over the sequence, K/V from the tokens."""
    k, v = (x.double() for x in toy_kv(tokens, 0))
    n = len(tokens)
    keep = torch.ones(n, dtype=torch.bool) if window is None else torch.arange(n) > n - 1 - window
    scores = torch.einsum("hd,khd->hk", q.double(), k) * SCALE
    scores[:, ~keep] = float("-inf")
    return torch.einsum("hk,khd->hd", torch.softmax(scores, dim=-1), v)


def batched_decode(bm: BlockManager, pool: KVCachePool, run: Runner, seqs: list[str], window: int | None,
                   seed: int) -> None:
    """Attention of one new query per sequence, all in one batch, through the page tables."""
    q = torch.randn(len(seqs), NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed))
    lens = [len(run.tokens[s]) for s in seqs]
    tables = [bm.block_table(s) for s in seqs]
    meta = AttentionMetadata.build([1] * len(seqs), lens, tables, BLOCK_SIZE)
    print("    block_tables tensor (padding and released entries read block 0; the kernel masks them):")
    print("    " + str(meta.block_tables).replace("\n", "\n    "))
    k_cache, v_cache = pool.layer(0)
    out = paged_attention_ref(q, k_cache, v_cache, meta.block_tables, meta.query_lens_cpu, meta.seq_lens_cpu,
                              SCALE, window)
    for i, s in enumerate(seqs):
        ref = dense_attention(q[i], run.tokens[s], window)
        err = ((out[i].double() - ref).norm() / ref.norm()).item()
        check(err < 1e-5, f"{s}: paged attention over {lens[i]} tokens == dense attention (rel. err {err:.1e})")


# ---------------------------------------------------------------------------------------------
def main() -> int:
    torch.manual_seed(0)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=NUM_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE)
    pool = KVCachePool(spec, NUM_BLOCKS, "cpu", num_cpu_blocks=NUM_CPU_BLOCKS)
    bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, num_cpu_blocks=NUM_CPU_BLOCKS, watermark=0.0)
    run = Runner(bm, pool)
    print(f"KV pool: {tuple(pool.kv.shape)} = [layers, K/V, blocks, block_size, kv_heads, head_dim], "
          f"{spec.bytes_per_block} bytes per block")

    header("1. Two sequences share a two-block prefix")
    print("The tutorial allocated seq1's blocks, copied the list for seq2 and called inc_ref by hand.\n"
          "Here seq A's prompt is computed and its full blocks are published to the prefix cache;\n"
          "seq B's prompt starts with the same 8 tokens, so match_prefix() finds both blocks.")
    shared = [11, 42, 7, 3, 99, 15, 64, 23]
    run.prefill("A", [*shared, 5, 6])
    cached = run.prefill("B", [*shared, 50, 51, 52])
    show(bm)
    ta, tb = bm.block_table("A"), bm.block_table("B")
    check(cached == 8, "B found its first 8 tokens (two blocks) in the prefix cache")
    check(ta[:2] == tb[:2], "A and B point at the same two physical blocks")
    check(all(bm.gpu.refcount(b) == 2 for b in ta[:2]), "the shared blocks have refcount 2")
    check(ta[2] != tb[2], "each grew into a block of its own for the tokens after the prefix")
    for s in ("A", "B"):
        run.check_contents(s)

    header("2. Copy-on-write: fork A (its last block is half full), then append to the fork")
    print("Forking shares every block.  The fork's next token lands in the shared, half-full\n"
          "block, so the manager gives the fork a private copy first: it returns (src, dst) and\n"
          "the pool copies the block before the token is written.")
    bm.fork("A", "A2")
    run.tokens["A2"] = list(run.tokens["A"])
    show(bm)
    partial = bm.block_table("A")[2]
    check(bm.gpu.refcount(partial) == 2, f"block {partial} (A's partial block) is shared by A and A2")
    copies = run.append("A2", 77)
    print(f"    copy-on-write pairs: {copies}")
    show(bm)
    check(len(copies) == 1 and copies[0][0] == partial, f"exactly one copy, from block {partial}")
    check(bm.block_table("A")[2] == partial and bm.block_table("A2")[2] == copies[0][1],
          "A keeps its block, A2 now has the copy")
    check(bm.gpu.refcount(partial) == 1, "the original is back to refcount 1")
    check(run.append("A", 8) == [], "A appends in place: its block is no longer shared")
    for s in ("A", "A2"):
        run.check_contents(s)

    header("3. Swap A and A2 out to the CPU, and back in")
    print("Preemption by swapping: the group's blocks are copied to the CPU pool once each (the\n"
          "blocks A and A2 share stay shared on the CPU), then the GPU blocks are released.")
    before = {s: gather(pool, bm.block_table(s), len(run.tokens[s])) for s in ("A", "A2")}
    out_pairs = bm.swap_out(["A", "A2"])
    pool.swap_out(out_pairs)
    print(f"    swap-out pairs (gpu -> cpu): {out_pairs}")
    show(bm)
    check(len(out_pairs) == len({b for s in ("A", "A2") for b in run.bm.swapped_block_table(s)}),
          "each distinct block was copied once")
    check(bm.swapped_block_table("A")[:2] == bm.swapped_block_table("A2")[:2],
          "the shared blocks are shared on the CPU too")
    for s in ("A", "A2"):
        run.check_contents(s)
    # Meanwhile the GPU keeps working: B fills its block and needs a new one, which comes from
    # the blocks the swap released.
    run.append("B", 9)
    run.append("B", 10)
    show(bm)
    in_pairs = bm.swap_in(["A", "A2"])
    pool.swap_in(in_pairs)
    print(f"    swap-in pairs (cpu -> gpu): {in_pairs}")
    show(bm)
    check(bm.block_table("A")[:2] == bm.block_table("B")[:2],
          "blocks B still holds were re-shared from the prefix cache, not copied back")
    for s in ("A", "A2"):
        after = gather(pool, bm.block_table(s), len(run.tokens[s]))
        check(all(torch.equal(x, y) for x, y in zip(before[s], after)), f"{s}: K/V identical after the round trip")

    header("4. Batched decode attention through the page tables")
    print("One query per sequence; the reference kernel gathers K/V through the block tables\n"
          "(like the tutorial's gather + paged_attention, but for the whole batch at once).")
    for s, tok in (("A", 1), ("A2", 2), ("B", 3)):
        run.append(s, tok)
    batched_decode(bm, pool, run, ["A", "A2", "B"], None, seed=1)
    for s in ("A", "A2", "B"):
        bm.free(s)
    show(bm)
    check(bm.num_used_blocks == 0, "after freeing everything no block is held (full blocks stay cached)")

    header("5. Sliding window: a sequence decodes past its window")
    window = 8
    print(f"With a window of {window} tokens a query at position p sees keys p-{window - 1}..p.  A block\n"
          "whose positions are all older than that is released during decode; its table entry\n"
          "becomes -- so logical positions stay where they are.")
    wbm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, sliding_window=window, watermark=0.0)
    wpool = KVCachePool(spec, NUM_BLOCKS, "cpu")
    wrun = Runner(wbm, wpool)
    wrun.prefill("W", [4, 8, 15, 16, 23, 42])
    bound = math.ceil(window / BLOCK_SIZE) + 1
    most = wbm.num_blocks_of("W")
    for i in range(30):
        wrun.append("W", (7 * i) % VOCAB)
        most = max(most, wbm.num_blocks_of("W"))
        if i % 6 == 5:
            cells = " ".join("--" if b == NULL_BLOCK else f"{b:2d}" for b in wbm.block_table("W"))
            print(f"    after {len(wrun.tokens['W']):2d} tokens: W -> [ {cells} ]  "
                  f"({wbm.num_blocks_of('W')} live blocks)")
    show(wbm)
    table = wbm.block_table("W")
    n = len(wrun.tokens["W"])
    check(len(table) == -(-n // BLOCK_SIZE), f"the table still has one entry per logical block ({len(table)})")
    check(most <= bound, f"at most ceil({window}/{BLOCK_SIZE})+1 = {bound} live blocks during the decode")
    check(table[0] == NULL_BLOCK and wbm.stats.num_window_released > 0,
          f"{wbm.stats.num_window_released} blocks were released")
    wrun.check_contents("W")
    wrun.prefill("V", [9, 9, 9])
    for i in range(3):
        wrun.append("V", i)
    batched_decode(wbm, wpool, wrun, ["W", "V"], window, seed=2)

    header("Summary")
    if FAILURES:
        print(f"{len(FAILURES)} check(s) FAILED:")
        for f in FAILURES:
            print(f"  - {f}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
