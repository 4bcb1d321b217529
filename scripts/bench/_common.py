"""The benchmark harness: what every scenario in this folder (ingest.py, query.py, ...) uses.

Child processes in their own process groups, ended on exit; the servers (minipacs, dcmtk
storescp, Orthanc) started fresh on free loopback ports and checked with a C-ECHO; the
minipacs code snapshot and `minipacs import`; storescu sends; a keep-alive HTTP client;
memory of a process tree; latency statistics, PASS/FAIL targets and the JSON figures.
A scenario imports it as `import _common as bench`: running `python scripts/bench/X.py`
puts this folder first on sys.path.
"""

import argparse
import contextlib
import http.client
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import IO
from typing import Any

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
HOST = "127.0.0.1"
CALLING_AET = "BENCHSCU"
ORTHANC_BIN = Path("/usr/sbin/Orthanc")
ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
ORTHANC_DICOMWEB = ORTHANC_PLUGIN_DIR / "libOrthancDicomWeb.so"
DICOM_JSON = "application/dicom+json"
CODE_PACKAGES = ("pacs", "storage", "viewer")

# Lines worth reporting in a server's or storescu's log: Python logging levels,
# Orthanc/glog ("E1125 ..."), dcmtk ("E: ..." / "W: ...").
LOG_ISSUE = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b|^[EWF]\d{4} |^[EWF]: ")
# Orthanc logs its ordinary start-up/shutdown messages at W level: count E and F only.
ORTHANC_ISSUE = re.compile(r"^[EF]\d{4} ")
# storescu -v: the file it is sending, and each C-STORE response.
SENDING = re.compile(r"^I: Sending file: (.+)$")
RESPONSE = re.compile(r"^I: Received Store Response \((\w+)")


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
        self, cmd: list[str], *, env: dict[str, str], out: Any, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log.debug("starting %s", shlex.join(cmd))
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
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


def missing(tools: tuple[str, ...] = (), files: tuple[Path, ...] = ()) -> list[str]:
    """The commands not on PATH and the files absent. A benchmark installs nothing: it
    names what is missing and exits 2 (`require`)."""
    return [t for t in tools if shutil.which(t) is None] + [str(f) for f in files if not f.exists()]


def require(tools: tuple[str, ...] = (), files: tuple[Path, ...] = (), hint: str = "") -> bool:
    """Log what is missing (with how to get it) and return False, or True when all is there."""
    absent = missing(tools, files)
    if absent:
        log.error("missing: %s%s", ", ".join(absent), f" ({hint})" if hint else "")
    return not absent


def log_issues(
    path: Path, pattern: re.Pattern[str] = LOG_ISSUE, limit: int = 8
) -> tuple[int, list[str]]:
    """How many warning/error lines a log holds, and the first `limit` of them."""
    if not path.exists():
        return 0, []
    text = path.read_text(errors="replace").splitlines()
    hits = [line.rstrip() for line in text if pattern.search(line)]
    return len(hits), hits[:limit]


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def count_files(folder: Path) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(folder))


# --------------------------------------------------------------------------- memory


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


