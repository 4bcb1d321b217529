#!/usr/bin/env python3
"""C-STORE ingest benchmark: minipacs against Orthanc and dcmtk storescp, side by side.

    .venv/bin/python scripts/bench/ingest.py [--count 500] [--loads x1,x4,x0,small,mixed,lag]

Every load runs against a fresh, empty instance of each server on 127.0.0.1, sent with
the same dcmtk `storescu` (TCP_NODELAY=1):

- x1: one synthetic CT study (512×512, 16 bit, scripts/make_study.py) over 1 association;
- x4: the same over `--parallel` (4) associations (one storescu each, a chunk of files);
- x0: one association per instance (`--x0-count` storescu runs one after another);
- small: `--small-studies` (2,000) small studies of 1–4 64² instances over 4 associations;
- mixed: 8 storescu × 30 CT instances while 8 HTTP threads loop over QIDO-RS, series
  metadata, WADO-RS and WADO-URI (JPEG) on a study loaded before; the rate beside the same
  send without web load, failed stores, HTTP errors, web latency with and without ingest;
- lag: how long after its C-STORE Success each instance of the x1 run is queryable.

The servers: minipacs (defaults + --minipacs-args), minipacs --no-fsync (x1, x4: like for
like with storescp, which does not fsync), Orthanc 1.10.1 (Debian) and storescp (no
index; no mixed). Peak RSS is the largest sum of VmRSS over the server's process tree,
sampled every 50 ms. The disk's fsync rate (fsynced 0.5 MB files/s) is measured as the
fsync-on ceiling. See scripts/bench/README.md.

Progress goes to stderr (logging); the figures tables go to stdout.
"""

import argparse
import contextlib
import hashlib
import http.client
import json
import logging
import os
import random
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

import _common as bench

log = logging.getLogger("bench.ingest")
Study = bench.StudyFiles

ALL_SERVERS = ("minipacs", "minipacs-nofsync", "orthanc", "storescp")
ALL_LOADS = ("x1", "x4", "x0", "small", "mixed", "lag")
# Which server runs which load: the --no-fsync variant is the like-for-like of storescp
# (x1, x4); storescp has no web API (no mixed) and no index (no lag).
SERVER_LOADS = {
    "minipacs": {"x1", "x4", "x0", "small", "mixed"},
    "minipacs-nofsync": {"x1", "x4"},
    "orthanc": {"x1", "x4", "x0", "small", "mixed"},
    "storescp": {"x1", "x4", "x0", "small"},
}
LAG_SERVERS = ("minipacs", "orthanc")
MB = 1_000_000
MIB = 1024 * 1024
WEB_KINDS = ("qido", "metadata", "wado-rs", "wado-uri")
MIXED_PATIENT = "MIXEDPRELOAD"
RSS_INTERVAL = 0.05
POLL_INTERVAL = 0.01

# Targets from the ingest-engine issue.
TARGET_X1 = 1.0  # × Orthanc
TARGET_X4 = 1.5  # × Orthanc
TARGET_X0 = 1.0  # × Orthanc
TARGET_SMALL = 1.0  # × Orthanc
TARGET_VS_STORESCP = 0.5  # minipacs --no-fsync ÷ storescp, x1 and x4
TARGET_MIXED = 0.70  # loaded ÷ unloaded ingest rate
TARGET_LAG_P99_S = 1.0
TARGET_RSS_MIB = 200.0


# --------------------------------------------------------------------------- data


