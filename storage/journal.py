"""Instances acknowledged but not yet indexed: the C-STORE durability point.

A dataset arriving over DICOM is held in memory (up to MEMORY bytes; a larger one is
written into `<root>/.queue/<id>.part` as it arrives). Once whole it is checked
(storage.dataset.read_header: the structure and the UIDs, without pydicom), written,
fdatasynced and renamed to `<id>~<size>~<who>.dcm`;
the directory fsync that makes the rename durable is shared by every receiver that
renamed meanwhile (group commit). Only then is Success sent. The indexer
(storage.indexer, a thread of the main process) parses each entry, places the file, commits its
row and unlinks the entry; whatever is left after a crash is indexed at start-up.

Receivers wake the indexer with a datagram on an abstract Unix socket named after the
archive root, so an instance is queryable milliseconds after its Success.
"""

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian

from storage import dataset
from storage.files import FULL_ERRNOS

log = logging.getLogger(__name__)

FOLDER = ".queue"
WRITE_SIZE = 1 << 18  # bytes gathered per write() call, once a dataset is past MEMORY
# A dataset up to this size (a CT or MR slice) is checked in memory and written at once;
# a larger one goes to its file as it arrives. At most this much per association.
MEMORY = 1 << 20
# Receive buffers (MEMORY bytes each) kept for the next receipts: a fresh one an instance
# was ~130 page faults (a new mapping each time: tune_malloc's mmap threshold), each a
# zeroed page and, on a VM, often a host fault.
BUFFERS_KEPT = 4
_spare: list[bytearray] = []
_spare_lock = threading.Lock()


def _take_buffer() -> bytearray:
    with _spare_lock:
        if _spare:
            return _spare.pop()
    return bytearray(MEMORY)


def _give_back(buffer: bytearray) -> None:
    with _spare_lock:
        if len(_spare) < BUFFERS_KEPT:
            _spare.append(buffer)


URGENT = b"!"  # a wake-up from someone waiting for entries to be indexed
# Our Implementation Class UID and Version Name (PS3.7 D.3.3.2), in file meta and
# association responses: a UUID-derived UID (PS3.5 B.2), made once for minipacs.
IMPLEMENTATION_UID = "2.25.174016624375843519209519306925812004781"
IMPLEMENTATION_VERSION = "MINIPACS_01"


@dataclass(frozen=True)
class Entry:
    """One journal entry: the received Part 10 file and what its name records."""

    path: Path
    size: int
    sha256: str  # "" since entries no longer name it: the indexer hashes the file
    calling_aet: str
    address: str

    @classmethod
    def parse(cls, path: Path) -> "Entry":
        """`ID~SIZE~WHO.dcm`, or `ID~SIZE~SHA256~WHO.dcm` as versions before 2026-12-05
        named them (a journal left by one is indexed all the same)."""
        _, size, *sha, who = path.stem.split("~")
        fields = json.loads(base64.urlsafe_b64decode(who + "=" * (-len(who) % 4)))
        return cls(path, int(size), "".join(sha), fields.get("aet", ""), fields.get("address", ""))


def file_meta(sop_class_uid: str, sop_uid: str, syntax: str, source_aet: str) -> bytes:
    """Preamble, prefix and File Meta Information of a Part 10 file (PS3.10 7.1)."""
    elements = [
        (0x0001, b"OB", b"\0\1"),
        (0x0002, b"UI", _ui(sop_class_uid)),
        (0x0003, b"UI", _ui(sop_uid)),
        (0x0010, b"UI", _ui(syntax)),
        (0x0012, b"UI", _ui(IMPLEMENTATION_UID)),
        (0x0013, b"SH", _padded(IMPLEMENTATION_VERSION)),
    ]
    if source_aet.strip():
        elements.append((0x0016, b"AE", _padded(source_aet.strip()[:16])))
    body = b"".join(
        struct.pack("<HH2sHI", 2, elem, vr, 0, len(value)) + value
        if vr == b"OB"
        else struct.pack("<HH2sH", 2, elem, vr, len(value)) + value
        for elem, vr, value in elements
    )
    return bytes(128) + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