def task_tree(pid: int) -> list[int]:
    """`pid` and its live descendants, from /proc/PID/task/TID/children (cheap enough to
    call every few ms); proc_tree() when the kernel lacks that file."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue  # gone
        tree.append(current)
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as file:
                    todo.extend(int(child) for child in file.read().split())
            except FileNotFoundError:
                if not os.path.exists(f"/proc/{current}/task/{task}"):
                    continue  # the thread ended
                return proc_tree(pid)  # no CONFIG_PROC_CHILDREN
            except OSError:
                continue
    return tree


PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def rss_kib(pid: int) -> int | None:
    """The resident set (VmRSS) of `pid` now, from /proc/PID/statm."""
    try:
        with open(f"/proc/{pid}/statm") as file:
            return int(file.read().split()[1]) * PAGE_KIB
    except (OSError, IndexError, ValueError):
        return None


def status_kib(pid: int, key: str) -> int | None:
    """A `VmRSS`/`VmHWM`-style line of /proc/PID/status, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def tree_kib(pid: int, key: str) -> int | None:
    """`key` of /proc/PID/status summed over `pid` and its live descendants."""
    known = [v for v in (status_kib(p, key) for p in task_tree(pid)) if v is not None]
    return sum(known) if known else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its live descendants so far."""
    ticks = 0
    for each in proc_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """The largest sum of VmRSS over a process tree, sampled every `interval` s in a
    thread (processes that come and go are caught while they live); at the end, the sum
    of VmHWM of the processes still alive, for comparison."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.max_processes = 0
        self.samples = 0
        self.samples_kib: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        values = [v for v in map(rss_kib, task_tree(self.pid)) if v is not None]
        self.samples += 1
        self.max_processes = max(self.max_processes, len(values))
        if values:
            self.samples_kib.append(sum(values))
        self.peak_kib = max(self.peak_kib, sum(values))

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def hwm_kib(self) -> int | None:
        return tree_kib(self.pid, "VmHWM")


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

    def tree_kib(self, key: str) -> int | None:
        """`key` (VmRSS, VmHWM) summed over the server process and its live descendants."""
        return tree_kib(self.proc.pid, key) if self.alive() and self.proc else None

    def peak_rss_kib(self) -> tuple[int | None, int]:
        """Sum of VmHWM over the server process and its live descendants, and how many."""
        if not self.alive() or self.proc is None:
            return None, 0
        values = [v for v in (status_kib(p, "VmHWM") for p in proc_tree(self.proc.pid)) if v]
        return (sum(values) if values else None), len(values)

    def stop(self) -> None:
        if self.proc is not None:
            code = PROCS.stop(self.proc)
            log.info("%s: stopped (status %s)", self.name, code)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class Minipacs(Server):
    """`minipacs serve` on `data` (default: a new folder), from the code snapshot if any."""

    name = "minipacs"
    aet = "MINIPACS"
    queryable_how = "index.sqlite"

    def __init__(
        self, workdir: Path, opts: argparse.Namespace, data: Path | None = None, args=()
    ) -> None:
        super().__init__(workdir, opts)
        self.http_port = free_port()
        self.data = data or workdir / "data"
        self.args = list(args)
        self._db: sqlite3.Connection | None = None

    def command(self) -> list[str]:
        return [
            str(self.opts.minipacs), "serve", "--data", str(self.data), "--aet", self.aet,
            "--host", HOST, "--port", str(self.port), "--http-port", str(self.http_port),
            *self.extra_args(),
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return minipacs_env(self.opts)

    def extra_args(self) -> list[str]:
        """More `minipacs serve` arguments: `args`, then `--minipacs-args` if the script has it."""
        return self.args + shlex.split(getattr(self.opts, "minipacs_args", "") or "")

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
        args = shlex.split(getattr(self.opts, "storescp_args", "+B +xa -pdu 131072 -dhl"))
        return ["storescp", "--fork", "-aet", self.aet, "-od", str(self.out), *args] + [
            str(self.port)
        ]

    def count_queryable(self) -> int:
        return count_files(self.out)


class Orthanc(Server):
    """Orthanc (Debian's package) with `plugins`; `peers` are the AEs it knows (it answers
    C-FIND and C-MOVE only to known AEs: our calling AE is always one)."""

    name = "orthanc"
    aet = "ORTHANC"
    queryable_how = "REST /statistics"
    log_issue = ORTHANC_ISSUE

    def __init__(
        self,
        workdir: Path,
        opts: argparse.Namespace,
        plugins: list[Path] | None = None,
        peers: dict[str, int] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(workdir, opts)
        self.http_port = free_port()
        self.config_path = workdir / "orthanc.json"
        self.plugins = list(plugins or [])
        self.peers = peers
        self.extra = extra or {}

    def config(self) -> dict[str, Any]:
        # Orthanc 1.10.1 (Debian 12) has no bind-address option: its DICOM and HTTP
        # servers listen on every interface; RemoteAccessAllowed=false makes the HTTP
        # server refuse other hosts. Everything not set here keeps Orthanc's defaults
        # (SyncStorageArea=true, StorageCompression=false, DicomThreadsCount=4,
        # MaximumPduLength=16384, no ingest transcoding).
        config: dict[str, Any] = {
            "Name": "minipacs-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "TemporaryDirectory": str(self.workdir / "tmp"),
            "Plugins": [str(p) for p in self.plugins],
            "HttpPort": self.http_port,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SaveJobs": False,
        }
        if any("DicomWeb" in p.name for p in self.plugins):
            # QIDO/WADO-RS at /dicom-web/, WADO-URI at /wado.
            config["DicomWeb"] = {
                "Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"
            }  # fmt: skip
        if self.peers is not None:  # its port is never used for our calling AE
            known = {**self.peers, CALLING_AET: 104}
            config["DicomModalities"] = {
                aet: {"AET": aet, "Host": HOST, "Port": port} for aet, port in known.items()
            }
        return {**config, **self.extra}

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


def orthanc_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "Orthanc":
                    pids.append(int(entry.name))
    return pids


def orthanc_version(binary: Path) -> str:
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    first = (result.stdout or result.stderr).splitlines()
    return first[0].strip() if first else "?"


def dpkg_version(package: str) -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True
    )
    return result.stdout.strip() or "?"


def warn_other_orthancs() -> None:
    others = orthanc_processes()
    if others:
        log.warning(
            "other Orthanc processes are running (pids %s): they are not measured but share "
            "the CPU",
            others,
        )


# --------------------------------------------------------------------------- minipacs code


def snapshot_code(root: Path, opts: argparse.Namespace, rev: str | None = None) -> str:
    """Copy minipacs' packages into `root/code` and run every minipacs process of this run
    from there (PYTHONPATH ahead of the editable install), so that edits to the working
    tree during a run cannot change the code measured halfway. With `rev`, the packages are
    `git archive REV`. Returns what was copied: a short hash ('+dirty' for a working tree
    that differs from HEAD)."""
    code = root / "code"
    code.mkdir()
    if rev is None:
        commit = git_commit()
        for package in CODE_PACKAGES:
            if (REPO / package).is_dir():
                ignore = shutil.ignore_patterns("__pycache__")
                shutil.copytree(REPO / package, code / package, ignore=ignore)
    else:
        git = ["git", "-C", str(REPO)]
        resolved = subprocess.run(
            [*git, "rev-parse", "--short", f"{rev}^{{commit}}"], capture_output=True, text=True
        )
        if resolved.returncode != 0:
            raise BenchError(f"--minipacs-rev {rev}: {resolved.stderr.strip()}")
        tar = subprocess.run(
            [*git, "archive", "--format=tar", rev, *CODE_PACKAGES], capture_output=True
        )
        if tar.returncode != 0:
            raise BenchError(f"git archive {rev}: {tar.stderr.decode(errors='replace')}")
        subprocess.run(["tar", "-x", "-C", str(code)], input=tar.stdout, check=True)
        commit = resolved.stdout.strip()
    opts.code = code
    probe = subprocess.run(
        [str(opts.minipacs.parent / "python"), "-c", "import pacs; print(pacs.__file__)"],
        cwd=code, env=minipacs_env(opts), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if not probe.stdout.strip().startswith(str(code)):
        raise BenchError(f"the code snapshot is not what minipacs imports: {probe.stdout!r}")
    log.info("minipacs code %s copied to %s", commit, code)
    return commit


def minipacs_env(opts: argparse.Namespace) -> dict[str, str]:
    """The environment of minipacs processes: the code snapshot first on the path."""
    env = base_env()
    code = getattr(opts, "code", None)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    return env


def minipacs_import(
    opts: argparse.Namespace,
    data: Path,
    folders: list[Path],
    log_path: Path,
    parallel: int = 1,
    timeout: float = 3600.0,
) -> float:
    """`minipacs import --no-fsync` of the folders (split over `parallel` processes at once);
    the wall time. Raises unless every process exits 0."""
    groups = [g for g in (folders[n::parallel] for n in range(parallel)) if g]
    procs: list[tuple[Any, IO[bytes], Path]] = []
    log.info("minipacs import of %d folder(s) into %s", len(folders), data)
    started = time.perf_counter()
    try:
        for number, group in enumerate(groups):
            path = log_path.with_name(f"{log_path.stem}-{number}{log_path.suffix}")
            out = path.open("wb")
            cmd = [str(opts.minipacs), "import", "--data", str(data), "--no-fsync", "--json"]
            cmd += [str(f) for f in group]
            procs.append((PROCS.start(cmd, env=minipacs_env(opts), out=out), out, path))
        for proc, _out, path in procs:
            try:
                code = proc.wait(timeout=max(0.1, started + timeout - time.perf_counter()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"minipacs import did not finish within {timeout:.0f} s") from None
            if code != 0:
                raise BenchError(f"minipacs import exited {code}:\n{tail(path)}")
        return time.perf_counter() - started
    finally:
        for proc, log_file, _path in procs:
            PROCS.stop(proc, grace=5.0)
            log_file.close()


# --------------------------------------------------------------------------- data


def make_study(folder: Path, count: int, size: int, **kwargs: Any) -> list[Path]:
    """scripts/make_study.py's synthetic CT study: one series, files in instance order."""
    if str(SCRIPTS) not in sys.path:  # make_study.py and make_studies() live there
        sys.path.insert(0, str(SCRIPTS))
    from make_study import make_study as write

    return write(folder, count, size, **kwargs)


@dataclass
class StudyFiles:
    """A one-series study on disk: its files (in instance order), size and UIDs."""

    files: list[Path]
    total_bytes: int
    study: str = ""
    series: str = ""
    patient_id: str = ""
    sops: list[str] = field(default_factory=list)  # per file
    rows: int = 0
    columns: int = 0


def read_study(files: list[Path], with_uids: bool = True) -> StudyFiles:
    """The files' total size and, `with_uids`, their UIDs (headers only)."""
    study = StudyFiles(files, sum(path.stat().st_size for path in files))
    if not with_uids:
        return study
    from pydicom import dcmread

    tags = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
    for path in files:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=[*tags, "Rows", "Columns"])
        study.patient_id, study.study, study.series = (str(ds.get(t)) for t in tags[:3])
        study.sops.append(str(ds.SOPInstanceUID))
        study.rows, study.columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    return study


# --------------------------------------------------------------------------- sending


def chunks(items: list[Path], parts: int) -> list[list[Path]]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        if end > start:
            out.append(items[start:end])
        start = end
    return out


@dataclass
class Sent:
    """What a send did: wall time, and the C-STORE responses storescu -v logged."""

    seconds: float = 0.0
    files: int = 0
    success: int = 0  # Success or Warning responses
    failure: int = 0  # other responses
    bad_exits: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> int:
        """Instances without a Success/Warning response (refused or never answered)."""
        return self.files - self.success


def storescu(server: Server, files: list[Path]) -> list[str]:
    return ["storescu", "-v", "-aet", CALLING_AET, "-aec", server.aet, HOST, str(server.port)] + [
        str(f) for f in files
    ]


def count_responses(path: Path) -> tuple[int, int]:
    success = failure = 0
    with path.open(errors="replace") as file:
        for line in file:
            match = RESPONSE.match(line)
            if match and match.group(1) in ("Success", "Warning"):
                success += 1
            elif match:
                failure += 1
    return success, failure


class Watch:
    """Reads one storescu's -v output as it comes: when each file's Success arrived."""

    def __init__(self, pipe: IO[bytes], out: IO[bytes]) -> None:
        self.pipe = pipe
        self.out = out
        self.success_at: dict[str, float] = {}  # file path → perf_counter()
        self.thread = threading.Thread(target=self._run, name="storescu-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        current: str | None = None
        for raw in iter(self.pipe.readline, b""):
            now = time.perf_counter()
            self.out.write(raw)
            line = raw.decode(errors="replace").rstrip("\r\n")
            sending = SENDING.match(line)
            if sending:
                current = sending.group(1)
                continue
            response = RESPONSE.match(line)
            if response and current is not None:
                if response.group(1) in ("Success", "Warning"):
                    self.success_at[current] = now
                current = None


def send_parts(
    server: Server, parts: list[list[Path]], timeout: float, tag: str, watch: bool = False
) -> tuple[Sent, Watch | None]:
    """One storescu per part, all at once; the wall time until the last exits. With
    `watch` (one part), its output is read as it comes (Success times)."""
    sent = Sent(files=sum(len(part) for part in parts))
    outs: list[IO[bytes]] = []
    procs: list[subprocess.Popen[bytes]] = []
    reader: Watch | None = None
    try:
        start = time.perf_counter()
        for index, part in enumerate(parts):
            path = server.workdir / f"storescu-{tag}-{index}.log"
            out = path.open("wb")
            outs.append(out)
            sent.logs.append(path)
            if watch:
                proc = PROCS.start(storescu(server, part), env=base_env(), out=subprocess.PIPE)
                assert proc.stdout is not None
                reader = Watch(proc.stdout, out)
            else:
                proc = PROCS.start(storescu(server, part), env=base_env(), out=out)
            procs.append(proc)
        deadline = start + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.perf_counter(), 0.01))
            except subprocess.TimeoutExpired:
                raise BenchError(f"storescu did not finish within {timeout:.0f} s") from None
        sent.seconds = time.perf_counter() - start
        sent.bad_exits = sum(proc.returncode != 0 for proc in procs)
    finally:
        for proc in procs:
            PROCS.stop(proc, grace=2.0)
        if reader is not None:
            reader.thread.join(timeout=5)
            reader.pipe.close()
        for log_file in outs:
            log_file.close()
    for path in sent.logs:
        success, failure = count_responses(path)
        sent.success += success
        sent.failure += failure
    if sent.bad_exits:
        log.warning(
            "%s %s: %d storescu exited non-zero; log tail:\n%s",
            server.name, tag, sent.bad_exits, tail(sent.logs[0], 8),
        )  # fmt: skip
    return sent, reader


def send(server: Server, files: list[Path], associations: int, timeout: float) -> float:
    """Run `associations` storescu processes at once; the wall time until all exit. Raises
    unless every storescu exits 0."""
    sent, _ = send_parts(server, chunks(files, associations), timeout, "send")
    if sent.bad_exits:
        raise BenchError(f"{sent.bad_exits} storescu exited non-zero: {tail(sent.logs[0])}")
    return sent.seconds


# --------------------------------------------------------------------------- HTTP


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)


