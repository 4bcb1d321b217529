"""Helpers shared by the benchmarks in this folder (ingest.py, query.py, ...).

Child processes in their own process groups, ended on exit; free loopback ports; the
three servers (minipacs, dcmtk storescp, Orthanc) started fresh in a folder of their
own and checked with a C-ECHO; storescu sends; log scanning; small formatting helpers.
Import it from a script in this folder (`from _common import ...`): running
`python scripts/bench/X.py` puts this folder first on sys.path.
"""

import argparse
import contextlib
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
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from typing import Any

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
HOST = "127.0.0.1"
CALLING_AET = "BENCHSCU"
ORTHANC_BIN = Path("/usr/sbin/Orthanc")

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
            *self.extra_args(),
        ]

    def extra_args(self) -> list[str]:
        """More `minipacs serve` arguments: `--minipacs-args` when the script has it."""
        return shlex.split(getattr(self.opts, "minipacs_args", "") or "")

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


ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def ensure_orthanc_plugin(path: Path, package: str) -> bool:
    """Debian's Orthanc plugin `path` is there, or `package` is installed now when we are
    root (apt-get install; the package lists are expected to be fresh: ensure_orthanc)."""
    if path.exists():
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log.warning("%s missing and not root (or no apt-get)", path)
        return False
    log.info("installing %s (apt-get install)", package)
    result = subprocess.run(
        ["apt-get", "install", "-y", "-q", package],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        log.warning("apt-get install %s failed: %s", package, result.stderr[-500:])
    return path.exists()


def dpkg_version(package: str) -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "?"


def orthanc_version(binary: Path) -> str:
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    first = (result.stdout or result.stderr).splitlines()
    return first[0].strip() if first else "?"


# --------------------------------------------------------------------------- misc


def fmt(value: float | None, spec: str = ".1f") -> str:
    return format(value, spec) if value is not None else "n/a"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


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


# -- shared by the benchmark scripts -------------------------------------------------

CODE_PACKAGES = ("pacs", "storage", "viewer")
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
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", *CODE_PACKAGES],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + ("+dirty" if dirty else "")


def write_json(payload: Any, dest: str) -> None:
    """The figures as JSON: on stdout for `-`, else into the file `dest`."""
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")
        log.info("figures written to %s", dest)


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (p50 = the median for odd counts)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