def _ui(uid: str) -> bytes:
    data = uid.encode("ascii", "replace")
    return data + b"\0" if len(data) % 2 else data


def _padded(value: str) -> bytes:
    data = value.encode("ascii", "replace")
    return data + b" " if len(data) % 2 else data


class Receipt:
    """One dataset arriving, for a `.part` file of the journal (hashed later by the
    indexer: 0.3 ms of a 0.5 MB CT off the receiver's critical path). Up to MEMORY bytes
    it is held in memory until it is checked; beyond, it goes to the file as it comes. A
    write error (disk full) is kept, not raised: the request is answered with a failure
    status once the dataset has been read off the wire."""

    def __init__(
        self, journal: "Journal", meta: bytes, syntax: str, calling_aet: str, address: str
    ) -> None:
        """`meta`: the preamble and File Meta Information the dataset, in `syntax`, goes
        after."""
        self.journal = journal
        self.syntax = syntax
        self.calling_aet = calling_aet
        self.address = address
        self.path = journal.folder / f"{journal.next_id()}.part"
        self.size = 0  # bytes in the file
        self.error: OSError | None = None
        self._start = len(meta)
        self._buffer = _take_buffer()
        self._used = 0  # bytes of _buffer held
        self._spilled = False  # past MEMORY: written as it comes
        self._fd: int | None = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            self.error = exc
        self.write(meta)

    def write(self, data) -> None:
        """Append bytes (a dataset arrives in PDV fragments: gathered into writes of
        WRITE_SIZE once past MEMORY)."""
        if self.error is not None:
            return
        if self._used + len(data) > len(self._buffer):
            self._spilled = True
            self._flush()
            if len(data) > len(self._buffer):
                self._write_out(data)
                return
        self._buffer[self._used : self._used + len(data)] = data
        self._used += len(data)
        if self._spilled and self._used >= WRITE_SIZE:
            self._flush()

    def header(self, pixel_budget: int | None) -> dataset.Header:
        """The whole dataset's header walk (storage.dataset.read_header): from memory when
        it is all there and not deflated, else from the file."""
        if not self._spilled and self.syntax != DeflatedExplicitVRLittleEndian:
            return dataset.read_header_in(
                self._buffer, self._start, self.syntax, pixel_budget, end=self._used
            )
        self.flush()
        return dataset.read_header(self.path, pixel_budget)

    def flush(self) -> None:
        """Everything written out to the file (not yet synced); raises a write error."""
        self._flush()
        if self.error is not None:
            raise self.error

    def _flush(self) -> None:
        if self._used:
            with memoryview(self._buffer) as view:
                self._write_out(view[: self._used])
            self._used = 0

    def _write_out(self, data) -> None:
        if self.error is not None:
            return
        try:
            with memoryview(data) as view:
                while view:
                    view = view[os.write(self._fd, view) :]  # type: ignore[arg-type]
        except OSError as exc:
            self.error = exc
            self._close()
            with contextlib.suppress(OSError):
                os.truncate(self.path, 0)  # free the space at once
            return
        self.size += len(data)

    def sync(self) -> None:
        """The bytes durable (before the rename that makes the entry)."""
        self.flush()
        if self._fd is not None and self.journal.fsync:
            os.fdatasync(self._fd)
        self._close()

    def full(self) -> bool:
        return self.error is not None and self.error.errno in FULL_ERRNOS

    def discard(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)

    def entry_name(self) -> str:
        """At most ~190 bytes (a file name has 255): the AE title is cut to 16 printable
        ASCII characters, the address to 64."""
        aet = "".join(c if " " <= c <= "~" else "?" for c in self.calling_aet[:16])
        who = json.dumps({"aet": aet, "address": self.address[:64]}).encode()
        encoded = base64.urlsafe_b64encode(who).decode().rstrip("=")
        return f"{self.path.stem}~{self.size}~{encoded}.dcm"

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._buffer:
            _give_back(self._buffer)
            self._buffer = bytearray()
            self._used = 0


