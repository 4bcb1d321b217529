"""The indexer: takes the journal's entries (storage.journal) into the index.

It runs as a thread of the main process (`minipacs serve`), at a lower CPU priority
than the DICOM workers that receive: a C-STORE never waits for it, and while senders are
faster it falls behind and catches up after. Entries are taken in arrival order, a batch
at a time: one commit and one fsync per folder for up to BATCH instances. Receivers wake
it with a datagram; it gathers entries for up to GATHER seconds (each commit's fsyncs
compete with the receivers' own), unless someone waits for them (a storage
association's release under index_wait, a storage commitment) or a batch is full. It
also looks every POLL seconds in case a wake-up was lost.
"""

import contextlib
import dataclasses
import json
import logging
import os
import select
import socket
import struct
import threading
import zlib
from collections.abc import Callable

from storage.archive import Archive
from storage.dataset import ParsedInstance
from storage.dataset import read_received
from storage.errors import InvalidDataset
from storage.errors import InvalidUID
from storage.journal import URGENT

log = logging.getLogger(__name__)
BATCH = 128
GATHER = 0.05  # s the oldest entry may wait for company
POLL = 1.0  # s between looks when nobody wakes it
RETRY = 5.0  # s after a failed round
NICE = 10  # the receivers come first
# parse_ahead: a DICOM worker idle for IDLE s parses entries past the indexer's next two
# batches (AHEAD = 2 × BATCH), at most AHEAD not yet indexed at a time (~15 KB each).
IDLE = 0.3
AHEAD = 2 * BATCH
_LENGTH = struct.Struct(">I")


def run(archive: Archive, stop: threading.Event) -> None:
    """Index entries until `stop` is set."""
    with contextlib.suppress(OSError):  # this thread only (Linux: nice is per thread)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    journal = archive.journal
    wake = journal.listen()
    if wake is None:
        log.info("another indexer listens for %s: looking every %.0f s", archive.root, POLL)
    urgent = False
    try:
        while not stop.is_set():
            timeout = POLL
            try:
                entries = journal.entries()
                if not entries:
                    urgent = False
                else:
                    early = GATHER - journal.age(entries[0])
                    if urgent or len(entries) >= BATCH or early <= 0:
                        if archive.index_entries(entries[:BATCH]):
                            continue
                    else:
                        timeout = min(early, GATHER)  # a clock stepped back: no longer
            except Exception:  # the index is down or the disk full: try again later
                log.exception("indexing round failed")
                stop.wait(RETRY)
                continue
            if wake is None:
                stop.wait(min(timeout, POLL))
            else:
                urgent |= _woken(wake, timeout)
    finally:
        if wake is not None:
            wake.close()


def _woken(wake: socket.socket, timeout: float) -> bool:
    """Wait for wake-ups (at most `timeout` s) and take them all; whether one was urgent."""
    urgent = False
    ready = select.select([wake], [], [], timeout)[0]
    while ready:
        urgent |= wake.recv(64) == URGENT
        ready = select.select([wake], [], [], 0)[0]
    return urgent


def parse_ahead(
    archive: Archive,
    out: int,
    busy: Callable[[], bool],
    stop: threading.Event,
    share: tuple[int, int] = (0, 1),
) -> None:
    """In a DICOM worker: while no association is active, parse journal entries past the
    indexer's next two batches and write each result to `out` (a pipe to the main
    process, read by `read_parsed`), so the indexer only places and commits those. After
    a burst the indexer catches up alone, on one core, while the workers idle: parsing
    is ~80 % of its work. Worker `share[0]` of `share[1]` takes the entries whose name
    hashes to it. Nothing is parsed while an association is active: the receivers do not
    share their GIL with it."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    number, workers = share
    sent: set[str] = set()  # parsed and sent, not yet indexed
    while not stop.wait(IDLE):
        while not busy() and not stop.is_set():
            entries = archive.journal.entries()
            sent &= {path.name for path in entries}
            todo = [
                path
                for path in entries[AHEAD:]
                if path.name not in sent and zlib.crc32(path.name.encode()) % workers == number
            ]
            if not todo:
                break
            if len(sent) >= AHEAD:  # the indexer has not reached those yet
                stop.wait(GATHER)
                continue
            for path in todo[: AHEAD - len(sent)]:
                if busy() or stop.is_set():
                    break
                sent.add(path.name)
                try:
                    parsed, sha = read_received(path)
                except (InvalidDataset, InvalidUID, ValueError, OSError):
                    continue  # indexed meanwhile, or unreadable: the indexer says what is wrong
                body = {"entry": path.name, "sha256": sha, "parsed": dataclasses.asdict(parsed)}
                try:
                    _write(out, json.dumps(body).encode())
                except OSError as exc:  # the supervisor stopped reading: it indexes alone
                    log.warning("parsing ahead stopped: %s", exc)
                    return


def read_parsed(source: int, offer: Callable[[str, ParsedInstance, str], None]) -> None:
    """In the main process: hand each entry a worker parsed (`parse_ahead`) to `offer`
    (Archive.offer_parsed), until the worker closes its end."""
    while (head := _read(source, _LENGTH.size)) is not None:
        body = _read(source, _LENGTH.unpack(head)[0])
        if body is None:
            return
        message = json.loads(body)
        offer(message["entry"], ParsedInstance(**message["parsed"]), message["sha256"])


def _write(out: int, data: bytes) -> None:
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(out, view) :]


def _read(source: int, size: int) -> bytes | None:
    """`size` bytes, or None at the end of the pipe."""
    data = b""
    while len(data) < size:
        chunk = os.read(source, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
