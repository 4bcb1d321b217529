#!/usr/bin/env python3
"""C-STORE ingest: minipacs beside Orthanc and dcmtk storescp, load by load (issue 16).

    .venv/bin/python scripts/bench/ingest.py [--loads x1,x4,x0,small,mixed,lag] [--json F]

What it measures, how, and its targets: scripts/bench/README.md, section ingest.py.
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import shlex
import sqlite3
import statistics
import threading
import time
import urllib.parse
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import harness as bench

log = bench.log
LOADS = ("x1", "x4", "x0", "small", "mixed", "lag")
RUNS = {  # the loads each server runs; lag rides on the x1 run of minipacs and Orthanc
    "minipacs": ("x1", "x4", "x0", "small", "mixed"),
    "minipacs-nofsync": ("x1", "x4"),
    "orthanc": ("x1", "x4", "x0", "small", "mixed"),
    "storescp": ("x1", "x4", "x0", "small"),
}
ASSOCIATIONS = {"x1": 1, "x4": 4, "small": 4, "mixed": 8}
WEB_THREADS = 8
# Targets of the ingest issue: minipacs' rate ÷ Orthanc's, and the others.
VS_ORTHANC = {"x1": 1.0, "x4": 1.5, "x0": 1.0, "small": 1.0}
VS_STORESCP = 0.5  # minipacs --no-fsync ÷ storescp, x1 and x4
REPEATED = ("x1", "x4", "x0")  # measured --repeats times a server, the servers in turn
MIXED_RATIO = 0.70  # the rate under web load ÷ alone
LAG_P99_MS = 1000.0
RSS_MIB = 200.0
OPTIONS: bench.Options = {
    "--loads": (list(LOADS), ",".join(LOADS)),
    "--servers": (list(RUNS), ",".join(RUNS)),
    "--count": (500, "instances of the CT study (x1, x4, lag)"),
    "--x0-count": (100, "storescu runs of x0, one instance each"),
    "--repeats": (3, "runs of x1, x4 and x0 a server (medians)"),
    "--small-studies": (2000, "studies of the small load"),
    "--mixed-per-assoc": (30, "CT instances each mixed storescu sends"),
    "--mixed-repeats": (3, "sends alone and under web load, each"),
    "--mixed-preload": (50, "instances of the study the web reads"),
    "--web-seconds": (4.0, "web latency measured without ingest"),
    "--minipacs-args": ("", "more `minipacs serve` arguments (--minipacs-args=...)"),
}


@dataclass
class Data:
    ct: bench.StudyFiles | None = None
    small: list[Path] = field(default_factory=list)
    preload: bench.StudyFiles | None = None  # what the web clients of the mixed load read
    mixed: tuple[list[Path], ...] = ()  # sent alone, under the web load, alone, …


def make_data(root: Path, opts: argparse.Namespace) -> Data:
    """Fresh UIDs: a 512² CT study, small studies of one patient each, the mixed load's."""
    data = Data()
    if {"x1", "x4", "x0", "lag"} & set(opts.loads):
        log.info("writing the %d-instance CT study", opts.count)
        data.ct = bench.read_study(bench.make_study(root / "ct", opts.count))
    if "small" in opts.loads:
        log.info("writing %d small studies", opts.small_studies)
        from make_study import make_studies

        data.small = make_studies(root / "small", opts.small_studies, 64)
    if "mixed" in opts.loads:
        preload = bench.make_study(root / "preload", opts.mixed_preload, patient_id="PRELOAD")
        data.preload = bench.read_study(preload)
        sets: list[list[Path]] = [[] for _ in range(2 * opts.mixed_repeats)]
        for number in range(len(sets) * ASSOCIATIONS["mixed"]):  # a study for each storescu
            folder = root / f"mixed-{number}"
            sets[number % len(sets)].extend(bench.make_study(folder, opts.mixed_per_assoc))
        data.mixed = tuple(sets)
    return data