def orthanc_hash(*uids: str) -> str:
    """Orthanc's resource id: SHA-1 of the UIDs joined by '|', in 5 dashed groups."""
    digest = hashlib.sha1("|".join(uids).encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def orthanc_ids(study: Study) -> list[str]:
    """Orthanc's instance ids of the study's files."""
    return [orthanc_hash(study.patient_id, study.study, study.series, sop) for sop in study.sops]


@dataclass
class Data:
    ct: Study | None = None
    small: Study | None = None
    preload: Study | None = None
    mixed_a: list[list[Path]] = field(default_factory=list)  # unloaded send, per association
    mixed_b: list[list[Path]] = field(default_factory=list)  # send under web load
    meta: dict[str, Any] = field(default_factory=dict)


def make_data(root: Path, loads: set[str], opts: argparse.Namespace) -> Data:
    sys.path.insert(0, str(bench.SCRIPTS))
    from make_study import make_studies

    data = Data()
    if loads & {"x1", "x4", "x0", "lag"}:
        log.info("writing a %d-instance %d² CT study", opts.count, opts.size)
        files = bench.make_study(root / "study", opts.count, opts.size)
        data.ct = bench.read_study(files, with_uids="lag" in loads)
        data.meta["ct"] = {
            "count": len(files),
            "size": opts.size,
            "total_mb": data.ct.total_bytes / MB,
            "instance_kb": data.ct.total_bytes / len(files) / 1000,
        }
    if "small" in loads:
        log.info("writing %d small studies (%d²)", opts.small_studies, opts.small_size)
        started = time.perf_counter()
        files = make_studies(root / "small", opts.small_studies, opts.small_size)
        data.small = bench.read_study(files, with_uids=False)
        data.meta["small"] = {
            "studies": opts.small_studies,
            "count": len(files),
            "size": opts.small_size,
            "total_mb": data.small.total_bytes / MB,
            "instance_kb": data.small.total_bytes / len(files) / 1000,
            "written_s": time.perf_counter() - started,
        }
    if "mixed" in loads:
        log.info(
            "writing the mixed load: %d preloaded + 2 × %d × %d CT instances",
            opts.mixed_preload,
            opts.mixed_assoc,
            opts.mixed_per_assoc,
        )
        files = bench.make_study(
            root / "mixed-preload", opts.mixed_preload, opts.size, patient_id=MIXED_PATIENT
        )
        data.preload = bench.read_study(files, with_uids=True)
        for tag, parts in (("a", data.mixed_a), ("b", data.mixed_b)):
            for index in range(opts.mixed_assoc):
                folder = root / f"mixed-{tag}{index}"
                parts.append(bench.make_study(folder, opts.mixed_per_assoc, opts.size))
        one = data.mixed_a[0][0].stat().st_size
        data.meta["mixed"] = {
            "preload": opts.mixed_preload,
            "associations": opts.mixed_assoc,
            "per_association": opts.mixed_per_assoc,
            "web_threads": opts.web_threads,
            "web_seconds": opts.web_seconds,
            "instance_kb": one / 1000,
        }
    return data


def disk_fsync_rate(folder: Path, files: int, size: int = 512 * 1024) -> float | None:
    """Files of `size` bytes written, fsynced and closed one after another: files/s."""
    if files < 1:
        return None
    target = folder / "fsync-probe"
    target.mkdir()
    payload = os.urandom(size)
    try:
        started = time.perf_counter()
        for index in range(files):
            fd = os.open(target / f"{index}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
        return files / (time.perf_counter() - started)
    finally:
        shutil.rmtree(target, ignore_errors=True)


# --------------------------------------------------------------------------- servers


class MinipacsNoFsync(bench.Minipacs):
    name = "minipacs-nofsync"

    def extra_args(self) -> list[str]:
        args = super().extra_args()
        return args if "--no-fsync" in args else [*args, "--no-fsync"]


def new_server(name: str, load: str, workdir: Path, opts: argparse.Namespace) -> bench.Server:
    if name == "minipacs":
        return bench.Minipacs(workdir, opts)
    if name == "minipacs-nofsync":
        return MinipacsNoFsync(workdir, opts)
    if name == "storescp":
        return bench.StoreScp(workdir, opts)
    # Debian's DICOMweb plugin (QIDO/WADO-RS, WADO-URI) for the mixed load only.
    plugin = opts.orthanc_plugin if load == "mixed" else None
    return bench.Orthanc(workdir, opts, plugins=[plugin] if plugin else [])


# --------------------------------------------------------------------------- sending


def send_each(server: bench.Server, files: list[Path], timeout: float) -> bench.Sent:
    """One storescu run per file, one after another (one association per instance)."""
    path = server.workdir / "storescu-x0-0.log"
    sent = bench.Sent(files=len(files), logs=[path])
    with path.open("wb") as out:
        start = time.perf_counter()
        deadline = start + timeout
        for file in files:
            proc = bench.PROCS.start(bench.storescu(server, [file]), env=bench.base_env(), out=out)
            try:
                proc.wait(timeout=max(deadline - time.perf_counter(), 0.01))
            except subprocess.TimeoutExpired:
                raise bench.BenchError(f"x0 did not finish within {timeout:.0f} s") from None
            finally:
                bench.PROCS.stop(proc, grace=2.0)
            sent.bad_exits += proc.returncode != 0
        sent.seconds = time.perf_counter() - start
    sent.success, sent.failure = bench.count_responses(path)
    return sent


def wait_count(server: bench.Server, count: int, timeout: float) -> tuple[int, float | None]:
    """Poll until `count` instances are queryable: (seen, perf_counter() when reached)."""
    deadline = time.perf_counter() + timeout
    seen = 0
    while True:
        seen = server.count_queryable()
        if seen >= count:
            return seen, time.perf_counter()
        server.check_alive()
        if time.perf_counter() > deadline:
            log.warning(
                "%s: only %d of %d queryable after %.0f s", server.name, seen, count, timeout
            )
            return seen, None
        time.sleep(POLL_INTERVAL)


# --------------------------------------------------------------------------- lag


def minipacs_poll(server: bench.Minipacs) -> Callable[[], list[str]]:
    """SOP Instance UIDs new in index.sqlite (read-only) since the last call."""
    state: dict[str, Any] = {"db": None, "rowid": 0, "by_rowid": True, "seen": set()}

    def poll() -> list[str]:
        if state["db"] is None:
            index = server.data / "index.sqlite"
            if not index.exists():
                return []
            state["db"] = sqlite3.connect(
                f"file:{index}?mode=ro", uri=True, timeout=1.0, check_same_thread=False
            )
        db: sqlite3.Connection = state["db"]
        try:
            if state["by_rowid"]:
                try:
                    rows = db.execute(
                        "SELECT rowid, sop_uid FROM instance WHERE rowid > ? ORDER BY rowid",
                        (state["rowid"],),
                    ).fetchall()
                except sqlite3.OperationalError as exc:
                    if "rowid" not in str(exc):
                        raise
                    state["by_rowid"] = False  # a WITHOUT ROWID table: read them all
                    return poll()
                if rows:
                    state["rowid"] = rows[-1][0]
                return [row[1] for row in rows]
            fresh = {row[0] for row in db.execute("SELECT sop_uid FROM instance")}
            new = fresh - state["seen"]
            state["seen"] |= new
            return list(new)
        except sqlite3.OperationalError as exc:  # not created yet, or busy
            log.debug("index not readable yet: %s", exc)
            return []

    def close() -> None:
        if state["db"] is not None:
            state["db"].close()

    poll.close = close  # type: ignore[attr-defined]
    return poll


def orthanc_poll(server: bench.Orthanc, sop_of: dict[str, str]) -> Callable[[], list[str]]:
    """SOP Instance UIDs of Orthanc's NewInstance changes since the last call (/changes;
    the ids are mapped back through Orthanc's hash of the UIDs)."""
    state = {"since": 0}

    def poll() -> list[str]:
        out: list[str] = []
        while True:
            url = (
                f"http://{bench.HOST}:{server.http_port}/changes?since={state['since']}&limit=1000"
            )
            try:
                status, body = bench.http_get(url)
            except OSError as exc:
                log.debug("/changes: %s", exc)
                return out
            if status != 200:
                return out
            answer = json.loads(body)
            for change in answer["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    out.append(sop_of.get(change["ID"], "?" + change["ID"]))
            state["since"] = answer["Last"]
            if answer["Done"]:
                return out

    poll.close = lambda: None  # type: ignore[attr-defined]
    return poll


class Poller:
    """Calls `poll` every 10 ms in a thread; when each SOP Instance UID first appeared."""

    def __init__(self, poll: Callable[[], list[str]], expected: int) -> None:
        self.poll = poll
        self.expected = expected
        self.seen_at: dict[str, float] = {}
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            new = self.poll()
            now = time.perf_counter()
            self.polls += 1
            for sop in new:
                self.seen_at.setdefault(sop, now)
            if len(self.seen_at) >= self.expected:
                return
            self._stop.wait(POLL_INTERVAL)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll.close()  # type: ignore[attr-defined]


def lag_figures(study: Study, success_at: dict[str, float], seen_at: dict[str, float]) -> dict:
    sop_of_path = dict(zip(map(str, study.files), study.sops, strict=True))
    lags = []
    never = 0
    for path, when in success_at.items():
        sop = sop_of_path.get(path)
        if sop is None:
            continue
        if sop in seen_at:
            lags.append(seen_at[sop] - when)
        else:
            never += 1
    return {
        "instances": len(lags),
        "never_seen": never,
        "no_success": len(study.files) - len(success_at),
        "p50_ms": _ms(bench.percentile(lags, 0.50)),
        "p99_ms": _ms(bench.percentile(lags, 0.99)),
        "max_ms": _ms(max(lags) if lags else None),
        "min_ms": _ms(min(lags) if lags else None),
    }


def _ms(seconds: float | None) -> float | None:
    return seconds * 1000 if seconds is not None else None


# --------------------------------------------------------------------------- web load


Request = tuple[str, str, dict[str, str], bytes | None]  # method, path, headers, body


def web_requests(
    server: bench.Server, study: Study, api: str
) -> dict[str, Callable[[random.Random], Request]]:
    """The four request kinds of the mixed load, against the preloaded study."""
    n = len(study.sops)
    if api == "rest":  # Orthanc without its DICOMweb plugin: the REST equivalents
        find = json.dumps(
            {"Level": "Study", "Query": {"PatientID": study.patient_id}, "Expand": True}
        ).encode()
        ids = orthanc_ids(study)
        json_type = {"Content-Type": "application/json"}
        tags = f"/series/{orthanc_hash(study.patient_id, study.study, study.series)}/instances-tags"
        jpeg = {"Accept": "image/jpeg"}
        return {
            "qido": lambda rng: ("POST", "/tools/find", json_type, find),
            "metadata": lambda rng: ("GET", tags, {}, None),
            "wado-rs": lambda rng: ("GET", f"/instances/{ids[rng.randrange(n)]}/file", {}, None),
            "wado-uri": lambda rng: (
                "GET",
                f"/instances/{ids[rng.randrange(n)]}/preview",
                jpeg,
                None,
            ),
        }
    series = f"/dicom-web/studies/{study.study}/series/{study.series}"
    qido = "/dicom-web/studies?" + urllib.parse.urlencode({"PatientID": study.patient_id})
    json_accept = {"Accept": "application/dicom+json"}
    dicom = {"Accept": 'multipart/related; type="application/dicom"'}
    sops = study.sops

    def wado_uri(rng: random.Random) -> Request:
        query = {
            "requestType": "WADO",
            "studyUID": study.study,
            "seriesUID": study.series,
            "objectUID": study.sops[rng.randrange(n)],
            "contentType": "image/jpeg",
        }
        # "/" unescaped: Orthanc's DICOMweb plugin (1.7) does not percent-decode it.
        return "GET", "/wado?" + urllib.parse.urlencode(query, safe="/"), {}, None

    return {
        "qido": lambda rng: ("GET", qido, json_accept, None),
        "metadata": lambda rng: ("GET", f"{series}/metadata", json_accept, None),
        "wado-rs": lambda rng: ("GET", f"{series}/instances/{sops[rng.randrange(n)]}", dicom, None),
        "wado-uri": wado_uri,
    }


@dataclass
class WebRecord:
    kind: str
    start: float
    seconds: float
    ok: bool


class WebLoad:
    """`threads` HTTP clients (one keep-alive connection each) looping over the request
    kinds, no pause between requests, until stopped."""

    def __init__(
        self, port: int, requests: dict[str, Callable[[random.Random], Request]], threads: int
    ) -> None:
        self.port = port
        self.requests = requests
        self.threads = threads
        self.records: list[WebRecord] = []
        self.error_samples: list[str] = []
        self.last_body = b""  # of the last answer (once() checks the JPEG)
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def once(self) -> list[str]:
        """Each kind once: the problems (status, error), to warn about before measuring."""
        problems = []
        conn = http.client.HTTPConnection(bench.HOST, self.port, timeout=30)
        try:
            for kind, make in self.requests.items():
                ok, note = self._request(conn, make(random.Random(0)))
                if not ok:
                    problems.append(f"{kind}: {note}")
                    conn.close()
                elif kind == "wado-uri" and not self.last_body.startswith(b"\xff\xd8"):
                    problems.append(f"wado-uri: not a JPEG: {self.last_body[:16]!r}")
        finally:
            conn.close()
        return problems

    def _request(self, conn: http.client.HTTPConnection, request: Request) -> tuple[bool, str]:
        method, path, headers, body = request
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            return False, f"{method} {path[:80]}: {type(exc).__name__}: {exc}"
        self.last_body = data
        if 200 <= resp.status < 300:
            return True, ""
        return False, f"{method} {path[:80]}: HTTP {resp.status} {data[:120]!r}"

    def _run(self, number: int) -> None:
        rng = random.Random(number)
        kinds = list(self.requests)
        conn: http.client.HTTPConnection | None = None
        turn = number
        while not self._stop.is_set():
            kind = kinds[turn % len(kinds)]
            turn += 1
            if conn is None:
                conn = http.client.HTTPConnection(bench.HOST, self.port, timeout=30)
            started = time.perf_counter()
            ok, note = self._request(conn, self.requests[kind](rng))
            self.records.append(WebRecord(kind, started, time.perf_counter() - started, ok))
            if not ok:
                if len(self.error_samples) < 8:
                    self.error_samples.append(f"{kind}: {note}")
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def start(self) -> None:
        self._stop.clear()
        self._workers = [
            threading.Thread(target=self._run, args=(n,), name=f"web-{n}", daemon=True)
            for n in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)

    def figures(self, start: float, end: float) -> dict[str, Any]:
        """Requests started in [start, end): per kind n, errors, p50/p99 ms."""
        out: dict[str, Any] = {}
        for kind in self.requests:
            chosen = [r for r in self.records if r.kind == kind and start <= r.start < end]
            seconds = [r.seconds for r in chosen if r.ok]
            out[kind] = {
                "n": len(chosen),
                "errors": sum(not r.ok for r in chosen),
                "p50_ms": _ms(bench.percentile(seconds, 0.50)),
                "p99_ms": _ms(bench.percentile(seconds, 0.99)),
            }
        return out


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    server: str
    load: str
    associations: int
    count: int
    total_bytes: int
    ok: bool = False
    error: str | None = None
    send_s: float | None = None
    queryable_s: float | None = None
    stored: int | None = None
    failed_stores: int | None = None
    peak_rss_mib: float | None = None
    hwm_sum_mib: float | None = None
    rss_processes: int = 0
    lag: dict[str, Any] | None = None
    mixed: dict[str, Any] | None = None
    server_log_issues: int = 0
    server_log_sample: list[str] = field(default_factory=list)
    storescu_log_issues: int = 0
    storescu_log_sample: list[str] = field(default_factory=list)

    @property
    def inst_per_s(self) -> float | None:
        return self.count / self.send_s if self.ok and self.send_s else None

    @property
    def mb_per_s(self) -> float | None:
        return self.total_bytes / MB / self.send_s if self.ok and self.send_s else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inst_per_s"] = self.inst_per_s
        data["mb_per_s"] = self.mb_per_s
        return data


def send_timeout(opts: argparse.Namespace, files: int) -> float:
    return opts.send_timeout if opts.send_timeout is not None else 60.0 + files / 2


def run_send(
    run: Run, server: bench.Server, study: Study, parts: int, opts: argparse.Namespace
) -> None:
    """x1, x4, small: the files over `parts` associations; with lag on the x1 run, the
    Success times and an index poller besides."""
    lag = run.load == "x1" and "lag" in opts.loads and run.server in LAG_SERVERS
    poller: Poller | None = None
    if lag:
        if isinstance(server, bench.Minipacs):
            poll = minipacs_poll(server)
        else:
            sop_of = dict(zip(orthanc_ids(study), study.sops, strict=True))
            poll = orthanc_poll(server, sop_of)  # type: ignore[arg-type]
        poller = Poller(poll, len(study.files))
        poller.start()
    try:
        started = time.perf_counter()
        sent, watch = bench.send_parts(
            server,
            bench.chunks(study.files, parts),
            send_timeout(opts, len(study.files)),
            run.load,
            watch=lag,
        )
        run.send_s = sent.seconds
        run.failed_stores = sent.failed
        run.stored, reached = wait_count(server, len(study.files), opts.query_timeout)
        if poller is not None and watch is not None:
            poller.wait(timeout=opts.query_timeout)
            run.lag = lag_figures(study, watch.success_at, poller.seen_at)
            run.lag["polls"] = poller.polls
            run.lag["how"] = (
                server.queryable_how if isinstance(server, bench.Minipacs) else "/changes"
            )
            if poller.seen_at:
                reached = max(poller.seen_at.values())
        run.queryable_s = reached - started if reached is not None else None
    finally:
        if poller is not None:
            poller.stop()
    run.ok = run.failed_stores == 0 and run.stored == len(study.files)
    if not run.ok:
        run.error = (
            f"{run.stored} of {len(study.files)} stored/queryable, "
            f"{run.failed_stores} without Success"
        )


def run_x0(run: Run, server: bench.Server, study: Study, opts: argparse.Namespace) -> None:
    files = study.files[: run.count]
    sent = send_each(server, files, send_timeout(opts, len(files) * 4))
    run.send_s = sent.seconds
    run.failed_stores = sent.failed
    run.stored, _ = wait_count(server, len(files), opts.query_timeout)
    run.ok = run.failed_stores == 0 and run.stored == len(files)
    if not run.ok:
        run.error = f"{run.stored} of {len(files)} stored, {run.failed_stores} without Success"


def run_mixed(run: Run, server: bench.Server, data: Data, opts: argparse.Namespace) -> None:
    """Preload a study; web latency alone; the 8×30 send alone; the 8×30 send under the
    web load. The run's rate is the loaded one."""
    assert data.preload is not None and server.http_port is not None
    preload = data.preload
    mixed: dict[str, Any] = {"api": opts.orthanc_api if server.name == "orthanc" else "dicomweb"}
    run.mixed = mixed
    per_send = sum(len(p) for p in data.mixed_a)
    sent, _ = bench.send_parts(
        server, [preload.files], send_timeout(opts, len(preload.files)), "preload"
    )
    stored, _ = wait_count(server, len(preload.files), opts.query_timeout)
    if sent.failed or stored < len(preload.files):
        raise bench.BenchError(f"preload: {stored} of {len(preload.files)} stored")
    web = WebLoad(server.http_port, web_requests(server, preload, mixed["api"]), opts.web_threads)
    problems = web.once()
    if problems:
        log.warning(
            "%s: web requests failing before the load:\n  %s", server.name, "\n  ".join(problems)
        )
    mixed["precheck_problems"] = problems

    # 1. web alone
    web.start()
    start = time.perf_counter()
    time.sleep(opts.web_seconds)
    end = time.perf_counter()
    web.stop()
    mixed["web_alone"] = web.figures(start, end)
    # 2. ingest alone
    alone, _ = bench.send_parts(server, data.mixed_a, send_timeout(opts, per_send), "mixed-alone")
    stored, _ = wait_count(server, len(preload.files) + per_send, opts.query_timeout)
    mixed["alone_s"] = alone.seconds
    mixed["alone_inst_per_s"] = per_send / alone.seconds
    mixed["alone_failed"] = alone.failed
    # 3. ingest under web load (web threads warm for 0.3 s first)
    web.start()
    time.sleep(0.3)
    start = time.perf_counter()
    loaded, _ = bench.send_parts(server, data.mixed_b, send_timeout(opts, per_send), "mixed-loaded")
    end = time.perf_counter()
    web.stop()
    mixed["web_loaded"] = web.figures(start, end)
    mixed["loaded_s"] = loaded.seconds
    mixed["loaded_inst_per_s"] = per_send / loaded.seconds
    mixed["loaded_failed"] = loaded.failed
    mixed["ratio"] = mixed["loaded_inst_per_s"] / mixed["alone_inst_per_s"]
    mixed["http_errors"] = sum(not r.ok for r in web.records)
    mixed["http_requests"] = len(web.records)
    mixed["http_error_samples"] = web.error_samples
    expected = len(preload.files) + 2 * per_send
    run.stored, _ = wait_count(server, expected, opts.query_timeout)
    run.send_s = loaded.seconds
    run.failed_stores = alone.failed + loaded.failed
    run.ok = run.failed_stores == 0 and run.stored == expected
    if not run.ok:
        run.error = f"{run.stored} of {expected} stored, {run.failed_stores} without Success"


def measure(name: str, load: str, data: Data, root: Path, opts: argparse.Namespace) -> Run:
    if load in ("x1", "x4", "x0"):
        assert data.ct is not None
        study = data.ct
        count = min(opts.x0_count, len(study.files)) if load == "x0" else len(study.files)
        total = sum(p.stat().st_size for p in study.files[:count])
        assoc = {"x1": 1, "x4": opts.parallel, "x0": count}[load]
    elif load == "small":
        assert data.small is not None
        study = data.small
        count, total, assoc = len(study.files), study.total_bytes, opts.parallel
    else:
        assert data.preload is not None
        study = data.preload
        count = sum(len(part) for part in data.mixed_b)
        total = sum(p.stat().st_size for part in data.mixed_b for p in part)
        assoc = opts.mixed_assoc
    run = Run(name, load, assoc, count, total)
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-{load}-", dir=root))
    server = new_server(name, load, workdir, opts)
    try:
        server.start()
        assert server.proc is not None
        log.info(
            "%s %s: ready on DICOM %d%s; %d instances over %d association(s)",
            name,
            load,
            server.port,
            f", HTTP {server.http_port}" if server.http_port else "",
            count,
            assoc,
        )
        with bench.RssSampler(server.proc.pid) as rss:
            if load == "x0":
                run_x0(run, server, study, opts)
            elif load == "mixed":
                run_mixed(run, server, data, opts)
            else:
                run_send(run, server, study, 1 if load == "x1" else opts.parallel, opts)
            rss.sample()
            hwm = rss.hwm_kib()
        run.peak_rss_mib = rss.peak_kib / 1024 if rss.peak_kib else None
        run.hwm_sum_mib = hwm / 1024 if hwm is not None else None
        run.rss_processes = rss.max_processes
        log.info(
            "%s %s: %s s, %s inst/s, peak RSS %s MiB over %d process(es)%s",
            name,
            load,
            bench.fmt(run.send_s, ".2f"),
            bench.fmt(run.inst_per_s),
            bench.fmt(run.peak_rss_mib),
            run.rss_processes,
            "" if run.ok else f" — {run.error}",
        )
    except bench.BenchError as exc:
        run.error = str(exc)
        log.error("%s %s failed: %s", name, load, exc)
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        log.exception("%s %s failed", name, load)
    finally:
        server.stop()
        run.server_log_issues, run.server_log_sample = bench.log_issues(
            server.log_path, server.log_issue
        )
        for path in sorted(workdir.glob("storescu-*.log")):
            hits, sample = bench.log_issues(path)
            run.storescu_log_issues += hits
            run.storescu_log_sample.extend(sample[: 8 - len(run.storescu_log_sample)])
        for what, hits, sample in (
            ("its log", run.server_log_issues, run.server_log_sample),
            ("storescu", run.storescu_log_issues, run.storescu_log_sample),
        ):
            if hits:
                log.warning(
                    "%s %s: %d warning/error line(s) from %s, e.g.:\n  %s",
                    name,
                    load,
                    hits,
                    what,
                    "\n  ".join(sample),
                )
        if opts.log_dir:
            opts.log_dir.mkdir(parents=True, exist_ok=True)
            for path in workdir.glob("*.log"):
                shutil.copy2(path, opts.log_dir / f"{name}-{load}-{path.name}")
        shutil.rmtree(workdir, ignore_errors=True)
    return run


# --------------------------------------------------------------------------- report


class Report:
    """The tables (one per load) and the targets."""

    def __init__(self, runs: list[Run], meta: dict[str, Any]) -> None:
        self.runs = runs
        self.meta = meta
        self.by = {(run.server, run.load): run for run in runs}
        self.lines: list[str] = []
        self.targets: list[dict[str, Any]] = []

    def rate(self, server: str, load: str) -> float | None:
        run = self.by.get((server, load))
        return run.inst_per_s if run else None

    def ran(self, load: str) -> bool:
        return any(run.load == load for run in self.runs)

    def target(
        self,
        load: str,
        label: str,
        value: float | None,
        goal: float,
        higher: bool = True,
        spec: str = ".2f",
    ) -> None:
        """Record a target and print its line."""
        if value is None:
            verdict = "n/a"
        elif higher:
            verdict = "PASS" if value >= goal else "FAIL"
        else:
            verdict = "PASS" if value <= goal else "FAIL"
        entry = {"load": load, "target": label, "value": value, "goal": goal, "verdict": verdict}
        self.targets.append(entry)
        self.lines.append(f"  target: {label:<46} {bench.fmt(value, spec):>7}  {verdict}")

    def vs(self, load: str, server: str, other: str, goal: float) -> None:
        """Target: `server`'s rate ≥ goal × `other`'s on `load`."""
        label = f"{load}: {server.replace('-nofsync', ' --no-fsync')} ≥ {goal:.1f} × {other}"
        value = bench.ratio(self.rate(server, load), self.rate(other, load))
        self.target(load, label, value, goal)

    @staticmethod
    def status(run: Run) -> str:
        text = "ok" if run.ok else f"FAILED: {(run.error or '').splitlines()[0][:70]}"
        if run.server_log_issues:
            text += f" ({run.server_log_issues} log warnings/errors)"
        return text

    def rate_table(self, load: str, title: str) -> None:
        self.lines += [
            "",
            title,
            f"  {'server':<17} {'inst/s':>8} {'MB/s':>7} {'send s':>7} {'queryable s':>11} "
            f"{'peak RSS MiB':>12} {'÷orthanc':>8} {'÷storescp':>9}  status",
        ]
        for run in (r for r in self.runs if r.load == load):
            queryable = bench.fmt(run.queryable_s, ".2f")
            if run.server == "storescp" and run.queryable_s is not None:
                queryable += "*"
            vs_o = bench.ratio(run.inst_per_s, self.rate("orthanc", load))
            vs_s = bench.ratio(run.inst_per_s, self.rate("storescp", load))
            self.lines.append(
                f"  {run.server:<17} {bench.fmt(run.inst_per_s):>8} "
                f"{bench.fmt(run.mb_per_s):>7} {bench.fmt(run.send_s, '.2f'):>7} "
                f"{queryable:>11} {bench.fmt(run.peak_rss_mib):>12} "
                f"{bench.fmt(vs_o, '.2f'):>8} {bench.fmt(vs_s, '.2f'):>9}  {self.status(run)}"
            )

    def build(self) -> tuple[str, list[dict[str, Any]]]:
        meta = self.meta
        self.lines = [
            f"C-STORE ingest — minipacs {meta['commit']}, "
            f"{meta.get('orthanc_version', 'no Orthanc')}, dcmtk storescu/storescp, "
            f"TCP_NODELAY=1, 127.0.0.1, {meta['cpus']} CPUs, {meta['date']}",
            f"minipacs args: {meta['minipacs_args'] or '(none: defaults, fsync on)'}; "
            f"storescp {meta['storescp_args']} (no fsync, no index)",
        ]
        fsync = meta.get("disk_fsync_files_per_s")
        if fsync is not None:
            self.lines.append(
                f"disk under {meta['tmp']}: {fsync:.0f} fsynced 0.5 MB files/s, one after "
                "another (the fsync-on ceiling of one association)"
            )
        for key, when in (("other_work", "at the start"), ("other_work_at_end", "at the end")):
            if meta.get(key):
                self.lines.append(f"WARNING: other benchmarks/tests ran {when}: {meta[key]}")
        ct = meta.get("ct")
        if ct and self.ran("x1"):
            note = " (+ lag polling on minipacs/orthanc)" if "lag" in meta["loads"] else ""
            self.rate_table(
                "x1",
                f"x1 — {ct['count']} × {ct['instance_kb']:.0f} KB {ct['size']}² CT "
                f"({ct['total_mb']:.1f} MB), 1 association{note}",
            )
            self.vs("x1", "minipacs", "orthanc", TARGET_X1)
            self.vs("x1", "minipacs-nofsync", "storescp", TARGET_VS_STORESCP)
            x1 = self.rate("minipacs", "x1")
            if fsync and x1:
                self.lines.append(
                    f"  minipacs (fsync on) = {x1 / fsync:.2f} of the disk's fsync rate "
                    f"({x1:.0f} ÷ {fsync:.0f} files/s)"
                )
        if ct and self.ran("x4"):
            self.rate_table("x4", f"x4 — the same over {meta['parallel']} associations")
            self.vs("x4", "minipacs", "orthanc", TARGET_X4)
            self.vs("x4", "minipacs-nofsync", "storescp", TARGET_VS_STORESCP)
        if any(r.server == "storescp" and r.load in ("x1", "x4") for r in self.runs):
            self.lines.append("  * storescp keeps no index: time until all files are on disk")
        if self.ran("x0"):
            self.rate_table(
                "x0",
                f"x0 — one association per instance: {meta['x0_count']} storescu runs "
                "(one file each, one after another)",
            )
            self.vs("x0", "minipacs", "orthanc", TARGET_X0)
        small = meta.get("small")
        if small and self.ran("small"):
            self.rate_table(
                "small",
                f"small — {small['studies']} studies, {small['count']} instances of "
                f"{small['size']}² ({small['instance_kb']:.1f} KB), "
                f"{meta['parallel']} associations",
            )
            self.vs("small", "minipacs", "orthanc", TARGET_SMALL)
        if self.ran("mixed"):
            self.mixed_tables()
        if "lag" in meta["loads"]:
            self.lag_table()
        self.rss_table()
        return "\n".join(self.lines), self.targets

    def mixed_tables(self) -> None:
        m = self.meta["mixed"]
        runs = [r for r in self.runs if r.load == "mixed"]
        apis = {
            "dicomweb": "DICOMweb + /wado",
            "plugin": f"DICOMweb plugin {self.meta.get('orthanc_dicomweb', '')}",
            "rest": "Orthanc REST",
        }
        self.lines += [
            "",
            f"mixed — {m['associations']} storescu × {m['per_association']} CT instances "
            f"while {m['web_threads']} HTTP threads loop over QIDO-RS, series metadata, "
            f"WADO-RS instance, WADO-URI JPEG of a {m['preload']}-instance study loaded before",
            f"  {'server':<9} {'web API':<24} {'alone inst/s':>12} {'loaded inst/s':>13} "
            f"{'ratio':>6} {'failed':>6} {'HTTP err':>8} {'requests':>8} {'RSS MiB':>8}  status",
        ]
        for run in runs:
            mx = run.mixed or {}
            self.lines.append(
                f"  {run.server:<9} {apis.get(mx.get('api', ''), '?'):<24} "
                f"{bench.fmt(mx.get('alone_inst_per_s')):>12} "
                f"{bench.fmt(mx.get('loaded_inst_per_s')):>13} "
                f"{bench.fmt(mx.get('ratio'), '.2f'):>6} {bench.fmt(run.failed_stores, 'd'):>6} "
                f"{bench.fmt(mx.get('http_errors'), 'd'):>8} "
                f"{bench.fmt(mx.get('http_requests'), 'd'):>8} "
                f"{bench.fmt(run.peak_rss_mib):>8}  {self.status(run)}"
            )
        self.lines.append(
            f"  web latency, ms p50 / p99 (requests)  without ingest ({m['web_seconds']:g} s)"
            "  │  under ingest"
        )
        for run in runs:
            mx = run.mixed or {}
            for kind in WEB_KINDS:
                cells = []
                for phase in ("web_alone", "web_loaded"):
                    f = (mx.get(phase) or {}).get(kind) or {}
                    errors = f" {f['errors']} err" if f.get("errors") else ""
                    cells.append(
                        f"{bench.fmt(f.get('p50_ms')):>7} / {bench.fmt(f.get('p99_ms')):>7} "
                        f"({f.get('n', 0):>4}){errors}"
                    )
                self.lines.append(f"  {run.server:<9} {kind:<9} {cells[0]:<31} │  {cells[1]}")
        if any((r.mixed or {}).get("api") == "rest" for r in runs):
            self.lines.append(
                "  Orthanc REST equivalents: POST /tools/find (Study, PatientID), "
                "/series/ID/instances-tags, /instances/ID/file, /instances/ID/preview (JPEG)"
            )
        mp = self.by.get(("minipacs", "mixed"))
        if mp is not None:
            mx = mp.mixed or {}
            self.target("mixed", "mixed: minipacs loaded ≥ 0.70 × alone", mx.get("ratio"), 0.7)
            failed, errors = mp.failed_stores, mx.get("http_errors")
            self.target("mixed", "mixed: minipacs failed stores = 0", failed, 0, False, ".0f")
            self.target("mixed", "mixed: minipacs HTTP errors = 0", errors, 0, False, ".0f")

    def lag_table(self) -> None:
        self.lines += [
            "",
            "lag — C-STORE Success (storescu -v, read as it comes) → instance queryable "
            f"(polled every {POLL_INTERVAL * 1000:.0f} ms), over the x1 run",
            f"  {'server':<9} {'instances':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
            f"{'min ms':>8} {'never':>5}  polled",
        ]
        for name in LAG_SERVERS:
            run = self.by.get((name, "x1"))
            if run is None:
                continue
            lag = run.lag or {}
            cells = [bench.fmt(lag.get(k)) for k in ("p50_ms", "p99_ms", "max_ms", "min_ms")]
            self.lines.append(
                f"  {name:<9} {lag.get('instances', 0):>9} "
                + " ".join(f"{c:>8}" for c in cells)
                + f" {lag.get('never_seen', '?'):>5}  {lag.get('how', '?')}"
            )
        self.lines.append(
            "  (negative: in the index before storescu's Success line was read; ±10 ms)"
        )
        run = self.by.get(("minipacs", "x1"))
        if run is not None:
            lag = run.lag or {}
            p99 = float("inf") if lag.get("never_seen") else lag.get("p99_ms")
            goal = TARGET_LAG_P99_S * 1000
            self.target("lag", "lag: minipacs p99 ≤ 1000 ms", p99, goal, False, ".1f")

    def rss_table(self) -> None:
        loads = [load for load in ("x1", "x4", "x0", "small", "mixed") if self.ran(load)]
        self.lines += [
            "",
            "peak RSS — largest sum of VmRSS over the server's process tree, sampled every "
            f"{RSS_INTERVAL * 1000:.0f} ms: MiB (processes at most)",
            f"  {'server':<17} " + " ".join(f"{load:>13}" for load in loads),
        ]
        for name in ALL_SERVERS:
            cells = []
            for load in loads:
                run = self.by.get((name, load))
                ok = run is not None and run.peak_rss_mib
                cells.append(f"{run.peak_rss_mib:.1f} ({run.rss_processes})" if ok else "-")  # type: ignore[union-attr]
            if any(c != "-" for c in cells):
                self.lines.append(f"  {name:<17} " + " ".join(f"{c:>13}" for c in cells))
        values = [
            r.peak_rss_mib for r in self.runs if r.server.startswith("minipacs") and r.peak_rss_mib
        ]
        if values:
            label = "minipacs peak RSS ≤ 200 MiB (max of its runs)"
            self.target("rss", label, max(values), TARGET_RSS_MIB, False, ".1f")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=500, help="instances of the CT study (x1, x4)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of the CT images")
    parser.add_argument(
        "--loads",
        default=",".join(ALL_LOADS),
        help="comma-separated subset of " + ",".join(ALL_LOADS) + " (lag rides on x1)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="comma-separated subset of " + ",".join(ALL_SERVERS),
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=4,
        help="associations of x4 and small (storescu processes)",
    )
    parser.add_argument("--x0-count", type=int, default=100, help="storescu runs of x0 (≤ --count)")
    parser.add_argument("--small-studies", type=int, default=2000, help="studies of the small load")
    parser.add_argument("--small-size", type=int, default=64, help="rows = columns, small load")
    parser.add_argument("--mixed-assoc", type=int, default=8, help="storescu processes, mixed")
    parser.add_argument("--mixed-per-assoc", type=int, default=30, help="CT instances each, mixed")
    parser.add_argument("--mixed-preload", type=int, default=50, help="instances of the web study")
    parser.add_argument("--web-threads", type=int, default=8, help="HTTP client threads, mixed")
    parser.add_argument(
        "--web-seconds", type=float, default=4.0, help="web latency measured without ingest, s"
    )
    parser.add_argument(
        "--orthanc-api",
        choices=("auto", "plugin", "rest"),
        default="auto",
        help="Orthanc's web API in the mixed load: its DICOMweb plugin (Debian package "
        "orthanc-dicomweb), its REST equivalents, or auto (the plugin if it is installed)",
    )
    parser.add_argument(
        "--fsync-files",
        type=int,
        default=200,
        help="0.5 MB files fsynced for the disk rate (0: skip)",
    )
    parser.add_argument(
        "--minipacs-args",
        default="",
        help="extra arguments for `minipacs serve`; use the = form: --minipacs-args=--workers=2",
    )
    parser.add_argument(
        "--storescp-args",
        default="+B +xa -pdu 131072 -dhl",
        help="storescp options besides --fork, -aet and -od",
    )
    parser.add_argument(
        "--minipacs-rev",
        metavar="REV",
        help="run minipacs from `git archive REV` of its packages (e.g. HEAD) instead of the "
        "working tree, which then may change during the run",
    )
    parser.add_argument(
        "--send-timeout", type=float, default=None, help="seconds per send (None: 60 + files / 2)"
    )
    parser.add_argument("--query-timeout", type=float, default=60.0, help="seconds")
    bench.add_common_args(parser, startup=60.0)
    opts = parser.parse_args(argv)
    servers = [s.strip() for s in opts.servers.split(",") if s.strip()]
    unknown = sorted(set(servers) - set(ALL_SERVERS))
    if unknown or not servers:
        parser.error(f"--servers: unknown {unknown}; choose from {','.join(ALL_SERVERS)}")
    opts.servers = [s for s in ALL_SERVERS if s in servers]
    loads = [s.strip() for s in opts.loads.split(",") if s.strip()]
    unknown = sorted(set(loads) - set(ALL_LOADS))
    if unknown or not loads:
        parser.error(f"--loads: unknown {unknown}; choose from {','.join(ALL_LOADS)}")
    opts.loads = [s for s in ALL_LOADS if s in loads]
    numbers = ("count", "parallel", "x0_count", "small_studies", "small_size", "mixed_assoc")
    numbers += ("mixed_per_assoc", "mixed_preload", "web_threads")
    if any(getattr(opts, name) < 1 for name in numbers):
        parser.error("counts, sizes and --parallel must be ≥ 1")
    opts.x0_count = min(opts.x0_count, opts.count)
    return opts


def plan(opts: argparse.Namespace) -> list[tuple[str, str]]:
    """(load, server) pairs to run, load after load, the servers side by side."""
    pairs = []
    for load in ("x1", "x4", "x0", "small", "mixed"):
        for name in opts.servers:
            wanted = load in opts.loads
            if load == "x1" and "lag" in opts.loads and name in LAG_SERVERS:
                wanted = True  # lag rides on the x1 run
            if wanted and load in SERVER_LOADS[name]:
                pairs.append((load, name))
    return pairs


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    bench.setup_logging(opts.verbose)
    tools = ("storescu", "echoscu") + (("storescp",) if "storescp" in opts.servers else ())
    if not bench.require(tools, hint="Debian package dcmtk"):
        return 2
    if any(s.startswith("minipacs") for s in opts.servers) and not opts.minipacs.exists():
        log.error("%s not found: create the venv (./scripts/serve does)", opts.minipacs)
        return 2
    if "orthanc" in opts.servers and not bench.require(
        files=(opts.orthanc,), hint="Debian package orthanc, or leave orthanc out of --servers"
    ):
        return 2
    if "--no-fsync" in shlex.split(opts.minipacs_args) and "minipacs-nofsync" in opts.servers:
        log.info("--minipacs-args has --no-fsync: minipacs-nofsync would repeat minipacs")
        opts.servers.remove("minipacs-nofsync")

    root: Path | None = None
    started = time.perf_counter()
    try:
        with bench.sigterm_unwinds():
            meta: dict[str, Any] = {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "commit": bench.git_commit(),
                "loads": opts.loads,
                "servers": opts.servers,
                "parallel": opts.parallel,
                "x0_count": opts.x0_count,
                "minipacs_args": opts.minipacs_args,
                "storescp_args": opts.storescp_args,
                "cpus": os.cpu_count(),
                "other_work": bench.other_work(),
            }
            if meta["other_work"]:
                log.warning("other benchmarks/tests are running: %s", meta["other_work"])
            opts.orthanc_plugin = None
            want, opts.orthanc_api = opts.orthanc_api, "none"
            if "orthanc" in opts.servers:
                meta["orthanc_version"] = bench.orthanc_version(opts.orthanc)
                bench.warn_other_orthancs()
                if "mixed" in opts.loads:
                    has = want != "rest" and bench.ORTHANC_DICOMWEB.exists()
                    if want == "plugin" and not has:
                        log.error(
                            "--orthanc-api plugin: %s missing (Debian package orthanc-dicomweb)",
                            bench.ORTHANC_DICOMWEB,
                        )
                        return 2
                    opts.orthanc_api = "plugin" if has else "rest"
                    if has:
                        opts.orthanc_plugin = bench.ORTHANC_DICOMWEB
                        meta["orthanc_dicomweb"] = bench.dpkg_version("orthanc-dicomweb")
                    log.info("Orthanc's web API in the mixed load: %s", opts.orthanc_api)
            meta["orthanc_api"] = opts.orthanc_api

            root = Path(tempfile.mkdtemp(prefix="minipacs-bench-", dir=opts.tmp))
            if opts.minipacs_rev and any(s.startswith("minipacs") for s in opts.servers):
                meta["commit"] = (
                    f"{bench.snapshot_code(root, opts, opts.minipacs_rev)} (git archive)"
                )
                log.info("minipacs runs from %s of %s", opts.code, meta["commit"])
            meta["tmp"] = str(root.parent)
            meta["disk_fsync_files_per_s"] = disk_fsync_rate(root, opts.fsync_files)
            data = make_data(root, set(opts.loads), opts)
            meta.update(data.meta)
            pairs = plan(opts)
            log.info("%d server runs: %s", len(pairs), ", ".join(f"{n} {ld}" for ld, n in pairs))
            runs = [measure(name, load, data, root, opts) for load, name in pairs]
            meta["elapsed_s"] = time.perf_counter() - started
            meta["other_work_at_end"] = bench.other_work()

            table, targets = Report(runs, meta).build()
            print(table)
            print(f"\n(run took {meta['elapsed_s']:.0f} s)")
            if opts.json:
                payload = {
                    "meta": meta,
                    "runs": [run.as_dict() for run in runs],
                    "targets": targets,
                }
                bench.write_json(payload, opts.json)
            sys.stdout.flush()
            if not all(run.ok for run in runs):
                return 1
            if opts.strict and any(t["verdict"] == "FAIL" for t in targets):
                return 3
            return 0
    except bench.BenchError as exc:
        log.error("%s", exc)
        return 2
    except (KeyboardInterrupt, bench.Interrupted):
        log.error("interrupted: cleaning up")
        return 130
    finally:
        bench.PROCS.stop_all()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
