"""The tutorial's PagedAttention scenario, replayed through the real engine, with pictures.

``seed_walkthrough.py`` replays the chapter-15 mini demo on the bare cache classes.  This script
does it one level up: requests go into :class:`pagedattn.LLM` and the scheduler, block manager,
model runner and sampler do what they always do.  A :class:`~pagedattn.viz.TraceRecorder`
listens to the block manager; afterwards the script finds the step where each concept happened,
checks it, and draws the pool at that step:

1. prefix sharing -- request 1 arrives while request 0 runs, hits the prefix cache and shares
   its first two pages (refcount 2);
2. growth -- decoding fills request 0's last page, the next token gets a new one;
3. copy-on-write -- a request with ``n=2`` forks its prompt's pages; the first write into the
   shared, half-full last page copies it;
4. offload -- a pool too small for three requests: the newest is preempted, its pages swapped
   to the CPU pool, and swapped back in when room returns;
5. sliding window -- a Mistral-style model with an 8-token window releases pages that fell out
   of the window (a second engine);
6. batched decode -- four requests of different lengths decode in one forward pass.

The model is a tiny random one (2 layers, 64 wide) written with ``save_pretrained`` into a
temporary folder, pages hold 4 tokens and the pool has 16 of them, so every page is visible.
Greedy outputs are compared token for token with HF transformers' ``generate`` (the sampled
request with a roomy engine), so the memory tricks provably change nothing.  The script exits
with status 1 when any check fails.

    python examples/engine_walkthrough.py [--out DIR]    # default DIR: docs/

writes ``DIR/images/walkthrough_*.png`` and ``DIR/walkthrough_trace.html`` (plus
``walkthrough_window_trace.html``), the pictures ``docs/walkthrough.md`` shows.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs, or may reach, a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers

from pagedattn import LLM, SamplingParams
from pagedattn.cache import NULL_BLOCK
from pagedattn.cache.kv_pool import KVCacheSpec
from pagedattn.engine.llm_engine import LLMEngine
from pagedattn.viz import PoolState, Trace, TraceRecorder, draw_memory_map, draw_timeline, render_html

transformers.utils.logging.disable_progress_bar()  # keep the output to the walkthrough itself

BLOCK_SIZE = 4  # tokens per page, as in the tutorial
NUM_BLOCKS = 16  # GPU pool: one row of 16 pages in the pictures
NUM_CPU_BLOCKS = 8  # CPU swap pool
WINDOW = 8  # sliding window of the second model, in tokens
MAX_PNG_BYTES = 200_000
MAX_HTML_BYTES = 1_000_000
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs"

# Token ids of the prompts (the tiny model has no tokenizer; ids 3..319 are plain tokens).
SHARED_PREFIX = [11, 42, 7, 3, 99, 15, 64, 23]  # two full pages
PROMPT_0 = [*SHARED_PREFIX, 5, 6]  # 10 tokens: two full pages and a half-full one
PROMPT_1 = [*SHARED_PREFIX, 50, 51]  # same first two pages, its own third page
PROMPT_2 = [31, 32, 33, 34, 35, 36]  # n=2: one full page and a half-full one
PROMPTS_345 = [[100 + 10 * i + j for j in range(12)] for i in range(3)]  # 3 full pages each
PROMPTS_6789 = [[200 + 11 * i + j for j in range(n)] for i, n in enumerate((5, 9, 14, 3))]
PROMPT_WINDOW = [4, 8, 15, 16, 23, 42]

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.25, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)


# ============================================================================ checks
FAILURES: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(f"    [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        FAILURES.append(what)
    return ok


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def greedy(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


# ============================================================================ models
def make_model(root: Path, name: str, sliding_window: int | None = None) -> Path:
    """A tiny random Llama (or Mistral with a window) saved like any HF checkpoint.

    A wide init range keeps logits far apart, so greedy decoding is decided by clear margins
    and token-for-token comparisons with HF are meaningful.
    """
    if sliding_window is None:
        cfg = transformers.LlamaConfig(**TINY)
    else:
        cfg = transformers.MistralConfig(**TINY, sliding_window=sliding_window)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # RMSNorm weights start at 1; perturb them so the norms matter
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.2)
    out = root / name
    model.save_pretrained(out)
    return out


_hf_models: dict[Path, Any] = {}  # model folder -> loaded HF model, for the oracle


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: HF transformers' greedy ``generate`` for one prompt, no EOS stop."""
    model = _hf_models.get(model_dir)
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        _hf_models[model_dir] = model
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_llm(model_dir: Path, num_blocks: int = NUM_BLOCKS, num_cpu_blocks: int = NUM_CPU_BLOCKS,
             **kw: Any) -> LLM:
    """An engine on the CPU with 4-token pages, ``num_blocks`` GPU-pool pages and
    ``num_cpu_blocks`` swap pages (the swap pool is given in GiB; convert exactly)."""
    arch = transformers.AutoConfig.from_pretrained(model_dir)
    spec = KVCacheSpec(arch.num_hidden_layers, arch.num_key_value_heads, arch.hidden_size // arch.num_attention_heads,
                       BLOCK_SIZE, torch.float32)
    swap_gib = (num_cpu_blocks + 0.5) * spec.bytes_per_block / (1 << 30)  # +0.5: no float rounding down
    llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=num_blocks,
              swap_space_gib=swap_gib, async_scheduling=False, enforce_eager=True, seed=0, **kw)
    got = llm.engine.block_manager.cpu.num_blocks
    if got != num_cpu_blocks:
        raise RuntimeError(f"swap pool has {got} blocks, expected {num_cpu_blocks}")
    return llm


