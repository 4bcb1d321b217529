"""The on-disk layout and the durable-write primitives it relies on."""

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from storage.errors import OutOfResources

# Errors that mean "no room", whatever the filesystem calls it.
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
CHUNK = 1 << 20


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Relative path of an instance; UIDs are validated before they get here."""
    return f"{study_uid}/{series_uid}/{sop_uid}.dcm"


def hash_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fp:
        while chunk := fp.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cached(path: Path) -> None:
    """Let the kernel drop a file's pages from the page cache (written back first if
    dirty). The indexer calls it once a received file is indexed: a push of thousands of
    instances then reuses the same few hundred MB of page cache instead of filling the
    machine's memory with files nobody has asked for yet, which pushed out the index's
    own pages and, on a VM whose untouched memory is slow to touch, cost minipacs's x4
    ingest up to half its rate (docs/ingest-performance.md). A reader pays one disk
    read for a file it then wants."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(root: Path, rel_dir: str, fsync: bool) -> None:
    """Create `root/rel_dir` and make each new directory entry durable in its parent."""
    path = root / rel_dir
    if path.is_dir():
        return
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
        if fsync:
            fsync_path(directory.parent)


def reraise_full(exc: OSError) -> None:
    """Turn a disk-full OSError into OutOfResources; re-raise anything else unchanged."""
    if exc.errno in FULL_ERRNOS:
        raise OutOfResources(f"no space left to store the instance ({exc.strerror})") from exc
    raise exc


def secret(path: Path, size: int = 32, make: Callable[[], bytes] | None = None) -> bytes:
    """A random key kept in a file (0600), made on first use (`make()`, else `size` random
    bytes); every process that shares the folder gets the same one, never a half-written
    one (made aside, then linked)."""
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    aside = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fp:
        fp.write(make() if make is not None else os.urandom(size))
        fp.flush()
        os.fsync(fp.fileno())
    try:
        os.link(aside, path)  # fails if another process linked its key first
    except FileExistsError:
        pass
    finally:
        aside.unlink()
    return path.read_bytes()
