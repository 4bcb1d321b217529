"""The SCU side, for scripts: echo, find, send, move and get against any PACS.

Each function opens its own association(s) and raises `ScuError` (a DIMSE failure, with
its status) or `AssociationError` (refused, aborted, unreachable); results are plain
pydicom Datasets and small dataclasses. It runs stock pynetdicom: the seam (pacs.seam)
is the server's, and reaches `send` only when the server passes its own AE (the router).
"""

import logging
import ssl
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import StoragePresentationContexts
from pynetdicom import _config
from pynetdicom import build_role
from pynetdicom import evt
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelMove
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove
from pynetdicom.sop_class import Verification

from pacs.tls import peer_tls_args
from storage.dataset import open_dataset
from storage.errors import InvalidDataset
from storage.errors import StorageError
from storage.query import identifier as identifier  # scu.identifier: part of this API

log = logging.getLogger(__name__)
UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
FIND = {
    "PATIENT": PatientRootQueryRetrieveInformationModelFind,
    "STUDY": StudyRootQueryRetrieveInformationModelFind,
}
MOVE = {
    "PATIENT": PatientRootQueryRetrieveInformationModelMove,
    "STUDY": StudyRootQueryRetrieveInformationModelMove,
}
GET = {
    "PATIENT": PatientRootQueryRetrieveInformationModelGet,
    "STUDY": StudyRootQueryRetrieveInformationModelGet,
}
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class AssociationError(ConnectionError):
    """The peer could not be reached, refused the association, or aborted it."""


class ScuError(Exception):
    """The peer answered with a failure status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"0x{status:04X}: {message}")
        self.status = status


@dataclass(frozen=True)
class Remote:
    """Where to connect: the peer's address and AE title, and ours."""

    host: str = "127.0.0.1"
    port: int = 11112
    aet: str = "MINIPACS"
    calling_aet: str = "MINIPACS-SCU"
    tls: ssl.SSLContext | None = None  # DICOM over TLS (pacs.tls.client_context)

    @classmethod
    def for_peer(cls, config, peer) -> "Remote":
        """A configured peer (`peer` setting), called as our AE, over TLS if marked so."""
        tls_args = peer_tls_args(config, peer)
        return cls(peer.host, peer.port, peer.aet, config.aet, tls_args and tls_args[0])


