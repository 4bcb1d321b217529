"""Storage associations on our own DICOM upper layer (PS3.8): the C-STORE fast path.

A modality's association proposes storage classes (and perhaps Verification) and
nothing else. pynetdicom serves it with two reactor threads that poll, queues between
them, a state machine and pydicom-encoded commands: more CPU per instance than the
archive's own work (docs/ingest-performance.md). The listener (pacs.seam's
Server) offers every new plain connection to `StoreSCP.divert`, which peeks at the
A-ASSOCIATE-RQ without taking it off the socket. A storage-only association is served
here, by one thread with blocking reads: PDVs are written straight into the archive's
journal (storage.journal) and each C-STORE is answered once its receipt is checked and
durable. Anything else (query/retrieve, commitment, worklist, SCP/SCU role selection,
an unparsable request) goes to pynetdicom untouched; so does TLS.

What is implemented of PS3.8 and PS3.7 here: A-ASSOCIATE-RQ/AC/RJ (one application
context, presentation contexts, maximum length, implementation class and version; an
asynchronous operations window is not offered, so one operation at a time), P-DATA-TF
with commands and datasets fragmented over any number of PDVs and PDUs, A-RELEASE,
A-ABORT both ways, C-ECHO, C-STORE and C-CANCEL (ignored: a C-STORE is not cancelled).
The association policy (pacs.policy) decides as it does for pynetdicom's associations.
"""

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from pynetdicom.sop_class import Verification

from pacs import dimse
from pacs import policy
from pacs.config import Config
from pacs.handlers import PROCESSING_FAILURE
from pacs.handlers import STATUS_FOR
from pacs.handlers import SUCCESS
from storage import Archive
from storage import audit
from storage import metrics
from storage.errors import StorageError
from storage.journal import IMPLEMENTATION_UID
from storage.journal import IMPLEMENTATION_VERSION
from storage.journal import Receipt

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
MAX_REQUEST = 1 << 16  # bytes of an A-ASSOCIATE-RQ we read ourselves (larger: pynetdicom)
MIN_PDU = 1 << 16  # a peer may send PDUs this long whatever maximum we announce
# Bytes a recv may bring in at once (about two of dcmtk's 128 KiB PDUs); a longer PDU
# grows the buffer to its length. The buffer is resident from the start (bytearray
# zero-fills it): at 1 MiB, 8 associations held 8 MiB of the worker's RSS.
READ_SIZE = 1 << 18
MAX_COMMAND = 1 << 16  # bytes of one command set (a C-STORE-RQ's is ~200)
# Presentation context results (PS3.8 9.3.3.2)
ACCEPTED, USER_REJECTED, ABSTRACT_NOT_SUPPORTED, SYNTAX_NOT_SUPPORTED = 0, 1, 3, 4
# A-ASSOCIATE-RJ (result, source, reason) and A-ABORT (source, reason), PS3.8 9.3.4, 9.3.8
APPLICATION_CONTEXT_NOT_SUPPORTED = (0x01, 0x01, 0x02)
PROTOCOL_VERSION_NOT_SUPPORTED = (0x01, 0x02, 0x02)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
UNRECOGNIZED_PDU = (0x02, 0x01)
UNEXPECTED_PDU = (0x02, 0x02)
INVALID_PDU_PARAMETER = (0x02, 0x06)
NOT_SPECIFIED = (0x00, 0x00)


