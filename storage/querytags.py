"""Extended query tags (issue 20): any attribute, standard or private, made a matching key
of C-FIND and QIDO-RS through an index instead of a scan of the stored DICOM JSON.

A tag is registered at a level (STUDY, SERIES, IMAGE) in `querytag`. Each entity of that
level has one `queryvalue` row per value of the attribute, in the forms storage.query
compares (text, TM as HHMMSS.ffffff, a PN's folded alphabetic group, a number); study and
series values are their first instance's, as the standard columns'. The index writer
writes them with every instance row (`index_instance`, called by index.apply_row), for
tags being added and ready. What was indexed before the tag was added is back-filled
from the stored JSON (no file is read), a batch per index transaction, by one server of
those sharing the index (a claim with a lease, `run`); a restart resumes at the last
entity done. Until then the tag is `adding` and storage.query matches it on the stored
JSON: answers are whole, only slower. Removal deletes the values in batches, then the tag.

On PostgreSQL, a writer that read the tags before a tag was added may still commit
instances without its values; it holds ACCESS SHARE on `querytag` (its read) until it
commits, so the back-fill's first step and a removal's last take ACCESS EXCLUSIVE, which
waits for them. SQLite's one write lock already orders them.
"""

import contextlib
import datetime
import json
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from peewee import IntegrityError
from pydicom.datadict import dictionary_VR
from pydicom.datadict import keyword_for_tag
from pydicom.datadict import tag_for_keyword

from storage import query
from storage.dataset import name_key
from storage.dataset import time_key
from storage.engine import is_sqlite
from storage.errors import Refused
from storage.models import AnyDatabase
from storage.models import Instance
from storage.models import QueryTag
from storage.models import db
from storage.rows import QueryTagRow

log = logging.getLogger(__name__)
LEVELS = {"study": "STUDY", "series": "SERIES", "instance": "IMAGE"}
TABLES = {"STUDY": "study", "SERIES": "series", "IMAGE": "instance"}
# VRs whose values are short and meant for matching (PS3.4 C.2.2.2); long texts (LT, ST,
# UT, UC, UR: over PostgreSQL's index entry limit), binary values and sequences are not.
INDEXABLE = {"AE", "AS", "CS", "DA", "DT", "LO", "PN", "SH", "TM", "UI", *query.NUMBER_VRS}
BATCH = 200  # entities a back-fill step reads and writes, in one index transaction
PURGE = 5000  # values a removal step deletes
LEASE = 60.0  # s a back-fill or removal holds its tag between steps
POLL = 2.0  # s between looks for tags to back-fill or remove
NICE = 10  # ingest first


class TagError(Refused, ValueError):
    """A tag that cannot be added, or is not registered: the message says why."""


@dataclass(frozen=True)
class _Tag:
    """What the index writer needs of a tag to write its values."""

    id: int
    tag: int
    creator: str
    vr: str
    level: str


# -- names ---------------------------------------------------------------------------


def parse(name: str) -> tuple[int, bool]:
    """(tag, private) of `Keyword`, `GGGGEEEE`, `(GGGG,EEEE)` or a private `ggggxxee`; a
    private element is registered without its block (gggg,00ee): files put it in any."""
    text = name.strip().strip("()").replace(",", "")
    if re.fullmatch(r"[0-9A-Fa-f]{4}[xX]{2}[0-9A-Fa-f]{2}", text):
        tag = (int(text[:4], 16) << 16) | 0x1000 | int(text[6:], 16)
    elif re.fullmatch(r"[0-9A-Fa-f]{8}", text):
        tag = int(text, 16)
    else:
        found = tag_for_keyword(text)
        if found is None:
            raise TagError(f"{name!r} is neither a DICOM keyword nor a tag (GGGGEEEE)")
        tag = found
    if not (tag >> 16) % 2:
        return tag, False
    if (tag & 0xFFFF) < 0x1000:
        raise TagError(f"{name}: a Private Creator or reserved element, not a private attribute")
    return query.registered_tag(tag), True


def _now(later: float = 0.0) -> str:
    return (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=later)).isoformat()


def _row(tag: QueryTag) -> QueryTagRow:
    return QueryTagRow(
        tag.id, tag.tag, tag.creator, tag.keyword, tag.vr, tag.level, tag.state,
        tag.done, tag.total,
    )  # fmt: skip


# -- registry (run through the archive's index writer where they write) -----------------


