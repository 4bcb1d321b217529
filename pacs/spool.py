"""Receive C-STORE datasets straight into the archive's `.incoming/` folder.

pynetdicom's STORE_RECV_CHUNKED_DATASET writes each incoming dataset to a
NamedTemporaryFile in the system temp folder, and a write error there (disk full)
aborts the association. We give it a file object of our own instead
(docs/decisions.md, 2026-11-25): it lives on the archive's filesystem so the
ingest can hard-link it into place, it hashes the bytes as they arrive, and a write
error is remembered and reported by the C-STORE handler as 0xA700 rather than
tearing down the association.
"""

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from pynetdicom import _config
from pynetdicom import dimse_messages

log = logging.getLogger(__name__)


class SpoolFile:
    """The part of NamedTemporaryFile that pynetdicom uses: name, write, file.flush, close."""

    def __init__(self, directory: Path) -> None:
        self.name = str(directory / f"{uuid.uuid4().hex}.part")
        self.file = self  # pynetdicom calls `.file.flush()` after each fragment
        self.error: OSError | None = None
        self.size = 0
        self.touched = time.monotonic()
        self.owner = threading.current_thread()  # the association's DUL thread
        self._sha = hashlib.sha256()
        self._fd: int | None = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]  # type: ignore[arg-type]
                self._sha.update(data)
                self.size += len(data)
                self.touched = time.monotonic()
            except OSError as exc:
                self.error = exc
                self._discard()
        return len(data)

    def flush(self) -> None:
        """Writes are unbuffered; nothing to flush."""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def digest(self) -> tuple[int, str]:
        return self.size, self._sha.hexdigest()

    def _discard(self) -> None:
        """Free the space at once: the dataset is lost anyway."""
        self.close()
        with contextlib.suppress(OSError):
            os.truncate(self.name, 0)


_lock = threading.Lock()
_directory: Path | None = None
_open: dict[str, SpoolFile] = {}


def _factory(*args: object, **kwargs: object) -> SpoolFile:
    assert _directory is not None
    spool = SpoolFile(_directory)
    with _lock:
        _open[spool.name] = spool
    return spool


def install(directory: Path) -> None:
    """Receive every C-STORE dataset of this process into `directory`."""
    global _directory
    _directory = directory
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _factory  # type: ignore[assignment]


def take(path: Path) -> SpoolFile | None:
    """The spool file behind a received dataset path (closed), or None if not ours."""
    with _lock:
        spool = _open.pop(str(path), None)
    if spool is not None:
        spool.close()
    return spool


def discard(owner: threading.Thread | None) -> int:
    """Remove what a closed association left half-received."""
    return _remove(lambda spool: spool.owner is owner)


def sweep(idle_seconds: float) -> int:
    """Remove half-received datasets nothing has written to for a while."""
    limit = time.monotonic() - idle_seconds
    return _remove(lambda spool: spool.touched < limit)


def _remove(predicate) -> int:
    with _lock:
        stale = [name for name, spool in _open.items() if predicate(spool)]
        spools = [_open.pop(name) for name in stale]
    for spool in spools:
        spool.close()
        Path(spool.name).unlink(missing_ok=True)
    if spools:
        log.info("removed %d incomplete received dataset(s)", len(spools))
    return len(spools)
