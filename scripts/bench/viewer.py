#!/usr/bin/env python3
"""Browser viewer benchmark: time to the first image and stack-scrolling rate, in Chromium.

    .venv/bin/python scripts/bench/viewer.py [--quick] [--count 500] [--size 512] [--json PATH]

One synthetic CT series (scripts/make_study.py, 500 slices of 512×512 by default) and a
one-slice warm-up study are imported into a fresh data folder (`minipacs import
--no-fsync`); `minipacs serve` runs on it on free loopback ports. Debian's Chromium,
driven by Playwright, opens the study list and clicks the study's row:

1. first image: from the click to the first exact frame drawn on the canvas, measured in
   the page (performance.now at the click and at the draw), in a new browser context each
   time (empty HTTP cache) against a freshly started server (empty render cache), then
   with the server's render cache warm;
2. scrolling: real wheel events over `.stage` (deltaY 100 = one slice) at a fixed pace,
   then ArrowDown held (key repeat at the same pace), through the whole series; frames
   drawn per second, slices shown, how far the display lags the input, and the rendered
   requests behind it (Resource Timing in the page, failures from Playwright).

The viewer runs unchanged: an init script only wraps the view object's `draw` (set on
`globalThis.minipacsView`) to time-stamp each exact draw, and listens to the click and
the input events. See scripts/bench/README.md.

Progress goes to stderr (logging); the figures table goes to stdout.
"""

import argparse
import asyncio
import http.client
import importlib.metadata
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

import _common as bench

log = logging.getLogger("bench.viewer")
Study = bench.StudyFiles

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 800}

# Targets of the viewer issue.
TARGET_FIRST_MS = 300.0
TARGET_IMAGES_PER_S = 20.0

# Runs in every page before its own scripts. It only observes: the click on a study row,
# each exact draw (the view's `draw` with a key, i.e. what increments `drawn`) and the
# next animation frame after the first, and the wheel/ArrowDown events after the viewer
# handled them (window, bubble phase: `index` is already the new one) with their deltaY:
# Chromium merges wheel events that queue up behind a busy page into one with the sum.
INIT_SCRIPT = """
(() => {
  const b = { clickAt: null, firstDraw: null, firstPaint: null, draws: [], inputs: [] };
  globalThis.__bench = b;
  performance.setResourceTimingBufferSize(100000);
  let view = null;
  Object.defineProperty(globalThis, "minipacsView", {
    configurable: true,
    get() { return view; },
    set(value) {
      view = value;
      if (!value || value.__benchDraw) return;
      const draw = value.draw;
      value.__benchDraw = true;
      value.draw = function (key, bitmap) {
        const result = draw.call(this, key, bitmap);
        if (key) {
          const now = performance.now();
          b.draws.push([now, this.index, key]);
          if (b.firstDraw === null) {
            b.firstDraw = now;
            requestAnimationFrame(() => { b.firstPaint = performance.now(); });
          }
        }
        return result;
      };
    },
  });
  addEventListener("click", (event) => {
    if (event.target.closest && event.target.closest("tr.study")) b.clickAt = performance.now();
  }, true);
  const input = (delta) => b.inputs.push([performance.now(), view ? view.index : -1, delta]);
  addEventListener("wheel", (event) => input(event.deltaY), { passive: true });
  addEventListener("keydown", (event) => { if (event.key === "ArrowDown") input(100); });
})();
"""

# The page's state: the bench record, the view's fields, and the Resource Timing entries
# that started at or after `since` (same clock as performance.now).
READ_STATE = """
(since) => {
  const b = globalThis.__bench;
  const v = globalThis.minipacsView;
  const resources = performance.getEntriesByType("resource")
    .filter((e) => e.startTime >= since)
    .map((e) => ({
      url: e.name, start: e.startTime, requestStart: e.requestStart,
      responseStart: e.responseStart, end: e.responseEnd, bytes: e.encodedBodySize,
      status: e.responseStatus,
    }));
  return {
    clickAt: b.clickAt, firstDraw: b.firstDraw, firstPaint: b.firstPaint,
    draws: b.draws, inputs: b.inputs, now: performance.now(),
    drawn: v ? v.drawn : null, index: v ? v.index : null,
    sops: v ? v.stack.map((s) => s.sop) : [],
    loading: v ? v.loading.size : null,
    message: v && !v.message.hidden ? v.message.textContent : null,
    resources,
  };
}
"""

# The current slice's exact rendering is on the canvas (the view's own key for it).
CURRENT_SHOWN = """
() => {
  const v = globalThis.minipacsView;
  return !!(v && v.stack.length && v.shown && v.shown.key === v.key_(v.index, "png"));
}
"""


# --------------------------------------------------------------------------- data


def make_data(root: Path, count: int, size: int) -> tuple[Study, Study]:
    """The measured series and a one-slice study that warms each new server up."""
    log.info("writing %d slices of %d×%d (make_study)", count, size, size)
    study = bench.read_study(bench.make_study(root / "images" / "study", count, size))
    warmup = bench.read_study(bench.make_study(root / "images" / "warmup", 1, size))
    return study, warmup


