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
import logging
import os
import select
import socket
import threading

from storage.archive import Archive
from storage.journal import URGENT

log = logging.getLogger(__name__)
BATCH = 128
GATHER = 0.05  # s the oldest entry may wait for company
POLL = 1.0  # s between looks when nobody wakes it
RETRY = 5.0  # s after a failed round
NICE = 10  # the receivers come first


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