def definition(name: str, level: str, creator: str = "", vr: str = "") -> dict[str, Any]:
    """The checked fields of a new tag (read-only: VR of a private tag from the data)."""
    tag, private = parse(name)
    if level.lower() not in LEVELS:
        raise TagError(f"level must be one of {', '.join(LEVELS)}")
    vr = vr.upper()
    if private and not creator.strip():
        raise TagError(f"{name} is private: give its Private Creator (--creator)")
    if not private and creator:
        raise TagError(f"{name} is a standard attribute: --creator is for private ones")
    if tag >> 16 in (0x0000, 0x0002, 0xFFFE):
        raise TagError(f"{name}: a command, file meta or item element, not an attribute")
    keyword = ""
    if private:
        vr = vr or _vr_in_data(tag, creator.strip())
    else:
        if tag in query.COLUMNS or tag in query.SPECIAL or tag in query.COMPUTED:
            raise TagError(f"{name} is a matching key of the index already")
        try:
            known = dictionary_VR(tag).split(" or ")[0]
        except KeyError:
            raise TagError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not in the DICOM "
                           "dictionary") from None  # fmt: skip
        if vr and vr != known:
            raise TagError(f"{name} is {known} in the DICOM dictionary, not {vr}")
        vr, keyword = known, keyword_for_tag(tag)
    if vr not in INDEXABLE:
        raise TagError(
            f"{name}: {vr} values are not matching keys here (these are: "
            f"{', '.join(sorted(INDEXABLE))})"
        )
    return {"tag": tag, "creator": creator.strip(), "keyword": keyword, "vr": vr,
            "level": LEVELS[level.lower()]}  # fmt: skip


def _vr_in_data(tag: int, creator: str) -> str:
    """The VR a private element has in the stored data (explicit VR files say it)."""
    key = query.Key(tag, "", "", creator)
    candidates = Instance.select(Instance.json).where(Instance.json.contains(creator)).limit(50)
    for (text,) in candidates.tuples().iterator():
        element = query.element_of(json.loads(text), key)
        if element is not None and element.get("vr") not in (None, "UN"):
            return str(element["vr"])
    raise TagError(
        f"no stored instance says which VR {tag >> 16:04X}xx{tag & 0xFF:02X} of {creator!r} "
        "has (explicit VR): give it (--vr)"
    )


def add(checked: list[dict[str, Any]]) -> list[QueryTagRow]:
    """Register tags (state adding), all or none: the writer writes their values from now
    on, and a server back-fills what is indexed already."""
    added = []
    for fields in checked:
        try:
            with db.atomic():
                created = QueryTag.create(**fields, created_at=_now())
        except IntegrityError:
            name = fields["keyword"] or f"{fields['tag']:08X} of {fields['creator']!r}"
            raise TagError(f"{name} is registered already (minipacs tags list)") from None
        log.info("query tag %08X added at %s level", fields["tag"], fields["level"])
        added.append(_row(created))
    return added


def listing() -> list[QueryTagRow]:
    return [_row(tag) for tag in QueryTag.select().order_by(QueryTag.id)]


def lookup(name: str, creator: str = "") -> QueryTagRow:
    tag, _ = parse(name)
    found = QueryTag.get_or_none((QueryTag.tag == tag) & (QueryTag.creator == creator.strip()))
    if found is None:
        raise TagError(f"{name} is not a registered query tag (minipacs tags list)")
    return _row(found)


def private(group: int, element: int) -> list[QueryTagRow]:
    """The registered private tags gggg,xxee of every creator (QIDO-RS names them so)."""
    tag = (group << 16) | (element & 0xFF)
    return [_row(t) for t in QueryTag.select().where(QueryTag.tag == tag).order_by(QueryTag.id)]


def start_removing(tag_id: int, worker: str) -> None:
    """Mark a tag removed (queries stop using it at once) and take it over from any
    back-fill: `worker` deletes its values next (`step`)."""
    QueryTag.update(state="removing", worker=worker, lease_until=_now(LEASE)).where(
        QueryTag.id == tag_id
    ).execute()


# -- values --------------------------------------------------------------------------


def active(database: AnyDatabase) -> list[_Tag]:
    """The tags whose values the index writer keeps (adding and ready), read in the
    writer's transaction: a back-fill's first step comes after it commits (module doc)."""
    cursor = database.execute_sql(
        "SELECT id, tag, creator, vr, level FROM querytag WHERE state <> 'removing'"
    )
    return [_Tag(*row) for row in cursor.fetchall()]


def values_of(stored: dict, tag: _Tag) -> list[tuple[str, str | None, float | None]]:
    """(text, folded, number) of each distinct value of the tag in a dataset's JSON."""
    element = query.element_of(stored, query.Key(tag.tag, tag.vr, "", tag.creator))
    if element is None:
        return []
    if tag.vr in query.NUMBER_VRS:
        return [("", None, n) for n in dict.fromkeys(query.element_numbers(element, tag.vr))]
    found: list[tuple[str, str | None, float | None]] = []
    for text in dict.fromkeys(query.element_texts(element, tag.vr)):
        if not text:
            continue
        if tag.vr == "TM":
            found.append((time_key(text), None, None))
        elif tag.vr == "PN":
            found.append((text, name_key(text), None))
        else:
            found.append((text, None, None))
    return found


