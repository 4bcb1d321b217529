"""The seam: every replacement of pynetdicom internals in minipacs, for our server only.

`install()` is called by the server side (`pacs.scp.start_scp`, `minipacs serve`), never by
`pacs.scu`. Each replacement acts only for associations of a `ServerAE` (the SCP's AE,
which also opens the C-MOVE sub-associations, and the one the router sends with); for any
other association in the process it calls pynetdicom's original unchanged, so a script or
test that uses pynetdicom next to our server gets stock pynetdicom. `check()` compares the
signature of everything replaced with the one recorded for the pynetdicom this was written
against (`EXPECTED`, 3.0.4; pyproject pins ~=3.0.4), and `minipacs serve` refuses to start
when they differ.

What it replaces, and why (docs/decisions.md, 2026-11-25, 2026-11-26, 2026-12-04):
- TCP_NODELAY on every association socket (`AssociationSocket._create_socket`, and
  `Server.get_request` for accepted ones): a DIMSE message is a small command PDU
  followed by the dataset; with Nagle's algorithm the second write waits for the peer's
  delayed ACK (~40 ms a message).
- `AssociationSocket.recv`: PDUs read up to 1 MiB per recv call instead of 4 KiB, and a
  PDU longer than the maximum we announced (PS3.8 9.3.1) is treated as a broken
  connection, not buffered.
- `Association.send_c_store`, for a `StoredDataset` or a file path (C-MOVE and C-GET
  sub-operations, the router): the request is written straight to the socket and the
  response read straight off it while the DUL thread is held off the socket, skipping
  pydicom's encoding, the DUL queues and state machine and two thread hand-overs (C-MOVE
  of 512² CT images went from ~620 to ~990 instances/s), and the bytes are exactly those
  stored, sent from the file by sendfile (no read into memory, whatever the size). A
  response that is not the plain C-STORE-RSP expected is left for pynetdicom to read. A
  dataset marked `already_sent` (a C-MOVE helper association sent it) is not sent
  again: send_c_store returns the status that send got.
- `FindAnswers` (no replacement, a user of `_write`): C-FIND pending responses, and the
  final Success, written straight to the socket as P-DATA-TF PDUs (batched), the
  identifier encoded from the index's DICOM JSON (~0.9 ms an answer through pynetdicom,
  a few tens of µs this way).
- `DIMSEServiceProvider.send_msg`: C-MOVE/C-GET pending responses at most every 100 ms
  (PS3.4 C.4.2.3.1 lets the SCP send them or not; pynetdicom encoded one per
  sub-operation, ~0.3 ms each), and no second final C-FIND response after FindAnswers'.
- `AssociationSocket.send` and the DUL state machine's `do_action` (wrapped per DUL):
  under the lock `_write` takes, so that a PDU pynetdicom takes off its queue is sent
  before any direct write starts, and no direct write lands inside one of its PDUs.
- `DULServiceProvider.__init__`, `run_reactor`, `_is_transport_event` (and per DUL its
  `kill_dul` and `stop_dul`) and the `time` of pynetdicom.dul and pynetdicom.association:
  pynetdicom's two reactor threads per association poll (1 ms sleeps); `_WakingTime`'s
  sleep waits for what is polled for: the association's DIMSE queue, notified also by the
  ACSE queue (at most 1 ms, as before); the DUL's socket and a wake-up socketpair that its
  send queue, a kill and the end of a hold write to (at most DUL_POLL: a DUL thread woke
  1,000 times a second, ~15 ms of CPU a second for each open association, idle or not).
  A sender reading its answer off the socket holds the DUL thread's reads (`_hold_reads`).
- `Association.__init__`: ours pause their reactor at a `_Checkpoint`, not an Event. With
  pynetdicom's, a sender could see the reactor "paused" during the turn in which it took
  the sender's answer off the DIMSE queue (a C-MOVE then waited out its DIMSE timeout).
- `Server` (a subclass of pynetdicom's ThreadedAssociationServer): the Association made in
  the listener thread, no gc.collect() every 60 accepts, the TLS handshake in a thread of
  its own, and `divert` for plain connections.
"""

import contextlib
import inspect
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from io import BytesIO
from pathlib import Path

import pynetdicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom import association
from pynetdicom import dul
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dimse_primitives import C_GET
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.transport import AssociationSocket
from pynetdicom.transport import ThreadedAssociationServer

from pacs import dimse
from storage.dataset import inflate
from storage.dataset import open_dataset
from storage.recode import to_little_endian

