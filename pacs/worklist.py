"""Modality Worklist C-FIND SCP (PS3.4 K) and Modality Performed Procedure Step SCP
(PS3.4 F.7): the network side of storage.worklist."""

import logging

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.events import Event

from pacs.config import Config
from storage import Archive
from storage import audit
from storage import query
from storage.worklist import StepError

log = logging.getLogger(__name__)

WORKLIST_FIND = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND
MPPS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step
PENDING, UNABLE_TO_PROCESS = 0xFF00, 0xC000


def handle_find(event: Event, archive: Archive, config: Config):
    """MWL C-FIND: one pending answer per matching item (storage.query.find_worklist)."""
    calling = event.assoc.requestor.ae_title
    try:
        keys = query.keys_from_dataset(event.identifier)
        options = query.Options(pn_case_insensitive=config.pn_case_insensitive)
        answers = list(archive.worklist.find(keys, options))
    except Exception as exc:  # an identifier pydicom cannot decode
        log.warning("worklist C-FIND from %s: identifier not understood: %s", calling, exc)
        yield _status(UNABLE_TO_PROCESS, f"identifier not understood: {exc}"), None
        return
    for answer in answers:
        if event.is_cancelled:
            yield 0xFE00, None
            return
        yield PENDING, Dataset.from_json(answer)
    log.info("worklist C-FIND from %s: %d item(s)", calling, len(answers))
    archive.audit(audit.Event("query", who=calling, address=event.assoc.requestor.address,
                              detail={"worklist": len(answers)}))  # fmt: skip


def handle_n_create(event: Event, archive: Archive):
    """MPPS N-CREATE: a step IN PROGRESS (0x0106 another status, 0x0111 it exists)."""
    request = event.request
    if request.AffectedSOPClassUID != MPPS:
        return _status(0x0122, "SOP class not supported"), None
    sop_uid = request.AffectedSOPInstanceUID or generate_uid()
    try:
        attributes = event.attribute_list
        archive.worklist.create_step(str(sop_uid), attributes)
    except StepError as exc:
        log.info("MPPS N-CREATE %s from %s refused: %s", sop_uid,
                 event.assoc.requestor.ae_title, exc)  # fmt: skip
        return _status(exc.status, str(exc)), None
    log.info("MPPS %s IN PROGRESS (from %s)", sop_uid, event.assoc.requestor.ae_title)
    if not request.AffectedSOPInstanceUID:  # pynetdicom answers with the UID we give it
        attributes.AffectedSOPInstanceUID = sop_uid
    return 0x0000, attributes


def handle_n_set(event: Event, archive: Archive):
    """MPPS N-SET: update a step IN PROGRESS (0x0112 unknown, 0x0110 no longer updatable)."""
    request = event.request
    if request.RequestedSOPClassUID != MPPS:
        return _status(0x0122, "SOP class not supported"), None
    sop_uid = str(request.RequestedSOPInstanceUID)
    try:
        changes = event.modification_list
        status = archive.worklist.set_step(sop_uid, changes)
    except StepError as exc:
        log.info("MPPS N-SET %s from %s refused: %s", sop_uid,
                 event.assoc.requestor.ae_title, exc)  # fmt: skip
        return _status(exc.status, str(exc)), None
    log.info("MPPS %s %s (from %s)", sop_uid, status, event.assoc.requestor.ae_title)
    return 0x0000, changes


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status
