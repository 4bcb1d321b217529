#!/usr/bin/env python3
"""The browser viewer in Chromium: study list, first image, scrolling, W/L drag (issue 19).

    .venv/bin/python scripts/bench/viewer.py [--count 500] [--repeat 5] [--json F]

What it measures, how, and its targets: scripts/bench/README.md, section viewer.py.
"""

import argparse
import asyncio
import contextlib
import math
import statistics
from pathlib import Path
from typing import Any

import harness as bench

log = bench.log
OPTIONS: bench.Options = {
    "--count": (500, "slices of the series"),
    "--repeat": (5, "study list and first image runs"),
    "--interval-ms": (25.0, "between wheel events"),
    "--drag-seconds": (2.5, "of the W/L drag"),
}
CHROMIUM = Path("/usr/bin/chromium")
# Targets of the viewer issue.
FIRST_IMAGE_MS = 300.0  # median, render cache cold
IMAGES_PER_S = 20.0  # while scrolling
UPDATES_PER_S = 20.0  # while dragging the window
DRAG_HZ = 60.0  # mouse moves a second during the drag

# In every page before its own scripts; it only observes. The time the first study row
# appears, the click on a row, each exact draw (a keyed `draw`, what counts in `drawn`),
# each draw of a bitmap not drawn before (a new rendering: `fresh`), each wheel event and
# each move of a pressed mouse, all on the page's clock (performance.now, from navigation
# start); between __benchWatch(true) and (false), animation frames (`frames`) and those
# whose canvas had no image (`blank`).
INIT_SCRIPT = """
(() => {
  const b = { listAt: null, clickAt: null, firstDraw: null, draws: [], inputs: [], moves: [],
              fresh: [], watch: false, frames: 0, blank: 0 };
  const seen = new WeakSet();
  globalThis.__bench = b;
  new MutationObserver((_, observer) => {
    if (document.querySelector("tr.study")) {
      b.listAt = performance.now();
      observer.disconnect();
    }
  }).observe(document, { childList: true, subtree: true });
  let view = null;
  Object.defineProperty(globalThis, "minipacsView", {
    configurable: true,
    get() { return view; },
    set(value) {
      view = value;
      if (!value || value.__bench) return;
      const draw = value.draw;
      value.__bench = true;
      value.draw = function (key, bitmap) {
        const result = draw.call(this, key, bitmap);
        if (!seen.has(bitmap)) b.fresh.push(performance.now());
        seen.add(bitmap);
        if (key) {
          b.draws.push([performance.now(), this.index, key]);
          if (b.firstDraw === null) b.firstDraw = performance.now();
        }
        return result;
      };
    },
  });
  addEventListener("click", (event) => {
    if (event.target.closest && event.target.closest("tr.study")) b.clickAt = performance.now();
  }, true);
  addEventListener("wheel", () => b.inputs.push(performance.now()), { passive: true });
  addEventListener("pointermove", (e) => e.buttons && b.moves.push(performance.now()), true);
  const look = () => {
    if (!b.watch) return;
    const shown = globalThis.minipacsView && globalThis.minipacsView.shown;
    b.frames += 1;
    if (!(shown && shown.bitmap && shown.bitmap.width)) b.blank += 1; // a closed one: 0
    requestAnimationFrame(look);
  };
  globalThis.__benchWatch = (on) => {
    if (on && !b.watch) requestAnimationFrame(look);
    b.watch = on;
  };
})();
"""
# The current slice's exact rendering is on the canvas.
CURRENT_SHOWN = """() => {
  const v = globalThis.minipacsView;
  return !!(v && v.shown && v.shown.key === v.key_(v.index, "png"));
}"""
PREFETCH_DONE = "() => globalThis.minipacsView && globalThis.minipacsView.loading.size === 0"


