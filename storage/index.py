"""Index writes: one writer thread per process commits rows in batches (group commit).

Concurrent associations each wait for their own row, but share one transaction and
one WAL fsync; SQLite never sees two writers from this process, so no "database is
locked". Each row is applied inside its own savepoint, so one bad row fails alone.

On PostgreSQL several processes (on several machines) write at once: every insert of
a new patient, study, series or instance tolerates the same row arriving from another
writer (ON CONFLICT DO NOTHING, then read it), the study's lists are read under a row
lock, and a batch that loses a deadlock is rolled back and run again.
"""

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import cast

from storage import querytags
from storage.dataset import ParsedInstance
from storage.engine import is_sqlite
from storage.errors import InstanceConflict
from storage.errors import Refused
from storage.errors import SeriesConflict
from storage.errors import UIDConflict
from storage.models import AnyDatabase
from storage.models import Instance
from storage.models import Patient
from storage.models import QueryTag
from storage.models import Series
from storage.models import Study
from storage.models import StudyModality

log = logging.getLogger(__name__)
MAX_BATCH = 128
RETRIES = 5
DEFER = 0.25  # s a batch of only submitted jobs waits for more
RETRYABLE = {"40P01", "40001"}  # PostgreSQL deadlock_detected, serialization_failure


@dataclass
class Row:
    """One instance to index; `replace` overwrites an existing row instead of keeping it."""

    parsed: ParsedInstance
    path: str
    size: int
    sha256: str
    calling_aet: str = ""
    replace: bool = False


@dataclass
class _Job:
    fn: Callable[[], Any]
    deferred: bool = False  # submitted, nobody waits: may wait for company
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class IndexWriter:
    """Owns the only write connection of this process; `call` runs a function in it."""

    def __init__(self, database: AnyDatabase, immediate: bool) -> None:
        self._db = database
        self._immediate = immediate
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._last: list[Callable[[], Any]] = []  # at_commit's, for the batch being written
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in the next committed batch; return its result once durable."""
        if not self._thread.is_alive():
            raise RuntimeError("the index writer has stopped")
        job = _Job(lambda: fn(*args))
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` in the next batch without waiting; a failure is only logged."""
        if self._thread.is_alive():
            self._queue.put(_Job(lambda: fn(*args), deferred=True))

    def pending(self) -> int:
        return self._queue.qsize()

    def at_commit(self, fn: Callable[..., Any], *args: Any) -> None:
        """From a job (in the writer thread): run `fn(*args)` last in the batch's
        transaction, after every job, and drop it if this job fails. The change feed
        numbers its entries there, under a lock then held only until the commit."""
        self._last.append(lambda: fn(*args))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        with self._db.connection_context():
            while True:
                batch = [self._queue.get()]
                if batch[0] is not None and batch[0].deferred:
                    self._gather(batch)
                while batch[-1] is not None and len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                jobs = [job for job in batch if job is not None]
                if jobs:
                    self._commit(jobs)
                if batch[-1] is None:
                    return

    def _gather(self, batch: list) -> None:
        """Hold a batch of submitted jobs (audit events of queries, retrievals) for up to
        DEFER seconds: committed at once, with an fsync, they took ~5 ms from the answer
        being sent (GIL and disk) for every C-FIND; held, many share one commit, after
        the burst. A job someone waits for ends the wait."""
        deadline = time.monotonic() + DEFER
        while len(batch) < MAX_BATCH and (left := deadline - time.monotonic()) > 0:
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                return
            if batch[-1] is None or not batch[-1].deferred:
                return

    def _commit(self, jobs: list[_Job]) -> None:
        # IMMEDIATE takes SQLite's write lock up front: other processes wait, not fail.
        lock = ("IMMEDIATE",) if self._immediate else ()
        for attempt in range(1, RETRIES + 1):
            for job in jobs:
                job.result = job.error = None
            self._last = []
            try:
                with self._db.atomic(*lock):
                    for job in jobs:
                        self._apply(job)
                    for fn in self._last:
                        fn()
                break
            except Exception as exc:  # the commit itself failed: nothing in the batch is durable
                if _sqlstate(exc) in RETRYABLE and attempt < RETRIES:
                    # Lost a deadlock to another writer: the whole batch let go of its
                    # locks; the winner goes on, and this batch runs again after it.
                    log.info("index batch lost a deadlock (attempt %d); retrying", attempt)
                    time.sleep(random.uniform(0, 0.05 * attempt))
                    continue
                log.error("index commit of %d writes failed: %s", len(jobs), _cause(exc))
                for job in jobs:
                    job.error = job.error or _cause(exc)
                break
        for job in jobs:
            job.done.set()

    def _apply(self, job: _Job) -> None:
        last = len(self._last)
        try:
            with self._db.atomic():
                job.result = job.fn()
        except Exception as exc:  # this job fails alone; the others still commit
            del self._last[last:]
            if _sqlstate(exc) in RETRYABLE:
                raise  # the whole batch must roll back to release its locks
            job.error = _cause(exc)
            if not isinstance(job.error, Refused | UIDConflict):  # the caller's to log
                log.error("index write failed: %s", job.error)