class Journal:
    """The `.queue` folder of one archive root."""

    def __init__(self, root: Path, fsync: bool) -> None:
        self.folder = root / FOLDER
        self.fsync = fsync
        self.wake_address = "\0minipacs-index-" + hashlib.sha1(str(root).encode()).hexdigest()
        self._counter = 0
        self._lock = threading.Lock()
        self._synced = _GroupSync(self.folder)
        self._waker: socket.socket | None = None

    def open(self) -> None:
        self.folder.mkdir(exist_ok=True)

    def next_id(self) -> str:
        """Names sort in arrival order (per process) and never collide across processes."""
        with self._lock:
            self._counter += 1
            counter = self._counter
        return f"{time.time_ns():020d}-{os.getpid()}-{counter}"

    def commit(self, receipt: Receipt) -> Entry:
        """Make a whole, checked receipt a durable entry; wake the indexer."""
        receipt.sync()
        entry = self.folder / receipt.entry_name()
        os.rename(receipt.path, entry)
        if self.fsync:
            self._synced.sync()
        self.wake()
        return Entry.parse(entry)

    def wake(self, urgent: bool = False) -> None:
        """Tell the indexer there is an entry; `urgent`: someone waits for it to be
        indexed (the indexer otherwise gathers entries for a moment, for fewer commits)."""
        with self._lock:
            if self._waker is None:
                self._waker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._waker.setblocking(False)
        with contextlib.suppress(OSError):  # no indexer listening, or its queue full
            self._waker.sendto(URGENT if urgent else b"\0", self.wake_address)

    def close(self) -> None:
        """Let go of the wake-up socket and the folder's descriptor (reopened if used)."""
        with self._lock:
            if self._waker is not None:
                self._waker.close()
                self._waker = None
        self._synced.close()

    def listen(self) -> socket.socket | None:
        """The indexer's wake-up socket (None if another indexer has it: poll then)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.wake_address)
        except OSError:
            sock.close()
            return None
        return sock

    def entries(self) -> list[Path]:
        """Entries in arrival order."""
        with os.scandir(self.folder) as found:
            names = [e.name for e in found if e.name.endswith(".dcm")]
        return [self.folder / name for name in sorted(names)]

    def partial(self, pid: int | None = None) -> Iterator[Path]:
        """Datasets whose receipt never completed (a crash, or a connection lost); of
        the process `pid` only, if given."""
        with os.scandir(self.folder) as found:
            for item in found:
                if item.name.endswith(".part") and (
                    pid is None or item.name.split("-")[1] == str(pid)
                ):
                    yield Path(item.path)

    @staticmethod
    def age(entry: Path) -> float:
        """Seconds since the entry's dataset began to arrive (its name says when)."""
        return time.time() - int(entry.name.split("-", 1)[0]) / 1e9

    def discard_partial(self, pid: int) -> None:
        """Remove what a dead receiving process left half-received."""
        for path in self.partial(pid):
            path.unlink(missing_ok=True)

    def pending(self) -> int:
        with os.scandir(self.folder) as found:
            return sum(1 for e in found if e.name.endswith(".dcm"))


@contextlib.contextmanager
def claimed(path: Path) -> Iterator[int | None]:
    """An exclusive lock on an entry (an fd), or None when another indexer holds it or
    it is gone. The lock ends with the process, so a crashed indexer's entries are
    taken up by the next one."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:  # unlinked meanwhile (the file lives on, linked into the archive): indexed
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        yield fd if same else None
    finally:
        os.close(fd)


class _GroupSync:
    """fsync of one directory shared by concurrent callers: a caller whose rename came
    before an fsync started waits for that fsync; later ones share the next."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False
        self._fd: int | None = None  # the folder, open while the journal is (2 calls less)

    def close(self) -> None:
        with self._cond:
            while self._running:
                self._cond.wait()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._done < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                target = self._requested
                self._cond.release()
                try:
                    if self._fd is None:  # only the thread that runs the fsync uses it
                        self._fd = os.open(self._folder, os.O_RDONLY)
                    os.fsync(self._fd)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._done = target