def fresh_server(root: Path, data: Path, warmup: bench.StudyFiles, number: int) -> bench.Minipacs:
    """A new minipacs on the data (an empty render cache), warmed up on the warm-up study:
    lazy imports, codecs and the index, while the measured series stays cold."""
    server = bench.Minipacs(root / f"minipacs-{number}", data)
    server.start()
    client = bench.Client(server.http_port)
    series = f"/dicom-web/studies/{warmup.study}/series/{warmup.series}"
    for path in (
        "/",
        "/dicom-web/studies?limit=51",
        f"/dicom-web/studies/{warmup.study}/series",
        f"{series}/instances",
        f"{series}/instances/{warmup.sops[0]}/metadata",
        f"{series}/instances/{warmup.sops[0]}/frames/1/rendered?accept=image%2Fpng",
        f"{series}/thumbnail?viewport=96,96",
    ):
        client.get(path)
    client.close()
    return server


async def open_study(browser: Any, server: bench.Minipacs, study: bench.StudyFiles) -> Any:
    """A new context: the study list, a click on the study, until its first frame is drawn."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
    await context.add_init_script(INIT_SCRIPT)  # bypass_csp: evaluate() needs it
    page = await context.new_page()
    await page.goto(server.url("/"))
    await page.locator(f'tr.study[data-study="{study.study}"]').click(timeout=30_000)
    first_draw = "() => globalThis.__bench.firstDraw !== null"
    await page.wait_for_function(first_draw, polling="raf", timeout=30_000)
    return context, page


async def scroll(page: Any, slices: int, interval: float) -> dict[str, Any]:
    """Wheel events over the image on a fixed schedule, not waiting for Chromium to
    acknowledge each (a wheel does not wait for the page either); frames drawn per second
    from the first event to the last, slices shown."""
    await page.wait_for_function(PREFETCH_DONE, polling="raf", timeout=30_000)
    box = await page.locator(".stage").bounding_box()
    await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    mark = await page.evaluate("() => (globalThis.__benchWatch(true), performance.now())")
    loop = asyncio.get_running_loop()
    start, pending = loop.time(), []
    for step in range(slices - 1):
        await asyncio.sleep(max(0.0, start + step * interval - loop.time()))
        pending.append(asyncio.ensure_future(page.mouse.wheel(0, 100)))
    await asyncio.gather(*pending)
    with contextlib.suppress(Exception):  # a slow settle is in the figures
        await page.wait_for_function(CURRENT_SHOWN, polling="raf", timeout=30_000)
    ended = "() => (globalThis.__benchWatch(false), [globalThis.__bench, minipacsView.index])"
    state = await page.evaluate(ended)
    inputs = [t for t in state[0]["inputs"] if t >= mark]
    every = [draw for draw in state[0]["draws"] if draw[0] >= mark]
    # The same frame drawn twice in a row is one image shown.
    draws = [d for n, d in enumerate(every) if n == 0 or every[n - 1][2] != d[2]]
    during = [t for t, _, _ in draws if inputs[0] <= t <= inputs[-1]]
    seconds = (inputs[-1] - inputs[0]) / 1000
    return {
        "events sent": slices - 1,
        "reached the page": len(inputs),
        "input s": seconds,
        "images/s": len(during) / seconds,
        "slices drawn": len({index for _, index, _ in draws}),
        "last slice": state[1],
        "blank frames": state[0]["blank"],
    }


async def drag(page: Any, seconds: float) -> dict[str, Any]:
    """A window/level drag over the image: DRAG_HZ mouse moves a second on a fixed
    schedule (not waiting for each to be acknowledged), each to a new window; new
    renderings drawn per second from the first move to the last, animation frames without
    an image, and the most rendered-image requests in flight at once."""
    await page.wait_for_function(PREFETCH_DONE, polling="raf", timeout=30_000)
    flight = {"now": 0, "most": 0}

    def sent(request: Any) -> None:
        if "/rendered" in request.url:
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])

    def ended(request: Any) -> None:
        flight["now"] -= "/rendered" in request.url

    box = await page.locator(".stage").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    await page.mouse.move(x, y)
    mark = await page.evaluate("() => (globalThis.__benchWatch(true), performance.now())")
    page.on("request", sent)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    await page.mouse.down()
    loop = asyncio.get_running_loop()
    start, pending, moves = loop.time(), [], round(seconds * DRAG_HZ)
    for step in range(1, moves + 1):  # a Lissajous path: every move a new window
        await asyncio.sleep(max(0.0, start + step / DRAG_HZ - loop.time()))
        phase = 2 * math.pi * step / moves
        move = page.mouse.move(x + 150 * math.sin(2 * phase), y + 100 * math.sin(3 * phase))
        pending.append(asyncio.ensure_future(move))
    await asyncio.gather(*pending)
    most = flight["most"]  # while the button was down
    await page.mouse.up()
    with contextlib.suppress(Exception):  # a slow settle is in the figures
        await page.wait_for_function(CURRENT_SHOWN, polling="raf", timeout=30_000)
    state = await page.evaluate("() => (globalThis.__benchWatch(false), globalThis.__bench)")
    for name, handler in (("request", sent), ("requestfinished", ended), ("requestfailed", ended)):
        page.remove_listener(name, handler)
    moved = [t for t in state["moves"] if t >= mark]
    seconds = (moved[-1] - moved[0]) / 1000
    fresh = [t for t in state["fresh"] if moved[0] <= t <= moved[-1]]
    return {
        "moves sent": moves,
        "reached the page": len(moved),
        "input s": seconds,
        "updates/s": len(fresh) / seconds,
        "blank frames": state["blank"],
        "of frames": state["frames"],
        "most in flight": most,
    }


async def measure(opts: argparse.Namespace, root: Path, study, warmup) -> tuple:
    from playwright.async_api import async_playwright

    firsts = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"]
        )
        opts.meta["chromium"] = browser.version
        try:
            for number in range(opts.repeat + 2):  # a warm-up run, the runs, the scroll run
                server = fresh_server(root, root / "data", warmup, number)
                context, page = await open_study(browser, server, warmup if number == 0 else study)
                state = await page.evaluate("() => globalThis.__bench")
                if 0 < number <= opts.repeat:
                    firsts.append([state["listAt"], state["firstDraw"] - state["clickAt"]])
                    log.info("run %d: study list %.0f ms, first image %.0f ms", number, *firsts[-1])
                elif number:
                    scrolled = await scroll(page, len(study.files), opts.interval_ms / 1000)
                    dragged = await drag(page, opts.drag_seconds)
                await context.close()
                server.stop()
        finally:
            await browser.close()
    return firsts, scrolled, dragged


def scenario(opts: argparse.Namespace, root: Path) -> int:
    bench.require(("echoscu",), (CHROMIUM,), hint="Debian packages dcmtk and chromium")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        raise bench.Unavailable("playwright (the venv's test extras)") from None
    study = bench.read_study(bench.make_study(root / "images" / "study", opts.count))
    warmup = bench.read_study(bench.make_study(root / "images" / "warmup", 1))
    bench.minipacs_import(root / "data", [root / "images"])
    firsts, scrolled, dragged = asyncio.run(measure(opts, root, study, warmup))
    out = bench.Report(f"Viewer in Chromium {opts.meta['chromium']}", opts)
    rows = [[f"run {n}", *times] for n, times in enumerate(firsts, 1)]
    medians = [statistics.median(column) for column in zip(*firsts, strict=True)]
    title = f"{opts.count}-slice 512² CT series, a fresh server each run, ms"
    out.table(title, ["", "study list", "first image"], [*rows, ["median", *medians]])
    title = f"scrolling: a wheel event every {opts.interval_ms:g} ms through the series"
    out.table(title, list(scrolled), [list(scrolled.values())])
    title = f"window/level drag: {DRAG_HZ:g} mouse moves a second on the last slice"
    out.table(title, list(dragged), [list(dragged.values())])
    out.target("first image: median ms", medians[1], FIRST_IMAGE_MS, higher=False)
    out.target("scrolling: images/s", scrolled["images/s"], IMAGES_PER_S)
    out.target("scrolling: blank frames", scrolled["blank frames"], 0, higher=False)
    out.target("W/L drag: updates/s", dragged["updates/s"], UPDATES_PER_S)
    out.target("W/L drag: blank frames", dragged["blank frames"], 0, higher=False)
    return out.finish()


if __name__ == "__main__":
    raise SystemExit(bench.main(__doc__, OPTIONS, scenario))
