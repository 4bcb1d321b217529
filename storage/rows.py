"""Index rows that storage hands to the DICOM and web sides, one frozen type per shape: a
caller names a field the type checker knows instead of a string key of a dict."""

import datetime
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class InstanceLocation:
    """An instance a retrieval sends (storage.query.locate, Catalog.locate): its UIDs, how
    it is stored and where its file is."""

    pk: int
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    instance_number: int | None
    path: Path  # relative to the archive root from query.locate, absolute from Catalog.locate


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """An item of the auto-routing queue (storage.routing): an instance, or a whole study
    when sop_uid is None, to forward to `destination`; or, with a `subscription`, an event
    notification (`body`, CloudEvents JSON) to post to it (storage.events)."""

    id: int
    destination: str
    study_uid: str
    sop_uid: str | None
    status: str
    attempts: int
    due_at: datetime.datetime
    last_error: str
    created_at: datetime.datetime
    event: str
    subscription: int | None
    body: str


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """An event of the audit trail (Archive.audit_events), its hash-chain fields too."""

    id: int
    at: str
    event: str
    outcome: str
    who: str
    address: str
    patient_id: str
    study_uid: str
    detail: str
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class ChangeEntry:
    """An entry of the change feed (storage.changefeed) as a reader sees it: the change,
    and the instance's state now (current, replaced, deleted) and, when asked for and
    current, its DICOM JSON as the index holds it (text: relative BulkDataURIs)."""

    sequence: int
    at: str  # UTC ISO 8601, microseconds, Z
    action: str  # create, update, delete
    study_uid: str
    series_uid: str
    sop_uid: str
    who: str
    state: str
    metadata: str | None


@dataclass(frozen=True, slots=True)
class QueryTagRow:
    """An extended query tag (storage.querytags) and how far its back-fill is."""

    id: int
    tag: int  # a private one without its block: gggg,00ee
    creator: str  # its Private Creator; '' for a standard attribute
    keyword: str
    vr: str
    level: str  # STUDY, SERIES or IMAGE
    state: str  # adding (back-filling), ready, removing
    done: int  # entities back-filled …
    total: int  # … of those there were when it began

    @property
    def name(self) -> str:
        """How `minipacs tags` and QIDO-RS name it: GGGGEEEE, or ggggxxee when private."""
        if self.creator:
            return f"{self.tag >> 16:04X}xx{self.tag & 0xFF:02X}"
        return f"{self.tag:08X}"
