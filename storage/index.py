"""Index writes: one writer thread per process commits rows in batches (group commit).

Concurrent associations each wait for their own row, but share one transaction and
one WAL fsync; SQLite never sees two writers from this process, so no "database is
locked". Each row is applied inside its own savepoint, so one bad row fails alone.
"""

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from typing import Any

from peewee import Database

from storage.dataset import ParsedInstance
from storage.models import Instance
from storage.models import Patient
from storage.models import Series
from storage.models import Study

log = logging.getLogger(__name__)
MAX_BATCH = 128


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
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class IndexWriter:
    """Owns the only write connection of this process; `call` runs a function in it."""

    def __init__(self, database: Database, immediate: bool) -> None:
        self._db = database
        self._immediate = immediate
        self._queue: queue.Queue[_Job | None] = queue.Queue()
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

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        with self._db.connection_context():
            while True:
                batch = [self._queue.get()]
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

    def _commit(self, jobs: list[_Job]) -> None:
        # IMMEDIATE takes SQLite's write lock up front: other processes wait, not fail.
        lock = ("IMMEDIATE",) if self._immediate else ()
        try:
            with self._db.atomic(*lock):
                for job in jobs:
                    try:
                        with self._db.atomic():
                            job.result = job.fn()
                    except Exception as exc:  # this job fails alone; the others still commit
                        log.exception("index write failed")
                        job.error = exc
        except Exception as exc:  # the commit itself failed: nothing in the batch is durable
            log.error("index commit of %d writes failed: %s", len(jobs), exc)
            for job in jobs:
                job.error = job.error or exc
        for job in jobs:
            job.done.set()


def apply_row(row: Row) -> None:
    """Insert or update one instance and maintain the counts above it."""
    parsed = row.parsed
    existing = Instance.get_or_none(Instance.sop_uid == parsed.sop_uid)
    if existing is not None:
        if row.replace:
            Instance.update(**_instance_fields(row), state=0).where(
                Instance.id == existing.id
            ).execute()
        return
    patient, _ = _patient(parsed)
    study, new_study = _study(parsed, patient)
    series, new_series = _series(parsed, study)
    Instance.insert(sop_uid=parsed.sop_uid, series=series.id, **_instance_fields(row)).execute()

    Series.update(num_instances=Series.num_instances + 1).where(Series.id == series.id).execute()
    modalities = _add(study.modalities, parsed.series["modality"])
    sop_classes = _add(study.sop_classes, parsed.sop_class_uid)
    Study.update(
        num_instances=Study.num_instances + 1,
        num_series=Study.num_series + int(new_series),
        modalities=modalities,
        sop_classes=sop_classes,
        updated_at=datetime.now(UTC),
    ).where(Study.id == study.id).execute()
    Patient.update(
        num_instances=Patient.num_instances + 1,
        num_series=Patient.num_series + int(new_series),
        num_studies=Patient.num_studies + int(new_study),
    ).where(Patient.id == patient.id).execute()


def mark_replacing(sop_uid: str) -> None:
    """Flag a row whose file is about to be replaced; start-up rehashes flagged rows."""
    Instance.update(state=1).where(Instance.sop_uid == sop_uid).execute()


def _instance_fields(row: Row) -> dict:
    return {
        "sop_class_uid": row.parsed.sop_class_uid,
        "instance_number": row.parsed.instance_number,
        "transfer_syntax": row.parsed.transfer_syntax,
        "path": row.path,
        "size": row.size,
        "sha256": row.sha256,
        "received_at": datetime.now(UTC),
        "calling_aet": row.calling_aet,
        "json": row.parsed.json,
    }


def _patient(parsed: ParsedInstance) -> tuple[Patient, bool]:
    keys = parsed.patient
    found = Patient.get_or_none(
        (Patient.patient_id == keys["patient_id"]) & (Patient.issuer == keys["issuer"])
    )
    if found is not None:
        return found, False
    return Patient.create(**keys), True


def _study(parsed: ParsedInstance, patient: Patient) -> tuple[Study, bool]:
    found = Study.get_or_none(Study.study_uid == parsed.study_uid)
    if found is not None:
        return found, False
    study = Study.create(
        study_uid=parsed.study_uid, patient=patient.id, updated_at=datetime.now(UTC), **parsed.study
    )
    return study, True


def _series(parsed: ParsedInstance, study: Study) -> tuple[Series, bool]:
    found = Series.get_or_none(Series.series_uid == parsed.series_uid)
    if found is not None:
        return found, False
    return Series.create(series_uid=parsed.series_uid, study=study.id, **parsed.series), True


def _add(values: str, value: str) -> str:
    """Add `value` to a sorted backslash-separated set."""
    if not value:
        return values
    items = set(filter(None, values.split("\\")))
    items.add(value)
    return "\\".join(sorted(items))
