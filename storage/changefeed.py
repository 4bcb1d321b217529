"""The change feed: every instance created, updated (different bytes replaced the stored
ones) or deleted, numbered in the order the changes commit, for scripts that follow the
archive (GET /changefeed, `minipacs changes`, pacs.changes).

An entry is written in the transaction of its change, last in the index writer's batch
(IndexWriter.at_commit), under a lock held until that batch commits: the next number is
one more than the highest, so numbers are gapless and no reader sees a number before
every lower one has committed. (With several writers on PostgreSQL a serial column's
numbers can commit out of order: a reader paging by number would see 11, then never 10.)
SQLite has one writer at a time, and its write lock is that lock.

Pruning removes entries older than an age but always keeps the newest, so the numbering
goes on; the feed starts at its lowest kept number (`first`), which tells a reader whose
last number is below it what it missed.
"""

from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import cast

from peewee import chunked
from peewee import fn

from storage.dataset import ParsedInstance
from storage.engine import is_sqlite
from storage.models import AnyDatabase
from storage.models import Change
from storage.models import Instance
from storage.models import db
from storage.rows import ChangeEntry

ACTIONS = ("create", "update", "delete")
MAX_LIMIT = 200  # entries a read returns at most (Azure's v2 change feed: 200)
PRUNE_CHUNK = 5000  # entries one pruning transaction removes
INSERT_CHUNK = 500  # rows an INSERT carries (SQLite allows 32766 parameters)


@dataclass(frozen=True)
class Pending:
    """A change to number: what happened to which instance, and who did it (the calling
    AE title or user; for a delete, who deleted)."""

    action: str
    study_uid: str
    series_uid: str
    sop_uid: str
    who: str = ""


def indexed(action: str, parsed: ParsedInstance, who: str) -> Pending:
    """The change of an instance `index.apply_row` created or updated."""
    return Pending(action, parsed.study_uid, parsed.series_uid, parsed.sop_uid, who)


def stamp(when: datetime) -> str:
    """The stored form of a time: UTC, fixed width, so text order is time order."""
    utc = when.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"  # strftime's %Y drops year 1's zeros


def append(database: AnyDatabase, changes: list[Pending]) -> None:
    """Number `changes` after the highest entry and insert them, inside the caller's
    transaction, which must commit next (IndexWriter.at_commit): the lock is held till then."""
    if not changes:
        return
    if not is_sqlite(database):  # readers (ACCESS SHARE) pass; appends and pruning wait
        database.execute_sql("LOCK TABLE changefeed IN EXCLUSIVE MODE")
    last = database.execute_sql("SELECT MAX(sequence) FROM changefeed").fetchone()[0] or 0
    at = stamp(datetime.now(UTC))
    rows = [
        {
            "sequence": last + number,
            "at": at,
            "action": change.action,
            "study_uid": change.study_uid,
            "series_uid": change.series_uid,
            "sop_uid": change.sop_uid,
            "who": change.who,
        }
        for number, change in enumerate(changes, 1)
    ]
    for chunk in chunked(rows, INSERT_CHUNK):
        Change.insert_many(chunk).execute()


class ChangeFeed:
    """Reading and pruning the change feed of one archive."""

    def __init__(self, write: Callable[..., Any]) -> None:
        self._write = write  # Archive.write: pruning goes through the index writer

    def read(
        self,
        *,
        after: int = 0,
        start: str = "",
        end: str = "",
        offset: int = 0,
        limit: int = 100,
        metadata: bool = True,
    ) -> list[ChangeEntry]:
        """Entries in sequence order: numbered above `after`, stamped from `start`
        (inclusive) to `end` (exclusive; both `stamp` texts, empty: open), the first
        `offset` of those skipped, at most `limit` (1 to MAX_LIMIT). `metadata`: with each
        current instance's DICOM JSON (the index's text: no parse on the way out)."""
        if not 1 <= limit <= MAX_LIMIT or offset < 0 or after < 0:
            raise ValueError(f"limit must be 1-{MAX_LIMIT}; offset and after at least 0")
        with db.connection_context():
            query = Change.select().where(Change.sequence > after)
            if start:
                query = query.where(Change.at >= start)
            if end:
                query = query.where(Change.at < end)
            rows = list(query.order_by(Change.sequence).offset(offset).limit(limit))
            return _entries(rows, metadata)

    def latest(self, metadata: bool = True) -> ChangeEntry | None:
        """The newest entry (None: nothing has changed yet)."""
        with db.connection_context():
            rows = list(Change.select().order_by(Change.sequence.desc()).limit(1))
            return _entries(rows, metadata)[0] if rows else None

    def first(self) -> int:
        """Where the feed starts: its lowest kept number (1 while it is empty)."""
        with db.connection_context():
            return Change.select(fn.MIN(Change.sequence)).scalar() or 1

    def prune(self, before: datetime) -> int:
        """Remove entries stamped before `before`, except the newest; how many went. A
        transaction of PRUNE_CHUNK at a time, so ingest is never held up for long."""
        removed = 0
        while True:
            count = self._write(_prune, stamp(before))
            removed += count
            if count < PRUNE_CHUNK:
                return removed


def _prune(before: str) -> int:
    newest = Change.select(fn.MAX(Change.sequence)).scalar() or 0
    doomed = (
        Change.select(Change.id)
        .where(Change.at < before, Change.sequence < newest)
        .order_by(Change.sequence)
        .limit(PRUNE_CHUNK)
    )
    return Change.delete().where(Change.id.in_(doomed)).execute()


def _entries(rows: list[Change], metadata: bool) -> list[ChangeEntry]:
    """Entries with their state: deleted when the instance is no longer in the index,
    current for its newest entry, replaced for one before."""
    sops = {row.sop_uid for row in rows}
    newest = dict(
        cast(
            Iterable[tuple[str, int]],
            Change.select(Change.sop_uid, fn.MAX(Change.sequence))
            .where(Change.sop_uid.in_(sops))
            .group_by(Change.sop_uid)
            .tuples(),
        )
    )
    columns = (Instance.sop_uid, Instance.json) if metadata else (Instance.sop_uid,)
    stored = {
        found[0]: found[-1]
        for found in cast(
            Iterable[tuple[str, ...]],
            Instance.select(*columns).where(Instance.sop_uid.in_(sops)).tuples(),
        )
    }
    entries = []
    for row in rows:
        if row.sop_uid not in stored:
            state = "deleted"
        else:
            state = "current" if newest[row.sop_uid] == row.sequence else "replaced"
        entries.append(
            ChangeEntry(
                sequence=row.sequence,
                at=row.at,
                action=row.action,
                study_uid=row.study_uid,
                series_uid=row.series_uid,
                sop_uid=row.sop_uid,
                who=row.who,
                state=state,
                metadata=stored[row.sop_uid] if metadata and state == "current" else None,
            )
        )
    return entries
