"""The SCP's event handlers: take the request, call `storage`, map errors to statuses.

Statuses a handler can send, and why, are listed in its docstring (PS3.4 Annex B for
C-STORE, PS3.7 Annex C for the general ones).
"""

import contextlib
import itertools
import logging
import queue
import socket
import threading
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelMove
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from pacs import commitment
from pacs import policy
from pacs import seam
from pacs import tls
from pacs import worklist
from pacs.config import Config
from storage import Archive
from storage import audit
from storage import metrics
from storage import query
from storage.dataset import read_dataset
from storage.dicomjson import json_to_bytes
from storage.errors import DuplicateRejected
from storage.errors import InstanceConflict
from storage.errors import InvalidDataset
from storage.errors import InvalidUID
from storage.errors import OutOfResources
from storage.errors import OverPixelBudget
from storage.errors import SeriesConflict
from storage.errors import StorageError
from storage.errors import UIDMismatch
from storage.recode import to_little_endian
from storage.rows import InstanceLocation

log = logging.getLogger(__name__)

SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.5.9 Failure: Duplicate SOP Instance (policy reject)
OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3 Refused: Out of Resources (disk full)
DATASET_MISMATCH = 0xA900  # PS3.4 B.2.3 Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3 Error: Cannot understand (does not parse, bad UID)
PROCESSING_FAILURE = 0x0110  # PS3.7 C.5.21 Failure: Processing failure (anything else)
QUERYABLE_WAIT = 10.0  # s a C-STORE on pynetdicom's path waits for the indexer
NOT_AUTHORIZED = 0x0124  # PS3.7 C.5.25 Refused: Not Authorized (policy)

STATUS_FOR = {
    OutOfResources: OUT_OF_RESOURCES,
    UIDMismatch: DATASET_MISMATCH,
    SeriesConflict: DATASET_MISMATCH,  # its series is stored under another study
    InstanceConflict: DATASET_MISMATCH,  # stored under another series (duplicates = "reject")
    InvalidDataset: CANNOT_UNDERSTAND,
    InvalidUID: CANNOT_UNDERSTAND,
    OverPixelBudget: CANNOT_UNDERSTAND,  # declares more pixel data than pixel_budget_mb
    DuplicateRejected: DUPLICATE_SOP_INSTANCE,
}


def handle_echo(event: Event) -> int:
    """C-ECHO: always Success (0x0000)."""
    return SUCCESS


def handle_store(event: Event, archive: Archive, config: Config) -> int | Dataset:
    """C-STORE on an association pynetdicom serves (one that also proposed other
    services, or TLS; storage-only associations are pacs.store_scp's): the same receipt
    and check, and Success once durable and, within QUERYABLE_WAIT seconds, queryable:
    a client that stores and then queries over one association finds what it stored.

    0x0000 stored; 0xA700 disk full; 0xA900 dataset UIDs differ from the request, its
    series is stored under another study, or (policies reject, replace) it is stored in another
    series; 0xC000 does not parse, has an invalid UID or declares more pixel data than
    the budget; 0x0111 different bytes under a stored UID with policy `reject`; 0x0124
    the association may not store; 0x0110 any other failure.
    Failures carry an ErrorComment.
    """
    request = event.request
    calling, address = event.assoc.requestor.ae_title, event.assoc.requestor.address
    if not policy.permitted(event, "store"):  # here only on contexts kept for C-GET
        _audit(archive, event, "rejected", "failure: store not permitted")
        return _failure(NOT_AUTHORIZED, f"{calling} may not store")
    sop_class, sop_uid = request.AffectedSOPClassUID, request.AffectedSOPInstanceUID
    try:
        receipt = archive.receive(
            sop_class, sop_uid, event.context.transfer_syntax[0], calling, address
        )
        try:
            receipt.write(request.DataSet.getbuffer())
        except BaseException:
            receipt.discard()
            raise
        entry = archive.accept(receipt, sop_class, sop_uid)  # discards it when refused
    except (StorageError, OSError) as exc:
        status = STATUS_FOR.get(type(exc), PROCESSING_FAILURE)
        _audit(archive, event, "store", f"failure: {exc}", sop=sop_uid)
        log.warning("C-STORE %s from %s refused (0x%04X): %s", sop_uid, calling, status, exc)
        return _failure(status, str(exc))
    if not archive.wait_indexed([entry.path], max(config.index_wait, QUERYABLE_WAIT)):
        log.warning("C-STORE %s: acknowledged before the indexer took it", sop_uid)
    log.info("C-STORE %s from %s: received", sop_uid, calling)
    return SUCCESS


