#!/usr/bin/env python3
"""C-STORE ingest benchmark: minipacs against Orthanc and dcmtk storescp, side by side.

    .venv/bin/python scripts/bench/ingest.py [--count 500] [--servers minipacs,storescp,orthanc]

One synthetic CT study (512×512, 16 bit, fresh UIDs, from scripts/make_study.py) is sent
with the same dcmtk `storescu` (TCP_NODELAY=1) to each server, over 1 association and over
N parallel associations (N storescu processes, one chunk of the files each), every run
against a fresh, empty server on 127.0.0.1. For each run it reports instances/s, MB/s,
the time from the start of sending until the last instance is queryable, and the
server's peak RSS; then ratios and the archive-core targets. See scripts/bench/README.md.

Progress goes to stderr (logging); the figures table goes to stdout.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import IO
from typing import Any

log = logging.getLogger("bench.ingest")

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
HOST = "127.0.0.1"
CALLING_AET = "BENCHSCU"
ORTHANC_BIN = Path("/usr/sbin/Orthanc")
ALL_SERVERS = ("minipacs", "storescp", "orthanc")
MB = 1_000_000

# Targets from the archive-core issue.
TARGET_VS_ORTHANC_1 = 1.0
TARGET_VS_ORTHANC_N = 1.5
TARGET_VS_STORESCP = 0.5
TARGET_RSS_MIB = 200.0

# Lines worth reporting in a server's or storescu's log: Python logging levels,
# Orthanc/glog ("E1125 ..."), dcmtk ("E: ..." / "W: ...").
LOG_ISSUE = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b|^[EWF]\d{4} |^[EWF]: ")
# Orthanc logs its ordinary start-up/shutdown messages at W level: count E and F only.
ORTHANC_ISSUE = re.compile(r"^[EF]\d{4} ")


class BenchError(Exception):
    """A run could not be carried out (server did not start, send failed...)."""


class Interrupted(BaseException):
    """SIGTERM received: unwind like Ctrl-C so that everything is cleaned up."""


# --------------------------------------------------------------------------- processes


class Processes:
    """Every child process this script starts, so that all of them are ended on exit.

    Each child gets its own session (process group), which keeps a terminal's Ctrl-C
    away from it and lets us end a forking server's leftovers by that group's id.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, cmd: list[str], *, env: dict[str, str], out: IO[bytes], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log.debug("starting %s", shlex.join(cmd))
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` s; then end what is left of its group."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM for %.0f s: SIGKILL", proc.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        # The group id is the child's pid (start_new_session): forked workers it left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(self._procs):
            try:
                self.stop(proc, grace=5.0)
            except Exception:
                log.exception("could not stop pid %d", proc.pid)


PROCS = Processes()


def base_env() -> dict[str, str]:
    """The environment for every child: ours, TCP_NODELAY=1, no stray MINIPACS_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIPACS_")}
    env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def proc_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def log_issues(
    path: Path, pattern: re.Pattern[str] = LOG_ISSUE, limit: int = 8
) -> tuple[int, list[str]]:
    """How many warning/error lines a log holds, and the first `limit` of them."""
    if not path.exists():
        return 0, []
    hits = [
        line.rstrip()
        for line in path.read_text(errors="replace").splitlines()
        if pattern.search(line)
    ]
    return len(hits), hits[:limit]


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def count_files(folder: Path) -> int:
    total = 0
    for _root, _dirs, files in os.walk(folder):
        total += len(files)
    return total


# --------------------------------------------------------------------------- servers


class Server:
    """One fresh server instance on free loopback ports, in its own folder."""

    name = "?"
    aet = "?"
    queryable_how = "?"
    log_issue = LOG_ISSUE

    def __init__(self, workdir: Path, opts: argparse.Namespace) -> None:
        self.workdir = workdir
        self.opts = opts
        self.port = free_port()
        self.http_port: int | None = None
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return base_env()

    def start(self) -> None:
        cmd = self.command()
        log.info("%s: %s", self.name, shlex.join(cmd))
        self._log_file = self.log_path.open("wb")
        self.proc = PROCS.start(cmd, env=self.env(), out=self._log_file, cwd=self.workdir)
        self.wait_ready()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            code = self.proc.returncode if self.proc else None
            raise BenchError(
                f"{self.name} exited (status {code}); log tail:\n{tail(self.log_path)}"
            )

    def wait_ready(self) -> None:
        """The HTTP check (if any), then a C-ECHO that succeeds: the DICOM port is up."""
        deadline = time.monotonic() + self.opts.startup_timeout
        if self.http_port is not None:
            url = f"http://{HOST}:{self.http_port}{self.health_path()}"
            while True:
                self.check_alive()
                with contextlib.suppress(OSError):
                    if http_get(url)[0] == 200:
                        break
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name}: {url} not 200 after startup timeout")
                time.sleep(0.1)
        echo = ["echoscu", "-aet", CALLING_AET, "-aec", self.aet, "-to", "5", HOST]
        echo.append(str(self.port))
        while True:
            self.check_alive()
            result = subprocess.run(
                echo, env=base_env(), capture_output=True, timeout=30, check=False
            )
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name}: C-ECHO still failing: {result.stdout!r} {result.stderr!r}"
                )
            time.sleep(0.1)

    def health_path(self) -> str:
        return "/"

    def count_queryable(self) -> int:
        raise NotImplementedError

    def peak_rss_kib(self) -> tuple[int | None, int]:
        """Sum of VmHWM over the server process and its live descendants, and how many."""
        if not self.alive() or self.proc is None:
            return None, 0
        pids = proc_tree(self.proc.pid)
        values = [v for v in (vm_hwm_kib(pid) for pid in pids) if v is not None]
        return (sum(values) if values else None), len(values)

    def stop(self) -> None:
        if self.proc is not None:
            code = PROCS.stop(self.proc)
            log.info("%s: stopped (status %s)", self.name, code)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class Minipacs(Server):
    name = "minipacs"
    aet = "MINIPACS"
    queryable_how = "index.sqlite"

    def __init__(self, workdir: Path, opts: argparse.Namespace) -> None:
        super().__init__(workdir, opts)
        self.http_port = free_port()
        self.data = workdir / "data"
        self._db: sqlite3.Connection | None = None

    def command(self) -> list[str]:
        return [
            str(self.opts.minipacs),
            "serve",
            "--data",
            str(self.data),
            "--aet",
            self.aet,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            *shlex.split(self.opts.minipacs_args),
        ]

    def health_path(self) -> str:
        return "/healthz"

    def count_queryable(self) -> int:
        if self._db is None:
            index = self.data / "index.sqlite"
            if not index.exists():
                return 0
            self._db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(self._db.execute("SELECT count(*) FROM instance").fetchone()[0])
        except sqlite3.OperationalError as exc:  # table not created yet, or busy
            log.debug("index not readable yet: %s", exc)
            return 0

    def stop(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        super().stop()


class StoreScp(Server):
    name = "storescp"
    aet = "STORESCP"
    queryable_how = "files on disk"

    def __init__(self, workdir: Path, opts: argparse.Namespace) -> None:
        super().__init__(workdir, opts)
        self.out = workdir / "out"
        self.out.mkdir()

    def command(self) -> list[str]:
        # --fork: one child per association, so that parallel associations run in
        # parallel (the default single-process mode serves them one after another).
        # The default --storescp-args: +B writes the dataset bytes exactly as received,
        # +xa accepts every transfer syntax it knows, -pdu 131072 is its largest
        # receive PDU (this is the ceiling), -dhl skips reverse DNS look-ups.
        return [
            "storescp",
            "--fork",
            "-aet",
            self.aet,
            "-od",
            str(self.out),
            *shlex.split(self.opts.storescp_args),
            str(self.port),
        ]

    def count_queryable(self) -> int:
        return count_files(self.out)


class Orthanc(Server):
    name = "orthanc"
    aet = "ORTHANC"
    queryable_how = "REST /statistics"
    log_issue = ORTHANC_ISSUE

    def __init__(self, workdir: Path, opts: argparse.Namespace) -> None:
        super().__init__(workdir, opts)
        self.http_port = free_port()
        self.config_path = workdir / "orthanc.json"

    def config(self) -> dict[str, Any]:
        # Orthanc 1.10.1 (Debian 12) has no bind-address option: its DICOM and HTTP
        # servers listen on every interface; RemoteAccessAllowed=false makes the HTTP
        # server refuse other hosts. Everything not set here keeps Orthanc's defaults
        # (SyncStorageArea=true, StorageCompression=false, DicomThreadsCount=4,
        # MaximumPduLength=16384, no ingest transcoding).
        return {
            "Name": "minipacs-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "TemporaryDirectory": str(self.workdir / "tmp"),
            "Plugins": [],
            "HttpPort": self.http_port,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SaveJobs": False,
        }

    def command(self) -> list[str]:
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        return [str(self.opts.orthanc), str(self.config_path)]

    def health_path(self) -> str:
        return "/system"

    def count_queryable(self) -> int:
        try:
            status, body = http_get(f"http://{HOST}:{self.http_port}/statistics")
        except OSError as exc:
            log.debug("/statistics: %s", exc)
            return 0
        if status != 200:
            return 0
        return int(json.loads(body)["CountInstances"])


SERVER_CLASSES: dict[str, type[Server]] = {
    "minipacs": Minipacs,
    "storescp": StoreScp,
    "orthanc": Orthanc,
}


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    server: str
    associations: int
    count: int
    total_bytes: int
    ok: bool = False
    error: str | None = None
    send_s: float | None = None
    queryable_s: float | None = None
    queryable_how: str = ""
    stored: int | None = None
    peak_rss_mib: float | None = None
    rss_processes: int = 0
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


def chunks(items: list[Path], parts: int) -> list[list[Path]]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        if end > start:
            out.append(items[start:end])
        start = end
    return out


def send(server: Server, files: list[Path], associations: int, timeout: float) -> float:
    """Run `associations` storescu processes at once; return the wall time until all exit."""
    logs: list[tuple[Path, IO[bytes]]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        start = time.perf_counter()
        for index, part in enumerate(chunks(files, associations)):
            path = server.workdir / f"storescu-{index}.log"
            out = path.open("wb")
            logs.append((path, out))
            cmd = [
                "storescu",
                "-aet",
                CALLING_AET,
                "-aec",
                server.aet,
                HOST,
                str(server.port),
                *map(str, part),
            ]
            procs.append(PROCS.start(cmd, env=base_env(), out=out))
        deadline = start + timeout
        for proc in procs:
            remaining = deadline - time.perf_counter()
            try:
                proc.wait(timeout=max(remaining, 0.01))
            except subprocess.TimeoutExpired:
                raise BenchError(f"storescu did not finish within {timeout:.0f} s") from None
        elapsed = time.perf_counter() - start
        failed = [(proc, path) for proc, (path, _) in zip(procs, logs, strict=True)]
        failed = [(proc, path) for proc, path in failed if proc.returncode != 0]
        if failed:
            proc, path = failed[0]
            raise BenchError(
                f"{len(failed)} storescu exited non-zero (first: {proc.returncode}); "
                f"log tail:\n{tail(path)}"
            )
        return elapsed
    finally:
        for proc in procs:
            PROCS.stop(proc, grace=2.0)
        for _, out in logs:
            out.close()


def wait_queryable(server: Server, count: int, started: float, timeout: float) -> float | None:
    """Poll until `count` instances are queryable; seconds since `started`, or None."""
    deadline = time.perf_counter() + timeout
    seen = 0
    while time.perf_counter() < deadline:
        seen = server.count_queryable()
        if seen >= count:
            return time.perf_counter() - started
        server.check_alive()
        time.sleep(0.01)
    log.warning("%s: only %d of %d queryable after %.0f s", server.name, seen, count, timeout)
    return None


def measure(
    name: str, associations: int, files: list[Path], total_bytes: int, root: Path, opts: Any
) -> Run:
    run = Run(name, associations, len(files), total_bytes)
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-{associations}x-", dir=root))
    server = SERVER_CLASSES[name](workdir, opts)
    run.queryable_how = server.queryable_how
    try:
        server.start()
        log.info(
            "%s: ready on DICOM %d%s; sending %d instances over %d association(s)",
            name,
            server.port,
            f", HTTP {server.http_port}" if server.http_port else "",
            len(files),
            associations,
        )
        # The send starts at `started`; polling begins as soon as every storescu has
        # exited (a server answers Success only after storing, so nothing is missed).
        started = time.perf_counter()
        run.send_s = send(server, files, associations, opts.send_timeout)
        run.queryable_s = wait_queryable(server, len(files), started, opts.query_timeout)
        run.stored = server.count_queryable()
        kib, run.rss_processes = server.peak_rss_kib()
        run.peak_rss_mib = kib / 1024 if kib is not None else None
        run.ok = run.queryable_s is not None and run.stored == len(files)
        if not run.ok:
            run.error = f"{run.stored} of {len(files)} instances stored/queryable"
        log.info(
            "%s ×%d: %.2f s, %.1f inst/s, queryable at %s s, peak RSS %s MiB",
            name,
            associations,
            run.send_s,
            len(files) / run.send_s,
            f"{run.queryable_s:.2f}" if run.queryable_s is not None else "never",
            f"{run.peak_rss_mib:.1f}" if run.peak_rss_mib is not None else "?",
        )
    except BenchError as exc:
        run.error = str(exc)
        log.error("%s ×%d failed: %s", name, associations, exc)
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        log.exception("%s ×%d failed", name, associations)
    finally:
        server.stop()
        run.server_log_issues, run.server_log_sample = log_issues(server.log_path, server.log_issue)
        for path in sorted(workdir.glob("storescu-*.log")):
            hits, sample = log_issues(path)
            run.storescu_log_issues += hits
            run.storescu_log_sample.extend(sample[: 8 - len(run.storescu_log_sample)])
        if run.server_log_issues:
            log.warning(
                "%s ×%d: %d warning/error line(s) in its log, e.g.:\n  %s",
                name,
                associations,
                run.server_log_issues,
                "\n  ".join(run.server_log_sample),
            )
        if run.storescu_log_issues:
            log.warning(
                "%s ×%d: %d warning/error line(s) from storescu, e.g.:\n  %s",
                name,
                associations,
                run.storescu_log_issues,
                "\n  ".join(run.storescu_log_sample),
            )
        if opts.log_dir:
            opts.log_dir.mkdir(parents=True, exist_ok=True)
            for path in workdir.glob("*.log"):
                shutil.copy2(path, opts.log_dir / f"{name}-{associations}x-{path.name}")
        shutil.rmtree(workdir, ignore_errors=True)
    return run


# --------------------------------------------------------------------------- orthanc


def orthanc_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "Orthanc":
                    pids.append(int(entry.name))
    return pids


def ensure_orthanc(binary: Path) -> bool:
    """Orthanc is there, or installed now from Debian's package when we are root."""
    if binary.exists():
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log.warning("%s missing and not root (or no apt-get): skipping Orthanc", binary)
        return False
    log.info("installing Debian's orthanc package (apt-get update && apt-get install)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "orthanc"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            log.error("%s failed:\n%s", shlex.join(cmd), result.stdout[-2000:] + result.stderr)
            return False
    # The package may start its own service (port 4242/8042, /var/lib/orthanc): it is
    # not what we measure, and it would compete for the CPU. Stop it.
    if orthanc_processes():
        log.info("stopping the orthanc system service the package started")
        subprocess.run(["service", "orthanc", "stop"], capture_output=True, timeout=60)
    return binary.exists()


def orthanc_version(binary: Path) -> str:
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    first = (result.stdout or result.stderr).splitlines()
    return first[0].strip() if first else "?"


# --------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ".1f") -> str:
    return format(value, spec) if value is not None else "n/a"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(runs: list[Run], meta: dict[str, Any], parallel: int) -> tuple[str, list[dict]]:
    lines = [
        f"C-STORE ingest, {meta['count']} instances × {meta['instance_kb']:.0f} KB "
        f"({meta['total_mb']:.1f} MB), storescu TCP_NODELAY=1, 127.0.0.1, {meta['date']}",
        "",
        f"{'server':<9} {'assoc':>5} {'inst/s':>8} {'MB/s':>7} {'send s':>7} "
        f"{'queryable s':>11} {'peak RSS MiB':>12}  status",
    ]
    for run in runs:
        queryable = fmt(run.queryable_s, ".2f")
        if run.server == "storescp" and run.queryable_s is not None:
            queryable += "*"
        status = "ok" if run.ok else f"FAILED: {(run.error or '').splitlines()[0][:60]}"
        if run.server_log_issues:
            status += f" ({run.server_log_issues} log warnings/errors)"
        lines.append(
            f"{run.server:<9} {run.associations:>5} {fmt(run.inst_per_s):>8} "
            f"{fmt(run.mb_per_s):>7} {fmt(run.send_s, '.2f'):>7} {queryable:>11} "
            f"{fmt(run.peak_rss_mib):>12}  {status}"
        )
    if any(run.server == "storescp" for run in runs):
        lines.append("* storescp keeps no index: time until all files are on disk")
    rss_note = [r for r in runs if r.rss_processes > 1]
    if rss_note:
        lines.append("peak RSS sums VmHWM over the server's live process tree")

    by = {(run.server, run.associations): run for run in runs}

    def rate(server: str, assoc: int) -> float | None:
        run = by.get((server, assoc))
        return run.inst_per_s if run else None

    lines += ["", "ratios (instances/s):"]
    for assoc in sorted({1, parallel}):
        mp = rate("minipacs", assoc)
        lines.append(
            f"  {assoc} assoc: minipacs ÷ orthanc = {fmt(ratio(mp, rate('orthanc', assoc)), '.2f')}"
            f", minipacs ÷ storescp = {fmt(ratio(mp, rate('storescp', assoc)), '.2f')}"
        )

    targets: list[dict[str, Any]] = []

    def target(label: str, value: float | None, goal: float, higher_is_better: bool) -> None:
        if value is None:
            verdict = "n/a"
        elif higher_is_better:
            verdict = "PASS" if value >= goal else "FAIL"
        else:
            verdict = "PASS" if value <= goal else "FAIL"
        targets.append({"target": label, "value": value, "goal": goal, "verdict": verdict})

    target(
        "1 assoc: minipacs ≥ 1.0 × orthanc",
        ratio(rate("minipacs", 1), rate("orthanc", 1)),
        TARGET_VS_ORTHANC_1,
        True,
    )
    if parallel > 1:
        target(
            f"{parallel} assoc: minipacs ≥ 1.5 × orthanc",
            ratio(rate("minipacs", parallel), rate("orthanc", parallel)),
            TARGET_VS_ORTHANC_N,
            True,
        )
    for assoc in sorted({1, parallel}):
        target(
            f"{assoc} assoc: minipacs ≥ 0.5 × storescp",
            ratio(rate("minipacs", assoc), rate("storescp", assoc)),
            TARGET_VS_STORESCP,
            True,
        )
    rss = [r.peak_rss_mib for r in runs if r.server == "minipacs" and r.peak_rss_mib is not None]
    target("minipacs peak RSS ≤ 200 MiB", max(rss) if rss else None, TARGET_RSS_MIB, False)

    lines += ["", "targets:"]
    for t in targets:
        value = fmt(t["value"], ".1f" if "RSS" in t["target"] else ".2f")
        lines.append(f"  {t['target']:<36} {value:>7}  {t['verdict']}")
    return "\n".join(lines), targets


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=500, help="instances in the study")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each image")
    parser.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="comma-separated subset of " + ",".join(ALL_SERVERS),
    )
    parser.add_argument(
        "--parallel", type=int, default=4, help="associations (storescu processes) at once"
    )
    parser.add_argument(
        "--minipacs-args",
        default="",
        help="extra arguments for `minipacs serve`; use the = form: --minipacs-args=--no-fsync",
    )
    parser.add_argument(
        "--storescp-args",
        default="+B +xa -pdu 131072 -dhl",
        help="storescp options besides --fork, -aet and -od",
    )
    parser.add_argument(
        "--minipacs", type=Path, default=REPO / ".venv" / "bin" / "minipacs", help="executable"
    )
    parser.add_argument("--orthanc", type=Path, default=ORTHANC_BIN, help="Orthanc executable")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="also write the figures as JSON to PATH (stdout when no PATH is given)",
    )
    parser.add_argument(
        "--tmp",
        type=Path,
        default=None,
        help="parent of the temporary study and data folders; its disk is what is measured "
        "(None: the system temp folder)",
    )
    parser.add_argument("--log-dir", type=Path, help="keep every server and storescu log here")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--send-timeout", type=float, default=None, help="seconds per send (None: 60 + count / 2)"
    )
    parser.add_argument("--query-timeout", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--strict", action="store_true", help="exit 3 when a measured target is missed"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    opts = parser.parse_args(argv)
    servers = [s.strip() for s in opts.servers.split(",") if s.strip()]
    unknown = sorted(set(servers) - set(ALL_SERVERS))
    if unknown or not servers:
        parser.error(f"--servers: unknown {unknown}; choose from {','.join(ALL_SERVERS)}")
    opts.servers = [s for s in ALL_SERVERS if s in servers]
    if opts.count < 1 or opts.parallel < 1:
        parser.error("--count and --parallel must be ≥ 1")
    if opts.send_timeout is None:
        opts.send_timeout = 60.0 + opts.count / 2
    return opts


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(
        level="DEBUG" if opts.verbose else "INFO",
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    for tool in ("storescu", "echoscu") + (("storescp",) if "storescp" in opts.servers else ()):
        if shutil.which(tool) is None:
            log.error("%s not found: install dcmtk (apt-get install dcmtk)", tool)
            return 2
    if "minipacs" in opts.servers and not opts.minipacs.exists():
        log.error("%s not found: create the venv (./scripts/serve does)", opts.minipacs)
        return 2

    root: Path | None = None
    try:
        with sigterm_unwinds():
            if "orthanc" in opts.servers:
                if not ensure_orthanc(opts.orthanc):
                    opts.servers.remove("orthanc")
                else:
                    others = orthanc_processes()
                    if others:
                        log.warning(
                            "other Orthanc processes are running (pids %s): they are not "
                            "measured but share the CPU",
                            others,
                        )
            if not opts.servers:
                log.error("no server left to measure")
                return 2

            root = Path(tempfile.mkdtemp(prefix="minipacs-bench-", dir=opts.tmp))
            sys.path.insert(0, str(SCRIPTS))
            from make_study import make_study

            log.info("writing a %d-instance %d×%d study", opts.count, opts.size, opts.size)
            files = make_study(root / "study", opts.count, opts.size)
            total_bytes = sum(path.stat().st_size for path in files)
            meta: dict[str, Any] = {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "count": opts.count,
                "size": opts.size,
                "total_mb": total_bytes / MB,
                "instance_kb": total_bytes / len(files) / 1000,
                "parallel": opts.parallel,
                "minipacs_args": opts.minipacs_args,
                "storescp_args": opts.storescp_args,
                "cpus": os.cpu_count(),
                "tmp": str(root),
            }
            if "orthanc" in opts.servers:
                meta["orthanc_version"] = orthanc_version(opts.orthanc)

            runs: list[Run] = []
            for name in opts.servers:
                for assoc in sorted({1, opts.parallel}):
                    runs.append(measure(name, assoc, files, total_bytes, root, opts))

            table, targets = report(runs, meta, opts.parallel)
            print(table)
            if opts.json:
                payload = {
                    "meta": meta,
                    "runs": [run.as_dict() for run in runs],
                    "targets": targets,
                }
                text = json.dumps(payload, indent=2, ensure_ascii=False)
                if opts.json == "-":
                    print(text)
                else:
                    Path(opts.json).write_text(text + "\n")
                    log.info("figures written to %s", opts.json)
            sys.stdout.flush()
            if not all(run.ok for run in runs):
                return 1
            if opts.strict and any(t["verdict"] == "FAIL" for t in targets):
                return 3
            return 0
    except (KeyboardInterrupt, Interrupted):
        log.error("interrupted: cleaning up")
        return 130
    finally:
        PROCS.stop_all()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