class Client:
    """One keep-alive HTTP/1.1 connection to a server; `prefix` goes before every path.
    Connecting is never timed: when the server has closed the connection, a new one is
    opened before the clock starts. Counted: `closes` (the answer said `Connection: close`
    or had no length) and `drops` (found closed when reused: Orthanc closes idle
    connections after a few seconds)."""

    def __init__(self, port: int, timeout: float, prefix: str = "") -> None:
        self.prefix = prefix
        self.conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        self.closes = 0
        self.drops = 0

    @property
    def reconnects(self) -> int:
        return self.closes + self.drops

    def request(self, method: str, path: str, headers: dict[str, str], body: Any = None) -> Answer:
        """Timed from sending the request to the last byte of the answer. A request whose
        connection turns out dropped is sent again once on a new one (STOW-RS too: the
        same instances again are stored once)."""
        for attempt in (1, 2):
            try:
                if self.conn.sock is None:
                    self.conn.connect()
                start = time.perf_counter()
                self.conn.request(method, self.prefix + path, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                elapsed = time.perf_counter() - start
                if response.will_close:
                    self.conn.close()
                    self.closes += 1
                content_type = response.getheader("Content-Type", "")
                headers_in = {k.lower(): v for k, v in response.getheaders()}
                return Answer(response.status, content_type, data, elapsed, headers_in)
            except (http.client.RemoteDisconnected, ConnectionError, http.client.CannotSendRequest):
                self.conn.close()
                self.drops += 1
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def get_json(self, path: str) -> tuple[Answer, list[dict[str, Any]] | None]:
        """A QIDO/metadata GET; the DICOM JSON array (204 No Content: empty), or None."""
        answer = self.request("GET", path, {"Accept": DICOM_JSON})
        if answer.status == 204:
            return answer, []
        if answer.status != 200:
            return answer, None
        try:
            value = json.loads(answer.body)
        except ValueError:
            return answer, None
        return answer, value if isinstance(value, list) else None

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class QuerySpec:
    """One search, for C-FIND (level and keys; '' = a return key) or QIDO-RS (`qido_path`),
    and how many answers it must have when that is known."""

    key: str  # short id
    label: str
    level: str  # STUDY, SERIES, IMAGE
    keys: tuple[tuple[str, str], ...]  # (keyword, value)
    expected: int | None = None

    def qido_path(self) -> str:
        """The QIDO-RS resource: matching values of a STUDY search as query parameters; a
        SERIES or IMAGE search in its study (and series) path."""
        match = {k: v for k, v in self.keys if v}
        if self.level == "STUDY":
            return "/studies?" + "&".join(f"{k}={v}" for k, v in match.items())
        path = f"/studies/{match['StudyInstanceUID']}/series"
        if self.level == "IMAGE":
            path += f"/{match['SeriesInstanceUID']}/instances"
        return path


@dataclass
class Latency:
    """One request kind on one server (by one client): timings in ms, answers, sizes."""

    runs_ms: list[float] = field(default_factory=list)
    answers: int | None = None
    bytes: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def p50(self) -> float | None:
        return statistics.median(self.runs_ms) if self.runs_ms else None

    @property
    def p95(self) -> float | None:
        return percentile(self.runs_ms, 0.95)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(p50_ms=self.p50, p95_ms=self.p95, runs_ms=[round(v, 3) for v in self.runs_ms])
        return data


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (p50 = the median for odd counts)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def fmt(value: float | None, spec: str = ".1f") -> str:
    return format(value, spec) if value is not None else "n/a"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def verdict(value: float | bool | None, goal: float | None = None, higher: bool = True) -> str:
    """PASS or FAIL of `value` against `goal` (≥ when `higher`, else ≤), or of a boolean;
    n/a when not measured."""
    if value is None:
        return "n/a"
    if goal is not None:
        value = value >= goal if higher else value <= goal
    return "PASS" if value else "FAIL"


def write_json(payload: Any, dest: str | Path) -> None:
    """The figures as JSON: on stdout for `-`, else into the file `dest`."""
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    if str(dest) == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")
        log.info("figures written to %s", dest)


# --------------------------------------------------------------------------- the run


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    startup: float,
    orthanc: bool = True,
    folders: bool = True,
    strict: bool = True,
) -> None:
    """The options every scenario has alike: the executables, --json, the temporary and log
    folders, --startup-timeout, --strict and -v."""
    default = REPO / ".venv" / "bin" / "minipacs"
    parser.add_argument("--minipacs", type=Path, default=default, help="executable")
    if orthanc:
        parser.add_argument("--orthanc", type=Path, default=ORTHANC_BIN, help="executable")
    text = "also write the figures as JSON to PATH (stdout when no PATH is given)"
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH", help=text)
    if folders:
        text = "parent of the temporary folder, whose disk is measured (default: the system's)"
        parser.add_argument("--tmp", type=Path, default=None, help=text)
        parser.add_argument("--log-dir", type=Path, help="keep every server and tool log here")
    parser.add_argument("--startup-timeout", type=float, default=startup, help="seconds")
    if strict:
        text = "exit 3 when a measured target is missed"
        parser.add_argument("--strict", action="store_true", help=text)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level="DEBUG" if verbose else "INFO",
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
    )