def _failure(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]  # Error Comment (0000,0902), PS3.7 C.5; LO: 64 characters
    return response


def build_handlers(archive: Archive, config: Config) -> list:
    return [
        (evt.EVT_REQUESTED, policy.handle_requested, [config, archive]),
        (evt.EVT_C_ECHO, metrics.timed("C-ECHO", handle_echo)),
        (evt.EVT_C_STORE, metrics.timed("C-STORE", handle_store), [archive, config]),
        (evt.EVT_C_FIND, metrics.timed("C-FIND", handle_find), [archive, config]),
        (evt.EVT_C_GET, metrics.timed("C-GET", handle_get), [archive, config]),
        (evt.EVT_C_MOVE, metrics.timed("C-MOVE", handle_move), [archive, config]),
        (
            evt.EVT_N_ACTION,
            metrics.timed("N-ACTION", commitment.handle_n_action),
            [archive, config],
        ),  # fmt: skip
        (evt.EVT_N_CREATE, metrics.timed("N-CREATE", worklist.handle_n_create), [archive]),
        (evt.EVT_N_SET, metrics.timed("N-SET", worklist.handle_n_set), [archive]),
        (evt.EVT_SOP_EXTENDED, handle_sop_extended),
    ]


# -- Query/Retrieve ----------------------------------------------------------------

FIND_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: "PATIENT",
    StudyRootQueryRetrieveInformationModelFind: "STUDY",
    PatientRootQueryRetrieveInformationModelMove: "PATIENT",
    StudyRootQueryRetrieveInformationModelMove: "STUDY",
    PatientRootQueryRetrieveInformationModelGet: "PATIENT",
    StudyRootQueryRetrieveInformationModelGet: "STUDY",
}
FIND_CLASSES = {
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
}
PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_MISMATCH = 0xA900  # PS3.4 C.4.1.1.4: Identifier does not match SOP Class
UNABLE_TO_PROCESS = 0xC000


def handle_find(event: Event, archive: Archive, config: Config):
    """C-FIND: one pending answer per matching entity, then Success.

    0xFF00 pending (each answer, written by `seam.FindAnswers`); 0x0000 done;
    0xFE00 cancelled (C-CANCEL, checked between answers); 0xA900 no or a bad
    QueryRetrieveLevel; 0xA700 more than `max_results` answers (those sent stand, the
    query should be narrowed); 0xC000 the identifier cannot be decoded.
    """
    if event.request.AffectedSOPClassUID == worklist.WORKLIST_FIND:
        yield from worklist.handle_find(event, archive, config)
        return
    model = FIND_MODELS[event.request.AffectedSOPClassUID]
    try:
        identifier = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", ""))
        keys = query.keys_from_dataset(identifier)
        options = _options(config, event)
        answers = archive.catalog.find(level, keys, model, options, limit=config.max_results + 1)
        first = next(answers, None)
    except query.QueryError as exc:
        log.warning("C-FIND from %s refused: %s", event.assoc.requestor.ae_title, exc)
        _audit(archive, event, "query", f"failure: {exc}")
        yield _failure(IDENTIFIER_MISMATCH, str(exc)), None
        return
    except Exception as exc:  # a value pydicom cannot decode
        log.warning(
            "C-FIND from %s: identifier not understood: %s", event.assoc.requestor.ae_title, exc
        )
        _audit(archive, event, "query", f"failure: identifier not understood: {exc}")
        yield _failure(UNABLE_TO_PROCESS, f"identifier not understood: {exc}"), None
        return
    implicit = event.context.transfer_syntax[0] == ImplicitVRLittleEndian  # else explicit LE
    pending = seam.FindAnswers(event.assoc, event.context.context_id, event.request)
    count = 0
    for answer in itertools.chain([first] if first else [], answers):
        if event.is_cancelled:
            pending.flush()
            log.info(
                "C-FIND from %s cancelled after %d answers", event.assoc.requestor.ae_title, count
            )
            yield CANCELLED, None
            return
        if count == config.max_results:
            pending.flush()
            log.warning(
                "C-FIND from %s stopped at max_results=%d", event.assoc.requestor.ae_title, count
            )
            yield _failure(OUT_OF_RESOURCES, f"more than {count} matches: narrow the query"), None
            return
        count += 1
        pending.send(json_to_bytes(answer, implicit))
    pending.finish()
    log.info("C-FIND %s level from %s: %d answer(s)", level, event.assoc.requestor.ae_title, count)
    _audit(archive, event, "query", answers=count)