# ============================================================================ recording a run
@dataclass
class Forward:
    """One forward pass as the model runner built it (what the attention kernels saw)."""

    step: int
    seqs: list[str]
    query_lens: list[int]  # new tokens per sequence this step
    seq_lens: list[int]  # K/V positions per sequence after this step
    block_tables: list[list[int]]  # the padded [B, max_blocks] tensor, as lists


@dataclass
class Run:
    """An engine with a trace recorder and a log of its forward passes."""

    llm: LLM
    recorder: TraceRecorder = field(default_factory=TraceRecorder)
    forwards: list[Forward] = field(default_factory=list)
    outputs: dict[str, list[list[int]]] = field(default_factory=dict)  # request -> tokens per sample

    def __post_init__(self) -> None:
        self.engine.attach_tracer(self.recorder)
        builder = self.engine.step_builder
        build = builder.build

        def recording_build(sched: Any, *args: Any) -> Any:
            # Read-only: call the engine's own step builder and note the metadata the runner makes of it.
            step = build(sched, *args)
            if not step.is_empty:
                meta = self.engine.runner.prepare(step)[2]
                self.forwards.append(Forward(
                    self.engine.num_steps, [s.seq.seq_id for s in sched.scheduled], list(meta.query_lens_cpu),
                    list(meta.seq_lens_cpu), meta.block_tables.tolist()))
            return step

        builder.build = recording_build

    @property
    def engine(self) -> LLMEngine:
        return self.llm.engine

    def add(self, prompt: list[int], params: SamplingParams) -> str:
        return self.engine.add_request({"prompt_token_ids": prompt}, params, stream=False)

    def step(self) -> None:
        for out in self.engine.step():
            if out.finished:
                self.outputs[out.request_id] = [c.token_ids for c in out.outputs]

    def run_until_done(self, request_ids: list[str]) -> None:
        while any(r not in self.outputs for r in request_ids):
            self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[str]:
        """Through the public ``LLM.generate``; returns the request ids it used."""
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for o in outs:
            self.outputs[o.request_id] = [c.token_ids for c in o.outputs]
        return [o.request_id for o in outs]

    def metrics(self) -> dict[str, float | int]:
        return self.llm.get_metrics()

    def forward_at(self, step: int) -> Forward | None:
        return next((f for f in self.forwards if f.step == step), None)


# ============================================================================ reading the trace
def first_event(trace: Trace, kind: str, pred: Callable[[dict[str, Any]], bool] = lambda e: True,
                after: int = -1) -> dict[str, Any] | None:
    return next((e for e in trace.events if e["kind"] == kind and e["step"] > after and pred(e)), None)


def fmt_table(table: list[int]) -> str:
    return "[" + " ".join("--" if b == NULL_BLOCK else f"{b:2d}" for b in table) + " ]"


