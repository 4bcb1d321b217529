"""Loopback ports for the peers tests and benchmarks start, held for the life of the
process that chose them.

A port the kernel calls free (bind to port 0, then close) is free only until someone
else takes it. Two xdist workers can be handed the same port a moment apart, and a peer
that stops and starts again on its ports (the S3 store going down and coming back, a
server restarted on its own data) leaves them free for another worker to choose. A
server then answered its readiness probe with another process's bytes. So each chosen
port is also claimed by a file named for it in one folder per user: a port whose file
exists is passed over while the process that wrote it lives. The files go when that
process exits; a file left by a process that died is taken over.
"""

import atexit
import os
import socket
import tempfile
from pathlib import Path

CLAIMS = Path(tempfile.gettempdir()) / f"minipacs-ports-{os.getuid()}"
_held: list[Path] = []


def free_port() -> int:
    """A loopback port nothing listens on now and no live process of ours has claimed."""
    CLAIMS.mkdir(exist_ok=True)
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        claim = CLAIMS / str(port)
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _owner_alive(claim):
                claim.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as file:
            file.write(str(os.getpid()))
        _held.append(claim)
        return port


def _owner_alive(claim: Path) -> bool:
    try:
        pid = int(claim.read_text())
    except (OSError, ValueError):
        return True  # being written (or gone): passed over this time
    return Path(f"/proc/{pid}").exists()


@atexit.register
def _release() -> None:
    for claim in _held:
        claim.unlink(missing_ok=True)
