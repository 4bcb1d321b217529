"""Reading the archive: the query engine's answers on this thread's connection, where an
instance's file is, what is stored, and whether the archive can answer for an instance
(storage commitment)."""

from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import cast

from peewee import fn

from storage import fileset
from storage import query
from storage.errors import StorageError
from storage.models import Instance
from storage.models import Patient
from storage.models import Series
from storage.models import Study
from storage.models import db
from storage.objects import LocalFiles
from storage.rows import InstanceLocation


class Catalog:
    """What is stored under one archive root, as the index says."""

    def __init__(self, root: Path, files: LocalFiles) -> None:
        self.root = root
        self.files = files

    def find(self, level: str, keys: list, model: str = "STUDY", options=None, **paging):
        """Answers of the query engine (storage.query.find), on this thread's connection."""
        with db.connection_context():
            yield from query.find(level, keys, model, options or query.Options(), **paging)

    def locate(self, level: str, keys: list, model: str = "STUDY") -> Iterator[InstanceLocation]:
        """Every instance under the entities the keys select (storage.query.locate), its
        path made absolute."""
        with db.connection_context():
            for found in query.locate(level, keys, model):
                yield replace(found, path=self.root / found.path)

    def locate_ids(self, ids: list[int]) -> Iterator[InstanceLocation]:
        """The instances with these index ids that are still stored, path absolute, in no
        order (an export resuming the plan it made: viewer.export)."""
        with db.connection_context():
            for start in range(0, len(ids), 500):
                rows = cast(
                    Iterable[tuple],
                    Instance.select(
                        Instance.id,
                        Study.study_uid,
                        Series.series_uid,
                        Instance.sop_uid,
                        Instance.sop_class_uid,
                        Instance.transfer_syntax,
                        Instance.instance_number,
                        Instance.path,
                    )
                    .join(Series, on=(Instance.series == Series.id))
                    .join(Study, on=(Series.study == Study.id))
                    .where(Instance.id.in_(ids[start : start + 500]))
                    .tuples(),
                )
                for pk, study, series, sop, sop_class, syntax, number, path in rows:
                    yield InstanceLocation(
                        pk, study, series, sop, sop_class, syntax, number, self.root / path
                    )

    def instance_json(self, level: str, keys: list) -> Iterator[tuple[str, str]]:
        """(SOP Instance UID, stored DICOM JSON) under the entities the keys select
        (storage.query.instance_json)."""
        with db.connection_context():
            yield from query.instance_json(level, keys)

    def instance_elements(
        self, level: str, keys: list, tags: list[str]
    ) -> Iterator[tuple[str, dict]]:
        """(SOP Instance UID, the stored JSON's top-level elements `tags`) under the
        entities the keys select (storage.query.instance_elements)."""
        with db.connection_context():
            yield from query.instance_elements(level, keys, tags)

    def contains(self, study_uid: str, series_uid: str = "", sop_uid: str = "") -> bool:
        """Whether the study (and the series in it, and the instance in that) is stored."""
        with db.connection_context():
            query = Study.select(Study.id).where(Study.study_uid == study_uid)
            if series_uid:
                query = query.join(Series).where(Series.series_uid == series_uid)
            if sop_uid:
                query = query.join(Instance).where(Instance.sop_uid == sop_uid)
            return query.exists()

    def instance_file(self, sop_uid: str, study_uid: str = "", series_uid: str = "") -> Path | None:
        """The stored file of an instance, or None; given study/series UIDs must match."""
        with db.connection_context():
            row = (
                Instance.select(Instance.path, Series.series_uid, Study.study_uid)
                .join(Series, on=(Instance.series == Series.id))
                .join(Study, on=(Series.study == Study.id))
                .where(Instance.sop_uid == sop_uid)
                .tuples()
                .first()
            )
        if (
            row is None
            or (study_uid and row[2] != study_uid)
            or (series_uid and row[1] != series_uid)
        ):
            return None
        return self.root / row[0]

    def file_set(self, study_uid: str, series_uid: str = "") -> fileset.Plan | None:
        """The study (or one series of it) as a DICOM File-set (storage.fileset), from the
        index alone; None when nothing of it is stored."""
        with db.connection_context():
            rows = (
                Instance.select(Instance.json, Instance.transfer_syntax, Instance.path)
                .join(Series, on=(Instance.series == Series.id))
                .join(Study, on=(Series.study == Study.id))
                .where(Study.study_uid == study_uid)
                .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
            )
            if series_uid:
                rows = rows.where(Series.series_uid == series_uid)
            stored = [
                fileset.Stored(text, syntax, self.root / path)
                for text, syntax, path in rows.tuples().iterator()
            ]
        return fileset.plan(stored) if stored else None

    def commitment_problem(self, sop_class_uid: str, sop_uid: str) -> str:
        """Why the archive cannot take responsibility for an instance ('' when it can):
        stored, under that SOP class, its file (or object) still the size and SHA-256
        recorded."""
        with db.connection_context():
            row = (
                Instance.select(
                    Instance.sop_class_uid, Instance.path, Instance.size, Instance.sha256
                )  # fmt: skip
                .where(Instance.sop_uid == sop_uid)
                .tuples()
                .first()
            )
        if row is None:
            return "not stored"
        if row[0] != sop_class_uid:
            return "stored under another SOP class"
        try:
            if self.files.check(row[1], row[2], row[3]):
                return "file missing or changed"
        except (OSError, StorageError):  # unreadable, or the object store does not answer
            return "file missing or changed"
        return ""

    def stats(self) -> dict[str, int]:
        with db.connection_context():
            return {
                "patients": Patient.select().count(),
                "studies": Study.select().count(),
                "series": Series.select().count(),
                "instances": Instance.select().count(),
                "bytes": int(Instance.select(fn.SUM(Instance.size)).scalar() or 0),
            }
