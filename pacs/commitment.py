"""Storage Commitment Push Model SCP (PS3.4 Annex J): a modality asks the archive to
take responsibility for instances before it deletes its own copies.

N-ACTION (Request Storage Commitment) is answered at once; each listed instance is then
checked against the index — stored, the same SOP class, and its file still of the
recorded size and SHA-256 — and the result goes back as an N-EVENT-REPORT: over the same
association while it is open, else over a new one to the requesting AE (a `peer`),
which then takes the SCU role (J.3.3; role selection, we propose the SCP role). A modality
that releases within half a second of our N-ACTION-RSP gets the new association.
"""

import logging
import threading
import time
from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom import build_context
from pynetdicom.events import Event

from pacs import tls
from pacs.config import Config
from pacs.config import Peer
from storage import Archive
from storage import audit

log = logging.getLogger(__name__)

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type ID
NO_SUCH_INSTANCE, PROCESSING_FAILURE, CLASS_INSTANCE_CONFLICT = 0x0112, 0x0110, 0x0119
INVALID_ARGUMENT, NO_SUCH_ACTION, MISSING_ATTRIBUTE = 0x0115, 0x0123, 0x0120
GRACE = 0.5  # s a modality has to release before we report over its association
SETTLE_SECONDS = 30.0  # the longest a report waits for what was received before it
FAILURE_REASONS = {  # storage.Archive.commitment_problem → Failure Reason (PS3.4 J.3.2.1.1)
    "not stored": NO_SUCH_INSTANCE,
    "stored under another SOP class": CLASS_INSTANCE_CONFLICT,
    "file missing or changed": PROCESSING_FAILURE,
}


def handle_n_action(event: Event, archive: Archive, config: Config):
    """EVT_N_ACTION: validate the request, answer it, report in a thread of its own."""
    request = event.request
    if request.RequestedSOPClassUID != STORAGE_COMMITMENT:
        return NO_SUCH_ACTION, None
    if request.ActionTypeID != REQUEST_COMMITMENT:
        return NO_SUCH_ACTION, None
    if request.RequestedSOPInstanceUID != WELL_KNOWN_INSTANCE:
        return NO_SUCH_INSTANCE, None
    try:
        info = event.action_information
        transaction = str(info.TransactionUID)
        references = [(str(r.ReferencedSOPClassUID), str(r.ReferencedSOPInstanceUID))
                      for r in info.ReferencedSOPSequence]  # fmt: skip
    except (AttributeError, TypeError, ValueError):
        log.warning("storage commitment from %s: no Transaction UID or references",
                    event.assoc.requestor.ae_title)  # fmt: skip
        return MISSING_ATTRIBUTE, None
    if not transaction or not references:
        return INVALID_ARGUMENT, None
    log.info("storage commitment %s: %d instance(s) from %s", transaction, len(references),
             event.assoc.requestor.ae_title)  # fmt: skip
    threading.Thread(
        target=_commit_and_report,
        args=(event.assoc, archive, config, transaction, references),
        name="storage-commitment",
        daemon=True,
    ).start()
    return 0x0000, None


def _commit_and_report(assoc, archive: Archive, config: Config, transaction: str, references):
    calling, address = assoc.requestor.ae_title, assoc.requestor.address
    if not archive.settle(SETTLE_SECONDS):  # a C-STORE acknowledged just before is indexed
        log.warning("storage commitment %s: indexing is behind", transaction)
    committed, failed = [], []
    for sop_class, sop_uid in references:
        problem = archive.catalog.commitment_problem(sop_class, sop_uid)
        if problem:
            log.warning("storage commitment %s: %s not committed: %s", transaction, sop_uid,
                        problem)  # fmt: skip
            failed.append((sop_class, sop_uid, FAILURE_REASONS[problem]))
        else:
            committed.append((sop_class, sop_uid, None))
    report = _report(transaction, committed, failed)
    event_type = SOME_FAILED if failed else ALL_COMMITTED
    archive.audit(
        audit.Event(
            "commit",
            "success" if not failed else f"failure: {len(failed)} not committed",
            who=calling,
            address=address,
            detail={
                "transaction": transaction,
                "committed": len(committed),
                "failed": [uid for _, uid, _ in failed],
            },  # fmt: skip
        )
    )
    if _report_on(assoc, report, event_type):
        return
    peer = next((p for p in config.peer if p.aet == calling), None)
    if peer is None:
        log.warning("storage commitment %s: %s left and is not a configured peer: no report",
                    transaction, calling)  # fmt: skip
        return
    _report_to(peer, config, report, event_type, transaction)


def _report(transaction: str, committed: list, failed: list) -> Dataset:
    report = Dataset()
    report.TransactionUID = transaction
    if committed:
        report.ReferencedSOPSequence = [_reference(c, i) for c, i, _ in committed]
    if failed:
        report.FailedSOPSequence = [_reference(c, i, reason) for c, i, reason in failed]
    return report


def _reference(sop_class: str, sop_uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    if reason is not None:
        item.FailureReason = reason
    return item


def _report_on(assoc, report: Dataset, event_type: int) -> bool:
    """Over the requesting association, if the modality keeps it open: one that releases
    right after our N-ACTION-RSP does so within GRACE seconds, and an N-EVENT-REPORT
    crossing its A-RELEASE-RQ would break the release. False: use a new association."""
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline:
        if not assoc.is_established or assoc.acse.is_release_requested():
            return False
        time.sleep(0.02)
    return _send(lambda: assoc.send_n_event_report(
        report, event_type, STORAGE_COMMITMENT, WELL_KNOWN_INSTANCE))  # fmt: skip


def _report_to(peer: Peer, config: Config, report: Dataset, event_type: int, transaction: str):
    ae = AE(ae_title=config.aet)
    ae.acse_timeout, ae.dimse_timeout = config.acse_timeout, config.dimse_timeout
    context = build_context(STORAGE_COMMITMENT)
    context.scu_role, context.scp_role = False, True  # we send the N-EVENT-REPORT
    tls_args = tls.peer_tls_args(config, peer)
    assoc = ae.associate(peer.host, peer.port, [context], ae_title=peer.aet, tls_args=tls_args)
    if not assoc.is_established:
        log.warning("storage commitment %s: %s at %s:%d refused or unreachable", transaction,
                    peer.aet, peer.host, peer.port)  # fmt: skip
        return
    try:
        if _send(lambda: assoc.send_n_event_report(
                report, event_type, STORAGE_COMMITMENT, WELL_KNOWN_INSTANCE)):  # fmt: skip
            log.info("storage commitment %s reported to %s", transaction, peer.aet)
    finally:
        assoc.release()


def _send(send: Callable[[], tuple]) -> bool:
    try:
        status, _ = send()
    except (RuntimeError, ValueError) as exc:
        log.warning("storage commitment report not sent: %s", exc)
        return False
    return status is not None and status.get("Status", 0xC000) == 0x0000
