"""The SCP's event handlers: take the request, call `storage`, map errors to statuses.

Statuses a handler can send, and why, are listed in its docstring (PS3.4 Annex B for
C-STORE, PS3.7 Annex C for the general ones).
"""

import logging
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event

from pacs import spool
from storage import Archive
from storage.errors import DuplicateRejected
from storage.errors import InvalidDataset
from storage.errors import InvalidUID
from storage.errors import OutOfResources
from storage.errors import StorageError
from storage.errors import UIDMismatch

log = logging.getLogger(__name__)

SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.5.? general failure: the UID is taken (policy reject)
OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3 Refused: Out of Resources (disk full)
DATASET_MISMATCH = 0xA900  # PS3.4 B.2.3 Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3 Error: Cannot understand (does not parse, bad UID)
PROCESSING_FAILURE = 0x0110  # PS3.7 C.1: anything else the archive could not do

STATUS_FOR = {
    OutOfResources: OUT_OF_RESOURCES,
    UIDMismatch: DATASET_MISMATCH,
    InvalidDataset: CANNOT_UNDERSTAND,
    InvalidUID: CANNOT_UNDERSTAND,
    DuplicateRejected: DUPLICATE_SOP_INSTANCE,
}


def handle_echo(event: Event) -> int:
    """C-ECHO: always Success (0x0000)."""
    return SUCCESS


def handle_store(event: Event, archive: Archive) -> int | Dataset:
    """C-STORE: store the dataset bytes as received, Success only once durable.

    0x0000 stored, or already stored (identical bytes, or `keep` policy); 0xA700 disk
    full; 0xA900 dataset UIDs differ from the request; 0xC000 does not parse or has an
    invalid UID; 0x0111 different bytes under a stored UID with policy `reject`;
    0x0110 any other storage failure. Failures carry an ErrorComment.
    """
    request = event.request
    path = Path(event.dataset_path)
    received = spool.take(path)
    try:
        if received is not None and received.error is not None:
            raise OutOfResources(f"cannot receive the dataset: {received.error.strerror}")
        tmp = path
        if received is None:  # not spooled by us: bring it onto the archive's filesystem
            tmp = archive.incoming_path()
            tmp.write_bytes(path.read_bytes())
        stored = archive.ingest(
            tmp,
            digest=received.digest() if received is not None else None,
            sop_class_uid=request.AffectedSOPClassUID,
            sop_uid=request.AffectedSOPInstanceUID,
            calling_aet=event.assoc.requestor.ae_title,
        )
    except StorageError as exc:
        status = STATUS_FOR.get(type(exc), PROCESSING_FAILURE)
        log.warning(
            "C-STORE %s from %s refused (0x%04X): %s",
            request.AffectedSOPInstanceUID,
            event.assoc.requestor.ae_title,
            status,
            exc,
        )
        return _failure(status, str(exc))
    finally:
        path.unlink(missing_ok=True)
    log.info(
        "C-STORE %s from %s: %s",
        stored.sop_uid,
        event.assoc.requestor.ae_title,
        stored.outcome.value,
    )
    return SUCCESS


def handle_conn_close(event: Event) -> None:
    """Remove what a dead association left half-received (and any older strays)."""
    spool.discard(getattr(event.assoc, "dul", None))
    spool.sweep(idle_seconds=600)


def _failure(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]  # LO, PS3.7 C.4.? (0000,0902)
    return response


def build_handlers(archive: Archive) -> list:
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [archive]),
        (evt.EVT_CONN_CLOSE, handle_conn_close),
    ]