class Servers:
    """Starts servers one at a time on the shared data folder; keeps their log issues."""

    def __init__(self, root: Path, data: Path, opts: argparse.Namespace, warmup: Study) -> None:
        self.root = root
        self.data = data
        self.opts = opts
        self.warmup = warmup
        self.current: bench.Minipacs | None = None
        self.issues: list[str] = []
        self.issue_count = 0
        self.started = 0

    def fresh(self) -> bench.Minipacs:
        """Stop the running server, start a new one (empty render cache), warm it up."""
        self.stop()
        workdir = Path(tempfile.mkdtemp(prefix="minipacs-", dir=self.root))
        server = bench.Minipacs(workdir, self.opts, self.data)  # a new one: an empty render cache
        self.current = server
        server.start()
        self.started += 1
        warm_server(server.http_port or 0, self.warmup)
        return server

    def stop(self) -> None:
        server, self.current = self.current, None
        if server is None:
            return
        server.stop()
        count, sample = bench.log_issues(server.log_path)
        self.issue_count += count
        self.issues += sample
        if self.opts.log_dir:
            self.opts.log_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(server.log_path, self.opts.log_dir / f"minipacs-{self.started}.log")


def warm_server(port: int, warmup: Study) -> None:
    """Lazy imports, codecs and the index out of the way, on a study that is not measured:
    the measured series' frames stay cold in the render cache."""
    base = f"http://{bench.HOST}:{port}"
    inst = f"/dicom-web/studies/{warmup.study}/series/{warmup.series}/instances"
    paths = [
        "/",
        "/dicom-web/studies?limit=51&includefield=00081030,00100030",
        f"/dicom-web/studies/{warmup.study}/series?includefield=00080021,00080031",
        inst,
        f"{inst}/{warmup.sops[0]}/metadata",
        f"{inst}/{warmup.sops[0]}/frames/1/rendered?accept=image%2Fpng",
        f"/dicom-web/studies/{warmup.study}/series/{warmup.series}/thumbnail?viewport=96,96",
    ]
    for path in paths:
        status, _ = bench.http_get(base + path, timeout=30.0)
        if status != 200:
            raise bench.BenchError(f"warm-up request {path}: HTTP {status}")


# --------------------------------------------------------------------------- page


class Watch:
    """What a page did besides drawing: console errors, page errors, failed requests and
    HTTP errors, and how many requests had to open a new connection (Playwright timing)."""

    def __init__(self, page: Any) -> None:
        self.console: list[str] = []
        self.failed: list[tuple[str, str]] = []  # (kind of URL, failure text)
        self.http_errors: list[str] = []
        self.new_connections: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.started: Counter[str] = Counter()
        page.on("console", self._console)
        page.on("pageerror", self._pageerror)
        page.on("requestfailed", self._failed)
        page.on("requestfinished", self._finished)
        page.on("request", lambda request: self.started.update([url_kind(request.url)]))
        page.on("response", self._response)

    def _console(self, message: Any) -> None:
        if message.type in ("error", "warning"):
            self.console.append(f"console.{message.type}: {message.text}")

    def _pageerror(self, error: Any) -> None:
        stack = (error.stack or "").splitlines()[1:3]
        where = " ← ".join(line.strip().removeprefix("at ") for line in stack)
        self.console.append(f"pageerror: {error.name}: {error.message} [{where}]")

    def _failed(self, request: Any) -> None:
        self.failed.append((url_kind(request.url), request.failure or "?"))

    def _finished(self, request: Any) -> None:
        kind = url_kind(request.url)
        self.finished[kind] += 1
        timing = request.timing
        if timing.get("connectStart", -1) >= 0:  # -1: an open connection was reused
            self.new_connections[kind] += 1

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.http_errors.append(f"{response.status} {url_kind(response.url)} {response.url}")


URL_KINDS = (  # (how the path ends, or starts for "/ui/", kind of request)
    ("/rendered", "frame"),
    ("/thumbnail", "thumbnail"),
    ("/metadata", "metadata"),
    ("/instances", "qido-instances"),
    ("/series", "qido-series"),
    ("/studies", "qido-studies"),
)


def url_kind(url: str) -> str:
    path = urllib.parse.urlsplit(url).path
    kind = next((kind for end, kind in URL_KINDS if path.endswith(end)), None)
    return kind or ("static" if path.startswith("/ui/") else "page")


def frame_sop(url: str) -> str:
    parts = urllib.parse.urlsplit(url).path.split("/")
    return parts[parts.index("instances") + 1] if "instances" in parts else ""


async def open_study(
    context: Any, port: int, study: Study, timeout_s: float
) -> tuple[Any, Watch, dict[str, Any], float]:
    """Load the study list, click the study's row and wait for the first frame to be
    painted; the page, its watch, the page's state and the wall-clock seconds of the wait."""
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(f"http://{bench.HOST}:{port}/", wait_until="networkidle")
    row = page.locator(f'tr.study[data-study="{study.study}"]')
    await row.wait_for(state="visible", timeout=timeout_s * 1000)
    started = time.perf_counter()
    await row.click()
    try:
        await page.wait_for_function(
            "() => globalThis.__bench.firstPaint !== null",
            polling="raf",
            timeout=timeout_s * 1000,
        )
    except Exception as exc:  # Playwright's TimeoutError, or the page crashed
        state = await safe_state(page)
        raise bench.BenchError(
            f"no image drawn within {timeout_s:.0f} s of the click: "
            f"drawn={state.get('drawn')}, message={state.get('message')!r}, "
            f"console={watch.console[:3]}, failed={watch.failed[:3]}, "
            f"http errors={watch.http_errors[:3]} ({type(exc).__name__})"
        ) from None
    wall = time.perf_counter() - started
    return page, watch, await page.evaluate(READ_STATE, 0), wall


