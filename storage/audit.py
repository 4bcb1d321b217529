"""The audit trail: who did what to which patient's data, when, with what outcome.

One table, append-only, each row chained to the previous one by SHA-256 so that an
edited, deleted or inserted row breaks the chain (`verify`). Modelled on the DICOM audit
messages (PS3.15 A.5, IHE ATNA): an event, its outcome, the active participant (user or
calling AE, and address) and the participant objects (Patient ID, Study/Series/SOP
Instance UIDs). Names and other PHI beyond the Patient ID never go in.

Appends run in the index writer (one transaction with the change they record where
there is one); several processes or servers append to one chain under the engine's
write lock (SQLite) or an advisory lock (PostgreSQL).
"""

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime

from peewee import Database

from storage.engine import is_sqlite
from storage.models import AuditEvent
from storage.models import Patient
from storage.models import Study

GENESIS = "0" * 64
LOGGER_NAME = "minipacs.audit"  # every appended event, for pacs.auditlog (syslog)
_events = logging.getLogger(LOGGER_NAME)
_events.propagate = False  # Patient IDs: never into the application log
EVENTS = (
    "store",  # C-STORE, STOW-RS, import
    "query",  # C-FIND, QIDO-RS
    "retrieve",  # C-MOVE, C-GET, WADO
    "view",  # the browser viewer
    "export",  # anonymize to a folder or peer
    "deidentify",  # WADO-URI or WADO-RS with anonymize=yes
    "delete",  # by an administrator, or by retention
    "login",
    "rejected",  # an association or request refused by policy
    "protect",
    "commit",  # storage commitment (PS3.4 Annex J)
)
FIELDS = ("at", "event", "outcome", "who", "address", "patient_id", "study_uid", "detail")
LAST_HASH = "SELECT hash FROM auditevent ORDER BY id DESC LIMIT 1"


@dataclass
class Event:
    event: str
    outcome: str = "success"
    who: str = ""
    address: str = ""
    patient_id: str = ""
    study_uid: str = ""
    detail: dict = field(default_factory=dict)
    at: str = ""

    def row(self) -> dict[str, str]:
        values = asdict(self)
        values["at"] = self.at or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        values["detail"] = json.dumps(self.detail, sort_keys=True, separators=(",", ":"))
        return values


def chain_hash(prev_hash: str, values: dict[str, str]) -> str:
    canonical = json.dumps([prev_hash, *(values[name] for name in FIELDS)], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def append(database: Database, event: Event) -> None:
    """Add one event at the end of the chain (inside the caller's transaction)."""
    if event.event not in EVENTS:
        raise ValueError(f"unknown audit event {event.event!r}")
    if not is_sqlite(database):  # SQLite's write lock already serialises writers
        database.execute_sql("SELECT pg_advisory_xact_lock(7420111)")
    if event.study_uid and not event.patient_id:  # a retrieve by study: whose study it is
        event.patient_id = (
            Patient.select(Patient.patient_id)
            .join(Study, on=(Study.patient == Patient.id))
            .where(Study.study_uid == event.study_uid)
            .scalar()
            or ""
        )
    # Plain SQL: peewee built these two statements in ~0.2 ms, once for every instance.
    last = database.execute_sql(LAST_HASH).fetchone()
    values = event.row()
    prev = last[0] if last else GENESIS
    p = database.param
    database.execute_sql(
        f"INSERT INTO auditevent ({', '.join(FIELDS)}, prev_hash, hash) "
        f"VALUES ({', '.join([p] * (len(FIELDS) + 2))})",
        (*(values[name] for name in FIELDS), prev, chain_hash(prev, values)),
    )
    if _events.handlers:  # a syslog collector is configured (pacs.auditlog)
        _events.info(event.event, extra={"audit": values})


def verify(rows: Iterator[AuditEvent]) -> list[str]:
    """Walk the chain in id order; every break is reported by the id where it shows."""
    problems, prev = [], GENESIS
    for row in rows:
        values = {name: getattr(row, name) for name in FIELDS}
        if row.prev_hash != prev:
            problems.append(f"event {row.id}: does not follow the event before it")
        if row.hash != chain_hash(row.prev_hash, values):
            problems.append(f"event {row.id}: its content was changed")
        prev = row.hash
    return problems