def handle_get(event: Event, archive: Archive, config: Config):
    """C-GET: C-STORE sub-operations over the requesting association.

    Pending with remaining/completed/failed/warning counts; final 0x0000, 0xB000 (some
    failed, with the Failed SOP Instance UID List), 0xA702 (all failed), 0xFE00 on C-CANCEL
    (checked between instances), 0xA900 bad identifier. Instances go as stored, or
    decompressed to Explicit VR Little Endian when the peer accepted no context for the
    stored transfer syntax.
    """
    instances = _locate(event, archive)
    if instances is None:
        yield _failure(IDENTIFIER_MISMATCH, "bad Query/Retrieve Level or identifier"), None
        return
    yield len(instances)
    budget = config.pixel_budget_mb << 20
    try:
        for row in instances:  # sent by pynetdicom on this association, in this thread
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, _readable(archive, row, event.assoc.accepted_contexts, budget)
    finally:
        _audit(archive, event, "retrieve", instances=len(instances), by="C-GET")


def handle_move(event: Event, archive: Archive, config: Config):
    """C-MOVE: C-STORE sub-operations over a new association to a configured peer.

    0xA801 unknown destination (not in `peer`); 0xC514 known but not reachable (logged);
    then as C-GET.
    The new association proposes only what the instances need: per SOP class, each stored
    transfer syntax and the uncompressed ones as fall-back.
    """
    destination = event.move_destination
    if isinstance(destination, bytes):
        destination = destination.decode("ascii", "replace")
    peer = next((p for p in config.peer if p.aet == destination.strip()), None)
    if peer is None:
        log.warning("C-MOVE from %s to unknown AE %r", event.assoc.requestor.ae_title, destination)
        yield None, None
        return
    instances = _locate(event, archive)
    if instances is None:
        yield None, None
        return
    if not _reachable(peer.host, peer.port):
        # Raised before the destination is yielded: pynetdicom answers 0xC514 (unable to
        # process) instead of 0xA801, which would claim the AE is unknown. That is its only
        # way to 0xC514, and it logs it at ERROR (its "must yield the (address, port)"
        # line, then this exception with its traceback): our line says what happened.
        log.warning(
            "C-MOVE from %s: destination %s at %s:%d is not reachable, answered 0xC514",
            event.assoc.requestor.ae_title,
            peer.aet,
            peer.host,
            peer.port,
        )
        raise ConnectionError(f"C-MOVE destination {peer.aet} is not reachable (0xC514)")
    established: list = []
    kwargs = {
        "contexts": _contexts_for(instances),
        "evt_handlers": [(evt.EVT_ESTABLISHED, _keep_sub_association, [established])],
        "max_pdu": 0,
        "tls_args": tls.peer_tls_args(config, peer),
    }
    yield peer.host, peer.port, kwargs
    yield len(instances)
    senders = _Senders(event, archive, instances, config.pixel_budget_mb << 20)
    try:
        if established:  # pynetdicom opened it before asking for the count
            senders.add(established[0])
            senders.open_more(peer, kwargs, config.move_associations - 1)
        yield from senders.results()
    finally:
        senders.close()
        _audit(archive, event, "retrieve", instances=len(instances), to=peer.aet, by="C-MOVE")