async def safe_state(page: Any) -> dict[str, Any]:
    try:
        return dict(await page.evaluate(READ_STATE, 0))
    except Exception as exc:
        return {"error": str(exc)}


async def settle(page: Any, timeout_s: float) -> float | None:
    """Wait until no frame request is in flight; ms since the click, None on timeout."""
    try:
        await page.wait_for_function(
            "() => globalThis.minipacsView && globalThis.minipacsView.loading.size === 0",
            polling="raf",
            timeout=timeout_s * 1000,
        )
    except Exception:
        return None
    state = await page.evaluate("() => performance.now() - globalThis.__bench.clickAt")
    return float(state)


def alone(port: int, study: Study) -> tuple[float, float]:
    """The viewer's QIDO-RS for the stack and the last slice's /rendered PNG (never asked
    for by the viewer's prefetch), each timed alone on a new connection to an idle server:
    what the same requests cost without the page's other requests beside them."""
    base = f"/dicom-web/studies/{study.study}/series/{study.series}/instances"
    frame = f"{base}/{study.sops[-1]}/frames/1/rendered?accept=image%2Fpng"
    times = []
    for path, accept in ((base, "application/dicom+json"), (frame, "image/png")):
        conn = http.client.HTTPConnection(bench.HOST, port, timeout=30)
        try:
            conn.connect()
            start = time.perf_counter()
            conn.request("GET", path, headers={"Accept": accept})
            response = conn.getresponse()
            response.read()
            times.append((time.perf_counter() - start) * 1000)
            if response.status != 200:
                raise bench.BenchError(f"{path}: HTTP {response.status}")
        finally:
            conn.close()
    return times[0], times[1]


# --------------------------------------------------------------------------- figures


@dataclass
class FirstImage:
    """One click-to-first-image run."""

    label: str
    server_cache: str  # cold / warm
    ok: bool = False
    error: str | None = None
    draw_ms: float | None = None  # click → the first exact frame drawn
    paint_ms: float | None = None  # click → the animation frame after it
    wall_ms: float | None = None  # Python: click() called → wait returned
    series_end_ms: float | None = None  # QIDO series answered
    instances_start_ms: float | None = None
    instances_end_ms: float | None = None  # QIDO instances (the whole stack) answered
    frame_start_ms: float | None = None  # the first slice's rendered request
    frame_ttfb_ms: float | None = None  # its request sent → first byte (server time)
    frame_end_ms: float | None = None
    frame_bytes: int | None = None
    settled_ms: float | None = None  # click → no frame request in flight (prefetch done)
    alone_instances_ms: float | None = None  # the same QIDO-RS from Python, server idle
    alone_frame_ms: float | None = None  # a never-asked slice's /rendered, server idle
    requests_before_draw: dict[str, int] = field(default_factory=dict)
    requests_to_settle: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def first_image_figures(run: FirstImage, state: dict[str, Any], wall: float) -> None:
    click = state["clickAt"]
    if click is None or state["firstDraw"] is None:
        run.error = "the click or the draw was not seen in the page"
        return
    run.draw_ms = state["firstDraw"] - click
    run.paint_ms = state["firstPaint"] - click if state["firstPaint"] is not None else None
    run.wall_ms = wall * 1000
    first_sop = state["sops"][0] if state["sops"] else ""
    for entry in state["resources"]:
        if entry["start"] < click:
            continue
        kind = url_kind(entry["url"])
        if entry["start"] <= state["firstDraw"]:
            run.requests_before_draw[kind] = run.requests_before_draw.get(kind, 0) + 1
        if kind == "qido-series" and run.series_end_ms is None:
            run.series_end_ms = entry["end"] - click
        elif kind == "qido-instances" and run.instances_end_ms is None:
            run.instances_start_ms = entry["start"] - click
            run.instances_end_ms = entry["end"] - click
        elif (
            kind == "frame" and frame_sop(entry["url"]) == first_sop and run.frame_start_ms is None
        ):
            run.frame_start_ms = entry["start"] - click
            run.frame_ttfb_ms = entry["responseStart"] - entry["requestStart"]
            run.frame_end_ms = entry["end"] - click
            run.frame_bytes = entry["bytes"]
    run.ok = True


