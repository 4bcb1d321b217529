"""Loopback ports for the peers tests and benchmarks start, held for the life of the
process that chose them.

A port the kernel calls free (bind to port 0, then close) is free only until someone
else takes it. Two xdist workers can be handed the same port a moment apart, and a peer
that stops and starts again on its ports (the S3 store going down and coming back, a
server restarted on its own data) leaves them free for another worker to choose. A
server then answered its readiness probe with another process's bytes. So each chosen
port is also claimed: a file named for it in one folder per user, locked (flock) by the
process that chose it for as long as it lives. A port whose file another process has
locked is passed over; the kernel releases the lock when its holder exits, however it
exits. The files stay (one per port ever claimed): removing one could let two processes
lock different files for the same port.
"""

import fcntl
import os
import socket
import tempfile
from pathlib import Path

CLAIMS = Path(tempfile.gettempdir()) / f"minipacs-ports-{os.getuid()}"
_held: list[int] = []  # the locked claim files' descriptors, open until the process ends


def free_port() -> int:
    """A loopback port nothing listens on now and no live process of ours has claimed."""
    CLAIMS.mkdir(exist_ok=True)
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        fd = os.open(CLAIMS / str(port), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held.append(fd)
        return port