def _sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a driver error, also through peewee's wrapper (which holds the
    driver's exception as its first argument)."""
    while exc is not None:
        state = getattr(exc, "sqlstate", None)
        if state:
            return state
        wrapped = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        exc = wrapped or exc.__cause__ or exc.__context__
    return None


def _cause(exc: BaseException) -> BaseException:
    """The first error of a chain: when SQLite rolls a failed statement back itself (disk
    full), peewee's own rollback then fails and hides the reason."""
    while exc.__context__ is not None and "rollback" in str(exc):
        exc = exc.__context__
    return exc


class Statements:
    """The SQL of one row insert, built once with the database's own placeholder.

    peewee builds each query in Python (~0.2 ms a statement); ingest writes six per
    instance, so the hot path uses these plain, portable statements instead.
    """

    def __init__(self, database: AnyDatabase) -> None:
        p = database.param
        # SQLite has one writer at a time; PostgreSQL must lock the row it rewrites.
        for_update = "" if is_sqlite(database) else " FOR UPDATE"
        self.find_instance = f"SELECT id, path FROM instance WHERE sop_uid = {p}"
        self.find_series = (
            f"SELECT series.id, series.study_id, study.study_uid FROM series "
            f"JOIN study ON study.id = series.study_id WHERE series.series_uid = {p}"
        )
        self.study_lists = (
            f"SELECT patient_id, modalities, sop_classes FROM study WHERE id = {p}{for_update}"
        )
        self.count_series = f"UPDATE series SET num_instances = num_instances + 1 WHERE id = {p}"
        self.count_study = (
            f"UPDATE study SET num_instances = num_instances + 1, num_series = num_series + {p}, "
            f"modalities = {p}, sop_classes = {p}, updated_at = {p} WHERE id = {p}"
        )
        self.count_patient = (
            f"UPDATE patient SET num_instances = num_instances + 1, "
            f"num_series = num_series + {p}, num_studies = num_studies + {p} WHERE id = {p}"
        )
        self.add_modality = (
            f"INSERT INTO studymodality (study_id, modality) VALUES ({p}, {p}) "
            "ON CONFLICT DO NOTHING"
        )
        columns = ["sop_uid", "series_id", *INSTANCE_COLUMNS]
        marks = ", ".join([p] * len(columns))
        self.insert_instance = (
            f"INSERT INTO instance ({', '.join(columns)}, state) VALUES ({marks}, 0) "
            "ON CONFLICT (sop_uid) DO NOTHING"
        )
        sets = ", ".join(f"{c} = {p}" for c in INSTANCE_COLUMNS)
        self.replace_instance = f"UPDATE instance SET {sets}, state = 0 WHERE id = {p}"
        self.patient = _Upsert(Patient, ("patient_id", "issuer"), p)
        self.study = _Upsert(Study, ("study_uid",), p)
        self.series = _Upsert(Series, ("series_uid",), p)


class _Upsert:
    """Find a row by its unique key, else insert it (a new patient, study or series):
    plain statements, as Statements' (peewee built six queries a new study, ~1 ms)."""

    def __init__(self, model, key: tuple[str, ...], p: str) -> None:
        self.fields = [f for f in model._meta.sorted_fields if f.name != "id"]
        self.key = key
        table = model._meta.table_name
        where = " AND ".join(f"{name} = {p}" for name in key)
        columns = ", ".join(f.column_name for f in self.fields)
        marks = ", ".join([p] * len(self.fields))
        self.find = f"SELECT id FROM {table} WHERE {where}"
        self.insert = (
            f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING RETURNING id"
        )

    def __call__(self, database: AnyDatabase, **values: Any) -> tuple[int, bool]:
        """(id, created). A row another writer inserts meanwhile is found, not duplicated
        (its unique key conflicts and nothing is returned)."""
        key = tuple(values[name] for name in self.key)
        found = database.execute_sql(self.find, key).fetchone()
        if found is not None:
            return found[0], False
        row = database.execute_sql(
            self.insert, [values[f.name] if f.name in values else _default(f) for f in self.fields]
        ).fetchone()
        if row is not None:
            return row[0], True
        return database.execute_sql(self.find, key).fetchone()[0], False


INSTANCE_COLUMNS = (
    "sop_class_uid",
    "instance_number",
    "transfer_syntax",
    "path",
    "size",
    "sha256",
    "received_at",
    "calling_aet",
    "json",
)