@dataclass
class Scroll:
    """One scrolling run through the series."""

    mode: str  # wheel / key
    label: str
    steps: int  # input events asked for (slices from the first to the last)
    interval_ms: float
    ok: bool = False
    error: str | None = None
    sent: int = 0
    send_s: float | None = None
    max_late_ms: float | None = None  # worst delay of an event behind its schedule
    received: int = 0
    delta_sum: float | None = None  # deltaY of the events that reached the page, summed
    merged_events: int = 0  # events with |deltaY| > 100: several notches merged into one
    input_s: float | None = None  # in the page: first to last input event
    draws_during_input: int = 0
    draws_total: int = 0
    repeated_draws: int = 0  # draw() called again for the frame already on screen
    distinct_slices: int = 0
    slices: int = 0
    index_at_input_end: int | None = None
    final_index: int | None = None
    settle_ms: float | None = None  # last input → the current slice's frame drawn
    gap_p50_ms: float | None = None
    gap_p95_ms: float | None = None
    gap_max_ms: float | None = None
    stall_ms: float | None = None  # longest time during the input with no new frame drawn
    lag_p50_ms: float | None = None  # a slice became current → its frame drawn
    lag_p95_ms: float | None = None
    frames_started: int = 0  # /rendered requests the page sent (Playwright)
    frames_finished: int = 0  # answered in full
    frames_aborted: int = 0  # failed with net::ERR_ABORTED: the viewer cancelled them
    frames_failed_other: int = 0
    frame_p50_ms: float | None = None  # start → last byte, queueing included
    frame_p95_ms: float | None = None
    ttfb_p50_ms: float | None = None  # request sent → first byte: the server's time
    ttfb_p95_ms: float | None = None
    queue_p50_ms: float | None = None  # fetch() → request sent (connection wait)
    new_connections: int = 0
    server_cpu_s: float | None = None
    machine_busy_cores: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float | None:
        if not self.ok or not self.input_s:
            return None
        return self.draws_during_input / self.input_s

    @property
    def input_rate(self) -> float | None:
        if not self.input_s or self.received < 2:
            return None
        return (self.received - 1) / self.input_s

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["images_per_s"] = self.images_per_s
        data["input_rate"] = self.input_rate
        return data


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def scroll_figures(run: Scroll, state: dict[str, Any], mark: float) -> None:
    inputs = [(t, i) for t, i, _ in state["inputs"] if t >= mark]
    run.delta_sum = sum(d for t, _, d in state["inputs"] if t >= mark)
    run.merged_events = sum(1 for t, _, d in state["inputs"] if t >= mark and abs(d) > 100)
    every = [(t, i, k) for t, i, k in state["draws"] if t >= mark]
    # The same frame drawn twice in a row (the view's draw called again for the key on
    # screen) is one image shown: count it once, and count the repeats apart.
    draws = [(t, i) for n, (t, i, k) in enumerate(every) if n == 0 or every[n - 1][2] != k]
    run.repeated_draws = len(every) - len(draws)
    run.received = len(inputs)
    run.slices = len(state["sops"])
    run.final_index = state["index"]
    run.draws_total = len(draws)
    run.distinct_slices = len({i for _, i in draws})
    if len(inputs) < 2:
        run.error = f"only {len(inputs)} input event(s) reached the page"
        return
    first, last = inputs[0][0], inputs[-1][0]
    run.input_s = (last - first) / 1000
    run.index_at_input_end = inputs[-1][1]
    during = [t for t, _ in draws if first <= t <= last]
    run.draws_during_input = len(during)
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    run.gap_p50_ms = bench.percentile(gaps, 0.5)
    run.gap_p95_ms = bench.percentile(gaps, 0.95)
    run.gap_max_ms = max(gaps) if gaps else None
    edges = [first, *during, last]
    run.stall_ms = max(b - a for a, b in zip(edges, edges[1:], strict=False))
    became: dict[int, float] = {}
    for t, index in inputs:
        became.setdefault(index, t)
    lags = [t - became[i] for t, i in draws if i in became and t >= became[i]]
    run.lag_p50_ms = bench.percentile(lags, 0.5)
    run.lag_p95_ms = bench.percentile(lags, 0.95)
    final_draws = [t for t, i in draws if i == state["index"]]
    if final_draws:
        run.settle_ms = max(final_draws[-1] - last, 0.0)
    # Timings of the answers received in full (an aborted fetch may leave an entry too).
    frames = [
        e
        for e in state["resources"]
        if url_kind(e["url"]) == "frame" and e["status"] == 200 and e["end"] > 0
    ]
    run.frame_p50_ms = bench.percentile([e["end"] - e["start"] for e in frames], 0.5)
    run.frame_p95_ms = bench.percentile([e["end"] - e["start"] for e in frames], 0.95)
    ttfb = [e["responseStart"] - e["requestStart"] for e in frames if e["requestStart"] > 0]
    run.ttfb_p50_ms = bench.percentile(ttfb, 0.5)
    run.ttfb_p95_ms = bench.percentile(ttfb, 0.95)
    queue = [e["requestStart"] - e["start"] for e in frames if e["requestStart"] > 0]
    run.queue_p50_ms = bench.percentile(queue, 0.5)
    run.ok = True


# --------------------------------------------------------------------------- runs


async def new_context(browser: Any) -> Any:
    # bypass_csp: the page's CSP (script-src 'self') forbids the string evaluation that
    # page.evaluate and wait_for_function use.
    context = await browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    await context.add_init_script(INIT_SCRIPT)
    return context


