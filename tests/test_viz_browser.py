"""The trace page in a real browser: headless Chromium driven by Selenium, offline.

A real engine run (a tiny random Llama on the CPU, 4-token blocks, a 16-block pool): a prefix
hit shares blocks, a request with ``n=2`` forks and copies on write, and three requests too big
for the pool make the engine swap one out and back in.  The block manager's state is read live
after every engine step.  Then its trace page must

* run its script without console errors and load nothing from anywhere;
* move through the run with the step buttons, the keyboard and the slider;
* show in its cells, at chosen steps, exactly the manager's state at that step: free / cached /
  held, refcount (data attributes and the number drawn) and owners, GPU and CPU pool;
* zoom a large pool to the blocks in use, with the whole pool one click (or ``z``) away.

A screenshot of the swap step is saved (``PAGEDATTN_TEST_ARTIFACTS`` or the test's temp dir).
Where Chromium, chromedriver or selenium is missing (``.ci/run`` installs them) the browser
tests skip and say why; the trace of the real run is still checked against the live manager.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pagedattn.cache import BlockManager
from pagedattn.viz import PoolState, Trace, TraceRecorder, render_html, snapshot
from pagedattn.viz.trace import REQUIRED_STATS
from tests.engine_models import make_model_dir

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PREFIX = [11, 42, 7, 3, 99, 15, 64, 23]  # two full 4-token blocks, shared by requests 0 and 1


# ====================================================================== a real traced run
@dataclass
class EngineRun:
    trace: Trace
    live: dict[int, PoolState]  # step -> the manager's own state right after that engine step
    page: Path

    def first(self, kind: str) -> int:
        return next(e["step"] for e in self.trace.events if e["kind"] == kind)


def _engine(model_dir: Path) -> Any:
    import torch

    from pagedattn import LLM
    from pagedattn.cache.kv_pool import KVCacheSpec

    spec = KVCacheSpec(2, 1, 16, 4, torch.float32)  # the tiny model: 2 layers, 1 KV head of 64/4 = 16
    swap_gib = 8.5 * spec.bytes_per_block / (1 << 30)  # 8 CPU blocks (+0.5: no rounding down)
    llm = LLM(str(model_dir), device="cpu", dtype="float32", block_size=4, num_kv_blocks=16, swap_space_gib=swap_gib,
              async_scheduling=False, enforce_eager=True, seed=0)
    assert llm.engine.block_manager.cpu.num_blocks == 8
    return llm.engine


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> EngineRun:
    from pagedattn import SamplingParams

    tmp = tmp_path_factory.mktemp("viz-browser")
    engine = _engine(make_model_dir(tmp, "llama_mqa_tied"))
    recorder = TraceRecorder()
    engine.attach_tracer(recorder)
    live: dict[int, PoolState] = {}

    def step() -> None:
        engine.step()
        live[engine.num_steps - 1] = snapshot(engine.block_manager)

    def drain() -> None:
        while engine.has_unfinished_requests():
            step()

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    engine.add_request({"prompt_token_ids": [*PREFIX, 5, 6]}, greedy(12))
    step()  # request 1 arrives once request 0's prompt blocks are in the prefix cache
    engine.add_request({"prompt_token_ids": [*PREFIX, 50, 51]}, greedy(8))
    drain()
    engine.add_request({"prompt_token_ids": [31, 32, 33, 34, 35, 36]},
                       SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True))
    drain()
    for i in range(3):  # 3 x 8 blocks of demand on 16
        engine.add_request({"prompt_token_ids": [100 + 10 * i + j for j in range(12)]}, greedy(20))
    drain()
    engine.check_integrity()
    engine.detach_tracer()
    trace = recorder.trace()
    return EngineRun(trace, live, render_html(trace, tmp / "trace.html"))


def test_trace_of_a_real_engine_run_equals_the_live_manager(run: EngineRun) -> None:
    kinds = {e["kind"] for e in run.trace.events}
    assert {"share", "fork", "cow", "swap_out", "swap_in", "evict", "preempt"} <= kinds
    assert sorted(run.live) == run.trace.steps
    for step, state in run.trace.states():
        assert state == run.live[step], f"step {step}"


# ====================================================================== the browser
def _find_browser() -> tuple[str, str]:
    """``(chromium, chromedriver)`` paths, or skip saying what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if p is None)
        pytest.skip(f"no {missing} on PATH (Debian: apt-get install chromium chromium-driver; .ci/run does)")
    return browser, driver


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    browser, chromedriver = _find_browser()
    with warnings.catch_warnings():  # trio, which selenium imports, warns about hypothesis' PRNG registry
        warnings.simplefilter("ignore")
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--host-resolver-rules=MAP * ~NOTFOUND"):  # no network: any lookup fails
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        drv = webdriver.Chrome(service=Service(chromedriver), options=opts)
    except WebDriverException as e:  # e.g. a snap wrapper in a container, a driver of another version
        pytest.skip(f"{browser} with {chromedriver} does not start: {e.msg}")
    try:
        yield drv
    finally:
        drv.quit()