@dataclass
class Outcome:
    """The result of send, move or get: counts, failed UIDs and the final status."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    status: int = 0x0000
    failed_uids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # failed UID or path → why

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.status in (0x0000, 0xB000) and not self.problems


def echo(remote: Remote) -> int:
    """C-ECHO; returns the status (0x0000 for success)."""
    with _association(remote, [(Verification, UNCOMPRESSED)]) as assoc:
        response = assoc.send_c_echo()
        return _status(response)


def find(remote: Remote, query: Dataset, model: str = "STUDY") -> Iterator[Dataset]:
    """C-FIND; yields each answer; raises ScuError when the query ends in failure."""
    model = model.upper()
    with _association(remote, [(FIND[model], UNCOMPRESSED)]) as assoc:
        for status, answer in assoc.send_c_find(query, FIND[model]):
            code = _status(status)
            if code in (0xFF00, 0xFF01):
                yield answer
            elif code != 0x0000:
                raise ScuError(code, str(status.get("ErrorComment", "C-FIND failed")))


def send(
    remote: Remote,
    paths: Iterable[Path],
    parallel: int = 1,
    progress: Callable[[Path, int], None] | None = None,
    make_ae: Callable[..., AE] = AE,
) -> Outcome:
    """C-STORE files exactly as they are (dataset bytes from the file), over `parallel`
    associations; `progress(path, status)` is called after each. `make_ae(ae_title=…)`
    makes our AE for each association (the server's router passes seam.ServerAE).
    A file that is not DICOM or cannot be read is not sent: it counts as failed, with
    its reason, and the others go. Each association's worker reads its own files' headers
    (the contexts it proposes), so `parallel` workers read them side by side rather than
    the caller reading every file's before any association."""
    outcome = Outcome()
    lock = threading.Lock()
    todo = [Path(path) for path in paths]
    chunks = [todo[n::parallel] for n in range(max(1, parallel))]

    def run(chunk: list[Path]) -> None:
        files: list[tuple[Path, tuple[str, str]]] = []
        for path in chunk:
            try:
                files.append((path, _file_context(path)))
            except (OSError, StorageError) as exc:
                with lock:
                    outcome.failed += 1
                    outcome.failed_uids.append(str(path))
                    outcome.reasons[str(path)] = f"not sent: {exc}"
                if progress:
                    progress(path, 0xC000)
        if not files:
            return
        done: list[Path] = []
        try:
            _send_chunk(remote, files, outcome, lock, progress, make_ae, done)
        except Exception as exc:  # AssociationError, a file pynetdicom cannot read…
            with lock:
                outcome.failed += len(files) - len(done)
                outcome.problems.append(str(exc) or type(exc).__name__)

    threads = [threading.Thread(target=run, args=(c,)) for c in chunks if c]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome


def move(
    remote: Remote,
    level: str,
    uids: list[str],
    destination: str,
    model: str = "STUDY",
    progress: Callable[[Dataset], None] | None = None,
) -> Outcome:
    """C-MOVE the entities with these unique keys to the AE `destination`."""
    model = model.upper()
    query = _retrieve_identifier(level, uids)
    with _association(remote, [(MOVE[model], UNCOMPRESSED)]) as assoc:
        return _retrieve(assoc.send_c_move(query, destination, MOVE[model]), progress)


def get(
    remote: Remote,
    level: str,
    uids: list[str],
    out: Path,
    model: str = "STUDY",
    progress: Callable[[Dataset], None] | None = None,
) -> Outcome:
    """C-GET the entities with these unique keys into folder `out` (files as received)."""
    model = model.upper()
    out.mkdir(parents=True, exist_ok=True)
    contexts = [(GET[model], UNCOMPRESSED), *_storage_contexts(remote, level, uids, model)]
    roles = [build_role(c, scp_role=True) for c in dict.fromkeys(c for c, _ in contexts[1:])]
    received: list[str] = []

    def store(event) -> int:
        sop_uid = event.request.AffectedSOPInstanceUID
        (out / f"{sop_uid}.dcm").write_bytes(event.encoded_dataset())
        received.append(sop_uid)
        return 0x0000

    handlers = [(evt.EVT_C_STORE, store)]
    with _association(remote, contexts, roles, handlers) as assoc:
        return _retrieve(assoc.send_c_get(_retrieve_identifier(level, uids), GET[model]), progress)


# -- helpers -------------------------------------------------------------------------


class _association:
    """Context manager: an established association, released (or aborted) on exit."""

    def __init__(self, remote: Remote, contexts, roles=None, handlers=None, make_ae=AE) -> None:
        ae = make_ae(ae_title=remote.calling_aet)
        ae.maximum_pdu_size = 1 << 20
        for sop_class, syntaxes in contexts[:128]:
            ae.add_requested_context(sop_class, syntaxes)
        self.assoc = ae.associate(
            remote.host,
            remote.port,
            ae_title=remote.aet,
            ext_neg=roles or [],
            evt_handlers=handlers or [],
            tls_args=(remote.tls, remote.host) if remote.tls else None,
        )
        if not self.assoc.is_established:
            reason = "rejected" if self.assoc.is_rejected else "not reachable or aborted"
            raise AssociationError(
                f"association with {remote.aet} at {remote.host}:{remote.port} {reason}"
            )

    def __enter__(self):
        return self.assoc

    def __exit__(self, *exc: object) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def _status(response: Dataset) -> int:
    if not response or "Status" not in response:
        raise AssociationError("no response: the association was aborted or timed out")
    return int(response.Status)


def _file_context(path: Path) -> tuple[str, str]:
    """A file's (SOP class, transfer syntax) from its File Meta; raises NotDicom,
    InvalidDataset (no SOP class there) or OSError: such a file is not sent."""
    fp, meta, _ = open_dataset(path)
    fp.close()
    if not meta.sop_class_uid:
        raise InvalidDataset("File Meta Information has no Media Storage SOP Class UID")
    return meta.sop_class_uid, meta.syntax


def _send_chunk(remote, chunk, outcome, lock, progress, make_ae, done) -> None:
    # One association per 128 distinct (SOP class, transfer syntax) pairs.
    pairs = list(dict.fromkeys(context for _, context in chunk))
    for start in range(0, len(pairs), 128):
        group = set(pairs[start : start + 128])
        todo = [path for path, context in chunk if context in group]
        # A path is sent by pynetdicom as the file's dataset bytes, streamed (never decoded).
        _config.STORE_SEND_CHUNKED_DATASET = True
        with _association(remote, [(c, [s]) for c, s in group], make_ae=make_ae) as assoc:
            for path in todo:
                try:
                    status = _status(assoc.send_c_store(path))
                except (ValueError, AttributeError) as exc:  # no context, bad file meta
                    status = 0xC000
                    log.warning("%s: %s", path, exc)
                    with lock:
                        outcome.reasons[str(path)] = f"not sent: {exc}"
                with lock:
                    done.append(path)
                    if status in (0x0000,) or status & 0xF000 == 0xB000:
                        outcome.completed += 1
                        outcome.warning += status != 0
                    else:
                        outcome.failed += 1
                        outcome.failed_uids.append(str(path))
                        outcome.status = status
                if progress:
                    progress(path, status)


def _retrieve_identifier(level: str, uids: list[str]) -> Dataset:
    level = level.upper()
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    setattr(ds, UNIQUE_KEY[level], uids if len(uids) > 1 else uids[0])
    return ds


def _retrieve(responses, progress) -> Outcome:
    outcome = Outcome()
    for status, answer in responses:
        code = _status(status)
        outcome.completed = int(status.get("NumberOfCompletedSuboperations", outcome.completed))
        outcome.failed = int(status.get("NumberOfFailedSuboperations", outcome.failed))
        outcome.warning = int(status.get("NumberOfWarningSuboperations", outcome.warning))
        if progress and code in (0xFF00, 0xFF01):
            progress(status)
        elif code not in (0xFF00, 0xFF01):
            outcome.status = code
            if answer is not None and "FailedSOPInstanceUIDList" in answer:
                failed = answer.FailedSOPInstanceUIDList
                outcome.failed_uids = [failed] if isinstance(failed, str) else list(failed)
            if code not in (0x0000, 0xB000):
                outcome.problems.append(
                    f"0x{code:04X}: {status.get('ErrorComment', 'retrieve failed')}"
                )
    return outcome


def _storage_contexts(remote: Remote, level: str, uids: list[str], model: str):
    """What to offer for C-GET's sub-operations: the SOP classes and transfer syntaxes of
    the instances (asked with C-FIND; AvailableTransferSyntaxUID where the peer answers
    it), each also uncompressed so the peer can decompress what we cannot take."""
    query = _retrieve_identifier(level, uids)
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPClassUID = ""
    query.AvailableTransferSyntaxUID = ""
    query.SOPInstanceUID = ""
    needed: dict[str, set[str]] = {}
    try:
        for answer in find(remote, query, model):
            syntax = answer.get("AvailableTransferSyntaxUID", "")
            needed.setdefault(str(answer.SOPClassUID), set()).update(
                [str(syntax)] if syntax else []
            )
    except (ScuError, AssociationError) as exc:
        log.info("could not list the instances first: %s", exc)
    if not needed:  # a strict peer (hierarchical IMAGE query refused): the common classes
        return [(cx.abstract_syntax, UNCOMPRESSED) for cx in StoragePresentationContexts[:127]]
    pairs = [(c, [s]) for c, syntaxes in needed.items() for s in sorted(syntaxes)]
    pairs += [(c, UNCOMPRESSED) for c in needed]
    return pairs[:127]