# Command lines of work that would distort the figures: another benchmark or test run.
OTHER_WORK = re.compile(r"scripts/bench/\w+\.py|pytest|scripts/test\b")


def other_work() -> list[str]:
    """Other benchmarks or test runs on this machine (they would distort the figures)."""
    found = []
    mine = _ancestors(os.getpid())  # this run and what started it (timeout, a shell)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        with contextlib.suppress(OSError):
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if OTHER_WORK.search(cmd):
                found.append(f"{entry.name} {cmd.strip()[:100]}")
    return found


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def wait_for_quiet(seconds: float) -> list[str]:
    """Wait (polling every 20 s) until no other benchmark or test runs, at most `seconds`."""
    deadline = time.monotonic() + seconds
    busy = other_work()
    while busy and time.monotonic() < deadline:
        log.info("waiting: other benchmarks/tests running: %s", "; ".join(busy))
        time.sleep(20)
        busy = other_work()
    return busy


def git_commit() -> str:
    """HEAD's short hash, '+dirty' when minipacs' packages differ from it."""
    git = ["git", "-C", str(REPO)]
    try:
        run = {"capture_output": True, "text": True, "timeout": 10, "check": True}
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], **run).stdout.strip()  # type: ignore[call-overload]
        dirty = subprocess.run(  # type: ignore[call-overload]
            [*git, "status", "--porcelain", "--", *CODE_PACKAGES], **run
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + ("+dirty" if dirty else "")