async def first_image_run(
    browser: Any, server: bench.Minipacs, study: Study, label: str, cache: str, opts: Any
) -> FirstImage:
    run = FirstImage(label, cache)
    context = await new_context(browser)
    try:
        page, watch, state, wall = await open_study(
            context, server.http_port or 0, study, opts.draw_timeout
        )
        first_image_figures(run, state, wall)
        run.settled_ms = await settle(page, opts.draw_timeout)
        run.alone_instances_ms, run.alone_frame_ms = alone(server.http_port or 0, study)
        after = await page.evaluate(READ_STATE, state["clickAt"])
        for entry in after["resources"]:
            kind = url_kind(entry["url"])
            run.requests_to_settle[kind] = run.requests_to_settle.get(kind, 0) + 1
        run.problems += watch.console + watch.http_errors
        run.problems += [f"{k} failed: {f}" for k, f in watch.failed if f != "net::ERR_ABORTED"]
        log.info(
            "%s (server cache %s): first image drawn %s ms after the click (painted %s)",
            label,
            cache,
            bench.fmt(run.draw_ms),
            bench.fmt(run.paint_ms),
        )
    except bench.BenchError as exc:
        run.error = str(exc)
        log.error("%s: %s", label, exc)
    finally:
        await context.close()
    return run


async def send_paced(page: Any, mode: str, steps: int, interval: float) -> tuple[float, float]:
    """Send `steps` input events on a fixed schedule, without waiting for Chromium to
    acknowledge each one (a wheel or a key repeat does not wait for the page either);
    then wait for all acknowledgements. (seconds sending, worst lateness in seconds)."""
    loop = asyncio.get_running_loop()
    pending = []
    late = 0.0
    start = loop.time()
    for step in range(steps):
        due = start + step * interval
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
        late = max(late, loop.time() - due)
        if mode == "wheel":
            pending.append(asyncio.ensure_future(page.mouse.wheel(0, 100)))
        else:  # down again while down: a repeat keydown, as a held key sends
            pending.append(asyncio.ensure_future(page.keyboard.down("ArrowDown")))
    sent = loop.time() - start
    await asyncio.gather(*pending)
    if mode == "key":
        await page.keyboard.up("ArrowDown")
    return sent, late


async def scroll_run(
    browser: Any, server: bench.Minipacs, study: Study, mode: str, opts: Any
) -> Scroll:
    label = "wheel (deltaY 100)" if mode == "wheel" else "ArrowDown held"
    steps = len(study.sops) - 1
    run = Scroll(mode, label, steps, opts.interval_ms)
    context = await new_context(browser)
    try:
        page, watch, _, _ = await open_study(
            context, server.http_port or 0, study, opts.draw_timeout
        )
        if await settle(page, opts.draw_timeout) is None:
            run.problems.append("the prefetch after opening did not finish")
        await page.wait_for_timeout(300)
        stage = page.locator(".stage")
        box = await stage.bounding_box()
        if box is None:
            raise bench.BenchError("no .stage on the page")
        if mode == "wheel":
            await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        else:
            await stage.focus()
        mark = float(await page.evaluate("() => performance.now()"))
        console_before = len(watch.console)
        failed_before = len(watch.failed)
        new_before = sum(watch.new_connections.values())
        started_before = watch.started["frame"]
        finished_before = watch.finished["frame"]
        cpu_before = bench.cpu_seconds(server.proc.pid) if server.alive() else None
        busy_before = cpu_jiffies()
        run.send_s, late = await send_paced(page, mode, steps, opts.interval_ms / 1000)
        run.sent = steps
        run.max_late_ms = late * 1000
        try:
            await page.wait_for_function(
                CURRENT_SHOWN, polling="raf", timeout=opts.draw_timeout * 1000
            )
        except Exception:
            run.problems.append(
                f"the current slice was not drawn within {opts.draw_timeout:.0f} s of the input"
            )
        await settle(page, opts.draw_timeout)
        busy_after = cpu_jiffies()
        cpu_after = bench.cpu_seconds(server.proc.pid) if server.alive() else None
        state = await page.evaluate(READ_STATE, mark)
        scroll_figures(run, state, mark)
        if cpu_before is not None and cpu_after is not None:
            run.server_cpu_s = cpu_after - cpu_before
        total = busy_after[1] - busy_before[1]
        if total > 0:
            run.machine_busy_cores = (
                (busy_after[0] - busy_before[0]) / total * (os.cpu_count() or 1)
            )
        failed = [(k, f) for k, f in watch.failed[failed_before:] if k == "frame"]
        run.frames_aborted = sum(1 for _, f in failed if f == "net::ERR_ABORTED")
        run.frames_failed_other = len(failed) - run.frames_aborted
        run.new_connections = sum(watch.new_connections.values()) - new_before
        run.frames_started = watch.started["frame"] - started_before
        run.frames_finished = watch.finished["frame"] - finished_before
        run.problems += watch.console[console_before:] + watch.http_errors
        run.problems += [f"{k} failed: {f}" for k, f in watch.failed if f != "net::ERR_ABORTED"]
        if run.final_index != steps:
            run.problems.append(
                f"{run.sent} events sent ({steps} slices), {run.received} reached the page "
                f"(deltaY sum {bench.fmt(run.delta_sum, '.0f')}); the view stopped at slice "
                f"{bench.fmt(run.final_index, 'd')} of 0..{steps}"
            )
        log.info(
            "%s: %s images/s drawn while asking %.0f/s; %d distinct of %d slices",
            label,
            bench.fmt(run.images_per_s),
            1000 / opts.interval_ms,
            run.distinct_slices,
            len(study.sops),
        )
    except bench.BenchError as exc:
        run.error = str(exc)
        log.error("%s: %s", label, exc)
    finally:
        await context.close()
    return run