def show_state(state: PoolState, run: Run, step: int) -> None:
    """Block tables (with each sequence's length after the step) and the refcount of every
    GPU block -- the part of the picture a grid cannot show."""
    fwd = run.forward_at(step)
    lens = dict(zip(fwd.seqs, fwd.seq_lens)) if fwd else {}
    for seq in sorted(state.tables, key=lambda s: (int(s.split("#")[0]), s)):
        where = "cpu" if seq in state.swapped else "gpu"
        n = f"{lens[seq]:3d} tokens" if seq in lens else "not in this step's batch"
        print(f"    seq {seq:>4} ({where}, {n}) -> {fmt_table(state.tables[seq])}")
    ids = " ".join(f"{b:>2d}" for b in range(state.num_blocks))
    refs = " ".join(f"{state.ref(b):>2d}" for b in range(state.num_blocks))
    marks = " ".join({"held": " H", "cached": " C", "free": " ."}[state.status(b)] for b in range(state.num_blocks))
    print(f"    gpu block {ids}\n    refcount  {refs}\n    state     {marks}   (H held, C cached, . free)")
    if state.num_cpu_blocks:
        print(f"    cpu refcount {' '.join(str(state.cpu_ref(b)) for b in range(state.num_cpu_blocks))}")


def show_metrics(m: dict[str, float | int], keys: list[str]) -> None:
    print("    metrics: " + ", ".join(f"{k}={m[k]:.2f}" if isinstance(m[k], float) else f"{k}={m[k]}"
                                     for k in keys))


@dataclass
class Figure:
    name: str  # file name under images/
    trace: Trace
    step: int


# ============================================================================ the scenes
def scene_prefix_and_growth(run: Run, trace: Trace, model_dir: Path, ids: list[str], figs: list[Figure],
                            m_after: dict[str, float | int]) -> None:
    header("1. Two requests share a prompt prefix (tutorial 15.5: seq2_blocks = seq1_blocks[:]; inc_ref)")
    first, second = (f"{r}#0" for r in ids)
    share = first_event(trace, "share", lambda e: e["seq"] == second)
    if not check(share is not None, f"request {ids[1]} took references on cached blocks (share events)"):
        return
    s = share["step"]
    state = trace.state_at(s)
    show_state(state, run, s)
    t0, t1 = state.tables[first], state.tables[second]
    check(t0[:2] == t1[:2], f"both page tables start with the same two physical pages {t0[:2]}")
    check(all(state.ref(b) == 2 for b in t0[:2]), "those pages have refcount 2")
    check(t0[2] != t1[2], "each request has its own third page for the tokens after the prefix")
    check(m_after["prefix_cache_hit_tokens"] == 8, f"prefix cache: 8 of request {ids[1]}'s 10 prompt tokens were hits")
    fwd = run.forward_at(s)
    check(fwd is not None and fwd.query_lens[fwd.seqs.index(second)] == 2,
          f"step {s}: request {ids[1]}'s prefill computed only its 2 new tokens")
    show_metrics(m_after, ["prefix_cache_hit_tokens", "prefix_cache_query_tokens", "prefix_cache_hit_rate"])
    figs.append(Figure("walkthrough_1_prefix_shared.png", trace, s))

    header("2. Growth: decoding fills the last page, the next token gets a new one")
    grow = first_event(trace, "allocate", lambda e: e["seq"] == first, after=trace.steps[0])
    if not check(grow is not None, f"request {ids[0]} was given a page during decode"):
        return
    g = grow["step"]
    before, after = run.forward_at(g - 1), run.forward_at(g)
    print(f"  step {g - 1} (before):")
    show_state(trace.state_at(g - 1), run, g - 1)
    print(f"  step {g} (after):")
    show_state(trace.state_at(g), run, g)
    n_before = before.seq_lens[before.seqs.index(first)] if before else -1
    n_after = after.seq_lens[after.seqs.index(first)] if after else -1
    pages_before = len(trace.state_at(g - 1).tables[first])
    check(n_before == pages_before * BLOCK_SIZE,
          f"after step {g - 1} request {ids[0]} has {n_before} tokens in {pages_before} pages: the last page is full")
    check(n_after == n_before + 1 and len(trace.state_at(g).tables[first]) == pages_before + 1
          and grow["blocks"] == [trace.state_at(g).tables[first][-1]],
          f"step {g} writes token #{n_after} into new page {grow['blocks']}")
    figs.append(Figure("walkthrough_2_growth.png", trace, g))
    for rid, prompt, new in zip(ids, (PROMPT_0, PROMPT_1), (12, 8)):
        check(run.outputs[rid][0] == hf_greedy(model_dir, prompt, new),
              f"request {rid}'s {new} greedy tokens == HF transformers generate")


