"""The benchmark harness every scenario in this folder (ingest.py, query.py, ...) runs on.

Child processes, each in its own process group, all ended on exit, Ctrl-C or SIGTERM; the
servers (minipacs, dcmtk storescp, Orthanc), each fresh in its own folder on free loopback
ports and ready once a C-ECHO succeeds; minipacs run from a snapshot of its code; storescu
sends; one keep-alive HTTP client; latency statistics; and one report: aligned tables and
PASS/FAIL targets on stdout, the same figures as JSON with --json. `python
scripts/bench/X.py` puts this folder first on sys.path, so a scenario imports `harness`.
"""

import argparse
import contextlib
import http.client
import json
import logging
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import IO
from typing import Any

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))  # make_study.py, pgtemp.py, ports.py
from ports import free_port  # noqa: E402  (claimed across processes, as the tests' are)

MINIPACS = REPO / ".venv" / "bin" / "minipacs"
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CODE_PACKAGES = ("pacs", "storage", "viewer")
HOST = "127.0.0.1"
CALLING_AET = "BENCHSCU"
DICOM_JSON = "application/dicom+json"
STARTUP_TIMEOUT = 120.0
# Log lines worth a look: Python's levels and dcmtk's "E: "/"W: ". Orthanc logs its
# ordinary start-up and shutdown at W level, so only its E and F lines count.
LOG_ISSUE = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b|^[EW]: ")
ORTHANC_ISSUE = re.compile(r"^[EF]\d{4} ")
FIND_PENDING = re.compile(r"Find Response: \d+ \(Pending\)")
STORE_SUCCESS = re.compile(r"^I: Received Store Response \((Success|Warning)", re.MULTILINE)
# Command lines of work that would distort the figures: another benchmark or a test run.
OTHER_WORK = re.compile(r"scripts/bench/\w+\.py|\bpytest(\s|$)|scripts/test\b")


class BenchError(Exception):
    """A measurement could not be carried out: the run exits 1."""


class Unavailable(BenchError):
    """A tool, file or revision the run needs is missing. A benchmark installs nothing:
    it names what is missing and exits 2."""


class Interrupted(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so that everything is cleaned up."""


def require(tools: tuple[str, ...] = (), files: tuple[Path, ...] = (), hint: str = "") -> None:
    """Raise Unavailable naming the commands not on PATH and the files absent."""
    absent = [t for t in tools if shutil.which(t) is None]
    absent += [str(f) for f in files if not f.exists()]
    if absent:
        raise Unavailable(f"missing: {', '.join(absent)}" + (f" ({hint})" if hint else ""))


# --------------------------------------------------------------------------- processes


class Processes:
    """Every child process this run starts, so that all of them are ended on exit. Each
    gets its own session (process group): a terminal's Ctrl-C does not reach it, and a
    forking server's leftovers are ended by that group's id."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, cmd: list[str], env: dict[str, str], out: Any, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log.debug("starting %s", " ".join(cmd))
        io = {"stdin": subprocess.DEVNULL, "stdout": out, "stderr": subprocess.STDOUT}
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, **io)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 15.0) -> int | None:
        """SIGTERM, SIGKILL after `grace` seconds, then whatever is left of its group."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM for %.0f s: SIGKILL", proc.pid, grace)
                proc.kill()
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group id is the child's pid
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
    """The environment of every child: ours, TCP_NODELAY=1, no stray MINIPACS_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIPACS_")}
    env["TCP_NODELAY"] = "1"
    return env


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def count_files(folder: Path) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(folder))