# --------------------------------------------------------------------------- report


def ms(value: float | None, width: int = 8) -> str:
    return f"{bench.fmt(value):>{width}}"


def cpu_per_frame_ms(run: Scroll) -> float | None:
    if run.server_cpu_s is None or not run.frames_finished:
        return None
    return run.server_cpu_s * 1000 / run.frames_finished


def requests_text(counts: dict[str, int]) -> str:
    order = ["qido-series", "qido-instances", "frame", "thumbnail", "metadata", "static"]
    keys = [k for k in order if k in counts] + sorted(k for k in counts if k not in order)
    short = {"qido-series": "series", "qido-instances": "instances"}
    return " ".join(f"{short.get(k, k)} {counts[k]}" for k in keys)


def report(
    firsts: list[FirstImage], scrolls: list[Scroll], meta: dict[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    lines = [
        f"Browser viewer, {meta['date']}: {meta['count']}-slice {meta['size']}×{meta['size']} "
        f"CT (make_study), minipacs {meta['commit']}, {bench.HOST}, {meta['cpus']} CPUs",
        f"Chromium {meta['chromium']} headless via Playwright {meta['playwright']}, "
        f"viewport {VIEWPORT['width']}×{VIEWPORT['height']}, a new browser context per run",
        "",
        "First image: click on the study row → first exact frame drawn (performance.now in the "
        "page), ms from the click",
        "  server cache cold = a freshly started server (warmed up on another study); "
        "warm = the same server again",
        "  series = QIDO-RS series answered; instances = the QIDO-RS of the stack, start–end; "
        "frame = the first slice's /rendered, start–end;",
        "  ttfb = its request sent → first byte (the server's time);",
        "  decode = drawn − frame end; settled = no /rendered in flight any more (prefetch done); "
        "frames = /rendered started before the draw;",
        "  alone = after it settled, the same instances QIDO-RS and a never-asked slice's "
        "/rendered from Python, one at a time",
        "  (what the server takes for them without the page's other requests beside them)",
        "",
        f"  {'run':<6}{'cache':<6}{'drawn':>7}{'painted':>9}{'series':>8}{'instances':>13}"
        f"{'frame':>15}{'ttfb':>7}{'decode':>8}{'settled':>9}{'frames':>7}"
        f"{'alone: instances':>18}{'frame':>7}",
    ]
    for run in firsts:
        if not run.ok:
            lines.append(f"  {run.label:<6}{run.server_cache:<6}FAILED: {run.error}")
            continue
        frame = f"{bench.fmt(run.frame_start_ms)}–{bench.fmt(run.frame_end_ms)}"
        instances = f"{bench.fmt(run.instances_start_ms)}–{bench.fmt(run.instances_end_ms)}"
        decode = (
            run.draw_ms - run.frame_end_ms
            if run.draw_ms is not None and run.frame_end_ms is not None
            else None
        )
        lines.append(
            f"  {run.label:<6}{run.server_cache:<6}{ms(run.draw_ms, 7)}{ms(run.paint_ms, 9)}"
            f"{ms(run.series_end_ms)}{instances:>13}{frame:>15}"
            f"{ms(run.frame_ttfb_ms, 7)}{ms(decode)}{ms(run.settled_ms, 9)}"
            f"{run.requests_before_draw.get('frame', 0):>7}"
            f"{ms(run.alone_instances_ms, 18)}{ms(run.alone_frame_ms, 7)}"
        )
    cold = [r.draw_ms for r in firsts if r.ok and r.server_cache == "cold" and r.draw_ms]
    warm = [r.draw_ms for r in firsts if r.ok and r.server_cache == "warm" and r.draw_ms]
    cold_median = statistics.median(cold) if cold else None
    lines.append(
        f"  median, server cache cold ({len(cold)} runs): {bench.fmt(cold_median)} ms "
        f"(each: {', '.join(bench.fmt(v) for v in cold)}); "
        f"warm: {', '.join(bench.fmt(v) for v in warm)}"
    )
    settled = [r for r in firsts if r.ok and r.requests_to_settle]
    if settled:
        lines.append(
            f"  requests started by run {settled[0].label}: before the draw "
            f"{requests_text(settled[0].requests_before_draw)}; until it settled "
            f"{requests_text(settled[0].requests_to_settle)}"
        )
    lines += [
        "",
        f"Scrolling through the series: one input event every {meta['interval_ms']:g} ms "
        f"(asking {1000 / meta['interval_ms']:.0f}/s), server cache cold (a fresh server), "
        "after the first image and its prefetch",
        "  images/s = exact frames drawn between the first and the last input event ÷ that time; "
        "/rendered timings: the answered ones (Resource Timing)",
    ]
    rows: list[tuple[str, Any]] = [
        ("input events sent / reached the page", lambda s: f"{s.sent} / {s.received}"),
        (
            "merged wheel events (deltaY sum)",
            lambda s: f"{s.merged_events} ({bench.fmt(s.delta_sum, '.0f')})",
        ),
        (
            "input rate in the page (/s), worst lateness ms",
            lambda s: f"{bench.fmt(s.input_rate)}, {bench.fmt(s.max_late_ms)}",
        ),
        ("input time s", lambda s: bench.fmt(s.input_s, ".2f")),
        (
            "frames drawn during input / in all (+ repeats)",
            lambda s: f"{s.draws_during_input} / {s.draws_total} (+{s.repeated_draws})",
        ),
        ("images/s", lambda s: bench.fmt(s.images_per_s)),
        ("distinct slices drawn", lambda s: f"{s.distinct_slices} of {s.slices}"),
        (
            "slice at the last input / at the end",
            lambda s: f"{bench.fmt(s.index_at_input_end, 'd')} / {bench.fmt(s.final_index, 'd')}",
        ),
        ("last input → its frame drawn, ms", lambda s: bench.fmt(s.settle_ms)),
        (
            "gap between draws p50 / p95 / max ms",
            lambda s: (
                f"{bench.fmt(s.gap_p50_ms)} / {bench.fmt(s.gap_p95_ms)} / {bench.fmt(s.gap_max_ms)}"
            ),
        ),
        ("longest time without a new frame, ms", lambda s: bench.fmt(s.stall_ms)),
        (
            "slice current → drawn p50 / p95 ms",
            lambda s: f"{bench.fmt(s.lag_p50_ms)} / {bench.fmt(s.lag_p95_ms)}",
        ),
        (
            "/rendered sent / answered / aborted / failed",
            lambda s: (
                f"{s.frames_started} / {s.frames_finished} / {s.frames_aborted}"
                f" / {s.frames_failed_other}"
            ),
        ),
        (
            "/rendered start→end p50 / p95 ms",
            lambda s: f"{bench.fmt(s.frame_p50_ms)} / {bench.fmt(s.frame_p95_ms)}",
        ),
        (
            "/rendered server ttfb p50 / p95 ms",
            lambda s: f"{bench.fmt(s.ttfb_p50_ms)} / {bench.fmt(s.ttfb_p95_ms)}",
        ),
        ("/rendered queued before sending p50 ms", lambda s: bench.fmt(s.queue_p50_ms)),
        ("new TCP connections", lambda s: str(s.new_connections)),
        (
            "server CPU s (ms per answered /rendered)",
            lambda s: f"{bench.fmt(s.server_cpu_s, '.2f')} ({bench.fmt(cpu_per_frame_ms(s))})",
        ),
        ("machine busy (cores of the 2)", lambda s: bench.fmt(s.machine_busy_cores, ".2f")),
    ]
    width = max(len(name) for name, _ in rows) + 2
    lines.append(f"  {'':<{width}}" + "".join(f"{s.label:>22}" for s in scrolls))
    for name, value in rows:
        cells = "".join(
            f"{(value(s) if s.ok else ('FAILED' if name == 'images/s' else '')):>22}"
            for s in scrolls
        )
        lines.append(f"  {name:<{width}}{cells}")
    for s in scrolls:
        if not s.ok:
            lines.append(f"  {s.label}: FAILED: {s.error}")

    targets: list[dict[str, Any]] = [
        {
            "name": f"first image, server cache cold, median ≤ {TARGET_FIRST_MS:g} ms",
            "value": cold_median,
            "verdict": bench.verdict(cold_median, TARGET_FIRST_MS, higher=False),
        }
    ]
    for s in scrolls:
        targets.append(
            {
                "name": f"scrolling, {s.label}, ≥ {TARGET_IMAGES_PER_S:g} images/s",
                "value": s.images_per_s,
                "verdict": bench.verdict(s.images_per_s, TARGET_IMAGES_PER_S),
            }
        )
    lines += ["", "targets:"]
    for target in targets:
        lines.append(f"  {target['name']:<52}{bench.fmt(target['value']):>8}  {target['verdict']}")
    return "\n".join(lines), targets


# --------------------------------------------------------------------------- misc


async def measure(
    opts: argparse.Namespace, study: Study, warmup: Study, servers: Servers, meta: dict[str, Any]
) -> tuple[list[FirstImage], list[Scroll]]:
    """Every browser run, in order; the servers are started (and stopped) as needed."""
    from playwright.async_api import async_playwright

    firsts: list[FirstImage] = []
    scrolls: list[Scroll] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(opts.chromium), args=["--no-sandbox"]
        )
        meta["chromium"] = browser.version
        try:
            server = servers.fresh()
            # One untimed session first: the browser's own first-use costs (renderer
            # start, module compilation) are not the viewer's.
            await first_image_run(browser, server, warmup, "browser warm-up", "-", opts)
            for number in range(1, opts.repeat + 1):
                if number > 1:
                    server = servers.fresh()
                firsts.append(
                    await first_image_run(browser, server, study, f"{number}", "cold", opts)
                )
            for number in range(1, opts.warm + 1):
                firsts.append(
                    await first_image_run(browser, server, study, f"w{number}", "warm", opts)
                )
            for mode in opts.modes:
                server = servers.fresh()
                scrolls.append(await scroll_run(browser, server, study, mode, opts))
        finally:
            servers.stop()
            await browser.close()
    return firsts, scrolls


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="60 slices, 3 cold runs")
    parser.add_argument(
        "--count", type=int, help="slices in the series (default 500, with --quick 60)%(default).0s"
    )
    parser.add_argument("--size", type=int, default=512, help="rows and columns")
    parser.add_argument(
        "--repeat",
        type=int,
        help="first-image runs, server cache cold (default 5, --quick 3)%(default).0s",
    )
    parser.add_argument("--warm", type=int, default=1, help="first-image runs, cache warm")
    parser.add_argument(
        "--interval-ms", type=float, default=25.0, help="between scroll input events"
    )
    parser.add_argument(
        "--modes", default="wheel,key", help="scrolling runs: any of wheel,key (none: '')"
    )
    parser.add_argument("--chromium", type=Path, default=CHROMIUM, help="the browser binary")
    parser.add_argument(
        "--minipacs-args", default="", help="extra `minipacs serve` arguments (use the = form)"
    )
    parser.add_argument("--draw-timeout", type=float, default=30.0, help="seconds per wait")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="first wait up to this many seconds while other benchmarks or tests run",
    )
    bench.add_common_args(parser, startup=60.0, orthanc=False)
    opts = parser.parse_args(argv)
    opts.count = opts.count or (60 if opts.quick else 500)
    opts.repeat = opts.repeat or (3 if opts.quick else 5)
    opts.modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    if set(opts.modes) - {"wheel", "key"}:
        parser.error("--modes: wheel and/or key")
    if opts.count < 2 or opts.size < 8 or opts.repeat < 1 or opts.warm < 0:
        parser.error("--count ≥ 2, --size ≥ 8, --repeat ≥ 1, --warm ≥ 0")
    if opts.interval_ms <= 0:
        parser.error("--interval-ms must be > 0")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    bench.setup_logging(opts.verbose)
    if not opts.minipacs.exists():
        log.error("%s not found: create the venv (./scripts/serve does)", opts.minipacs)
        return 2
    if not opts.chromium.exists():
        log.error(
            "%s not found: Debian package chromium (./scripts/test installs it)", opts.chromium
        )
        return 2
    if not bench.require(("echoscu",), hint="dcmtk"):
        return 2
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        log.error("playwright is not installed in this Python (./scripts/test installs it)")
        return 2

    root: Path | None = None
    servers: Servers | None = None
    try:
        with bench.sigterm_unwinds():
            busy = (
                bench.wait_for_quiet(opts.wait_idle) if opts.wait_idle > 0 else bench.other_work()
            )
            if busy:
                log.warning("other benchmarks/tests are running: %s", "; ".join(busy))
            meta: dict[str, Any] = {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "count": opts.count,
                "size": opts.size,
                "interval_ms": opts.interval_ms,
                "cpus": os.cpu_count(),
                "commit": bench.git_commit(),
                "playwright": importlib.metadata.version("playwright"),
                "loadavg_start": os.getloadavg(),
                "other_work_start": busy,
            }
            root = Path(tempfile.mkdtemp(prefix="minipacs-viewer-", dir=opts.tmp))
            study, warmup = make_data(root, opts.count, opts.size)
            data = root / "data"
            bench.minipacs_import(
                opts, data, [root / "images"], root / "import.log", 1, 600 + opts.count
            )
            servers = Servers(root, data, opts, warmup)
            firsts, scrolls = asyncio.run(measure(opts, study, warmup, servers, meta))
            meta["loadavg_end"] = os.getloadavg()
            meta["other_work_end"] = bench.other_work()
            table, targets = report(firsts, scrolls, meta)
            lines = [table, "", "problems:"]
            problems = [(r.label, p) for r in firsts for p in r.problems]
            problems += [(s.label, p) for s in scrolls for p in s.problems]
            for label, problem in problems[:20]:
                lines.append(f"  {label}: {problem[:200]}")
            if len(problems) > 20:
                lines.append(f"  … and {len(problems) - 20} more")
            if not problems:
                lines.append("  none in the pages (console errors, failed requests, HTTP errors)")
            lines.append(
                f"  minipacs logs ({servers.started} server runs): "
                f"{servers.issue_count} warning/error line(s)"
            )
            lines += [f"    {line[:160]}" for line in servers.issues[:4]]
            others = meta["other_work_start"] + meta["other_work_end"]
            if others:
                lines.append("  other benchmarks/tests were running: " + "; ".join(others[:4]))
            lines.append(
                f"load average {meta['loadavg_start'][0]:.2f} at the start, "
                f"{meta['loadavg_end'][0]:.2f} at the end"
            )
            print("\n".join(lines))
            sys.stdout.flush()
            if opts.json:
                payload = {
                    "meta": meta,
                    "first_image": [asdict(r) for r in firsts],
                    "scrolling": [s.as_dict() for s in scrolls],
                    "targets": targets,
                }
                bench.write_json(payload, opts.json)
            if any(not r.ok for r in firsts) or any(not s.ok for s in scrolls):
                return 1
            if opts.strict and any(t["verdict"] == "FAIL" for t in targets):
                return 3
            return 0
    except bench.BenchError as exc:
        log.error("%s", exc)
        return 1
    except (KeyboardInterrupt, bench.Interrupted):
        log.error("interrupted: cleaning up")
        return 130
    finally:
        if servers is not None:
            servers.stop()
        bench.PROCS.stop_all()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
