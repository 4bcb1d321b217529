"""Fixtures: real `minipacs serve` processes on free loopback ports, and real clients."""

import os
import signal
import socket
import subprocess
import sys
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `python -m pacs serve` subprocess; its stderr goes to `log_path`."""

    def __init__(self, data: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data = data
        self.args = args
        self.env = env
        self.port = free_port()
        self.http_port = free_port()
        self.log_path = data.parent / f"{data.name}-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Server":
        command = [sys.executable, "-m", "pacs", "serve", "--data", str(self.data)]
        command += ["--port", str(self.port), "--http-port", str(self.http_port), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, stderr=log, stdout=log, cwd=ROOT, env={**os.environ, **(self.env or {})}
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not answer within {timeout}s:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

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


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Factory: start_server(*flags, data=...) → a running Server, stopped at teardown."""
    servers: list[Server] = []

    def start(*args: str, data: Path | None = None, env: dict[str, str] | None = None) -> Server:
        server = Server(data or tmp_path / "data", *args, env=env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def server(start_server) -> Server:
    return start_server()


def run(
    *command: str, check: bool = True, timeout: float = 120, **kwargs
) -> subprocess.CompletedProcess:
    """Run a client, TCP_NODELAY on for dcmtk (shared/notes), output captured as text."""
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