def apply_row(
    row: Row, sql: Statements, database: AnyDatabase, tags: list | None = None
) -> str | None:
    """Insert or update one instance and maintain the counts above it and the values of
    extended query tags (`tags`: querytags.active, read here when None); what changed, in
    the change feed's words: "create", "update" (a replace), None (already there).
    InstanceConflict when the instance is stored at another path (another series or
    study), SeriesConflict when its series is stored under another study."""
    parsed = row.parsed
    found = database.execute_sql(sql.find_instance, (parsed.sop_uid,)).fetchone()
    values = (
        parsed.sop_class_uid,
        parsed.instance_number,
        parsed.transfer_syntax,
        row.path,
        row.size,
        row.sha256,
        _now(),
        row.calling_aet,
        parsed.json,
    )
    if found is not None:
        _same_place(parsed.sop_uid, found[1], row.path)
        if row.replace:
            database.execute_sql(sql.replace_instance, (*values, found[0]))
            _replaced_values(database, found[0], tags)
            return "update"
        return None
    series = database.execute_sql(sql.find_series, (parsed.series_uid,)).fetchone()
    if series is None:
        patient_id, _ = sql.patient(database, **parsed.patient)
        study_id, new_study = sql.study(
            database, study_uid=parsed.study_uid, patient=patient_id, updated_at=_now(),
            **parsed.study,
        )  # fmt: skip
        series_id, new_series = sql.series(
            database, series_uid=parsed.series_uid, study=study_id, **parsed.series
        )
    else:
        series_id, study_id, study_uid = series
        if study_uid != parsed.study_uid:
            raise SeriesConflict(series_conflict(parsed.series_uid, study_uid, parsed.study_uid))
        new_study, new_series = False, False
    inserted = database.execute_sql(sql.insert_instance, (parsed.sop_uid, series_id, *values))
    if inserted.rowcount == 0:  # another writer indexed the same instance meanwhile
        found = database.execute_sql(sql.find_instance, (parsed.sop_uid,)).fetchone()
        _same_place(parsed.sop_uid, found[1], row.path)
        return None
    database.execute_sql(sql.count_series, (series_id,))
    patient_id, modalities, sop_classes = database.execute_sql(
        sql.study_lists, (study_id,)
    ).fetchone()
    modality = str(parsed.series["modality"])
    if modality and modality not in modalities.split("\\"):
        database.execute_sql(sql.add_modality, (study_id, modality))
    database.execute_sql(
        sql.count_study,
        (
            int(new_series),
            _add(modalities, modality),
            _add(sop_classes, parsed.sop_class_uid),
            _now(),
            study_id,
        ),
    )
    database.execute_sql(sql.count_patient, (int(new_series), int(new_study), patient_id))
    tags = querytags.active(database) if tags is None else tags
    if tags:
        instance_id = database.execute_sql(sql.find_instance, (parsed.sop_uid,)).fetchone()[0]
        querytags.index_instance(
            database, tags, parsed.json, instance_id,
            series_id if new_series else None, study_id if new_study else None,
        )  # fmt: skip
    return "create"


def _replaced_values(database: AnyDatabase, instance_id: int, tags: list | None) -> None:
    """A replaced instance's extended query tag values, and its series' and study's (it
    may be their first instance)."""
    tags = querytags.active(database) if tags is None else tags
    if not tags:
        return
    p = database.param
    series_id, study_id = database.execute_sql(
        f"SELECT i.series_id, s.study_id FROM instance i JOIN series s ON i.series_id = s.id "
        f"WHERE i.id = {p}",
        (instance_id,),
    ).fetchone()
    for level, entity in (("IMAGE", instance_id), ("SERIES", series_id), ("STUDY", study_id)):
        querytags.refresh(database, level, [entity], tags)


def series_conflict(series_uid: str, stored: str, arrived: str) -> str:
    """First what an ErrorComment (64 characters) keeps, then the UIDs for the log."""
    return f"series stored under another study: {series_uid} is in {stored}, not {arrived}"


def instance_conflict(sop_uid: str, stored: str, arrived: str) -> InstanceConflict:
    """An instance stored at `stored` arrived for `arrived` (paths): first what an
    ErrorComment (64 characters) keeps, then the UIDs for the log."""
    return InstanceConflict(
        f"instance stored in another series; delete it first: {sop_uid} is at {stored}, "
        f"not {arrived}",
        stored,
    )


def _same_place(sop_uid: str, stored: str, arrived: str) -> None:
    """A row found for an instance is this file's only where it names the same path."""
    if stored != arrived:
        raise instance_conflict(sop_uid, stored, arrived)


def study_of_series(database: AnyDatabase, series_uid: str) -> str | None:
    """The Study Instance UID the index files a series under (None: not indexed). Plain
    SQL: it is on the C-STORE receive path, where peewee's query building took 110 of
    its 125 µs."""
    row = database.execute_sql(
        f"SELECT study.study_uid FROM series JOIN study ON study.id = series.study_id "
        f"WHERE series.series_uid = {database.param}",
        (series_uid,),
    ).fetchone()
    return row[0] if row is not None else None