log = logging.getLogger(__name__)
PENDING_INTERVAL = 0.1  # s between C-MOVE/C-GET pending responses
DUL_POLL = 0.05  # s: a DUL thread's longest idle wait (its socket, a send or a kill end it)
STREAM_ABOVE = 256 << 20  # bytes: a larger file pynetdicom must convert is left to it (a path)
SOP_INSTANCE_UID = 0x00080018

# Everything the seam replaces, wraps or overrides, with its signature (annotations left
# out) in pynetdicom 3.0.4. check() holds the installed pynetdicom to it.
EXPECTED: dict[tuple[object, str], str] = {
    (AssociationSocket, "_create_socket"): "(self, address)",
    (AssociationSocket, "recv"): "(self, nr_bytes)",
    (AssociationSocket, "send"): "(self, bytestream)",
    (Association, "__init__"): "(self, ae, mode)",
    (Association, "send_c_store"): (
        "(self, dataset, msg_id=1, priority=2, originator_aet=None, originator_id=None)"
    ),
    (DIMSEServiceProvider, "send_msg"): "(self, primitive, context_id)",
    (DULServiceProvider, "__init__"): "(self, assoc)",
    (DULServiceProvider, "run_reactor"): "(self)",
    (DULServiceProvider, "_is_transport_event"): "(self)",
    (DULServiceProvider, "kill_dul"): "(self)",
    (DULServiceProvider, "stop_dul"): "(self)",
    (StateMachine, "do_action"): "(self, event)",
    (dul, "time"): "module time",
    (association, "time"): "module time",
    (ThreadedAssociationServer, "get_request"): "(self)",
    (ThreadedAssociationServer, "process_request"): "(self, request, client_address)",
    (ThreadedAssociationServer, "process_request_thread"): "(self, request, client_address)",
    (ThreadedAssociationServer, "service_actions"): "(self)",
}
_ORIGINAL = {key: getattr(*key, None) for key in EXPECTED}  # before install() replaces them
_create_socket = _ORIGINAL[AssociationSocket, "_create_socket"]
_socket_recv = _ORIGINAL[AssociationSocket, "recv"]
_socket_send = _ORIGINAL[AssociationSocket, "send"]
_send_c_store = _ORIGINAL[Association, "send_c_store"]
_association_init_original = _ORIGINAL[Association, "__init__"]
_send_msg = _ORIGINAL[DIMSEServiceProvider, "send_msg"]
_dul_init_original = _ORIGINAL[DULServiceProvider, "__init__"]
_dul_run_original = _ORIGINAL[DULServiceProvider, "run_reactor"]
_dul_transport_event_original = _ORIGINAL[DULServiceProvider, "_is_transport_event"]
_installed = False


class SeamMismatch(RuntimeError):
    """The installed pynetdicom lacks, or has changed, something the seam replaces."""


class ServerAE(AE):
    """Our server's AE: the seam acts on its associations (the SCP's, the C-MOVE
    sub-associations it opens, the router's) and on no other AE's."""


def _ours(assoc: Association) -> bool:
    return isinstance(assoc.ae, ServerAE)


def check(expected: dict[tuple[object, str], str] = EXPECTED) -> None:
    """Raise SeamMismatch, one line naming what differs, unless every attribute in
    `expected` is there with the recorded signature: the replacements call the
    originals and rely on what they do."""
    problems = []
    for (owner, name), recorded in expected.items():
        where = f"{getattr(owner, '__name__', owner)}.{name}"
        found = _ORIGINAL.get((owner, name), getattr(owner, name, None))
        if found is None:
            problems.append(f"{where} is missing")
        elif (shape := _shape(found)) != recorded:
            problems.append(f"{where} is {shape}, expected {recorded}")
    if problems:
        raise SeamMismatch(
            f"pynetdicom {pynetdicom.__version__} differs from the one minipacs was written "
            f"against (pynetdicom~=3.0.4): {'; '.join(problems)}"
        )