def scene_cow(run: Run, trace: Trace, rid: str, reference: list[list[int]], figs: list[Figure],
              m_before: dict[str, float | int], m_after: dict[str, float | int]) -> None:
    header("3. Copy-on-write: n=2 samples fork the prompt's pages (tutorial 15.7, extension 1)")
    s0, s1 = f"{rid}#0", f"{rid}#1"
    fork = first_event(trace, "fork", lambda e: e["seq"] == s1)
    cow = first_event(trace, "cow", lambda e: e["seq"] in (s0, s1))
    if not check(fork is not None and cow is not None, f"request {rid} forked its second sample and copied a page"):
        return
    f, c = fork["step"], cow["step"]
    print(f"  step {f}: prompt computed, first token sampled for both samples, sample 1 forked:")
    sf = trace.state_at(f)
    show_state(sf, run, f)
    check(sf.tables[s0] == sf.tables[s1] and all(sf.ref(b) == 2 for b in sf.tables[s0]),
          f"after the fork both samples point at pages {sf.tables[s0]}, each with refcount 2")
    print(f"  step {c}: both samples write position {len(PROMPT_2)}, inside the shared half-full page:")
    sc = trace.state_at(c)
    show_state(sc, run, c)
    partial = sf.tables[s0][-1]
    check(cow["src"] == partial, f"the copied page is the half-full one ({partial} -> {cow['dst']}), "
          f"taken by the first writer, {cow['seq']}")
    check(sc.ref(partial) == 1 and sc.ref(cow["dst"]) == 1,
          "the original and its copy now have one owner each; the other sample writes in place")
    check(sc.ref(sf.tables[s0][0]) == 2, "the full prompt page stays shared (refcount 2): never written")
    check(m_after["num_cow_copies"] - m_before["num_cow_copies"] == 1, "exactly one copy-on-write copy")
    show_metrics(m_after, ["num_cow_copies"])
    got = run.outputs[rid]
    check(got[0] != got[1], "the two seeded samples differ")
    check(got == reference, "both samples == the same seeded request in a roomy engine with 16-token pages")
    figs.append(Figure("walkthrough_3_cow_fork.png", trace, f))
    figs.append(Figure("walkthrough_3_cow_copy.png", trace, c))


def scene_swap(run: Run, trace: Trace, model_dir: Path, ids: list[str], figs: list[Figure],
               m_before: dict[str, float | int], m_after: dict[str, float | int]) -> None:
    header("4. Offload: a full pool preempts a request to the CPU pool and back (extension 2)")
    mine = {f"{r}#0" for r in ids}
    out = first_event(trace, "swap_out", lambda e: set(e["seqs"]) <= mine)
    if not check(out is not None, f"one of requests {', '.join(ids)} was swapped out"):
        return
    victim = out["seqs"][0]
    into = first_event(trace, "swap_in", lambda e: e["seqs"] == out["seqs"], after=out["step"])
    if not check(into is not None, f"seq {victim} was swapped back in"):
        return
    so, si = out["step"], into["step"]
    preempt = first_event(trace, "preempt", lambda e: e["step"] == so)
    check(preempt is not None and preempt["to"] == "swapped" and victim == f"{ids[-1]}#0",
          f"step {so}: the pool ran dry; the newest request, {ids[-1]}, was preempted to the CPU")
    print(f"  step {so}: swapped out, pairs (gpu page -> cpu page) {out['pairs']}")
    s_out = trace.state_at(so)
    show_state(s_out, run, so)
    check(victim in s_out.swapped and s_out.num_cpu_used == len(out["pairs"]) > 0,
          f"{len(out['pairs'])} pages now live in the CPU pool")
    pages_before = trace.state_at(so - 1).num_used
    check(pages_before + len(ids) > NUM_BLOCKS,
          f"before step {so} the {len(ids)} requests held {pages_before} pages; each needed one more: "
          f"{pages_before + len(ids)} > {NUM_BLOCKS}")
    # The picture: the step during the swap with the fullest GPU pool.
    full = max(range(so, si), key=lambda k: (trace.state_at(k).num_used, -k))
    print(f"  step {full}: request {ids[-1]} waits on the CPU while the others grow into its old pages:")
    s_full = trace.state_at(full)
    show_state(s_full, run, full)
    check(victim in s_full.swapped and s_full.num_used == NUM_BLOCKS,
          f"step {full}: requests {ids[0]} and {ids[1]} hold all {NUM_BLOCKS} GPU pages")
    print(f"  step {si}: swapped in, pairs (cpu page -> gpu page) {into['pairs']}")
    s_in = trace.state_at(si)
    show_state(s_in, run, si)
    check(victim not in s_in.swapped and s_in.num_cpu_used == 0, "back on the GPU; the CPU pool is empty again")
    show_metrics(m_after, ["num_preemptions", "num_swap_preemptions", "num_swapped_out_blocks",
                           "num_swapped_in_blocks", "prefix_cache_evictions"])
    check(m_after["num_swap_preemptions"] - m_before["num_swap_preemptions"] == 1, "one swap preemption")
    for rid, prompt in zip(ids, PROMPTS_345):
        check(run.outputs[rid][0] == hf_greedy(model_dir, prompt, 20),
              f"request {rid}'s 20 greedy tokens == HF transformers generate")
    figs.append(Figure("walkthrough_4_swapped_out.png", trace, full))
    figs.append(Figure("walkthrough_4_swapped_in.png", trace, si))