def mark_replacing(sop_uid: str) -> None:
    """Flag a row whose file is about to be replaced; start-up rehashes flagged rows."""
    Instance.update(state=1).where(Instance.sop_uid == sop_uid).execute()


def _default(field: Any) -> Any:
    return field.default() if callable(field.default) else field.default


def _now() -> str:
    """UTC now, in the text form peewee's DateTimeField stores."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _add(values: str, value: str) -> str:
    """Add `value` to a sorted backslash-separated set."""
    if not value:
        return values
    items = set(filter(None, values.split("\\")))
    items.add(value)
    return "\\".join(sorted(items))


def _scope(level: str, uid: str):
    """The instances of a study, series or instance (`level` STUDY, SERIES or IMAGE)."""
    key = {"STUDY": Study.study_uid, "SERIES": Series.series_uid, "IMAGE": Instance.sop_uid}
    return Instance.select(Instance.id).join(Series).join(Study).where(key[level] == uid)


def uids_under(level: str, uid: str) -> list[tuple[str, str, str]]:
    """(Study, Series, SOP Instance UID) of each instance `delete_rows` would remove."""
    rows = _scope(level, uid).select(Study.study_uid, Series.series_uid, Instance.sop_uid)
    return cast(list[tuple[str, str, str]], list(rows.order_by(Instance.id).tuples()))


def delete_rows(level: str, uid: str) -> tuple[int, str, str]:
    """Remove the rows of a study, series or instance (`level` STUDY, SERIES or IMAGE) and
    recount what is above it; an emptied series, study or patient goes too. Returns
    (instances removed, Patient ID, Study Instance UID); (0, '', '') when nothing matched."""
    scope = _scope(level, uid)
    pairs = scope.select(Series.id, Study.id).distinct().tuples()  # (series, study)
    rows = cast(list[tuple[int, int]], list(pairs))  # peewee types rows as models
    if not rows:
        return 0, "", ""
    tagged = QueryTag.select().exists()
    instances = [i for (i,) in scope.tuples()] if tagged else []
    removed = Instance.delete().where(Instance.id.in_(scope)).execute()
    emptied = [s for s, _ in rows if not Instance.select().where(Instance.series == s).exists()]
    Series.delete().where(Series.id.in_(emptied)).execute()
    study = Study.get_by_id(rows[0][1])
    patient = Patient.get_by_id(study.patient_id)
    _recount_study(study)
    _recount_patient(patient)
    if tagged:
        _deleted_values(instances, [s for s, _ in rows], emptied, study.id)
    return removed, patient.patient_id, study.study_uid


def _deleted_values(instances: list[int], series: list[int], emptied: list[int], study: int):
    """Extended query tag values of deleted rows go; a series or study that stays may
    have another first instance now."""
    database = Instance._meta.database
    tags = querytags.active(database)
    querytags.forget(database, "IMAGE", instances)
    querytags.forget(database, "SERIES", emptied)
    querytags.refresh(database, "SERIES", set(series) - set(emptied), tags)
    if Study.select().where(Study.id == study).exists():
        querytags.refresh(database, "STUDY", [study], tags)
    else:
        querytags.forget(database, "STUDY", [study])


def _recount_study(study: Study) -> None:
    """Counts and lists of a study from its remaining rows; the study goes when empty."""
    series = list(Series.select().where(Series.study == study))
    StudyModality.delete().where(StudyModality.study == study).execute()
    if not series:
        Study.delete().where(Study.id == study.id).execute()
        return
    for s in series:
        s.num_instances = Instance.select().where(Instance.series == s).count()
        s.save(only=[Series.num_instances])
    modalities = sorted({s.modality for s in series if s.modality})
    classes = (
        Instance.select(Instance.sop_class_uid)
        .distinct()
        .where(Instance.series.in_([s.id for s in series]))
    )
    for modality in modalities:
        StudyModality.insert(study=study, modality=modality).execute()
    Study.update(
        num_series=len(series),
        num_instances=sum(s.num_instances for s in series),
        modalities="\\".join(modalities),
        sop_classes="\\".join(sorted(c.sop_class_uid for c in classes)),
    ).where(Study.id == study.id).execute()


def _recount_patient(patient: Patient) -> None:
    studies = list(
        Study.select(Study.num_series, Study.num_instances).where(Study.patient == patient)
    )
    if not studies:
        Patient.delete().where(Patient.id == patient.id).execute()
        return
    Patient.update(
        num_studies=len(studies),
        num_series=sum(s.num_series for s in studies),
        num_instances=sum(s.num_instances for s in studies),
    ).where(Patient.id == patient.id).execute()
