"""The audit trail: who did what to which patient's data, when, with what outcome.

One table, append-only, each row chained to the previous one by HMAC-SHA256 under a key
kept outside the index (`<data>/.audit-key`, 0600, made on first use), so that an edited,
deleted or inserted row breaks the chain (`Chain.verify`) and whoever can write the index
but not read the key cannot forge a new one. Events from before the key (plain SHA-256,
the chain of earlier versions) stay as they are: the key file records the last of them,
and the first keyed event covers its hash. Modelled on the DICOM audit
messages (PS3.15 A.5, IHE ATNA): an event, its outcome, the active participant (user or
calling AE, and address) and the participant objects (Patient ID, Study/Series/SOP
Instance UIDs). Names and other PHI beyond the Patient ID never go in.

Appends run in the index writer (one transaction with the change they record where
there is one); several processes or servers append to one chain under the engine's
write lock (SQLite) or an advisory lock (PostgreSQL).
"""

import hashlib
import hmac
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from pathlib import Path

from storage import files
from storage.engine import is_sqlite
from storage.models import AnyDatabase
from storage.models import AuditEvent

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
    "audit",  # the audit trail read (PS3.15 A.5.3.2, Audit Log Used)
    "worklist",  # a worklist item added or removed over HTTP
    "rejected",  # an association or request refused by policy
    "protect",
    "commit",  # storage commitment (PS3.4 Annex J)
    "reindex",  # the index rebuilt from the files (minipacs reindex)
)
FIELDS = ("at", "event", "outcome", "who", "address", "patient_id", "study_uid", "detail")
LAST = "SELECT id, hash FROM auditevent ORDER BY id DESC LIMIT 1"
PATIENT = (
    "SELECT p.patient_id FROM study s JOIN patient p ON s.patient_id = p.id WHERE s.study_uid = {p}"
)
KEY_FILE = ".audit-key"


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

    def __post_init__(self) -> None:
        # The one check of the name, where the event is made: a caller's typo is refused
        # at its call (Archive.audit), never in the writer's batch with others' events.
        if self.event not in EVENTS:
            raise ValueError(f"unknown audit event {self.event!r}")

    def row(self) -> dict[str, str]:
        """The stored fields (`at` now unless set: %Y-%m-%dT%H:%M:%S.%fZ). Field by field,
        not dataclasses.asdict, which deep-copies: a third of an append's time."""
        values = {name: getattr(self, name) for name in FIELDS}
        values["at"] = self.at or datetime.now(UTC).isoformat(timespec="microseconds")[:-6] + "Z"
        values["detail"] = json.dumps(self.detail, sort_keys=True, separators=(",", ":"))
        return values


def _canonical(prev_hash: str, values: dict[str, str]) -> bytes:
    return json.dumps([prev_hash, *(values[name] for name in FIELDS)], ensure_ascii=False).encode()


def chain_hash(prev_hash: str, values: dict[str, str]) -> str:
    """The unkeyed link of events from before the key (anyone can recompute it)."""
    return hashlib.sha256(_canonical(prev_hash, values)).hexdigest()


@dataclass(frozen=True)
class Key:
    secret: bytes
    since: int  # the last event before the key: it and those before are unkeyed

    def seal(self, prev_hash: str, values: dict[str, str]) -> str:
        """A new event's link: one HMAC-SHA256 over it and the hash before it."""
        return hmac.digest(self.secret, _canonical(prev_hash, values), "sha256").hex()

    def link(self, event_id: int, prev_hash: str, values: dict[str, str]) -> str:
        """What a stored event's hash must be."""
        if event_id <= self.since:
            return chain_hash(prev_hash, values)
        return self.seal(prev_hash, values)


class Chain:
    """The audit trail of one archive, keyed by the file at `key_path`."""

    def __init__(self, key_path: Path) -> None:
        self.key_path = key_path
        self._key: Key | None = None

    def append(self, database: AnyDatabase, event: Event) -> None:
        """Add one event at the end of the chain (inside the caller's transaction)."""
        self.extend(database, [event])

    def extend(self, database: AnyDatabase, events: list[Event]) -> None:
        """Add events at the end of the chain in their order (inside the caller's
        transaction), its end read once for all of them."""
        if not events:
            return
        if not is_sqlite(database):  # SQLite's write lock already serialises writers
            database.execute_sql("SELECT pg_advisory_xact_lock(7420111)")
        # Plain SQL: peewee built these statements in ~0.2 ms each, once for every instance
        # stored and every image retrieved.
        p = database.param
        insert = (
            f"INSERT INTO auditevent ({', '.join(FIELDS)}, prev_hash, hash) "
            f"VALUES ({', '.join([p] * (len(FIELDS) + 2))})"
        )
        last_id, prev = database.execute_sql(LAST).fetchone() or (0, GENESIS)
        key = self._key or self._load(create_since=last_id)
        for event in events:
            if event.study_uid and not event.patient_id:  # a retrieve by study: whose study
                found = database.execute_sql(PATIENT.format(p=p), (event.study_uid,))
                event.patient_id = (found.fetchone() or ("",))[0] or ""
            values = event.row()
            link = key.seal(prev, values)
            database.execute_sql(insert, (*(values[name] for name in FIELDS), prev, link))
            _events_log(event.event, values)
            prev = link

    def verify(self, rows: Iterator[AuditEvent]) -> list[str]:
        """Walk the chain in id order; every break is reported by the id where it shows."""
        problems, prev = [], GENESIS
        key = self._key or (self._load(create_since=None) if self.key_path.exists() else None)
        for row in rows:
            if key is None:  # no key file: nothing keyed to check against
                key = Key(b"", since=1 << 63)
                problems.append(
                    f"no audit key ({self.key_path}): the chain is unkeyed, anyone could "
                    "have recomputed it"
                )
            values = {name: getattr(row, name) for name in FIELDS}
            if row.prev_hash != prev:
                problems.append(f"event {row.id}: does not follow the event before it")
            if not hmac.compare_digest(row.hash, key.link(row.id, row.prev_hash, values)):
                problems.append(f"event {row.id}: its content was changed")
            prev = row.hash
        return problems

    def _load(self, create_since: int | None) -> Key:
        """The key, made now (0600, recording `create_since`) when there is none yet and
        `create_since` is given; every process sharing the folder gets the same one."""

        def make() -> bytes:
            return json.dumps({"key": os.urandom(32).hex(), "since": create_since}).encode()

        content = files.secret(self.key_path, make=make) if create_since is not None else None
        stored = json.loads(content or self.key_path.read_bytes())
        self._key = Key(bytes.fromhex(stored["key"]), int(stored["since"]))
        return self._key


def _events_log(name: str, values: dict[str, str]) -> None:
    if _events.handlers:  # a syslog collector is configured (pacs.auditlog)
        _events.info(name, extra={"audit": values})