# --------------------------------------------------------------------------- memory

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants, from /proc/PID/task/TID/children (cheap enough to
    read every few milliseconds)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue  # it ended
        tree.append(current)
        for task in tasks:
            with contextlib.suppress(OSError, ValueError):
                children = Path(f"/proc/{current}/task/{task}/children").read_text()
                todo.extend(map(int, children.split()))
    return tree


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` now (0 when it ended)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    except (OSError, IndexError, ValueError):
        return 0


class RssSampler:
    """The largest sum of VmRSS over a process tree, sampled every 50 ms in a thread, and
    the most processes seen at once. A sampled sum catches processes that come and go
    (minipacs' workers, storescp's child per association) while they live."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        pids = process_tree(self.pid)
        self.peak_kib = max(self.peak_kib, sum(map(rss_kib, pids)))
        self.processes = max(self.processes, len(pids))

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()


# --------------------------------------------------------------------------- servers


class Server:
    """One fresh server in its own folder on free loopback ports, ready once its HTTP
    health check (if any) answers 200 and a C-ECHO succeeds."""

    name = ""
    aet = ""
    health = ""  # an HTTP path that answers 200 once the server is up
    log_issue = LOG_ISSUE

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port() if self.health else 0
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return base_env()

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.http_port}{path}"

    def start(self) -> float:
        """Start it and wait until it is ready; the seconds that took."""
        started = time.perf_counter()
        with self.log_path.open("ab") as out:
            self.proc = PROCS.start(self.command(), self.env(), out, cwd=self.workdir)
        while not self.ready():
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited ({self.proc.returncode}):\n{tail(self.log_path)}"
                )
            if time.perf_counter() - started > STARTUP_TIMEOUT:
                raise BenchError(f"{self.name} not ready after {STARTUP_TIMEOUT:.0f} s")
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        log.info("%s ready in %.1f s on DICOM port %d", self.name, seconds, self.port)
        return seconds

    def ready(self) -> bool:
        with contextlib.suppress(OSError):
            if self.health and http_get(self.url(self.health))[0] != 200:
                return False
            echo = ["echoscu", "-aet", CALLING_AET, "-aec", self.aet, "-to", "5", HOST]
            echo.append(str(self.port))
            return subprocess.run(echo, env=base_env(), capture_output=True).returncode == 0
        return False

    def count_queryable(self) -> int:
        raise NotImplementedError

    def stop(self) -> int:
        """Stop it; how many lines of its log are worth a look (the first few are logged)."""
        if self.proc is None:
            return 0
        PROCS.stop(self.proc)
        self.proc = None
        lines = self.log_path.read_text("latin-1").splitlines()
        hits = [line[:200] for line in lines if self.log_issue.search(line)]
        if hits:
            sample = "\n  ".join(hits[:3])
            log.warning("%s: %d log line(s) worth a look, e.g.\n  %s", self.name, len(hits), sample)
        return len(hits)


class Minipacs(Server):
    """`minipacs serve` on `data` (default: a new folder), run from the code snapshot."""

    aet = "MINIPACS"
    health = "/healthz"

    def __init__(
        self,
        workdir: Path,
        data: Path | None = None,
        args: list[str] | None = None,
        name: str = "minipacs",
    ) -> None:
        self.name = name
        super().__init__(workdir)
        self.data = data or workdir / "data"
        self.args = args or []

    def command(self) -> list[str]:
        cmd = [str(MINIPACS), "serve", "--data", str(self.data), "--aet", self.aet, "--host", HOST]
        return [*cmd, "--port", str(self.port), "--http-port", str(self.http_port), *self.args]

    def env(self) -> dict[str, str]:
        return minipacs_env()

    def count_queryable(self) -> int:
        """Rows of its SQLite index, read-only (0 until the index is there)."""
        index = f"file:{self.data / 'index.sqlite'}?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(index, uri=True, timeout=1.0)) as db:
                return int(db.execute("SELECT count(*) FROM instance").fetchone()[0])
        except sqlite3.Error:
            return 0


class StoreScp(Server):
    """dcmtk's storescp, the ceiling: no index, no fsync. --fork serves each association
    in a child of its own; +B writes the bytes as received, +xa accepts every transfer
    syntax it knows, -pdu 131072 is its largest receive PDU, -dhl skips DNS look-ups."""

    name = "storescp"
    aet = "STORESCP"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.out = workdir / "out"
        self.out.mkdir()

    def command(self) -> list[str]:
        cmd = ["storescp", "--fork", "-aet", self.aet, "-od", str(self.out)]
        return [*cmd, "+B", "+xa", "-pdu", "131072", "-dhl", str(self.port)]

    def count_queryable(self) -> int:
        """The files it wrote (it keeps no index)."""
        return count_files(self.out)


class Orthanc(Server):
    """Debian's Orthanc with `plugins`, everything else at its defaults (fsync on, no
    compression, 4 DICOM threads). It answers C-FIND and C-MOVE only to the AEs it knows:
    ours and `peers`. Version 1.10.1 has no bind address: its ports listen on every
    interface, and RemoteAccessAllowed false makes its HTTP server refuse other hosts."""

    name = "orthanc"
    aet = "ORTHANC"
    health = "/system"
    log_issue = ORTHANC_ISSUE

    def __init__(
        self,
        workdir: Path,
        plugins: list[Path] | None = None,
        peers: dict[str, int] | None = None,
    ) -> None:
        super().__init__(workdir)
        known = {**(peers or {}), CALLING_AET: 104}  # the port of our AE is never used
        self.config = {
            "Name": "minipacs-bench",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "TemporaryDirectory": str(workdir / "tmp"),
            "Plugins": [str(p) for p in plugins or []],
            "HttpPort": self.http_port,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SaveJobs": False,
            "DicomModalities": {a: {"AET": a, "Host": HOST, "Port": p} for a, p in known.items()},
            # With the DICOMweb plugin: QIDO/WADO-RS at /dicom-web/, WADO-URI at /wado.
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "WadoRoot": "/wado"},
        }

    def command(self) -> list[str]:
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config, indent=2))
        return [str(ORTHANC), str(path)]

    def count_queryable(self) -> int:
        with contextlib.suppress(OSError, ValueError, KeyError):
            status, body = http_get(self.url("/statistics"))
            return int(json.loads(body)["CountInstances"]) if status == 200 else 0
        return 0


def orthanc_version() -> str:
    result = subprocess.run([str(ORTHANC), "--version"], capture_output=True, text=True)
    return "Orthanc " + (result.stdout or result.stderr or "?").split("\n")[0].split()[-1]


def poll(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """`check()` every `every` s until it answers something true: that; BenchError
    saying `what` did not happen once `timeout` s have passed."""
    deadline = time.perf_counter() + timeout
    while not (found := check()):
        if time.perf_counter() > deadline:
            raise BenchError(f"{what} not within {timeout:.0f} s")
        time.sleep(every)
    return found


def wait_queryable(server: Server, count: int, timeout: float | None = None) -> float:
    """Poll every 10 ms until the server reports `count` instances; perf_counter() then."""
    what = f"{server.name}: {count} instances queryable"
    poll(lambda: server.count_queryable() >= count, timeout or 60 + count / 10, what, 0.01)
    return time.perf_counter()


# --------------------------------------------------------------------------- minipacs code

_code: Path | None = None  # the snapshot every minipacs process of this run starts from


def git_commit() -> str:
    """HEAD's short hash, '+dirty' when minipacs' packages differ from it."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    status = [*git, "status", "--porcelain", "--", *CODE_PACKAGES]
    dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def snapshot_code(root: Path, rev: str | None) -> str:
    """Copy minipacs' packages (the working tree's, or those of `git archive REV`) into
    root/code, and run every minipacs process of this run from there, PYTHONPATH ahead of
    the editable install: edits to the working tree during a run cannot change the code
    measured halfway. Returns what was copied: a short hash."""
    global _code
    code = root / "code"
    git = ["git", "-C", str(REPO)]
    if rev is None:
        commit = git_commit()
        for package in CODE_PACKAGES:
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(REPO / package, code / package, ignore=ignore)
    else:
        resolve = [*git, "rev-parse", "--short", f"{rev}^{{commit}}"]
        resolved = subprocess.run(resolve, capture_output=True, text=True)
        if resolved.returncode != 0:
            raise Unavailable(f"--minipacs-rev {rev}: {resolved.stderr.strip()}")
        archive = [*git, "archive", "--format=tar", rev, *CODE_PACKAGES]
        tar = subprocess.run(archive, capture_output=True, check=True).stdout
        code.mkdir()
        subprocess.run(["tar", "-x", "-C", str(code)], input=tar, check=True)
        commit = resolved.stdout.strip() + " (git archive)"
    _code = code
    probe = [str(MINIPACS.parent / "python"), "-c", "import pacs; print(pacs.__file__)"]
    found = subprocess.run(probe, env=minipacs_env(), cwd=code, capture_output=True, text=True)
    found = found.stdout
    if not found.startswith(str(code)):
        raise BenchError(f"minipacs does not import the code snapshot but {found!r}")
    return commit


def minipacs_env() -> dict[str, str]:
    """The environment of minipacs processes: the code snapshot first on the path."""
    env = base_env()
    if _code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_code), env.get("PYTHONPATH")]))
    return env


def minipacs_import(data: Path, folders: list[Path]) -> float:
    """`minipacs import --no-fsync` of the folders; the wall time. Raises unless it exits 0."""
    cmd = [str(MINIPACS), "import", "--data", str(data), "--no-fsync", *map(str, folders)]
    path = data.parent / f"import-{data.name}.log"
    started = time.perf_counter()
    with path.open("wb") as out:
        proc = PROCS.start(cmd, minipacs_env(), out)
    try:
        if proc.wait(timeout=3600) != 0:
            raise BenchError(f"minipacs import exited {proc.returncode}:\n{tail(path)}")
    finally:
        PROCS.stop(proc)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- data


def make_study(folder: Path, count: int, size: int = 512, **kwargs: Any) -> list[Path]:
    """scripts/make_study.py's synthetic CT study: one series, files in instance order."""
    from make_study import make_study as write

    return write(folder, count, size, **kwargs)


@dataclass
class StudyFiles:
    """A one-series study on disk: its files in instance order, their size and UIDs."""

    files: list[Path]
    bytes: int
    patient_id: str
    study: str
    series: str
    sops: list[str]


def read_study(files: list[Path]) -> StudyFiles:
    from pydicom import dcmread

    tags = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
    heads = [dcmread(path, stop_before_pixels=True, specific_tags=tags) for path in files]
    first = heads[0]
    size = sum(path.stat().st_size for path in files)
    uids = first.StudyInstanceUID, first.SeriesInstanceUID, [h.SOPInstanceUID for h in heads]
    return StudyFiles(files, size, str(first.PatientID), *uids)


# --------------------------------------------------------------------------- sending


@dataclass
class Sent:
    """What a send did: its wall time and how many C-STOREs got Success or Warning."""

    seconds: float
    files: int
    success: int

    @property
    def failed(self) -> int:
        """The instances refused or never answered."""
        return self.files - self.success


def send(
    server: Server,
    files: list[Path],
    associations: int = 1,
    tag: str = "send",
    on_line: Callable[[str, float], None] | None = None,
) -> Sent:
    """`associations` storescu -v processes at once, each on a contiguous part of `files`:
    the wall time from starting the first to the exit of the last (storescu's start-up
    included, the same for every server), and the responses their logs hold. With
    `on_line`, the first storescu's output is handed to it line by line as it comes,
    with the time it was read."""
    n = len(files)
    parts = [
        files[n * i // associations : n * (i + 1) // associations] for i in range(associations)
    ]
    parts = [part for part in parts if part]
    logs = [server.workdir / f"storescu-{tag}-{i}.log" for i in range(len(parts))]
    timeout = 60 + n / 2
    procs: list[subprocess.Popen[bytes]] = []
    pump = None
    started = time.perf_counter()
    try:
        for part, path in zip(parts, logs, strict=True):
            cmd = ["storescu", "-v", "-aet", CALLING_AET, "-aec", server.aet, HOST]
            cmd += [str(server.port), *map(str, part)]
            with path.open("wb") as out:
                pipe = on_line is not None and not procs
                procs.append(PROCS.start(cmd, base_env(), subprocess.PIPE if pipe else out))
        if on_line is not None:
            args = (procs[0].stdout, logs[0], on_line)
            pump = threading.Thread(target=_pump, args=args, daemon=True)
            pump.start()
        for proc in procs:
            try:
                proc.wait(timeout=max(started + timeout - time.perf_counter(), 0.01))
            except subprocess.TimeoutExpired:
                raise BenchError(f"storescu did not finish within {timeout:.0f} s") from None
        seconds = time.perf_counter() - started
    finally:
        for proc in procs:
            PROCS.stop(proc, grace=2.0)
        if pump is not None:
            pump.join(timeout=5)
    success = sum(len(STORE_SUCCESS.findall(path.read_text("latin-1"))) for path in logs)
    return Sent(seconds, n, success)


def _pump(pipe: IO[bytes], path: Path, on_line: Callable[[str, float], None]) -> None:
    with path.open("wb") as out:
        for raw in iter(pipe.readline, b""):
            on_line(raw.decode("latin-1").rstrip(), time.perf_counter())
            out.write(raw)


def findscu(
    server: Server, keys: dict[str, str], model: str = "-S", count: bool = False
) -> tuple[float, int | None]:
    """One dcmtk findscu run (-S Study Root, -W Modality Worklist), start to exit, the
    association included: (seconds, answers when `count`). A counting run logs each
    answer (-v); the others print nothing (-q). Keys without a value are return keys."""
    cmd = ["findscu", model, "-aet", CALLING_AET, "-aec", server.aet, "-to", "60"]
    cmd += ["-v" if count else "-q", HOST, str(server.port)]
    for keyword, value in keys.items():
        cmd += ["-k", f"{keyword}={value}" if value else keyword]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    if done.returncode != 0 or count and "Final Find Response (Success)" not in output:
        raise BenchError(f"findscu on {server.name}: {output[-400:]}")
    return seconds, len(FIND_PENDING.findall(output)) if count else None


def movescu(server: Server, storescp: "StoreScp", study: str, instances: int) -> float:
    """C-MOVE of a study to storescp (its folder emptied first), movescu start to exit;
    the seconds. Raises unless every instance arrived."""
    shutil.rmtree(storescp.out)
    storescp.out.mkdir()
    cmd = ["movescu", "-S", "-aet", CALLING_AET, "-aec", server.aet, "-aem", storescp.aet]
    cmd += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    started = time.perf_counter()
    done = subprocess.run([*cmd, HOST, str(server.port)], env=base_env(), capture_output=True)
    seconds = time.perf_counter() - started
    moved = count_files(storescp.out)
    if done.returncode != 0 or moved != instances:
        raise BenchError(f"C-MOVE from {server.name}: {moved} of {instances} instances moved")
    return seconds


# --------------------------------------------------------------------------- HTTP


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes
    seconds: float  # from sending the request to the last byte of the answer


class Client:
    """One keep-alive HTTP/1.1 connection to a server; `prefix` goes before every path.
    Connecting is never timed: a connection the server closed is opened again before
    the clock starts, and a request that finds it dropped (Orthanc closes idle ones
    after a few seconds) is sent again once on a new one."""

    def __init__(self, port: int, prefix: str = "", timeout: float = 300.0) -> None:
        self.prefix = prefix
        self.conn = http.client.HTTPConnection(HOST, port, timeout=timeout)

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None
    ) -> Answer:
        try:
            return self._request(method, path, headers or {}, body)
        except (http.client.RemoteDisconnected, ConnectionError, http.client.CannotSendRequest):
            self.conn.close()
            return self._request(method, path, headers or {}, body)

    def _request(self, method: str, path: str, headers: dict[str, str], body: Any) -> Answer:
        if self.conn.sock is None:
            self.conn.connect()
        started = time.perf_counter()
        self.conn.request(method, self.prefix + path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        seconds = time.perf_counter() - started
        if response.will_close:
            self.conn.close()
        return Answer(response.status, response.getheader("Content-Type", ""), data, seconds)

    def get(self, path: str, accept: str = "*/*") -> Answer:
        """A GET that must succeed (200, or 204 for no match): BenchError otherwise."""
        answer = self.request("GET", path, {"Accept": accept})
        if answer.status not in (200, 204):
            raise BenchError(f"GET {path[:120]}: HTTP {answer.status} {answer.body[:160]!r}")
        return answer

    def search(self, path: str) -> tuple[float, int]:
        """A QIDO-RS or metadata GET: (seconds, items of its DICOM JSON)."""
        answer = self.get(path, DICOM_JSON)
        return answer.seconds, len(json.loads(answer.body)) if answer.body else 0

    def searcher(self, path: str) -> "Call":
        """A call for `interleaved`: the search of `path`, its items counted."""
        return lambda first: self.search(path)

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest rank: p50 of an odd count is the median."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def side_by_side(found: dict[str, "Latency"], answers: int | None = None) -> tuple[list, str]:
    """Two servers' timings of one request: [p50, p95 of each, ratio of the p50s], and
    "ok" or what failed: an error, or answer counts other than `answers` (if given)."""
    a, b = found.values()
    wrong = ", ".join(name for name, lat in found.items() if answers not in (None, lat.answers))
    failed = ", ".join(name for name, lat in found.items() if lat.error)
    check = f"wrong: {wrong}" if wrong else f"failed: {failed}" if failed else "ok"
    return [a.p50, a.p95, b.p50, b.p95, ratio(a.p50, b.p50)], check


@dataclass
class Latency:
    """Timings of one kind of request on one server, in ms, and how many answers it had."""

    runs_ms: list[float] = field(default_factory=list)
    answers: int | None = None
    error: str | None = None

    @property
    def p50(self) -> float | None:
        return percentile(self.runs_ms, 0.50)

    @property
    def p95(self) -> float | None:
        return percentile(self.runs_ms, 0.95)


# A call of one request or command: given whether to count its answers (the untimed
# first run), it returns (seconds, answers or None), and raises BenchError on failure.
Call = Callable[[bool], tuple[float, int | None]]


def interleaved(reps: int, calls: dict[str, Call]) -> dict[str, Latency]:
    """Each call once untimed (its answers counted; codecs and caches warmed), then `reps`
    timed rounds with the calls interleaved, so that background load hits every server
    alike. A call that fails is not run again; its error is kept."""
    out = {name: Latency() for name in calls}
    for rep in range(reps + 1):
        for name, call in calls.items():
            latency = out[name]
            if latency.error:
                continue
            try:
                seconds, answers = call(rep == 0)
            except (BenchError, OSError, http.client.HTTPException) as exc:
                latency.error = str(exc).splitlines()[0]
                log.error("%s: %s", name, exc)
                continue
            if rep == 0:
                latency.answers = answers
            else:
                latency.runs_ms.append(1000 * seconds)
    return out


# --------------------------------------------------------------------------- report


def cell(value: Any) -> str:
    """A figure as text: n/a for none, two decimals below 10, else one."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


class Report:
    """What a scenario prints on stdout: a title, aligned tables, notes, PASS/FAIL
    targets; with --json, the same tables (unformatted) and targets as JSON."""

    def __init__(self, title: str, opts: argparse.Namespace) -> None:
        self.opts = opts
        meta = opts.meta
        self.lines = [
            f"{title} — minipacs {meta['commit']}, {meta['date']}, {meta['cpus']} CPUs, {HOST}"
        ]
        self.tables: dict[str, dict[str, list[Any]]] = {}
        self.targets: list[dict[str, Any]] = []

    def table(self, title: str, header: list[str], rows: list[list[Any]]) -> None:
        """Left-aligned first column, the others right-aligned."""
        self.tables[title] = {"header": header, "rows": rows}
        text = [header] + [[cell(value) for value in row] for row in rows]
        text = [row + [""] * (len(header) - len(row)) for row in text]  # short rows end blank
        widths = [max(len(row[i]) for row in text) for i in range(len(header))]
        self.lines += ["", title]
        for row in text:
            cells = [c.rjust(w) for c, w in zip(row, widths, strict=True)]
            cells[0] = row[0].ljust(widths[0])
            self.lines.append("  " + "  ".join(cells).rstrip())

    def note(self, text: str) -> None:
        self.lines.append("  " + text)

    def target(self, label: str, value: float | None, goal: float, higher: bool = True) -> None:
        """`value` ≥ `goal` (≤ unless `higher`); n/a when it was not measured."""
        passed = value is not None and (value >= goal if higher else value <= goal)
        verdict = "n/a" if value is None else "PASS" if passed else "FAIL"
        goal_text = f"{'≥' if higher else '≤'} {goal:g}"
        self.targets.append(
            {"target": label, "value": value, "goal": goal_text, "verdict": verdict}
        )

    def finish(self, failed: bool = False) -> int:
        """Print it, write the JSON; the exit status: 1 when a measurement failed, 3 with
        --strict when a target is missed, else 0."""
        meta = self.opts.meta
        meta["load_avg_end"], meta["other_work_end"] = os.getloadavg(), other_work()
        if self.targets:
            rows = [list(t.values()) for t in self.targets]
            self.table("targets", ["target", "value", "goal", "verdict"], rows)
        if meta["other_work"] or meta["other_work_end"]:
            others = "; ".join(dict.fromkeys(meta["other_work"] + meta["other_work_end"]))
            self.lines += ["", f"WARNING: other benchmarks/tests ran beside this one: {others}"]
        print("\n".join(self.lines), flush=True)
        if self.opts.json:
            self.tables.pop("targets", None)  # they follow, with their goals
            figures = {"meta": meta, "tables": self.tables, "targets": self.targets}
            text = json.dumps(figures, indent=2, ensure_ascii=False, default=str)
            if self.opts.json == "-":
                print(text)
            else:
                Path(self.opts.json).write_text(text + "\n")
        if failed:
            return 1
        return 3 if self.opts.strict and any(t["verdict"] == "FAIL" for t in self.targets) else 0


# --------------------------------------------------------------------------- the run


def other_work() -> list[str]:
    """Other benchmarks or test runs on this machine: they would distort the figures."""
    mine, pid = set(), os.getpid()
    while pid > 1 and pid not in mine:  # this run and what started it (a shell, timeout)
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in mine:
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("latin-1")
                if OTHER_WORK.search(cmd):
                    found.append(f"{entry.name} {cmd.strip()[:100]}")
    return found


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


# A scenario's own options: flag → (default, help). The default's type parses a value;
# a list default takes a comma-separated list: of its strings (kept in its order), or
# of numbers of its items' type.
Options = dict[str, tuple[Any, str]]


def comma_list(default: list) -> Callable[[str], list]:
    def comma_separated(text: str) -> list:
        items = [item for item in text.split(",") if item]
        if not isinstance(default[0], str):
            return [type(default[0])(item) for item in items]
        if not items or set(items) - set(default):
            raise argparse.ArgumentTypeError(f"choose among {','.join(default)}")
        return [item for item in default if item in items]

    return comma_separated


def main(
    doc: str,
    options: Options,
    scenario: Callable[[argparse.Namespace, Path], int],
    argv: list[str] | None = None,
) -> int:
    """Parse the scenario's options and the common ones, then run `scenario(opts, root)`
    with root a new temporary folder; whatever happens, every child process is stopped
    and the folder deleted. The exit status is the scenario's, or 1 when a measurement
    failed, 2 when something it needs is missing, 130 when interrupted."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add = parser.add_argument
    for flag, (default, text) in options.items():
        kind = comma_list(default) if isinstance(default, list) else type(default)
        add(flag, type=kind, default=default, help=text)
    add("--json", nargs="?", const="-", metavar="PATH", help="also write the figures as JSON")
    add("--strict", action="store_true", help="exit 3 when a target is missed")
    add("--minipacs-rev", metavar="REV", help="run minipacs from `git archive REV`")
    add("--tmp", type=Path, help="where the temporary folder goes (its disk is measured)")
    add("--log-dir", type=Path, help="keep every server and tool log in this folder")
    add("-v", "--verbose", action="store_true", help="debug logging")
    opts = parser.parse_args(argv)
    level = "DEBUG" if opts.verbose else "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="minipacs-bench-", dir=opts.tmp))
    try:
        date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        opts.meta = {"date": date, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
        opts.meta["other_work"] = other_work()
        if opts.meta["other_work"]:
            log.warning("other benchmarks/tests are running: %s", opts.meta["other_work"])
        opts.meta["commit"] = snapshot_code(root, opts.minipacs_rev)
        return scenario(opts, root)
    except Unavailable as exc:
        log.error("%s", exc)
        return 2
    except BenchError as exc:
        log.error("%s", exc)
        return 1
    except (KeyboardInterrupt, Interrupted):
        log.error("interrupted: cleaning up")
        return 130
    finally:
        PROCS.stop_all()
        if opts.log_dir:
            opts.log_dir.mkdir(parents=True, exist_ok=True)
            for path in root.rglob("*.log"):
                shutil.copy2(path, opts.log_dir / "-".join(path.relative_to(root).parts))
        shutil.rmtree(root, ignore_errors=True)