def _open(drv: Any, page: Path) -> None:
    drv.get_log("browser")  # drop what earlier pages logged (entries are read once)
    drv.get(page.resolve().as_uri())


def _console_problems(drv: Any) -> list[str]:
    return [f"{e['level']}: {e['message']}" for e in drv.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


# The cells as the page shows them: what each says it is, and the number drawn on it.
READ_CELLS = """
const read = (id) => [...document.querySelectorAll('#' + id + ' .cell')].map((c) => [
  c.dataset.state, +c.dataset.ref, c.dataset.owners,
  c.firstChild && c.firstChild.nodeType === Node.TEXT_NODE ? c.firstChild.textContent : ""]);
return {label: document.getElementById('steplabel').textContent, slider: +document.getElementById('slider').value,
        gpu: read('gpu'), cpu: read('cpu')};
"""


def _expected(state: PoolState, n: int, m: int) -> tuple[list[list[Any]], list[list[Any]]]:
    owners, cpu_owners = state.gpu_owners(), state.cpu_owners()
    gpu = [[state.status(b), state.ref(b), " ".join(owners.get(b, [])), str(state.ref(b)) if state.ref(b) > 1 else ""]
           for b in range(n)]
    cpu = [["held" if state.cpu_ref(b) else "free", state.cpu_ref(b), " ".join(cpu_owners.get(b, [])),
            str(state.cpu_ref(b)) if state.cpu_ref(b) > 1 else ""] for b in range(m)]
    return gpu, cpu


def _shows(drv: Any, run: EngineRun, step: int) -> dict[str, Any]:
    """The page shows ``step``, and each cell equals the manager's state right after it."""
    shown = drv.execute_script(READ_CELLS)
    index = run.trace.steps.index(step)
    assert shown["label"] == f"step {step}  ({index + 1}/{len(run.trace.steps)})"
    assert shown["slider"] == index
    gpu, cpu = _expected(run.live[step], len(shown["gpu"]), len(shown["cpu"]))
    assert shown["gpu"] == gpu, f"GPU cells at step {step}"
    assert shown["cpu"] == cpu, f"CPU cells at step {step}"
    return shown


def _keys(drv: Any, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(drv).send_keys(*keys).perform()


def _click(drv: Any, element_id: str) -> None:
    drv.find_element("id", element_id).click()


def test_page_steps_through_a_real_run_showing_the_managers_state(driver: Any, run: EngineRun) -> None:
    from selenium.webdriver.common.keys import Keys

    _open(driver, run.page)
    steps = run.trace.steps
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    shown = _shows(driver, run, run.trace.busiest_step())  # the page opens at the busiest step
    assert len(shown["gpu"]) == 16 and len(shown["cpu"]) == 8  # the whole (small) pools
    assert not driver.find_element("id", "zoombar").is_displayed()

    # Buttons.
    _click(driver, "first")
    _shows(driver, run, steps[0])
    _click(driver, "next")
    _click(driver, "next")
    _shows(driver, run, steps[2])
    _click(driver, "prev")
    _shows(driver, run, steps[1])
    _click(driver, "last")
    _shows(driver, run, steps[-1])

    # Keyboard, forward to the steps that matter and back.
    share, cow, out, back = (run.first(k) for k in ("share", "cow", "swap_out", "swap_in"))
    assert 0 < share < cow < out < back < steps[-1]
    _keys(driver, Keys.HOME)
    _shows(driver, run, steps[0])
    _keys(driver, Keys.ARROW_RIGHT * steps.index(share))
    _shows(driver, run, share)  # requests 0 and 1 share two blocks (refcount 2)
    _keys(driver, Keys.ARROW_RIGHT * (steps.index(cow) - steps.index(share)))
    _shows(driver, run, cow)  # the copied block and its source, one owner each
    _keys(driver, Keys.ARROW_RIGHT * (steps.index(out) - steps.index(cow)))
    at_swap = _shows(driver, run, out)  # a request's blocks in the CPU pool
    assert any(cell[0] == "held" for cell in at_swap["cpu"])
    _save_screenshot(driver, run.page.parent)
    _keys(driver, Keys.ARROW_LEFT)
    _shows(driver, run, steps[steps.index(out) - 1])
    _keys(driver, Keys.END, Keys.ARROW_LEFT * (len(steps) - 1 - steps.index(back)))
    _shows(driver, run, back)

    # The slider.
    driver.execute_script("const s = document.getElementById('slider'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", steps.index(cow))
    _shows(driver, run, cow)
    assert _console_problems(driver) == []


def _save_screenshot(drv: Any, tmp: Path) -> Path:
    """Save the page as a test artifact, and check the screen shows the held cells' colours."""
    from matplotlib.image import imread

    out = Path(os.environ.get("PAGEDATTN_TEST_ARTIFACTS") or tmp) / "viz_trace_page_swap.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    assert drv.save_screenshot(str(out))
    pixels = imread(out)
    probes = drv.execute_script("""
      const ratio = window.devicePixelRatio;
      const held = [...document.querySelectorAll('#gpu .cell[data-state=held], #cpu .cell[data-state=held]')];
      return held.filter((c) => getComputedStyle(c).backgroundImage === "none").map((c) => {  // one colour
        const r = c.getBoundingClientRect();  // the top-right corner: clear of the id, number and second colour
        const colour = getComputedStyle(c).backgroundColor;
        return [Math.round((r.top + 5) * ratio), Math.round((r.right - 5) * ratio), colour];
      });""")
    assert probes
    for y, x, css in probes:
        want = [int(v) for v in css[css.index("(") + 1:css.index(")")].split(",")[:3]]
        got = [round(float(v) * 255) for v in pixels[y, x, :3]]
        assert all(abs(g - w) <= 2 for g, w in zip(got, want)), (y, x, css, got)
    print(f"screenshot: {out}")
    return out


def test_page_of_a_large_pool_zooms_to_the_blocks_in_use(driver: Any, tmp_path: Path) -> None:
    bm = BlockManager(num_blocks=2912, block_size=16, num_cpu_blocks=5825)
    rec = TraceRecorder().attach(bm)
    for step, n in enumerate((20, 40, 60)):  # 9 blocks of a large pool, like a short real run
        rec.begin_step(step)
        assert bm.allocate_slots(f"{step}#0", 0, n)
        rec.end_step(step, dict.fromkeys(REQUIRED_STATS, 0))
    page = render_html(rec.trace(), tmp_path / "big.html")
    _open(driver, page)

    def count(pool: str) -> int:
        return int(driver.execute_script(f"return document.querySelectorAll('#{pool} .cell').length"))

    assert (count("gpu"), count("cpu")) == (16, 0)
    assert "GPU blocks 0–15 of 2912" in driver.find_element("id", "zoomnote").text
    _click(driver, "zoom")
    assert (count("gpu"), count("cpu")) == (2912, 5825)
    held = driver.execute_script("return document.querySelectorAll('#gpu .cell[data-state=held]').length")
    assert held == 2 + 3 + 4
    _keys(driver, "z")
    assert (count("gpu"), count("cpu")) == (16, 0)
    assert _console_problems(driver) == []


def test_console_errors_are_caught(driver: Any, tmp_path: Path) -> None:
    """The console check above can fail: a page whose data is broken reports its error."""
    bad = tmp_path / "broken.html"
    html = render_html(Trace({"num_blocks": 4, "num_cpu_blocks": 0, "block_size": 4}, [], {}), bad).read_text()
    bad.write_text(html.replace('<script id="trace-data" type="application/json">{', '<script id="trace-data" '
                                'type="application/json">{oops', 1))
    _open(driver, bad)
    problems = _console_problems(driver)
    assert problems and "SyntaxError" in problems[0]
