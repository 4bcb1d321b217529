"""Fixtures: real `minipacs serve` processes on free loopback ports, and real clients."""

import compileall
import contextlib
import os
import pickle
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
CHARSET_FILES = TEST_FILES.parent / "charset_files"
sys.path.insert(0, str(ROOT / "scripts"))

import pgtemp  # noqa: E402  (from scripts/)
import s3temp  # noqa: E402  (from scripts/)
from ports import free_port  # noqa: E402,F401  (from scripts/; tests import it from here)

from storage.engine import open_database  # noqa: E402

ENGINES = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile minipacs once for the run when Python is told not to write bytecode
    (PYTHONDONTWRITEBYTECODE, set in many CI containers): otherwise every Python process
    the tests start (a server is three: the command, the server, a DICOM worker) compiles
    each module of ours it imports again, ~0.1 CPU-s a process. A module edited since is
    compiled again in memory, as without this; the files are written atomically, so xdist
    workers doing it at once do not clash."""
    if sys.flags.dont_write_bytecode:
        for package in ("pacs", "storage", "viewer"):
            compileall.compile_dir(ROOT / package, quiet=1)


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Return once a peer we started accepts connections on `port` (instead of sleeping
    for a while and hoping it listens)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def storescp(port: int, out: Path, *args: str) -> subprocess.Popen:
    """dcmtk storescp (`args` before the port, e.g. "-aet", "DEST") writing what it
    receives into `out`, returned once it listens; the caller terminates it."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["storescp", *args, "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    wait_listening(port, proc)
    return proc