class _Senders:
    """C-MOVE sub-operations, sent by one thread per association to the destination: the
    one pynetdicom opened and up to `move_associations - 1` more, opened in the background
    (one sends while the peer stores what came over another). Each thread takes the next
    instance as soon as its last one is answered and hands the dataset back with its
    status attached (`seam.already_sent`); the handler yields them to pynetdicom,
    which counts them and sends the pending responses.

    A peer that answers one association at a time (storescp without --fork) leaves the
    extra request waiting until the move is over; one that refuses it changes nothing.
    An association that fails hands its instance back for the others; when none is left,
    what remains is yielded as it is, and pynetdicom's failing send counts it as failed.
    A cancel stops new sends; those under way are counted first.
    """

    POLL = 0.05  # s between looks at a cancel while waiting for a sender

    def __init__(
        self, event: Event, archive: Archive, instances: list[InstanceLocation], pixel_budget: int
    ) -> None:
        self._event = event
        self._archive = archive
        self._pixel_budget = pixel_budget
        self._rows = list(reversed(instances))  # pop() takes them in order
        self._count = len(instances)
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._senders = 0
        self._stopped = False
        self._extra: list = []
        self._closed = False

    def add(self, assoc) -> None:
        with self._lock:
            self._senders += 1
        threading.Thread(target=self._send_all, args=(assoc,), name="sub-op", daemon=True).start()

    def open_more(self, peer, kwargs: dict, count: int) -> None:
        if count > 0 and self._count > 1:
            args = (peer, kwargs["contexts"], kwargs["tls_args"], count)
            threading.Thread(target=self._associate, args=args, daemon=True).start()

    def results(self):
        """(status, dataset) for pynetdicom: each instance once, sent or to be sent."""
        for _ in range(self._count):
            dataset = self._next_done()
            if dataset is None:
                yield CANCELLED, None
                return
            yield PENDING, dataset

    def _next_done(self) -> Dataset | None:
        """The next instance a sender is done with; one no sender is left to send, as
        failed; None once a cancel has stopped them all."""
        while True:
            if self._event.is_cancelled:
                with self._lock:
                    self._stopped = True
            try:
                return self._done.get(timeout=self.POLL)
            except queue.Empty:
                pass
            with self._lock:
                if self._senders or not self._done.empty():
                    continue
                return None if self._stopped else _failed(self._rows.pop())

    def close(self) -> None:
        with self._lock:
            self._stopped = self._closed = True
            extra, self._extra = self._extra, []
        for assoc in extra:
            assoc.release()

    def _take(self) -> InstanceLocation | None:
        with self._lock:
            if not self._event.assoc.is_established:  # the requestor is gone: so is the move
                self._stopped = True
            return None if self._stopped or not self._rows else self._rows.pop()

    def _send_all(self, assoc) -> None:
        try:
            while (row := self._take()) is not None:
                dataset = self._send(assoc, row)
                if dataset is None:  # the association is gone: not this instance
                    with self._lock:
                        self._rows.append(row)
                    return
                self._done.put(dataset)
        finally:
            with self._lock:
                self._senders -= 1

    def _send(self, assoc, row: InstanceLocation) -> Dataset | None:
        """One sub-operation: the dataset with its status attached; None if the
        association is gone."""
        dataset = _readable(self._archive, row, assoc.accepted_contexts, self._pixel_budget)
        if getattr(dataset, "_sent_status", None) is not None:  # unreadable: failed
            return dataset
        try:
            status = assoc.send_c_store(
                dataset,
                msg_id=_next_message_id(assoc),
                originator_aet=self._event.assoc.requestor.ae_title,  # PS3.7 9.3.1.1
                originator_id=self._event.request.MessageID,
            )
        except Exception as exc:
            log.warning("C-MOVE sub-association: %s", exc)
            status = Dataset()
            if isinstance(exc, OSError):  # the connection broke: so did the association
                with contextlib.suppress(Exception):
                    assoc.abort()
        if "Status" not in status and not assoc.is_established:
            return None
        return seam.already_sent(dataset, status)

    def _associate(self, peer, contexts, tls_args, count: int) -> None:
        for _ in range(count):
            assoc = self._event.assoc.ae.associate(
                peer.host,
                peer.port,
                contexts=contexts,
                ae_title=peer.aet,
                max_pdu=0,
                tls_args=tls_args,
            )
            with self._lock:
                keep = assoc.is_established and not self._closed
                if keep:
                    self._extra.append(assoc)
            if keep:
                self.add(assoc)
                continue
            if assoc.is_established:  # too late: the move is over
                assoc.release()
            else:
                log.info("C-MOVE destination %s: no further association", peer.aet)
            return


def _next_message_id(assoc) -> int:
    assoc.sent = getattr(assoc, "sent", 0) % 65535 + 1  # Message ID is a US
    return assoc.sent


def handle_sop_extended(event: Event) -> dict[str, bytes]:
    """Extended negotiation for C-FIND (PS3.4 C.5.1.1): we offer combined date-time range
    matching (byte 2) when asked; relational queries and fuzzy matching we decline."""
    accepted = {}
    for uid, info in event.app_info.items():
        if uid in FIND_CLASSES and info:
            combined = info[1:2] if len(info) > 1 else b"\x00"
            accepted[uid] = b"\x00" + combined
    return accepted


