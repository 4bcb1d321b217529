"""STOW-RS (PS3.18 10.5): multipart/related parts streamed to disk and through
`Archive.ingest`, the one ingest path; the answer lists what was stored and what failed.

Each part is written to `<data>/.incoming` while it arrives (hashed on the way), so memory
stays at one read buffer whatever the body size. A part is acknowledged only once ingest
returned, i.e. once file and index row are durable. When the body breaks off, the parts
that arrived whole are stored and the one cut short is dropped.
"""

import io
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from storage import Archive
from storage import audit
from storage.errors import DuplicateRejected
from storage.errors import InvalidDataset
from storage.errors import InvalidUID
from storage.errors import OutOfResources
from storage.errors import StorageError
from storage.errors import UIDMismatch
from viewer.media import MediaError
from viewer.media import parse_media_type

log = logging.getLogger(__name__)

DICOM = "application/dicom"
HEAD = 64 << 10  # bytes of each part kept to name a failed instance
INGEST_THREADS = 4
# FailureReason (0008,1197) values, PS3.18 Table 10.5.3-2 / PS3.4 Annex B.
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900  # also: the instance is not of the study in the path
CANNOT_UNDERSTAND = 0xC000


@dataclass
class Outcome:
    sop_class_uid: str
    sop_uid: str
    study_uid: str = ""
    series_uid: str = ""
    failure: int | None = None
    reason: str = ""


def store_parts(
    archive: Archive,
    parts: Iterator[tuple[dict[str, str], Iterator[bytes]]],
    default_type: str,
    study_uid: str | None,
    calling: str,
    outcomes: list[Outcome],
    who: str = "",
) -> None:
    """Receive each part to disk and ingest it, appending one Outcome per part, in order;
    `calling` (the client's address) and `who` (the user) go into each store event.

    Ingests run on a few threads while the next part is received, so fsyncs overlap and
    the index writer commits them in groups. When the body breaks off (MediaError), the
    parts received whole are still ingested and listed before the error propagates.
    """
    pending: list[Future | Outcome] = []
    with ThreadPoolExecutor(INGEST_THREADS, thread_name_prefix="stow") as pool:
        try:
            for headers, chunks in parts:
                media = headers.get("content-type", default_type)
                try:
                    kind = parse_media_type(media).media_type
                except MediaError:
                    kind = media
                if kind != DICOM:
                    for _ in chunks:
                        pass
                    reason = f"part type {media}"
                    pending.append(Outcome("", "", failure=SOP_CLASS_NOT_SUPPORTED, reason=reason))
                    continue
                head = bytearray()
                try:
                    tmp, digest = archive.spool(_watched(chunks, head))
                except StorageError as exc:  # no room for this part; the next may fit
                    for _ in chunks:
                        pass
                    pending.append(_failed(archive, exc, bytes(head), calling, who))
                    continue
                args = (archive, tmp, digest, bytes(head), study_uid, calling, who)
                pending.append(pool.submit(_ingest, *args))
                running = [p for p in pending if isinstance(p, Future) and not p.done()]
                if len(running) > 2 * INGEST_THREADS:
                    wait(running[:INGEST_THREADS])
        finally:
            outcomes.extend(p.result() if isinstance(p, Future) else p for p in pending)


def _watched(chunks: Iterator[bytes], head: bytearray) -> Iterator[bytes]:
    """The part's chunks, keeping its first HEAD bytes in `head` (to name it if it fails)."""
    for chunk in chunks:
        if len(head) < HEAD:
            head.extend(chunk[: HEAD - len(head)])
        yield chunk


def _ingest(
    archive: Archive,
    tmp: Path,
    digest: tuple[int, str],
    head: bytes,
    study_uid,
    calling: str,
    who: str,
) -> Outcome:
    try:
        stored = archive.ingest(tmp, digest=digest, study_uid=study_uid, who=who, address=calling)
    except StorageError as exc:
        return _failed(archive, exc, head, calling, who)
    log.info("STOW-RS from %s: %s %s", calling, stored.sop_uid, stored.outcome.value)
    return Outcome(stored.sop_class_uid, stored.sop_uid, stored.study_uid, stored.series_uid)


def _failed(archive: Archive, exc: StorageError, head: bytes, calling: str, who: str) -> Outcome:
    """A part that was not stored: audited, logged, and named as far as its bytes say."""
    code = _failure_code(exc)
    sop_class, sop, study = _names(head)
    archive.audit(
        audit.Event("store", f"failure: {exc}", who=who, address=calling, detail={"sop": sop})
    )
    log.warning("STOW-RS from %s: %s failed (0x%04X): %s", calling, sop or "?", code, exc)
    return Outcome(sop_class, sop, study, failure=code, reason=str(exc))


def _failure_code(exc: StorageError) -> int:
    if isinstance(exc, OutOfResources):
        return OUT_OF_RESOURCES
    if isinstance(exc, UIDMismatch):
        return DATASET_MISMATCH
    if isinstance(exc, InvalidDataset | InvalidUID):
        return CANNOT_UNDERSTAND
    if isinstance(exc, DuplicateRejected):
        return PROCESSING_FAILURE
    return PROCESSING_FAILURE


def _names(head: bytes) -> tuple[str, str, str]:
    """SOP Class, SOP Instance and Study UIDs from a part's first bytes, where readable."""
    try:
        ds = dcmread(
            io.BytesIO(head),
            force=True,
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
        )
        return (
            str(ds.get("SOPClassUID", "")),
            str(ds.get("SOPInstanceUID", "")),
            str(ds.get("StudyInstanceUID", "")),
        )
    except Exception:
        return "", "", ""


def response(outcomes: list[Outcome], base: str, study_uid: str | None) -> tuple[int, dict]:
    """The PS3.18 10.5.3 answer: 200 all stored, 202 some failed, 409 none stored."""
    stored = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    body: dict = {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}}
    studies = {o.study_uid for o in stored} or ({study_uid} if study_uid else set())
    if len(studies) == 1:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{studies.pop()}"]}
    body["00081198"] = {"vr": "SQ", "Value": [_failed_item(o) for o in failed]}
    body["00081199"] = {"vr": "SQ", "Value": [_stored_item(o, base) for o in stored]}
    status = 200 if not failed else 202 if stored else 409
    return status, body


def _failed_item(outcome: Outcome) -> dict:
    item = {}
    if outcome.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
    if outcome.sop_uid:
        item["00081155"] = {"vr": "UI", "Value": [outcome.sop_uid]}
    item["00081197"] = {"vr": "US", "Value": [outcome.failure]}
    return item


def _stored_item(outcome: Outcome, base: str) -> dict:
    url = (
        f"{base}/studies/{outcome.study_uid}/series/{outcome.series_uid}"
        f"/instances/{outcome.sop_uid}"
    )
    return {
        "00081150": {"vr": "UI", "Value": [outcome.sop_class_uid]},
        "00081155": {"vr": "UI", "Value": [outcome.sop_uid]},
        "00081190": {"vr": "UR", "Value": [url]},
    }