class Server:
    """The server process `minipacs serve` becomes (pacs.boot, started as the command starts
    it); its output goes to `log_path`."""

    def __init__(
        self,
        data: Path,
        *args: str,
        env: dict[str, str] | None = None,
        index: str = "",
        ca: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """`ca`: the web side speaks HTTPS with a certificate this CA signed. `host`: another
        loopback address (127.0.0.2) is "beyond loopback" to minipacs."""
        self.data = data
        self.host = host
        self.ca = ca
        self.ssl_context = ssl.create_default_context(cafile=ca) if ca else None
        self.index = index
        self.args = (*args, "--index", index) if index else args
        if host != "127.0.0.1":
            self.args = (*self.args, "--host", host)
        self.env = env
        self.port = free_port()
        self.http_port = free_port()
        self.log_path = data.parent / f"{data.name}-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Server":
        """What `minipacs serve ARGS` does, minus a Python start of its own (~0.5 CPU-s, a
        third of a server's start): the serve command's options parsed by the command, the
        settings loaded as it loads them, then the server process it would exec into, the
        settings pickled on its stdin (pacs.boot). test_serve runs the command itself."""
        from pacs import boot
        from pacs import config as settings
        from pacs.cli.archive import serve

        args = ["--data", str(self.data), "--port", str(self.port)]
        args += ["--http-port", str(self.http_port), *self.args]
        # Tests check the index right after a send: releases wait for the indexer here.
        env = {**os.environ, "MINIPACS_INDEX_WAIT": "30", **(self.env or {})}
        flags = serve.make_context("serve", args).params
        config = settings.load(flags.pop("config_file"), env, flags)
        command = boot.command("pacs.server", config.index, storage=config.storage)
        with open(self.log_path, "ab") as log, tempfile.TemporaryFile() as stdin:
            stdin.write(pickle.dumps(config))
            stdin.seek(0)
            self.proc = subprocess.Popen(
                command, stdin=stdin, stderr=log, stdout=log, cwd=ROOT, env=env
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()  # not left running for a later test's Popen.__del__ to warn about
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(
                    f"{self.url}/healthz", timeout=1, context=self.ssl_context
                ) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not answer within {timeout}s:\n{self.log()}")

    def rows(self, sql: str, *args) -> list[tuple]:
        return index_rows(self.data, sql, *args, index=self.index)

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.host}:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def postgres() -> Iterator[pgtemp.Cluster]:
    """A PostgreSQL cluster for the whole run; each test that asks gets its own database."""
    cluster = pgtemp.Cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def s3store() -> Iterator[s3temp.Store]:
    """An S3-compatible store (SeaweedFS) for the whole run; each module that asks makes
    its own bucket (`s3store.bucket()`), and may stop and start it (store down, back)."""
    store = s3temp.Store()
    yield store
    store.close()


def _index_url(request) -> str:
    return request.getfixturevalue("postgres").database() if request.param == "postgresql" else ""


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    """The index URL of each engine in turn ('' = SQLite): a test or module that uses this
    fixture (`pytestmark = pytest.mark.usefixtures("engine")`) runs on both."""
    return _index_url(request)


@pytest.fixture(scope="module", params=ENGINES)
def module_engine(request) -> str:
    """`engine` for module-scoped fixtures (one database per module and engine)."""
    return _index_url(request)


@pytest.fixture
def start_server(tmp_path: Path, request) -> Iterator:
    """Factory: start_server(*flags, data=...) → a running Server, stopped at teardown; on
    the test's `engine` when it has one."""
    servers: list[Server] = []
    index = request.getfixturevalue("engine") if "engine" in request.fixturenames else ""

    def start(
        *args: str,
        data: Path | None = None,
        env: dict[str, str] | None = None,
        index: str = index,
        ca: Path | None = None,
        host: str = "127.0.0.1",
    ) -> Server:
        server = Server(data or tmp_path / "data", *args, env=env, index=index, ca=ca, host=host)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def server(start_server) -> Server:
    return start_server()


def index_rows(data: Path, sql: str, *args, index: str = "") -> list[tuple]:
    """Rows of a query on an archive's index, on either engine (`?` placeholders)."""
    database = open_database(index, data, fsync=False)
    try:
        with database.connection_context():
            cursor = database.execute_sql(sql.replace("?", database.param), args)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
    finally:
        if hasattr(database, "close_all"):
            database.close_all()


def wait_until(check, seconds: float = 30.0):
    """Poll `check()` until it returns something true or `seconds` pass (never a fixed
    sleep); its last answer, for the caller to assert on."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    return check()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection within `seconds` (we send nothing)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def running(pid: int) -> bool:
    """Whether a process still runs (a zombie has exited; only its reaping is missing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> set[int]:
    """The child processes of a process (of any of its threads)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def add_user(data: Path, name: str, role: str, password: str, index: str = "") -> str:
    """A web user added to an archive's index, and a bearer token of theirs (90 days): what
    `minipacs user add` and `user token` do (storage.users through Archive.accounts), in
    this process, for tests whose subject is not the command (two Python starts fewer)."""
    from storage import Archive
    from storage import users

    with Archive(data, fsync=False, index_url=index) as archive:
        archive.accounts(users.add, name, role, password, write=True)
        return archive.accounts(users.issue_token, name, 90, write=True)[0]


def import_files(data: Path, *paths: Path, index: str = "") -> None:
    """Files, and folders walked, imported into an archive by Archive.import_file (what
    `minipacs import` calls for each), in this process: for fixtures that only need a
    filled archive (test_maintenance runs the command). A file refused raises."""
    from storage import Archive

    files = [
        found
        for path in paths
        for found in (
            sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        )
    ]
    with Archive(data, fsync=False, index_url=index) as archive:
        for path in files:
            archive.import_file(path)


def index_args(index: str) -> list[str]:
    """`--index URL` for a minipacs command on a PostgreSQL index; nothing for SQLite."""
    return ["--index", index] if index else []


def run(
    *command: str, check: bool = True, timeout: float = 120, **kwargs
) -> subprocess.CompletedProcess:
    """Run a client, output captured as text; dcmtk with TCP_NODELAY on (Nagle stalls its
    small messages, docs/ingest-performance.md)."""
    env = {**os.environ, "TCP_NODELAY": "1", **kwargs.pop("env", {})}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def minipacs(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "pacs", *args, cwd=ROOT, **kwargs)


# storescu proposes only uncompressed syntaxes unless told which compressed one to offer.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2": "-xi",
}


def storescu(port: int, *files: Path | str, extra: tuple[str, ...] = (), check: bool = True):
    return run(
        "storescu",
        "-aec",
        "MINIPACS",
        *extra,
        "127.0.0.1",
        str(port),
        *map(str, files),
        check=check,
    )


def storescu_concurrently(port: int, batches: list[list[Path]]) -> list[str]:
    """One storescu per batch, all at once; the stderr of each that failed."""
    import threading

    errors: list[str] = []

    def send(paths: list[Path]) -> None:
        result = storescu(port, *paths, check=False)
        if result.returncode:
            errors.append(result.stderr)

    threads = [threading.Thread(target=send, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return errors


CHROMIUM = "/usr/bin/chromium"
VIEWER_ARTIFACTS = ROOT / "test-artifacts" / "viewer"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's) for a module's viewer tests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server, request):
    """A viewer page on the module's `server`, its screenshot named after the test."""
    with viewer_page(browser, f"{request.module.__name__}-{request.node.name}") as page:
        yield page


@contextlib.contextmanager
def viewer_page(browser, screenshot: str):
    """A page in a fresh context, its script errors and requested URLs recorded
    (`page.errors`, `page.requests`); a screenshot named `screenshot` is kept in
    test-artifacts/viewer, and a script error fails the test."""
    # bypass_csp: the page's CSP forbids eval, which Playwright's wait_for_function uses.
    context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
    page = context.new_page()
    page.requests = []
    page.errors = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    VIEWER_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=VIEWER_ARTIFACTS / f"{screenshot}.png")
    context.close()
    assert page.errors == []