def _keep_sub_association(event: Event, established: list) -> None:
    """Keep the C-MOVE sub-association (pynetdicom opens it from what the handler yields)."""
    established.append(event.assoc)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def _options(config: Config, event: Event | None = None) -> query.Options:
    info = b""
    if event is not None:
        info = event.assoc.requestor.sop_class_extended.get(event.request.AffectedSOPClassUID, b"")
    return query.Options(
        pn_case_insensitive=config.pn_case_insensitive,
        retrieve_aet=config.aet,
        combined_datetime=info[1:2] == b"\x01",
    )


def _audit(archive: Archive, event: Event, kind: str, outcome: str = "success", **detail) -> None:
    """One audit event for a DIMSE request: the calling AE and address, and the identifier's
    non-empty keys (an exact Patient ID and Study Instance UID also in their own columns)."""
    keys: dict[str, str] = {}
    with contextlib.suppress(Exception):  # an identifier that does not decode has no keys
        keys = {
            elem.keyword or str(elem.tag): str(elem.value)
            for elem in event.identifier
            if elem.VR != "SQ" and elem.value not in (None, "") and elem.tag != 0x00080005
        }
    requestor = event.assoc.requestor
    archive.audit(
        audit.Event(
            kind,
            outcome,
            who=requestor.ae_title,
            address=requestor.address,
            patient_id=_exact(keys.get("PatientID", "")),
            study_uid=_exact(keys.get("StudyInstanceUID", "")),
            detail={**({"keys": keys} if keys else {}), **detail},
        )
    )


def _exact(value: str) -> str:
    """A single exact matching value, or '' for a wildcard, range or list."""
    return "" if any(c in value for c in "*?\\") else value


def _locate(event: Event, archive: Archive) -> list[InstanceLocation] | None:
    model = FIND_MODELS[event.request.AffectedSOPClassUID]
    try:
        identifier = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", ""))
        return list(archive.catalog.locate(level, query.keys_from_dataset(identifier), model))
    except Exception as exc:
        log.warning("retrieve from %s refused: %s", event.assoc.requestor.ae_title, exc)
        return None


def _contexts_for(instances: list[InstanceLocation]) -> list[PresentationContext]:
    """One context per (SOP class, stored syntax) and one uncompressed per SOP class; merged
    per SOP class when that exceeds the 128 contexts an association may propose."""
    needed: dict[str, set[str]] = {}
    for row in instances:
        needed.setdefault(row.sop_class_uid, set()).add(row.transfer_syntax)
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    pairs = [(c, [s]) for c, syntaxes in needed.items() for s in sorted(syntaxes)]
    pairs += [(c, uncompressed) for c in needed]
    if len(pairs) > 128:
        pairs = [(c, sorted(syntaxes) + uncompressed) for c, syntaxes in needed.items()][:128]
    return [build_context(c, syntaxes) for c, syntaxes in pairs]


def _readable(
    archive: Archive, row: InstanceLocation, accepted: list, pixel_budget: int
) -> Dataset:
    """The instance to send (`_dataset_to_send`), or, if its file cannot be read (or
    fetched from the object store) or converted, a failed sub-operation (PS3.4
    C.4.2.1.4.2: counted, its UID in the Failed SOP Instance UID List)."""
    try:
        path = archive.files.local(row.path)
        return _dataset_to_send(path, row, accepted, pixel_budget)
    except Exception as exc:
        log.warning("cannot send %s: %s", row.sop_uid, exc)
        return _failed(row)


def _failed(row: InstanceLocation) -> Dataset:
    dataset, status = Dataset(), Dataset()
    dataset.SOPInstanceUID = row.sop_uid
    status.Status = PROCESSING_FAILURE
    return seam.already_sent(dataset, status)


def _dataset_to_send(
    path: Path, row: InstanceLocation, accepted: list, pixel_budget: int
) -> Dataset:
    """The stored instance (its file at `path`): its bytes as stored, sent from the file,
    when the peer took that syntax, else the dataset made little endian by storage.recode
    (decompressed within `pixel_budget` bytes, or byte-swapped), which pynetdicom encodes
    in the accepted syntax."""
    syntax = UID(row.transfer_syntax)
    offered = [cx.transfer_syntax[0] for cx in accepted if cx.abstract_syntax == row.sop_class_uid]
    if syntax in offered:
        stored = seam.StoredFile(path)  # opened here: one that cannot be is a failed sub-op
        return seam.StoredDataset(row.sop_class_uid, row.sop_uid, syntax, stored)
    ds = read_dataset(path)  # a deflated one inflated within MAX_INFLATED
    if any(s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) for s in offered):
        to_little_endian(ds, pixel_budget)  # raises: the sub-operation fails, counted
    return ds