@dataclass
class Run:
    """One load on one server: what was sent and what it measured."""

    server: str
    load: str
    files: list[Path]
    send_s: float | None = None
    queryable_s: float | None = None
    failed: int | None = None
    peak_rss_mib: float | None = None
    log_issues: int = 0
    error: str | None = None
    lag: dict[str, Any] = field(default_factory=dict)
    mixed: dict[str, Any] = field(default_factory=dict)
    repeat: int = 0  # which of the --repeats measurements of this load on this server
    each: list[float | None] = field(default_factory=list)  # combined: each one's rate

    @property
    def rate(self) -> float | None:
        return len(self.files) / self.send_s if self.send_s and not self.error else None

    @property
    def mb_per_s(self) -> float | None:
        size = sum(path.stat().st_size for path in self.files) / 1e6
        return size / self.send_s if self.rate else None


# --------------------------------------------------------------------------- lag


def orthanc_id(*uids: str) -> str:
    """Orthanc's id of a resource: the SHA-1 of its UIDs joined by '|', dashed."""
    digest = hashlib.sha1("|".join(uids).encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


class Lag:
    """From C-STORE Success to queryable: storescu's -v output, read as it comes, gives
    the time of each file's Success; meanwhile a thread polls the server every 10 ms for
    new instances (minipacs: new rows of its index; Orthanc: /changes) and keeps when
    each SOP Instance UID first appeared."""

    def __init__(self, server: bench.Server, study: bench.StudyFiles) -> None:
        self.server = server
        self.expected = len(study.files)
        self.sop_of = dict(zip(map(str, study.files), study.sops, strict=True))
        uids = (study.patient_id, study.study, study.series)
        self.orthanc_sops = {orthanc_id(*uids, sop): sop for sop in study.sops}
        self.success_at: dict[str, float] = {}
        self.seen_at: dict[str, float] = {}
        self.sending: str | None = None
        self.last = 0  # the last index row or Orthanc change seen
        self.index: sqlite3.Connection | None = None
        self.thread = threading.Thread(target=self._poll_loop, daemon=True)
        self.thread.start()

    def on_line(self, line: str, when: float) -> None:
        if line.startswith("I: Sending file: "):
            self.sending = line.removeprefix("I: Sending file: ")
        elif bench.STORE_SUCCESS.match(line) and self.sending in self.sop_of:
            self.success_at[self.sop_of[self.sending]] = when

    def _poll_loop(self) -> None:
        deadline = time.perf_counter() + 60 + self.expected / 10
        while len(self.seen_at) < self.expected and time.perf_counter() < deadline:
            try:
                new = self._poll()
            except (OSError, sqlite3.Error):
                new = []
            now = time.perf_counter()
            for sop in new:
                self.seen_at.setdefault(sop, now)
            time.sleep(0.01)
        if self.index is not None:
            self.index.close()

    def _poll(self) -> list[str]:
        if isinstance(self.server, bench.Minipacs):
            if self.index is None:
                uri = f"file:{self.server.data / 'index.sqlite'}?mode=ro"
                self.index = sqlite3.connect(uri, uri=True, timeout=1.0)
            query = "SELECT id, sop_uid FROM instance WHERE id > ? ORDER BY id"
            rows = self.index.execute(query, (self.last,)).fetchall()
            self.last = rows[-1][0] if rows else self.last
            return [sop for _, sop in rows]
        found = []
        done = False
        while not done:
            url = self.server.url(f"/changes?since={self.last}&limit=1000")
            answer = json.loads(bench.http_get(url)[1])
            changes = [c for c in answer["Changes"] if c["ChangeType"] == "NewInstance"]
            found += [self.orthanc_sops.get(change["ID"], "?") for change in changes]
            self.last, done = answer["Last"], answer["Done"]
        return found

    def figures(self) -> dict[str, Any]:
        """Lag in ms: p50, p99 (infinite when an instance was never seen), max."""
        self.thread.join()
        lags = [
            1000 * (self.seen_at[s] - t) for s, t in self.success_at.items() if s in self.seen_at
        ]
        never = len(self.success_at) - len(lags)
        p99 = float("inf") if never else bench.percentile(lags, 0.99)
        return {
            "p50": bench.percentile(lags, 0.5),
            "p99": p99,
            "max": max(lags, default=None),
            "never seen": never,
        }


# --------------------------------------------------------------------------- web load


class WebLoad:
    """WEB_THREADS clients, one keep-alive connection each, looping with no pause over
    four kinds of request on the preloaded study; every request is recorded."""

    def __init__(self, server: bench.Server, study: bench.StudyFiles) -> None:
        self.port = server.http_port
        self.sops = study.sops
        series = f"/dicom-web/studies/{study.study}/series/{study.series}"
        uri = {"requestType": "WADO", "studyUID": study.study, "seriesUID": study.series}
        uri["contentType"] = "image/jpeg"
        # "/" unescaped: Orthanc's DICOMweb plugin (1.7) does not percent-decode it.
        wado_uri = "/wado?" + urllib.parse.urlencode(uri, safe="/") + "&objectUID="
        dicom = 'multipart/related; type="application/dicom"'
        self.kinds = {  # kind: (path before the SOP Instance UID or None, Accept)
            "qido": (f"/dicom-web/studies?PatientID={study.patient_id}", bench.DICOM_JSON),
            "metadata": (f"{series}/metadata", bench.DICOM_JSON),
            "wado-rs": (f"{series}/instances/", dicom),
            "wado-uri": (wado_uri, "image/jpeg"),
        }
        self.records: list[tuple[str, float, float, bool]] = []  # kind, start, seconds, ok
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def path(self, kind: str, rng: random.Random) -> str:
        path = self.kinds[kind][0]
        return path + rng.choice(self.sops) if kind in ("wado-rs", "wado-uri") else path

    def check(self) -> None:
        """Each kind once before the load: a failing one is worth a warning."""
        client = bench.Client(self.port)
        for kind, (_, accept) in self.kinds.items():
            answer = client.request("GET", self.path(kind, random.Random(0)), {"Accept": accept})
            if answer.status != 200 or kind == "wado-uri" and answer.body[:2] != b"\xff\xd8":
                log.warning("%s: HTTP %d %r", kind, answer.status, answer.body[:100])
        client.close()

    def _loop(self, number: int) -> None:
        client, rng, kinds = bench.Client(self.port), random.Random(number), list(self.kinds)
        turn = number  # the threads start at different kinds
        while not self.stopping.is_set():
            kind = kinds[turn % len(kinds)]
            turn += 1
            started = time.perf_counter()
            try:
                answer = client.request(
                    "GET", self.path(kind, rng), {"Accept": self.kinds[kind][1]}
                )
                ok = 200 <= answer.status < 300
            except (OSError, http.client.HTTPException):
                ok = False
                client.close()
            self.records.append((kind, started, time.perf_counter() - started, ok))
        client.close()

    def start(self) -> None:
        self.stopping.clear()
        self.threads = [threading.Thread(target=self._loop, args=(n,)) for n in range(WEB_THREADS)]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def latency_in(self, windows: list[tuple[float, float]]) -> dict[str, list[float | None]]:
        """Per kind, of the requests started in any of `windows`: p50 and p99 ms."""
        out = {}
        for kind in self.kinds:
            ms = [
                1000 * s
                for k, t, s, ok in self.records
                if k == kind and ok and any(start <= t < end for start, end in windows)
            ]
            out[kind] = [bench.percentile(ms, 0.5), bench.percentile(ms, 0.99)]
        return out


# --------------------------------------------------------------------------- runs


def run_mixed(run: Run, server: bench.Server, data: Data, opts: argparse.Namespace) -> None:
    """The preloaded study first; web latency alone for --web-seconds; then sets sent
    alone and under the web load, in turn, --mixed-repeats times each: a set is sent in
    about half a second, so one pair of sends decided the ratio by noise (0.50 to 0.94
    in runs of one code). The rates are the medians."""
    preload = data.preload.files
    if bench.send(server, preload, tag="preload").failed:
        raise bench.BenchError("the preloaded study was refused")
    bench.wait_queryable(server, len(preload))
    web = WebLoad(server, data.preload)
    web.check()
    web.start()
    alone_start = time.perf_counter()
    time.sleep(opts.web_seconds)
    web.stop()
    web_alone = web.latency_in([(alone_start, time.perf_counter())])
    alone: list[bench.Sent] = []
    loaded: list[bench.Sent] = []
    windows: list[tuple[float, float]] = []
    for number, files in enumerate(data.mixed):
        tag = f"mixed-{number}"
        # Each send starts with the index caught up on the one before it.
        bench.wait_queryable(server, len(preload) + sum(len(f) for f in data.mixed[:number]))
        if number % 2 == 0:
            alone.append(bench.send(server, files, ASSOCIATIONS["mixed"], tag))
            continue
        web.start()
        time.sleep(0.3)  # the clients under way first
        started = time.perf_counter()
        loaded.append(bench.send(server, files, ASSOCIATIONS["mixed"], tag))
        windows.append((started, started + loaded[-1].seconds))
        web.stop()
    bench.wait_queryable(server, len(preload) + sum(len(f) for f in data.mixed))
    rates_alone = [sent.files / sent.seconds for sent in alone]
    rates_loaded = [sent.files / sent.seconds for sent in loaded]
    run.send_s = sum(sent.seconds for sent in loaded)
    run.failed = sum(sent.failed for sent in alone + loaded)
    run.mixed = {
        "alone": statistics.median(rates_alone),
        "loaded": statistics.median(rates_loaded),
        "ratio": statistics.median(rates_loaded) / statistics.median(rates_alone),
        "alone_each": rates_alone,
        "loaded_each": rates_loaded,
        "http_errors": sum(not ok for *_, ok in web.records),
        "requests": len(web.records),
        "web_alone": web_alone,
        "web_loaded": web.latency_in(windows),
    }


def run_load(run: Run, server: bench.Server, data: Data, opts: argparse.Namespace) -> None:
    if run.load == "mixed":
        return run_mixed(run, server, data, opts)
    lag = None
    lagged = run.server in ("minipacs", "orthanc") and run.repeat == 0
    if run.load == "x1" and "lag" in opts.loads and lagged:
        lag = Lag(server, data.ct)
    started = time.perf_counter()
    if run.load == "x0":
        sent = [bench.send(server, [path], tag=f"x0-{n}") for n, path in enumerate(run.files)]
        run.send_s = time.perf_counter() - started
        run.failed = sum(s.failed for s in sent)
    else:
        on_line = lag.on_line if lag else None
        sent = bench.send(server, run.files, ASSOCIATIONS[run.load], run.load, on_line)
        run.send_s, run.failed = sent.seconds, sent.failed
    run.queryable_s = bench.wait_queryable(server, len(run.files)) - started
    if lag:
        run.lag = lag.figures()
        run.queryable_s = max(lag.seen_at.values(), default=started) - started


def new_server(name: str, load: str, workdir: Path, opts: argparse.Namespace) -> bench.Server:
    if name == "storescp":
        return bench.StoreScp(workdir)
    if name == "orthanc":
        return bench.Orthanc(workdir, [bench.DICOMWEB_PLUGIN] if load == "mixed" else [])
    args = shlex.split(opts.minipacs_args) + (["--no-fsync"] if name.endswith("nofsync") else [])
    return bench.Minipacs(workdir, args=args, name=name)


def measure(
    name: str, load: str, repeat: int, data: Data, root: Path, opts: argparse.Namespace
) -> Run:
    """One load on a fresh server. Its data stays until the whole run ends: on an ext4
    without a journal (this machine's disk), a file created within 60 s of many deletions
    in its block group scans past each freed inode (the kernel's recently_deleted()), and
    deleting a run's data here made the next server's C-STOREs pay for it: 18 % of
    minipacs's receiver CPU at x4, 400 instead of 600 inst/s (scripts/bench/README.md)."""
    if load in ("small", "mixed"):
        files = (
            data.small if load == "small" else [path for part in data.mixed[1::2] for path in part]
        )
    else:
        files = data.ct.files[: opts.x0_count] if load == "x0" else data.ct.files
    run = Run(name, load, files, repeat=repeat)
    workdir = root / f"{name}-{load}-{repeat}"
    server = new_server(name, load, workdir, opts)
    log.info("%s %s: %d instances", name, load, len(run.files))
    try:
        server.start()
        # What earlier runs left dirty goes to disk first: storescp and --no-fsync leave
        # ~250 MB unwritten, and the next run's fsyncs queued behind its writeback (x4
        # after storescp x1: 345 inst/s in a full run, ~600 alone).
        os.sync()
        with bench.RssSampler(server.proc.pid) as rss:
            run_load(run, server, data, opts)
        run.peak_rss_mib = rss.peak_mib
        if run.failed:
            run.error = f"{run.failed} stores failed"
    except (bench.BenchError, OSError, sqlite3.Error) as exc:
        run.error = str(exc).splitlines()[0]
        log.error("%s %s: %s", name, load, exc)
    finally:
        run.log_issues = server.stop()
    figures = bench.cell(run.rate), bench.cell(run.peak_rss_mib)
    log.info("%s %s: %s inst/s, peak RSS %s MiB", name, load, *figures)
    return run


# --------------------------------------------------------------------------- report


def report(runs: list[Run], opts: argparse.Namespace) -> int:
    out = bench.Report(f"C-STORE ingest beside {opts.meta.get('orthanc', 'no Orthanc')}", opts)
    by = {(run.server, run.load): run for run in runs}

    def rate(server: str, load: str) -> float | None:
        return by[server, load].rate if (server, load) in by else None

    def status(run: Run) -> str:
        issues = f" ({run.log_issues} log lines)" if run.log_issues else ""
        return (f"FAILED: {run.error[:60]}" if run.error else "ok") + issues

    rows = []
    for run in runs:
        if run.load != "mixed":
            vs = [bench.ratio(run.rate, rate(peer, run.load)) for peer in ("orthanc", "storescp")]
            figures = [run.rate, run.mb_per_s, run.send_s, run.queryable_s, run.peak_rss_mib]
            rows.append([run.load, run.server, *figures, *vs, status(run)])
    header = ["load", "server", "inst/s", "MB/s", "send s", "queryable s", "peak RSS MiB"]
    out.table("C-STORE rates", header + ["÷orthanc", "÷storescp", "status"], rows)
    out.note("x1/x4: 512² CT over 1/4 associations; x0: one association an instance; small:")
    out.note("64² studies of 1-4 instances over 4; storescp has no index: queryable = on disk")
    for run in runs:
        if len(run.each) > 1:
            each = " ".join(bench.cell(rate) for rate in run.each)
            out.note(f"{run.load} {run.server}: inst/s of each run {each} (the median above)")
    mixed = [run for run in runs if run.mixed]
    if mixed:
        rows, web = [], []
        for run in mixed:
            m = run.mixed
            figures = [m["alone"], m["loaded"], m["ratio"], run.failed, m["http_errors"]]
            rows.append([run.server, *figures, m["requests"], run.peak_rss_mib, status(run)])
            web += [
                [run.server, kind, *m["web_alone"][kind], *m["web_loaded"][kind]]
                for kind in m["web_alone"]
            ]
        header = ["server", "alone inst/s", "loaded inst/s", "ratio", "failed stores"]
        out.table(
            "mixed: C-STORE alone and under web load",
            header + ["HTTP errors", "requests", "peak RSS MiB", "status"],
            rows,
        )
        for run in mixed:
            alone, loaded = (
                " ".join(f"{r:.0f}" for r in run.mixed[k]) for k in ("alone_each", "loaded_each")
            )
            out.note(
                f"{run.server}: inst/s of each send alone {alone}, loaded {loaded} (medians above)"
            )
        header = ["server", "request", "alone p50", "p99", "under ingest p50", "p99"]
        out.table("mixed: web latency, ms", header, web)
    lagged = [run for run in runs if run.lag]
    if lagged:
        rows = [[run.server, *run.lag.values()] for run in lagged]
        header = ["server", *lagged[0].lag]
        out.table("lag: C-STORE Success → queryable, ms", header, rows)

    for load, goal in VS_ORTHANC.items():
        if load in opts.loads:
            value = bench.ratio(rate("minipacs", load), rate("orthanc", load))
            out.target(f"{load}: minipacs ÷ orthanc", value, goal)
    for load in ("x1", "x4"):
        if load in opts.loads:
            value = bench.ratio(rate("minipacs-nofsync", load), rate("storescp", load))
            out.target(f"{load}: minipacs --no-fsync ÷ storescp", value, VS_STORESCP)
    if ("minipacs", "mixed") in by:
        run = by["minipacs", "mixed"]
        out.target("mixed: minipacs loaded ÷ alone", run.mixed.get("ratio"), MIXED_RATIO)
        out.target("mixed: minipacs failed stores", run.failed, 0, higher=False)
        out.target("mixed: minipacs HTTP errors", run.mixed.get("http_errors"), 0, higher=False)
    if ("minipacs", "x1") in by and "lag" in opts.loads:
        p99 = by["minipacs", "x1"].lag.get("p99")
        out.target("lag: minipacs p99 ms", p99, LAG_P99_MS, higher=False)
    rss = [
        run.peak_rss_mib for run in runs if run.server.startswith("minipacs") and run.peak_rss_mib
    ]
    out.target("minipacs peak RSS MiB, all its runs", max(rss, default=None), RSS_MIB, higher=False)
    return out.finish(failed=any(run.error for run in runs))


# --------------------------------------------------------------------------- main


def scenario(opts: argparse.Namespace, root: Path) -> int:
    bench.require(("storescu", "echoscu", "storescp"), hint="Debian package dcmtk")
    if "orthanc" in opts.servers:
        plugin = (bench.DICOMWEB_PLUGIN,) if "mixed" in opts.loads else ()
        bench.require(files=(bench.ORTHANC, *plugin), hint="Debian orthanc, orthanc-dicomweb")
        opts.meta["orthanc"] = bench.orthanc_version()
    data = make_data(root, opts)
    lag_runs = {"minipacs", "orthanc"} if "lag" in opts.loads else set()
    plan = [
        (name, load, repeat)
        for load in ("x1", "x4", "x0", "small", "mixed")
        for repeat in range(opts.repeats if load in REPEATED else 1)
        for name in opts.servers
        if load in RUNS[name] and (load in opts.loads or load == "x1" and name in lag_runs)
    ]
    log.info("%d server runs", len(plan))
    runs = [measure(name, load, repeat, data, root, opts) for name, load, repeat in plan]
    return report(combine(runs), opts)


def combine(runs: list[Run]) -> list[Run]:
    """One run for each server and load: repeated ones (--repeats) as their median send
    and queryable times (so the median rate), the largest peak RSS, every failure and log
    line, the first one's lag. The machine has slow spells (docs/ingest-performance.md)
    that can take one run of a server and not its peer's."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.server, run.load), []).append(run)
    return [_combined(group) if len(group) > 1 else group[0] for group in groups.values()]


def _combined(group: list[Run]) -> Run:
    def median(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return statistics.median(known) if known else None

    first = group[0]
    errors = [run.error for run in group if run.error]
    return Run(
        first.server,
        first.load,
        first.files,
        send_s=median([run.send_s for run in group]),
        queryable_s=median([run.queryable_s for run in group]),
        failed=sum(run.failed or 0 for run in group),
        peak_rss_mib=max((r.peak_rss_mib for r in group if r.peak_rss_mib), default=None),
        log_issues=sum(run.log_issues for run in group),
        error=errors[0] if errors else None,
        lag=first.lag,
        each=[run.rate for run in group],
    )


if __name__ == "__main__":
    raise SystemExit(bench.main(__doc__, OPTIONS, scenario))