def _shape(value: object) -> str:
    if inspect.ismodule(value):
        return f"module {value.__name__}"
    try:
        signature = inspect.signature(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "not a function"
    bare = [p.replace(annotation=p.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=signature.empty))


def install() -> None:
    """Check pynetdicom, then put the replacements in place (once, for the process);
    they act only for ServerAE associations."""
    global _installed
    check()
    if _installed:
        return
    AssociationSocket._create_socket = _nodelay_socket
    AssociationSocket.recv = _recv
    AssociationSocket.send = _locked_send
    Association.__init__ = _association_init
    Association.send_c_store = _stored_c_store
    DIMSEServiceProvider.send_msg = _send_msg_sparingly
    DULServiceProvider.__init__ = _dul_init
    DULServiceProvider.run_reactor = _dul_run
    DULServiceProvider._is_transport_event = _dul_transport_event
    dul.time = association.time = _WakingTime()  # type: ignore[assignment]
    _installed = True


class StoredFile:
    """The dataset part of a stored file, where it lies (an open file, its first byte and
    its length): sent from there with os.sendfile, never read into memory on the way.
    `meta` is what its File Meta says (storage.dataset.FileMeta)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file, self.meta, self.size = open_dataset(path)

    def read(self, start: int = 0, size: int | None = None) -> bytes:
        """The dataset's bytes (`size` of them from its byte `start`)."""
        size = self.size - start if size is None else size
        return os.pread(self.file.fileno(), size, self.meta.start + start)

    def close(self) -> None:
        self.file.close()


class StoredDataset(Dataset):
    """A stored instance, as its UIDs (from the index) and where its dataset bytes lie as
    received (`StoredFile`, closed once the dataset is sent). Of the elements only SOP
    Instance UID, which pynetdicom reads of a failed sub-operation; the SOP class and
    transfer syntax are plain attributes (a Dataset with all three and its file meta
    cost ~80 µs to make, one per sub-operation; this one ~17)."""

    def __init__(self, sop_class_uid: str, sop_uid: str, syntax: str, stored: StoredFile) -> None:
        super().__init__()
        self[SOP_INSTANCE_UID] = DataElement(SOP_INSTANCE_UID, "UI", sop_uid)
        self.sop_uid = sop_uid
        self.sop_class_uid = sop_class_uid
        self.syntax = UID(syntax)
        self.stored = stored

    def close(self) -> None:
        self.stored.close()

    def decoded(self) -> Dataset:
        """The dataset itself, for pynetdicom's own send path (which encodes it anew,
        converting between uncompressed syntaxes, but not their byte order): inflated
        within MAX_INFLATED, and an uncompressed one made little endian (storage.recode)."""
        syntax = self.syntax
        raw = self.stored.read()
        if syntax.is_deflated:
            raw = inflate(raw)
        ds = read_dataset(BytesIO(raw), syntax.is_implicit_VR, syntax.is_little_endian)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        if not syntax.is_encapsulated:
            to_little_endian(ds, None)  # no decoding: byte order at most
        return ds


def already_sent(dataset: Dataset, status: Dataset) -> Dataset:
    """Mark a dataset a helper association sent (C-MOVE): send_c_store returns `status`."""
    dataset._sent_status = status
    return dataset


def stored_file(path: Path) -> StoredDataset | Path:
    """A file as a StoredDataset (its dataset bytes where they lie on disk); the path
    itself, for pynetdicom to refuse and say why, when it lacks the file meta a C-STORE
    needs. The File Meta is read once, as the file is opened."""
    try:
        stored = StoredFile(path)
    except Exception:  # unreadable, not DICOM, no meta: pynetdicom says why
        return path
    meta = stored.meta
    if not (meta.sop_class_uid and meta.sop_uid):
        stored.close()
        return path
    return StoredDataset(meta.sop_class_uid, meta.sop_uid, meta.syntax, stored)


PENDING = 0xFF00
CANCEL = 0xFE00


class FindAnswers:
    """C-FIND pending responses written straight to the socket, several per send()."""

    FLUSH = 32 << 10

    def __init__(self, assoc: Association, context_id: int, request) -> None:
        self._assoc = assoc
        self._context_id = context_id
        self._max_pdu = _peer_max_pdu(assoc)

        def response(data_set_type: int, status: int) -> bytes:
            command = dimse.command(
                (0x00000002, dimse.ui(request.AffectedSOPClassUID)),
                (0x00000100, struct.pack("<H", dimse.C_FIND_RSP)),
                (0x00000120, struct.pack("<H", request.MessageID)),
                (0x00000800, struct.pack("<H", data_set_type)),
                (0x00000900, struct.pack("<H", status)),
            )
            return dimse.pdata(context_id, command, True, self._max_pdu)

        self._command = response(dimse.DATASET, PENDING)  # the same for each answer
        self._final = response(dimse.NO_DATASET, 0x0000)
        self._message_id = request.MessageID
        self._buffer = bytearray()
        self._answered = False

    def send(self, identifier: bytes) -> None:
        first = not self._answered
        self._answered = True
        self._buffer += self._command
        self._buffer += dimse.pdata(self._context_id, identifier, False, self._max_pdu)
        if first or len(self._buffer) >= self.FLUSH:  # the first answer goes out at once
            self.flush()

    def flush(self) -> None:
        """Out with what is buffered: before any response pynetdicom sends after these."""
        if self._buffer:
            _write(self._assoc, self._buffer)
            self._buffer.clear()

    def finish(self) -> None:
        """The final Success response, sent with what is buffered; pynetdicom's own (a
        pydicom-encoded command and a hand-over to its DUL thread) is then skipped."""
        self._buffer += self._final
        self.flush()
        self._assoc.dimse._final_sent = self._message_id


def _stored_c_store(
    self: Association,
    dataset,
    msg_id: int = 1,
    priority: int = 2,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> Dataset:
    """Association.send_c_store; for ours, fast for a StoredDataset (or a file path) sent
    in its stored syntax, and for a dataset another association sent already, that
    send's status."""
    if not _ours(self):
        return _send_c_store(self, dataset, msg_id, priority, originator_aet, originator_id)
    sent = getattr(dataset, "_sent_status", None)
    if sent is not None:
        return sent
    if isinstance(dataset, str | Path):
        dataset = stored_file(Path(dataset))
    try:
        return _send_stored(self, dataset, msg_id, priority, originator_aet, originator_id)
    finally:
        if isinstance(dataset, StoredDataset):
            dataset.close()


def _send_stored(
    self: Association,
    dataset,
    msg_id: int,
    priority: int,
    originator_aet: str | None,
    originator_id: int | None,
) -> Dataset:
    stored = dataset if isinstance(dataset, StoredDataset) else None
    context = None
    if stored is not None:
        context = next(
            (
                cx
                for cx in self.accepted_contexts
                if cx.abstract_syntax == stored.sop_class_uid
                and cx.transfer_syntax[0] == stored.syntax
                and cx.as_scu  # we send as SCU: pynetdicom's own test (a C-GET's roles)
            ),
            None,
        )
    if stored is None or context is None or not self.is_established:
        if stored is not None and self.is_established:  # another syntax: pynetdicom converts
            large = stored.stored.size > STREAM_ABOVE
            dataset = stored.stored.path if large else stored.decoded()
        return _send_c_store(self, dataset, msg_id, priority, originator_aet, originator_id)
    elements = [
        (0x00000002, dimse.ui(stored.sop_class_uid)),
        (0x00000100, struct.pack("<H", dimse.C_STORE_RQ)),
        (0x00000110, struct.pack("<H", msg_id)),
        (0x00000700, struct.pack("<H", priority)),
        (0x00000800, struct.pack("<H", dimse.DATASET)),
        (0x00001000, dimse.ui(stored.sop_uid)),
    ]
    if originator_aet:
        elements.append((0x00001030, dimse.text(originator_aet, 16)))
    if originator_id is not None:
        elements.append((0x00001031, struct.pack("<H", originator_id)))
    # The reactor must not take the response off the queue. pynetdicom pauses it for each
    # sub-operation and lets it run between them, which races with a fast answer (the
    # reactor wakes late and reads it); ours stays paused until release() resumes it.
    self._reactor_checkpoint.clear()
    while not self._is_paused:
        time.sleep(0.0001)
    try:
        max_pdu = _peer_max_pdu(self)
        command = dimse.pdata(context.context_id, dimse.command(*elements), True, max_pdu)
        sock = self.dul.socket.socket
        direct = not isinstance(sock, ssl.SSLSocket)  # MSG_PEEK needs the plain socket
        if direct:
            _hold_reads(self.dul, True)
        found = None
        try:
            try:
                _write(
                    self,
                    partial(_send_dataset, command, context.context_id, stored.stored, max_pdu),
                )
            except OSError:  # a PDU may have gone out in part: nothing can follow it
                self.abort()
                raise
            found = _read_store_response(self, sock, context.context_id, msg_id) if direct else None
        finally:
            if direct:
                # The DUL thread is woken only when it has something to read: what came
                # instead of the answer, or a C-CANCEL a C-GET's requestor may send. The
                # peer of a C-MOVE (or the router) sends nothing between our requests,
                # and waking it after each cost more than the read itself (a release,
                # like any send, wakes it).
                _hold_reads(self.dul, False, wake=not found or self.is_acceptor)
        if found is None:  # not the plain answer expected: pynetdicom reads what came
            _, response = self.dimse.get_msg(block=True)
            found = (
                {k: getattr(response, k, None) for k in ("Status", *_STATUS_DETAIL)}
                if isinstance(response, C_STORE)
                else {}
            )
    finally:
        if self.is_acceptor:  # C-GET: the handler runs in the reactor's own thread
            self._reactor_checkpoint.set()
    status = Dataset()
    if found.get("Status") is None:
        self.abort()  # no (or no valid) answer within the DIMSE timeout
        return status
    for keyword, value in found.items():
        if value is not None:  # as elements: ~15 µs less each than by keyword
            tag, vr = _STATUS_ELEMENTS[keyword]
            status[tag] = DataElement(tag, vr, value)
    return status


_STATUS_DETAIL = ("ErrorComment", "OffendingElement")
_STATUS_ELEMENTS = {
    "Status": (0x00000900, "US"),
    "ErrorComment": (0x00000902, "LO"),
    "OffendingElement": (0x00000901, "AT"),
}
MAX_PEEK = 1 << 16
RESPONSE_PEEK = 512  # bytes peeked at first: a C-STORE-RSP PDU is ~200
# A dataset goes to a peer with no maximum PDU length in 1 MiB fragments all the same: on
# TLS each is read into memory, whatever the file's size.
UNLIMITED_PDU = (1 << 20) + 6


def _send_dataset(
    command: bytes, context_id: int, stored: StoredFile, max_pdu: int, sock: socket.socket
) -> None:
    """A C-STORE-RQ: its command PDUs, then the stored dataset as P-DATA-TF PDUs of one
    PDV each, no longer than the peer's maximum (PS3.8 9.3.5, E.2), whatever its size.
    On a plain socket each fragment goes from the file by sendfile, behind its PDU
    header, which MSG_MORE holds back to leave with it: no copy through memory (at
    512 KiB an instance, the reads, copies and page faults of fresh buffers were most of
    the sender's CPU). TLS encrypts in this process: a fragment at a time is read."""
    tls = isinstance(sock, ssl.SSLSocket)
    sock.sendall(command, 0 if tls else socket.MSG_MORE)  # held back to leave with a head
    pdus = dimse.pdata_headers(context_id, stored.size, False, max_pdu or UNLIMITED_PDU)
    for start, length, head in pdus:
        if tls:
            data = stored.read(start, length)
            if len(data) != length:  # the PDU header would promise bytes that are not there
                raise ConnectionError(f"{stored.path} ended before its recorded length")
            sock.sendall(head + data)
        else:
            sock.sendall(head, socket.MSG_MORE)
            _sendfile(sock, stored, stored.meta.start + start, length)


def _sendfile(sock: socket.socket, stored: StoredFile, offset: int, length: int) -> None:
    """`length` bytes of the file from `offset` onto the socket by the kernel: os.sendfile
    on a blocking socket (socket.sendfile makes a poll object for each call), else
    socket.sendfile, which waits for it within the socket's timeout."""
    if sock.gettimeout() is not None:
        sent = sock.sendfile(stored.file, offset, length) if length else 0
    else:
        sent = 0
        while sent < length:
            count = os.sendfile(sock.fileno(), stored.file.fileno(), offset + sent, length - sent)
            if not count:
                break
            sent += count
    if sent != length:  # the PDU header promised `length`: the stream is broken
        raise ConnectionError(f"{stored.path} ended before its recorded length")


def _write(assoc: Association, data: bytes | bytearray | Callable[[socket.socket], None]) -> None:
    """Whole DIMSE messages (`data`, or what `data(sock)` sends) written on the
    association's socket from this thread, under
    `_sending`, once nothing is queued for the DUL thread: pynetdicom's PDUs (C-GET
    pending responses, a release) go through its queue, and its actions hold the same
    lock from taking a PDU off the queue until it is sent, so the two never interleave.
    (Our writers are the threads that also queue pynetdicom's messages on that
    association, so none is queued half-way meanwhile.) On TLS not while the DUL thread
    reads either: an SSL object is not for two threads at once."""
    provider = assoc.dul
    sock = provider.socket.socket
    if sock is None:
        raise ConnectionError("the association's connection is closed")
    while True:
        with provider._sending:
            if not provider.to_provider_queue.queue:
                if isinstance(sock, ssl.SSLSocket):
                    with provider._reading:
                        _send(sock, data)
                else:
                    _send(sock, data)
                return
        if not provider.is_alive():
            raise ConnectionError("the association's DUL thread has ended")
        _wake_dul(provider)
        time.sleep(0.0001)


def _send(sock: socket.socket, data: bytes | bytearray | Callable[[socket.socket], None]) -> None:
    if callable(data):
        data(sock)
    else:
        sock.sendall(data)


def _hold_reads(provider: DULServiceProvider, hold: bool, wake: bool = True) -> None:
    """Keep the DUL thread off the socket (`hold`) while a sender reads its answer there,
    or give the socket back to it: at once (`wake`), or when it next looks (DUL_POLL)."""
    with provider._reading:
        provider._held = hold
    if not hold and wake:
        _wake_dul(provider)


def _read_store_response(
    assoc: Association, sock: socket.socket, context_id: int, msg_id: int
) -> dict | None:
    """The C-STORE-RSP to `msg_id`, read straight off the socket: its Status (and error
    detail). pynetdicom's path (its DUL thread, state machine, pydicom-decoded command,
    two queue hand-overs) cost more than the send itself. Anything else the peer sends
    first (a C-CANCEL, a release, a reply spread over several PDUs) is left unread for
    pynetdicom (None); a peer that aborts, closes or says nothing within the DIMSE
    timeout gives no status ({}), its abort left for pynetdicom to read.
    """
    timeout = assoc.dimse_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    head = _peek(sock, 6, deadline, RESPONSE_PEEK)  # the whole response, mostly
    if head is None or head[0] == dimse.ABORT:
        return {}  # closed, silent, or aborting: no status (the send failed)
    (length,) = struct.unpack(">I", head[2:6])
    if head[0] != dimse.P_DATA or length > MAX_PEEK:
        return None
    pdu = head[: 6 + length] if len(head) >= 6 + length else _peek(sock, 6 + length, deadline)
    if pdu is None:
        return {}
    command = _single_command(pdu[6:], context_id)
    if command is None:
        return None
    fields = dimse.fields(command)
    if (
        fields.get(0x00000100) != struct.pack("<H", dimse.C_STORE_RSP)
        or fields.get(0x00000120) != struct.pack("<H", msg_id)
        or fields.get(0x00000800) != struct.pack("<H", dimse.NO_DATASET)
        or len(fields.get(0x00000900, b"")) != 2
    ):
        return None
    sock.recv(len(pdu))  # it was ours: take it off the socket
    assoc.dul._idle_timer.restart()
    found: dict = {"Status": struct.unpack("<H", fields[0x00000900])[0]}
    if 0x00000902 in fields:
        found["ErrorComment"] = fields[0x00000902].decode("ascii", "replace").strip(" \0")
    if 0x00000901 in fields:
        raw = fields[0x00000901]
        found["OffendingElement"] = [
            (g << 16) | e for g, e in struct.iter_unpack("<HH", raw[: len(raw) // 4 * 4])
        ]
    return found


def _peek(sock: socket.socket, size: int, deadline: float | None, upto: int = 0) -> bytes | None:
    """The next `size` bytes on the socket (up to `upto` if there are more), left there;
    None if it closed or the time ran out."""
    while True:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0)
        try:
            ready, _, _ = select.select([sock], [], [], wait)
            data = sock.recv(max(size, upto), socket.MSG_PEEK) if ready else None
        except (OSError, ValueError):
            return None
        if not data:  # closed, or timed out
            return None
        if len(data) >= size:
            return data
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(0.0001)  # the rest of a PDU is on its way


def _single_command(items: bytes, context_id: int) -> bytes | None:
    """The command of a P-DATA-TF whose PDVs carry one whole command and nothing else."""
    command, offset = bytearray(), 0
    while offset + 6 <= len(items):
        size, pdv_context, header = struct.unpack(">IBB", items[offset : offset + 6])
        if size < 2 or pdv_context != context_id or not header & 1:
            return None  # a dataset fragment, or another context
        command += items[offset + 6 : offset + 4 + size]
        offset += 4 + size
        if header & 2:
            return bytes(command) if offset == len(items) else None
    return None  # the command goes on in another PDU


def _peer_max_pdu(assoc: Association) -> int:
    peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    return peer.maximum_length or 0


def _send_msg_sparingly(self: DIMSEServiceProvider, primitive, context_id: int) -> None:
    """DIMSEServiceProvider.send_msg; for ours, skipping C-MOVE/C-GET pending responses
    that follow the previous one within PENDING_INTERVAL, and the final C-FIND response
    that `FindAnswers.finish` sent already. A final C-MOVE/C-GET response other than
    Cancel loses the Number of Remaining Sub-operations that pynetdicom's reused pending
    response still carries: PS3.4 C.4.2.1.6 and C.4.3.1.6 allow it only with Pending
    (shall) and Cancel (may); Warning, Failure and Success shall not contain it."""
    if not _ours(self.assoc):
        return _send_msg(self, primitive, context_id)
    if (
        isinstance(primitive, C_FIND)
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.MessageIDBeingRespondedTo == getattr(self, "_final_sent", None)
    ):
        # Success went out already; so does nothing else for that request (a failure
        # pynetdicom sends when the handler raised afterwards would be a second final).
        self._final_sent = None
        return
    if isinstance(primitive, C_MOVE | C_GET) and primitive.MessageIDBeingRespondedTo is not None:
        if primitive.Status == PENDING:
            now = time.monotonic()
            if now - getattr(self, "_last_pending", -PENDING_INTERVAL) < PENDING_INTERVAL:
                return
            self._last_pending = now
        elif primitive.Status != CANCEL:
            primitive.NumberOfRemainingSuboperations = None
    _send_msg(self, primitive, context_id)


class _WakingQueue(queue.Queue):
    """A DUL queue whose put() also wakes the thread that waits for it."""

    def __init__(self, wake) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def _association_init(self: Association, ae: AE, mode: str) -> None:
    """Association.__init__; ours get a `_Checkpoint` for the reactor to pause at."""
    _association_init_original(self, ae, mode)
    if _ours(self):
        self._reactor_checkpoint = _Checkpoint(self)  # type: ignore[assignment]


class _Checkpoint:
    """The pause point of an association's reactor (pynetdicom's `_reactor_checkpoint`,
    a threading.Event there). A sender pauses the reactor by clearing it and waiting for
    `_is_paused`, so that the reactor does not take the answer it waits for off the DIMSE
    queue. pynetdicom's reactor sets `_is_paused` before its wait, and a wait on a
    checkpoint still set returns at once: a sender that cleared it in between saw
    "paused" while the reactor ran one more turn, and that turn could take the answer
    ("Received unexpected C-STORE service message"; the sender then waited out its DIMSE
    timeout: a C-MOVE that sent over both paths stalled). Here a wait that passes says so
    under the lock a clear takes: once a sender has cleared, `_is_paused` is True only
    for a reactor that stops here before its next look at the queue."""

    def __init__(self, assoc: Association) -> None:
        self._assoc = assoc
        self._cond = threading.Condition(threading.Lock())
        self._open = True

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if self._open:
                self._assoc._is_paused = False  # passing: whatever the reactor said
                return True
            return self._cond.wait_for(lambda: self._open, timeout)


def _dul_init(self: DULServiceProvider, assoc: Association) -> None:
    """DULServiceProvider.__init__; ours also get the locks direct writes and reads take,
    waking queues, and their state machine's actions under the send lock."""
    _dul_init_original(self, assoc)
    if not _ours(assoc):
        return
    self._reading = threading.Lock()  # held by the DUL thread while it reads a PDU
    # Held while a PDU goes out: ours (`_write`), and pynetdicom's from the moment an
    # action takes a primitive off to_provider_queue until its PDU is sent (in 3.0.x
    # the reactor only peeks at the queue; the action, DT-1 and the like, takes and sends).
    self._sending = threading.RLock()
    self._held = False
    self._wake_recv, self._wake_send = socket.socketpair()
    self._wake_recv.setblocking(False)
    self._wake_send.setblocking(False)
    self.to_provider_queue = _WakingQueue(lambda: _wake_dul(self))
    self.to_user_queue = _WakingQueue(lambda: _wake_reactor(assoc))
    act = self.state_machine.do_action
    kill, stop = self.kill_dul, self.stop_dul

    def do_action(event: str) -> None:
        with self._sending:
            act(event)

    def kill_dul() -> None:
        kill()
        _wake_dul(self)  # it may be waiting DUL_POLL

    def stop_dul() -> bool:
        if self.state_machine.current_state == "Sta1":  # where pynetdicom's stops it
            self._kill_thread = True
            _wake_dul(self)
        return stop()

    self.state_machine.do_action = do_action  # type: ignore[method-assign]
    self.kill_dul = kill_dul  # type: ignore[method-assign]
    self.stop_dul = stop_dul  # type: ignore[method-assign]


def _locked_send(self: AssociationSocket, bytestream: bytes) -> None:
    """AssociationSocket.send; for ours, under the lock `_write` takes."""
    if not _ours(self.assoc):
        return _socket_send(self, bytestream)
    with self.assoc.dul._sending:
        return _socket_send(self, bytestream)


def _dul_transport_event(self: DULServiceProvider) -> bool:
    """DULServiceProvider._is_transport_event; for ours, not while a sender holds the
    socket's reads."""
    if not _ours(self.assoc):
        return _dul_transport_event_original(self)
    with self._reading:
        return False if self._held else _dul_transport_event_original(self)


def _dul_run(self: DULServiceProvider) -> None:
    """DULServiceProvider.run_reactor; for ours, the wake-up sockets closed at the end."""
    if not _ours(self.assoc):
        return _dul_run_original(self)
    try:
        _dul_run_original(self)
    finally:
        self._wake_recv.close()
        self._wake_send.close()


def _wake_dul(provider: DULServiceProvider) -> None:
    with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
        provider._wake_send.send(b"\0")


def _wake_reactor(assoc: Association) -> None:
    dimse = getattr(assoc, "dimse", None)
    if dimse is not None:
        with dimse.msg_queue.not_empty:
            dimse.msg_queue.not_empty.notify_all()


class _WakingTime:
    """`time` for pynetdicom.dul and pynetdicom.association: the idle sleeps of our
    associations' reactors end as soon as there is something to do; any other thread
    sleeps as asked."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        if seconds <= 0.001 and isinstance(thread, DULServiceProvider) and _ours(thread.assoc):
            sock = getattr(thread.socket, "socket", None)
            if sock is not None:
                # Its socket, a send, a kill and the end of a hold wake it; whatever else
                # it looks at (its timers) can wait DUL_POLL. While a sender reads its
                # answer (_hold_reads) the socket is not the thread's to watch.
                watch = [thread._wake_recv] if thread._held else [sock, thread._wake_recv]
                if watch[0] is sock and isinstance(sock, ssl.SSLSocket) and sock.pending():
                    return  # read from the socket already, decrypted: select cannot tell
                try:
                    select.select(watch, [], [], DUL_POLL)
                    while thread._wake_recv.recv(4096):
                        pass
                except BlockingIOError:  # drained
                    return
                except (OSError, ValueError):  # closed meanwhile: sleep as asked
                    pass
        elif seconds == 0.001 and isinstance(thread, Association) and _ours(thread):
            waiting = thread.dimse.msg_queue
            # A release or abort the DUL queued while a handler ran was notified before
            # this wait began: look at its queue too, or it waits out the whole sleep.
            acse = thread.dul.to_user_queue.queue
            with waiting.not_empty:  # holds the queue's lock: qsize() would deadlock
                if not waiting.queue and not acse:
                    waiting.not_empty.wait(seconds)
            return
        time.sleep(seconds)


class Server(ThreadedAssociationServer):
    """The SCP listener (make it with a ServerAE).

    - Accepted connections get TCP_NODELAY, and there is no full garbage collection every
      60 turns of the accept loop (pynetdicom's `service_actions`): with pydicom's
      dictionaries and the index in memory one took milliseconds with the GIL held, in
      the middle of other associations' answers.
    - A plain connection's Association is made in the listener thread itself:
      socketserver started a thread per connection whose only work was to start the
      Association's thread (~0.3 ms before the association request is even read).
    - On TLS, the handshake runs in a thread per connection, within the ACSE timeout:
      pynetdicom does it in the accept thread, where one client that connects and says
      nothing holds up every other.
    - `divert(connection, address)`, when set, sees each plain connection first; when it
      returns True it has taken the connection and no Association is made. It runs in
      the listener thread: it must return quickly.
    """

    divert: Callable[[socket.socket, tuple], bool] | None = None

    def service_actions(self) -> None:
        pass

    def get_request(self) -> tuple[socket.socket, tuple]:
        """Accept only: the TLS handshake, if any, is the connection's thread's work."""
        connection, address = self.socket.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, address

    def process_request(self, request, client_address) -> None:
        if self.ssl_context is not None:
            threading.Thread(
                target=self._handshake, args=(request, client_address), daemon=True
            ).start()
            return
        if self.divert is not None and self.divert(request, client_address):
            return
        self.process_request_thread(request, client_address)  # starts the Association

    def _handshake(self, connection: socket.socket, address: tuple) -> None:
        try:
            connection.settimeout(self.ae.acse_timeout)
            wrapped = self.ssl_context.wrap_socket(connection, server_side=True)
            wrapped.settimeout(None)
        except (OSError, ValueError) as exc:  # refused, silent, gone
            log.info("TLS handshake with %s failed: %s", address[0], exc)
            self.shutdown_request(connection)
            return
        self.process_request_thread(wrapped, address)


class SharedPortServer(Server):
    """A listener sharing its port with the other workers (SO_REUSEPORT): the kernel
    spreads new connections over them."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _nodelay_socket(self: AssociationSocket, address) -> socket.socket:
    """AssociationSocket._create_socket; ours (C-MOVE, the router) get TCP_NODELAY."""
    sock = _create_socket(self, address)
    if _ours(self.assoc):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv; for ours, up to 1 MiB a call, and no PDU beyond our maximum."""
    if not _ours(self.assoc):
        return _socket_recv(self, nr_bytes)
    limit = self.assoc.acceptor.maximum_length if self.assoc.is_acceptor else 0
    if limit and nr_bytes > max(limit, 1 << 16):
        raise OSError(f"peer sent a {nr_bytes}-byte PDU; our maximum is {limit}")
    stream = bytearray()
    while len(stream) < nr_bytes:
        chunk = self.socket.recv(min(nr_bytes - len(stream), 1 << 20))
        if not chunk:  # connection closed: return what we have, as pynetdicom does
            break
        stream += chunk
    return stream