def scene_batched(run: Run, trace: Trace, model_dir: Path, ids: list[str], figs: list[Figure]) -> None:
    header("6. Batched decode: several requests in one forward pass (extension 4)")
    mine = {f"{r}#0" for r in ids}
    prefill = next((f for f in run.forwards if set(f.seqs) == mine and max(f.query_lens) > 1), None)
    decode = next((f for f in run.forwards if set(f.seqs) == mine and max(f.query_lens) == 1), None)
    if not check(prefill is not None and decode is not None,
                 f"the {len(ids)} requests were prefilled and decoded together"):
        return
    print(f"  step {prefill.step}: one ragged prefill batch, query_lens {prefill.query_lens} "
          f"({sum(prefill.query_lens)} tokens)")
    print(f"  step {decode.step}: one decode batch, one query per sequence; the runner's metadata:")
    print(f"    seqs {decode.seqs}\n    seq_lens {decode.seq_lens}\n    block_tables (padding reads block 0, masked):")
    for seq, row in zip(decode.seqs, decode.block_tables):
        print(f"      {seq:>4}: {row}")
    state = trace.state_at(decode.step)
    show_state(state, run, decode.step)
    stats = trace.summaries[decode.step]
    n = len(ids)
    check(stats["running"] == n and stats["num_tokens"] == n,
          f"step {decode.step}: {n} running, {n} tokens in one step")
    for rid, prompt in zip(ids, PROMPTS_6789):
        check(run.outputs[rid][0] == hf_greedy(model_dir, prompt, 4), f"request {rid} == HF transformers generate")
    figs.append(Figure("walkthrough_6_batched.png", trace, decode.step))


def scene_window(run: Run, trace: Trace, model_dir: Path, rid: str, figs: list[Figure]) -> None:
    header(f"5. Sliding window: an {WINDOW}-token window releases old pages (extension 3)")
    seq = f"{rid}#0"
    releases = [e for e in trace.events if e["kind"] == "window_release" and e["seq"] == seq]
    if not check(bool(releases), "pages were released during decode"):
        return
    live_max, last = 0, 0
    for step, state in trace.states():
        if seq in state.tables:
            live = sum(b != NULL_BLOCK for b in state.tables[seq])
            live_max, last = max(live_max, live), step
            fwd = run.forward_at(step)
            if fwd and step % 4 == 0:
                n = fwd.seq_lens[0]
                print(f"    step {step:2d}: {n:2d} tokens -> {fmt_table(state.tables[seq])}  ({live} live pages)")
    print(f"  step {last}, the last one before the request finished:")
    state = trace.state_at(last)
    show_state(state, run, last)
    bound = math.ceil(WINDOW / BLOCK_SIZE) + 1
    check(live_max <= bound, f"never more than ceil({WINDOW}/{BLOCK_SIZE})+1 = {bound} live pages (max {live_max})")
    table = state.tables[seq]
    check(table[0] == NULL_BLOCK and len(table) == math.ceil(run.forward_at(last).seq_lens[0] / BLOCK_SIZE),
          "the table keeps one entry per logical page; released ones read --")
    m = run.metrics()
    show_metrics(m, ["num_window_released_blocks", "kv_blocks_cached", "kv_blocks_free"])
    check(m["num_window_released_blocks"] == sum(len(e["blocks"]) for e in releases) > 0,
          f"{m['num_window_released_blocks']} pages released")
    check(run.outputs[rid][0] == hf_greedy(model_dir, PROMPT_WINDOW, 26),
          "26 greedy tokens == HF transformers generate (with its sliding-window mask)")
    figs.append(Figure("walkthrough_5_window.png", trace, last))