def index_instance(
    database: AnyDatabase,
    tags: list[_Tag],
    json_text: str,
    instance_id: int,
    series_id: int | None,
    study_id: int | None,
) -> None:
    """Values of a new instance: its own, and those of the series and study it created
    (None: they existed, their first instance gave theirs)."""
    entities = {"IMAGE": instance_id, "SERIES": series_id, "STUDY": study_id}
    wanted = [t for t in tags if entities[t.level] is not None]
    if not wanted:
        return
    stored = json.loads(json_text)
    rows = [(t.id, entities[t.level], *value) for t in wanted for value in values_of(stored, t)]
    _insert(database, rows)


def refresh(database: AnyDatabase, level: str, ids: Iterable[int], tags: list[_Tag]) -> None:
    """Write again the values of these entities of `level` from their (first) instance's
    stored JSON now: a replaced instance, a series or study whose first instance went."""
    wanted = [t for t in tags if t.level == level]
    ids = sorted(set(ids))
    if not wanted or not ids:
        return
    marks = ", ".join([database.param] * len(ids))
    _rewrite(database, wanted, _documents(database, level, f"e.id IN ({marks})", ids))


def forget(database: AnyDatabase, level: str, ids: Iterable[int]) -> None:
    """Delete the values of entities whose rows go (ids are reused by SQLite)."""
    ids = sorted(set(ids))
    p = database.param
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        database.execute_sql(
            f"DELETE FROM queryvalue WHERE entity IN ({', '.join([p] * len(chunk))}) "
            f"AND tag_id IN (SELECT id FROM querytag WHERE level = {p})",
            (*chunk, level),
        )


def _documents(
    database: AnyDatabase, level: str, where: str, params: Iterable, limit: int = 0
) -> list[tuple[int, str | None]]:
    """(id, DICOM JSON) of entities of `level` (alias e): their first instance's above IMAGE."""
    first = {
        "IMAGE": "e.json",
        "SERIES": "(SELECT i.json FROM instance i WHERE i.series_id = e.id ORDER BY i.id LIMIT 1)",
        "STUDY": (
            "(SELECT i.json FROM instance i JOIN series s ON i.series_id = s.id "
            "WHERE s.study_id = e.id ORDER BY i.id LIMIT 1)"
        ),
    }[level]
    sql = f"SELECT e.id, {first} FROM {TABLES[level]} e WHERE {where} ORDER BY e.id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    return [(row[0], row[1]) for row in database.execute_sql(sql, tuple(params)).fetchall()]


def _rewrite(database: AnyDatabase, tags: list[_Tag], docs: list[tuple[int, str | None]]) -> None:
    """Replace the tags' values of these entities by those of their JSON (idempotent)."""
    if not docs:
        return
    p = database.param
    ids = [entity for entity, _ in docs]
    marks = ", ".join([p] * len(ids))
    for tag in tags:
        database.execute_sql(
            f"DELETE FROM queryvalue WHERE tag_id = {p} AND entity IN ({marks})", (tag.id, *ids)
        )
    rows = []
    for entity, text in docs:
        if text:
            stored = json.loads(text)
            rows += [(t.id, entity, *value) for t in tags for value in values_of(stored, t)]
    _insert(database, rows)


def _insert(database: AnyDatabase, rows: list[tuple]) -> None:
    if rows:
        marks = ", ".join([database.param] * 5)
        database.cursor().executemany(
            f"INSERT INTO queryvalue (tag_id, entity, text, folded, number) VALUES ({marks})",
            rows,
        )


# -- back-fill and removal, a step per index transaction ---------------------------------


def claim(tag_id: int, worker: str) -> bool:
    """Take a tag to back-fill or remove, unless another process holds it (its lease)."""
    taken = (
        QueryTag.update(worker=worker, lease_until=_now(LEASE))
        .where(
            (QueryTag.id == tag_id)
            & (QueryTag.state != "ready")
            & (
                (QueryTag.worker == "")
                | (QueryTag.worker == worker)
                | (QueryTag.lease_until < _now())
            )
        )  # fmt: skip
        .execute()
    )
    return taken == 1