class ProtocolError(Exception):
    """The peer broke PS3.8 or PS3.7: the association is aborted with `abort`."""

    def __init__(self, message: str, abort: tuple[int, int] = UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.abort = abort


@dataclass
class Request:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2), as far as a storage association needs it."""

    pdu: bytes
    version: int
    called: str
    calling: str
    application_context: str = ""
    contexts: list[tuple[int, str, list[str]]] = field(default_factory=list)
    max_length: int = 0
    role_selection: bool = False

    @classmethod
    def parse(cls, pdu: bytes) -> "Request":
        """Raises ValueError when the PDU is not a well-formed A-ASSOCIATE-RQ."""
        if len(pdu) < 74 or pdu[0] != dimse.ASSOCIATE_RQ:
            raise ValueError("not an A-ASSOCIATE-RQ")
        if struct.unpack_from(">I", pdu, 2)[0] != len(pdu) - 6:
            raise ValueError("the A-ASSOCIATE-RQ did not arrive whole")
        request = cls(
            pdu,
            struct.unpack_from(">H", pdu, 6)[0],
            pdu[10:26].decode("ascii", "replace").strip(),
            pdu[26:42].decode("ascii", "replace").strip(),
        )
        for kind, value in _items(pdu, 74):
            if kind == 0x10:
                request.application_context = _uid(value)
            elif kind == 0x20:
                syntaxes = [(k, v) for k, v in _items(value, 4)]
                abstract = [_uid(v) for k, v in syntaxes if k == 0x30]
                if len(abstract) != 1 or not value:
                    raise ValueError("a presentation context without one abstract syntax")
                transfer = [_uid(v) for k, v in syntaxes if k == 0x40]
                request.contexts.append((value[0], abstract[0], transfer))
            elif kind == 0x50:
                for sub, data in _items(value, 0):
                    if sub == 0x51 and len(data) == 4:
                        request.max_length = struct.unpack(">I", data)[0]
                    elif sub == 0x54:
                        request.role_selection = True
        return request


def _items(data: bytes, offset: int):
    """(type, value) of the items (or sub-items) from `offset` to the end of `data`."""
    while offset < len(data):
        if offset + 4 > len(data):
            raise ValueError("an item header runs past its PDU")
        kind, _, length = struct.unpack_from(">BBH", data, offset)
        if offset + 4 + length > len(data):
            raise ValueError("an item runs past its PDU")
        yield kind, data[offset + 4 : offset + 4 + length]
        offset += 4 + length


def _uid(value: bytes) -> str:
    return value.decode("ascii", "replace").rstrip("\0 ")


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


class StoreSCP:
    """Serves storage-only associations; built once per listening SCP."""

    def __init__(
        self,
        config: Config,
        archive: Archive,
        storage_classes: Callable[[str], bool],
        syntaxes: list[str],
        others: Callable[[], int],
    ) -> None:
        """`storage_classes(uid)`: whether we store that SOP class; `syntaxes`: the
        transfer syntaxes we accept; `others()`: associations pynetdicom has open (for
        max_associations)."""
        self.config = config
        self.archive = archive
        self.is_storage = storage_classes
        self.syntaxes = set(syntaxes)
        self.others = others
        self.fallback: Callable[[socket.socket, tuple], None] | None = None
        self._lock = threading.Lock()
        self._open: set[_Association] = set()

    @property
    def active(self) -> int:
        return len(self._open)

    def divert(self, sock: socket.socket, address: tuple) -> bool:
        """The listener's hook, in its thread: True when the connection is ours to serve
        (a storage association, or one whose request has not fully arrived: a thread
        waits for it and routes it then)."""
        pdu = _peek_request(sock, None)
        if pdu is None:
            threading.Thread(target=self._route_later, args=(sock, address), daemon=True).start()
            return True
        request = self._ours(pdu)
        if request is None:
            return False
        threading.Thread(
            target=self._serve, args=(sock, address, request), name="store-scp", daemon=True
        ).start()
        return True

    def stop(self, drain: float) -> None:
        """Let open associations finish for up to `drain` seconds, then abort them."""
        deadline = time.monotonic() + drain
        while self._open and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left = list(self._open)
        for assoc in left:
            log.warning("aborting association with %s at shutdown", assoc.request.calling)
            assoc.abort(NOT_SPECIFIED)

    def _route_later(self, sock: socket.socket, address: tuple) -> None:
        pdu = _peek_request(sock, self.config.acse_timeout)
        if pdu is None:  # silent or closed (PS3.8 ARTIM): nothing to answer
            with contextlib.suppress(OSError):
                sock.close()
            return
        request = self._ours(pdu)
        if request is not None:
            self._serve(sock, address, request)
        elif self.fallback is not None:
            self.fallback(sock, address)

    def _ours(self, pdu: bytes) -> Request | None:
        """The request, if it asks for storage (and Verification) only."""
        try:
            request = Request.parse(pdu)
        except ValueError:
            return None  # pynetdicom answers malformed requests as the standard says
        if request.role_selection or not request.contexts:
            return None
        if any(
            abstract != Verification and not self.is_storage(abstract)
            for _, abstract, _ in request.contexts
        ):
            return None
        return request

    def _serve(self, sock: socket.socket, address: tuple, request: Request) -> None:
        assoc = _Association(self, sock, address[0], request)
        with self._lock:
            self._open.add(assoc)
        try:
            assoc.run()
        finally:
            with self._lock:
                self._open.discard(assoc)


def _peek_request(sock: socket.socket, timeout: float | None) -> bytes | None:
    """The A-ASSOCIATE-RQ PDU waiting on the socket, left there for whoever serves it.
    `timeout` None: only what has arrived already, None if not all of it has; else wait
    up to `timeout` s, None if it did not come whole (or the peer closed). A PDU larger
    than MAX_REQUEST is returned as its first bytes (not ours: pynetdicom reads it)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.0005
    while True:
        try:
            data = sock.recv(MAX_REQUEST, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            if not data:
                return None  # closed
        except BlockingIOError:
            data = b""
        except OSError:
            return None
        if len(data) >= 6:
            (length,) = struct.unpack_from(">I", data, 2)
            if len(data) >= 6 + length or len(data) == MAX_REQUEST or data[0] != 1:
                return data[: 6 + length]
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if data:  # the rest of the PDU is on its way: look again, less and less often
            pause = min(pause * 2, 0.05)
            time.sleep(min(pause, left))
        else:
            try:
                select.select([sock], [], [], left)
            except (OSError, ValueError):
                return None


def _set_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking socket whose reads and writes fail (EAGAIN, an OSError) after `seconds`
    without progress. Not socket.settimeout: Python then polls before every recv and
    send (~4 more system calls a 0.5 MB CT instance), each a release of the GIL that a
    sender's associations contend for in the worker."""
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class _Association:
    """One storage association, served in its own thread."""

    def __init__(self, owner: StoreSCP, sock: socket.socket, address: str, request: Request):
        self.owner = owner
        self.config = owner.config
        self.archive = owner.archive
        self.sock = sock
        self.address = address
        self.request = request
        self.max_pdu = self.config.max_pdu
        self.peer_max_pdu = request.max_length
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted: id → (abstract, syntax)
        self.entries: list[Path] = []  # journal entries acknowledged, maybe not yet indexed
        self._limit = max(self.max_pdu, MIN_PDU) if self.max_pdu else 0  # longest PDU taken
        self._buffer = bytearray(READ_SIZE)
        self._start = self._end = 0  # what is buffered and not yet taken
        self._command = bytearray()
        self._command_context = 0
        self._store: _Store | None = None

    # -- association ---------------------------------------------------------------

    def run(self) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _set_timeout(self.sock, self.config.acse_timeout)
            self._read(len(self.request.pdu))  # the request, peeked so far
            if not self._associate():
                return
            _set_timeout(self.sock, self.config.network_timeout)
            self._serve()
        except ProtocolError as exc:
            log.warning("association from %s aborted: %s", self.request.calling, exc)
            self.abort(exc.abort)
        except BlockingIOError:  # _set_timeout's timeout
            log.info("association from %s ended: silent past its timeout", self.request.calling)
        except (OSError, TimeoutError) as exc:
            log.info("association from %s ended: %s", self.request.calling, exc or "timeout")
        except Exception:  # a bug, or the archive failing: never a silent dead thread
            log.exception("association from %s failed", self.request.calling)
            self.abort(NOT_SPECIFIED)
        finally:
            with contextlib.suppress(OSError):
                if self._store is not None:
                    self._store.receipt.discard()
            with contextlib.suppress(OSError):
                self.sock.close()

    def abort(self, reason: tuple[int, int]) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">BBIBBBB", dimse.ABORT, 0, 4, 0, 0, *reason))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _associate(self) -> bool:
        """Answer the request: A-ASSOCIATE-AC, or RJ (False)."""
        request = self.request
        decision = policy.decide(self.config, request.calling, request.called, self.address)
        reject = decision.reject
        if reject is not None:
            policy.record_rejection(
                self.archive, request.calling, self.address, request.called, decision.reason
            )
        elif not request.version & 1:
            reject = PROTOCOL_VERSION_NOT_SUPPORTED
        elif request.application_context != APPLICATION_CONTEXT:
            reject = APPLICATION_CONTEXT_NOT_SUPPORTED
        elif self.owner.active + self.owner.others() > self.config.max_associations:
            log.warning("association from %s refused: max_associations", request.calling)
            reject = LOCAL_LIMIT_EXCEEDED
        if reject is not None:
            self.sock.sendall(struct.pack(">BBIBBBB", dimse.ASSOCIATE_RJ, 0, 4, 0, *reject))
            return False
        items = _item(0x10, request.application_context.encode())
        for context_id, abstract, syntaxes in request.contexts:
            result, syntax = self._negotiate(abstract, syntaxes, decision.allowed)
            if result == ACCEPTED:
                self.contexts[context_id] = (abstract, syntax)
            sub = _item(0x40, syntax.encode())
            items += struct.pack(">BBHBBBB", 0x21, 0, 4 + len(sub), context_id, 0, result, 0)
            items += sub
        user = _item(0x51, struct.pack(">I", self.max_pdu))
        user += _item(0x52, IMPLEMENTATION_UID.encode())
        user += _item(0x55, IMPLEMENTATION_VERSION.encode())
        items += _item(0x50, user)
        # Called and calling AE titles and the reserved field go back as they came.
        body = struct.pack(">HH", 1, 0) + request.pdu[10:74] + items
        self.sock.sendall(struct.pack(">BBI", dimse.ASSOCIATE_AC, 0, len(body)) + body)
        log.info(
            "association from %s at %s: storage, %d of %d context(s) accepted",
            request.calling,
            self.address,
            len(self.contexts),
            len(request.contexts),
        )
        return True

    def _negotiate(self, abstract: str, syntaxes: list[str], allowed) -> tuple[int, str]:
        """(result, transfer syntax) for one proposed context: the first syntax we take,
        in the requestor's order of preference."""
        first = syntaxes[0] if syntaxes else ""
        if abstract == Verification:
            if "echo" not in allowed:
                return USER_REJECTED, first
        elif "store" not in allowed:
            return USER_REJECTED, first
        syntax = next((s for s in syntaxes if s in self.owner.syntaxes), None)
        return (ACCEPTED, syntax) if syntax else (SYNTAX_NOT_SUPPORTED, first)

    def _serve(self) -> None:
        """PDUs until the association is released or aborted."""
        while True:
            kind, length = struct.unpack(">BxI", self._read(6))
            if kind == dimse.P_DATA:
                if self._limit and length > self._limit:
                    raise ProtocolError(
                        f"a {length}-byte PDU; our maximum is {self.max_pdu}",
                        INVALID_PDU_PARAMETER,
                    )
                self._pdata(self._read(length))
            elif kind == dimse.RELEASE_RQ:
                if length != 4:
                    raise ProtocolError(f"an A-RELEASE-RQ of {length} bytes", INVALID_PDU_PARAMETER)
                self._read(length)
                self._release()
                return
            elif kind == dimse.ABORT:
                log.info("association from %s aborted by the peer", self.request.calling)
                return
            elif kind in (dimse.ASSOCIATE_RQ, dimse.ASSOCIATE_AC, dimse.ASSOCIATE_RJ):
                raise ProtocolError(f"unexpected PDU type 0x{kind:02X}")
            else:
                raise ProtocolError(f"unrecognized PDU type 0x{kind:02X}", UNRECOGNIZED_PDU)

    def _release(self) -> None:
        """A-RELEASE-RP, once what this association stored is queryable (at most
        index_wait seconds): a script that stores and then queries finds it all."""
        if self._store is not None or self._command:
            raise ProtocolError("release requested in the middle of a message")
        wait = self.config.index_wait
        if self.entries and wait and not self.archive.wait_indexed(self.entries, wait):
            log.warning("released before indexing caught up (index_wait)")
        self.sock.sendall(struct.pack(">BBII", dimse.RELEASE_RP, 0, 4, 0))

    def _read(self, size: int) -> memoryview:
        """The next `size` bytes off the socket, as a view valid until the next call:
        received READ_SIZE at a time, so a PDU header and its body, or several small
        PDUs, cost one recv."""
        if self._end - self._start < size:
            kept = self._end - self._start
            if size > len(self._buffer):
                bigger = bytearray(size)
                bigger[:kept] = self._buffer[self._start : self._end]
                self._buffer = bigger
            else:
                self._buffer[:kept] = self._buffer[self._start : self._end]
            self._start, self._end = 0, kept
            view = memoryview(self._buffer)
            while self._end < size:
                n = self.sock.recv_into(view[self._end :])
                if not n:
                    raise ConnectionError("the peer closed the connection")
                self._end += n
        self._start += size
        return memoryview(self._buffer)[self._start - size : self._start]

    # -- DIMSE -----------------------------------------------------------------------

    def _pdata(self, items: memoryview) -> None:
        offset = 0
        while offset < len(items):
            if offset + 6 > len(items):
                raise ProtocolError("a PDV header runs past its PDU", INVALID_PDU_PARAMETER)
            length, context_id, header = struct.unpack_from(">IBB", items, offset)
            end = offset + 4 + length
            if length < 2 or end > len(items):
                raise ProtocolError("a PDV runs past its PDU", INVALID_PDU_PARAMETER)
            if context_id not in self.contexts:
                raise ProtocolError(f"a PDV on presentation context {context_id}, not accepted")
            fragment = items[offset + 6 : end]
            if header & 1:
                self._command_fragment(context_id, fragment, bool(header & 2))
            else:
                self._dataset_fragment(context_id, fragment, bool(header & 2))
            offset = end

    def _command_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        if self._store is not None:
            raise ProtocolError("a command before the previous dataset ended")
        if self._command and context_id != self._command_context:
            raise ProtocolError("a command's fragments on two presentation contexts")
        self._command_context = context_id
        self._command += fragment
        if len(self._command) > MAX_COMMAND:
            raise ProtocolError(f"a command set longer than {MAX_COMMAND} bytes")
        if last:
            fields = dimse.fields(self._command)
            self._command.clear()
            self._dispatch(context_id, fields)

    def _dispatch(self, context_id: int, fields: dict[int, bytes]) -> None:
        command = struct.unpack("<H", fields.get(dimse.COMMAND_FIELD, b"\0\0")[:2])[0]
        has_dataset = fields.get(dimse.COMMAND_DATASET_TYPE) != dimse.us(dimse.NO_DATASET)
        abstract, syntax = self.contexts[context_id]
        if command == dimse.C_ECHO_RQ and abstract == Verification and not has_dataset:
            started = time.monotonic()
            self._respond(context_id, fields, dimse.C_ECHO_RSP, SUCCESS)
            metrics.dimse("C-ECHO", started, False)
        elif command == dimse.C_STORE_RQ and abstract != Verification and has_dataset:
            self._store = _Store(context_id, fields, self._receive(fields, syntax))
        elif command == dimse.C_CANCEL_RQ:
            pass  # PS3.7 9.3.2.3: a C-STORE has no cancel; nothing is under way between messages
        else:
            raise ProtocolError(f"command 0x{command:04X} on a {abstract} context")

    def _receive(self, fields: dict[int, bytes], syntax: str) -> Receipt:
        return self.archive.receive(
            _uid(fields.get(dimse.AFFECTED_SOP_CLASS_UID, b"")),
            _uid(fields.get(dimse.AFFECTED_SOP_INSTANCE_UID, b"")),
            syntax,
            self.request.calling,
            self.address,
        )

    def _dataset_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        store = self._store
        if store is None or context_id != store.context_id:
            raise ProtocolError("a dataset fragment with no C-STORE request before it")
        store.receipt.write(fragment)
        if last:
            self._store = None
            self._finish(store)

    def _finish(self, store: "_Store") -> None:
        """Check the dataset and make it durable, then answer the C-STORE."""
        sop_class = _uid(store.fields.get(dimse.AFFECTED_SOP_CLASS_UID, b""))
        sop_uid = _uid(store.fields.get(dimse.AFFECTED_SOP_INSTANCE_UID, b""))
        status, comment = SUCCESS, ""
        try:
            entry = self.archive.accept(store.receipt, sop_class, sop_uid)
            if self.config.index_wait:  # for the release to wait on
                self.entries.append(entry.path)
        except StorageError as exc:
            status, comment = STATUS_FOR.get(type(exc), PROCESSING_FAILURE), str(exc)
        except OSError as exc:
            status, comment = PROCESSING_FAILURE, f"cannot store the dataset: {exc}"
        self._respond(store.context_id, store.fields, dimse.C_STORE_RSP, status, comment)
        metrics.dimse("C-STORE", store.started, status != SUCCESS)
        if status == SUCCESS:  # debug: a line an instance, the audit trail has each
            log.debug("C-STORE %s from %s: received", sop_uid, self.request.calling)
            return
        log.warning(
            "C-STORE %s from %s refused (0x%04X): %s",
            sop_uid[:64],
            self.request.calling,
            status,
            comment,
        )
        self.archive.audit(
            audit.Event(
                "store",
                f"failure: {comment}",
                who=self.request.calling,
                address=self.address,
                detail={"sop": sop_uid[:64]},
            )
        )

    def _respond(
        self, context_id: int, fields: dict[int, bytes], kind: int, status: int, comment: str = ""
    ) -> None:
        elements = [
            (dimse.AFFECTED_SOP_CLASS_UID, fields.get(dimse.AFFECTED_SOP_CLASS_UID, b"")),
            (dimse.COMMAND_FIELD, dimse.us(kind)),
            (dimse.MESSAGE_ID_BEING_RESPONDED_TO, fields.get(dimse.MESSAGE_ID, b"\0\0")),
            (dimse.COMMAND_DATASET_TYPE, dimse.us(dimse.NO_DATASET)),
            (dimse.STATUS, dimse.us(status)),
        ]
        if kind == dimse.C_STORE_RSP:
            elements.append(
                (dimse.AFFECTED_SOP_INSTANCE_UID, fields.get(dimse.AFFECTED_SOP_INSTANCE_UID, b""))
            )
        if comment:
            elements.append((dimse.ERROR_COMMENT, dimse.text(comment)))
        message = dimse.command(*sorted(elements))
        self.sock.sendall(dimse.pdata(context_id, message, True, self.peer_max_pdu))


@dataclass
class _Store:
    """A C-STORE whose dataset is arriving."""

    context_id: int
    fields: dict[int, bytes]
    receipt: Receipt
    started: float = field(default_factory=time.monotonic)