# ============================================================================ pictures
def write_pictures(out: Path, figs: list[Figure], main: Trace, window: Trace) -> list[Path]:
    images = out / "images"
    written = [draw_memory_map(f.trace.state_at(f.step), images / f.name, step=f.step, extent=f.trace.extent())
               for f in figs]
    written.append(draw_timeline(main, images / "walkthrough_timeline.png"))
    written.append(draw_timeline(window, images / "walkthrough_window_timeline.png"))
    written.append(render_html(main, out / "walkthrough_trace.html",
                               title="pagedattn · engine walkthrough (scenes 1-4, 6)"))
    written.append(render_html(window, out / "walkthrough_window_trace.html",
                               title="pagedattn · engine walkthrough (scene 5, sliding window)"))
    for p in written:
        limit = MAX_HTML_BYTES if p.suffix == ".html" else MAX_PNG_BYTES
        check(p.stat().st_size < limit, f"{p} ({p.stat().st_size // 1000} KB < {limit // 1000} KB)")
    return written


# ============================================================================ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="directory for the HTML pages; PNGs go to OUT/images (default: docs/)")
    args = ap.parse_args(argv)
    FAILURES.clear()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # 64-wide matmuls: more threads only add contention
    figs: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="pagedattn-walkthrough-") as tmp:
        llama = make_model(Path(tmp), "tiny-llama")
        mistral = make_model(Path(tmp), "tiny-mistral-window", sliding_window=WINDOW)

        run = Run(make_llm(llama))
        print(f"engine: {NUM_BLOCKS} GPU pages + {NUM_CPU_BLOCKS} CPU pages of {BLOCK_SIZE} tokens, "
              f"KV pool tensor {tuple(run.engine.kv_pool.kv.shape)} = [layers, K/V, pages, page, kv_heads, head_dim]")
        # Scenes 1-2: request 0's prompt is computed in step 0; request 1 arrives after it.
        r0 = run.add(PROMPT_0, greedy(12))
        run.step()
        r1 = run.add(PROMPT_1, greedy(8))
        run.run_until_done([r0, r1])
        m1 = run.metrics()
        # Scene 3: two seeded samples of one prompt.
        sampled = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
        (r2,) = run.generate([PROMPT_2], sampled)
        m2 = run.metrics()
        # Scene 4: 3 x 8 pages of demand on 16 pages.
        ids_345 = run.generate(PROMPTS_345, greedy(20))
        m3 = run.metrics()
        # Scene 6: four prompts of different lengths at once.
        ids_6789 = run.generate(PROMPTS_6789, greedy(4))
        run.engine.check_integrity()
        run.recorder.close()
        main_trace = run.recorder.trace()

        # The sampled request again, alone in a roomy engine with 16-token pages and no cache.
        ref = LLM(str(llama), device="cpu", block_size=16, num_kv_blocks=64, swap_space_gib=0,
                  enable_prefix_caching=False, async_scheduling=False, seed=0)
        cow_ref = [c.token_ids for c in ref.generate([{"prompt_token_ids": PROMPT_2}], sampled,
                                                      use_tqdm=False)[0].outputs]

        # Prefix caching off here: released pages go straight back to the free list (with it on,
        # full ones would park in the cache as evictable pages, which hides the release).
        wrun = Run(make_llm(mistral, num_cpu_blocks=0, enable_prefix_caching=False))
        (rw,) = wrun.generate([PROMPT_WINDOW], greedy(26))
        wrun.engine.check_integrity()
        wrun.recorder.close()
        window_trace = wrun.recorder.trace()

        scene_prefix_and_growth(run, main_trace, llama, [r0, r1], figs, m1)
        scene_cow(run, main_trace, r2, cow_ref, figs, m1, m2)
        scene_swap(run, main_trace, llama, ids_345, figs, m2, m3)
        scene_window(wrun, window_trace, mistral, rw, figs)
        scene_batched(run, main_trace, llama, ids_6789, figs)

    header("Pictures")
    for p in write_pictures(args.out, figs, main_trace, window_trace):
        print(f"    wrote {p}")
    return summary()


def summary() -> int:
    """Print the verdict; the exit status is 1 when any check failed."""
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