def step(tag_id: int, worker: str) -> str:
    """One batch of the back-fill or the removal `worker` holds: "more", "done" or "lost"
    (removed meanwhile, or taken over after the lease ran out)."""
    database = db
    lock = "" if is_sqlite(database) else " FOR NO KEY UPDATE"
    p = database.param
    found = database.execute_sql(
        f"SELECT state, worker, level, mark, end_id, done, total, tag, creator, vr "
        f"FROM querytag WHERE id = {p}{lock}",
        (tag_id,),
    ).fetchone()
    if found is None or found[1] != worker:
        return "lost"
    state, _, level, mark, end, done, total, tag, creator, vr = found
    if state == "removing":
        return _purge(database, tag_id)
    if state != "adding":
        return "lost"
    if end is None:  # the first step: every writer from now on writes its values
        if not is_sqlite(database):
            database.execute_sql("LOCK TABLE querytag IN ACCESS EXCLUSIVE MODE")
        table = TABLES[level]
        end, total = database.execute_sql(
            f"SELECT COALESCE(MAX(id), 0), COUNT(*) FROM {table}"
        ).fetchone()
        log.info("back-filling query tag %08X (%s): %d %s row(s)", tag, creator, total, table)
    docs = _documents(database, level, f"e.id > {p} AND e.id <= {p}", (mark, end), BATCH)
    _rewrite(database, [_Tag(tag_id, tag, creator, vr, level)], docs)
    finished = len(docs) < BATCH
    QueryTag.update(
        end_id=end,
        total=total,
        mark=docs[-1][0] if docs else mark,
        done=done + len(docs),
        state="ready" if finished else "adding",
        worker="" if finished else worker,
        lease_until=_now(LEASE),
    ).where(QueryTag.id == tag_id).execute()
    if finished:
        log.info("query tag %08X (%s) is ready", tag, creator)
    return "done" if finished else "more"


def _purge(database: AnyDatabase, tag_id: int) -> str:
    p = database.param
    deleted = database.execute_sql(
        f"DELETE FROM queryvalue WHERE id IN "
        f"(SELECT id FROM queryvalue WHERE tag_id = {p} LIMIT {PURGE})",
        (tag_id,),
    ).rowcount
    if deleted == PURGE:
        QueryTag.update(lease_until=_now(LEASE)).where(QueryTag.id == tag_id).execute()
        return "more"
    if not is_sqlite(database):  # writers that still saw it ready write no more after this
        database.execute_sql("LOCK TABLE querytag IN ACCESS EXCLUSIVE MODE")
    database.execute_sql(f"DELETE FROM queryvalue WHERE tag_id = {p}", (tag_id,))
    database.execute_sql(f"DELETE FROM querytag WHERE id = {p}", (tag_id,))
    log.info("query tag %d removed", tag_id)
    return "done"


def pending() -> list[int]:
    """Tags to back-fill or remove whose lease is free."""
    rows = QueryTag.select(QueryTag.id).where(
        (QueryTag.state != "ready") & ((QueryTag.worker == "") | (QueryTag.lease_until < _now()))
    )
    return [row.id for row in rows.order_by(QueryTag.id)]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class QueryTags:
    """One archive's extended query tags: reads on this thread's connection, writes
    through the archive's index writer (`write`)."""

    def __init__(self, write: Callable) -> None:
        self._write = write

    def add(
        self, names: Iterable[str], level: str = "study", creator: str = "", vr: str = ""
    ) -> list[QueryTagRow]:
        """Register tags (all checked first) at one level; a server back-fills them."""
        with db.connection_context():
            checked = [definition(name, level, creator, vr) for name in names]
        return self._write(add, checked)

    def listing(self) -> list[QueryTagRow]:
        with db.connection_context():
            return listing()

    def private(self, group: int, element: int) -> list[QueryTagRow]:
        with db.connection_context():
            return private(group, element)

    def remove(self, name: str, creator: str = "") -> QueryTagRow:
        """Remove a tag now: its values in batches, then its definition."""
        with db.connection_context():
            tag = lookup(name, creator)
        worker = worker_name()
        self._write(start_removing, tag.id, worker)
        while self._write(step, tag.id, worker) == "more":
            pass
        return tag

    def work(self, worker: str, stop: threading.Event) -> bool:
        """Back-fill or remove each tag that waits for it, to the end (or `stop`); whether
        there was any."""
        with db.connection_context():
            waiting = pending()
        for tag_id in waiting:
            if not self._write(claim, tag_id, worker):
                continue  # another server took it
            while not stop.is_set() and self._write(step, tag_id, worker) == "more":
                pass
        return bool(waiting)


def run(tags: QueryTags, stop: threading.Event) -> None:
    """The server's back-fill thread: a look every POLL seconds until `stop`."""
    with contextlib.suppress(OSError):  # this thread only (Linux: nice is per thread)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    worker = worker_name()
    while not stop.is_set():
        try:
            tags.work(worker, stop)
        except Exception:  # the index is down: look again later
            if not stop.is_set():  # (stopping: the archive may be closed under it)
                log.exception("query tag back-fill round failed")
        stop.wait(POLL)
