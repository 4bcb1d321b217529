"""Removing from the archive: deletion of a patient, study, series or instance (files and
rows together, audited, crash-safe through `.trash/`), protection, and the quota."""

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from peewee import fn

from storage import audit
from storage import events
from storage import index
from storage.changefeed import Pending
from storage.files import fsync_path
from storage.files import instance_path
from storage.models import Instance
from storage.models import Patient
from storage.models import Series
from storage.models import Study
from storage.models import db

if TYPE_CHECKING:
    from storage.archive import Archive

log = logging.getLogger(__name__)
TRASH = ".trash"  # what is being deleted: <LEVEL>.<UID>.<random>, a folder or a file


class Retention:
    """Deletion and quota of one archive."""

    def __init__(self, archive: "Archive") -> None:
        self.archive = archive

    def delete(self, level: str, uid: str, who: str = "", reason: str = "") -> int:
        """Remove a patient (by Patient ID), study, series or instance (IMAGE): files and
        rows together, audited; returns the instances removed. Crash-safe: the rename of
        the folder or file into `.trash/` is the point of no return, and start-up finishes
        (rows, then files) whatever a crash interrupted. With an object store their objects
        go too, once the rows have (storage.objects: retried while the store is down)."""
        level = level.upper()
        if level == "PATIENT":
            with db.connection_context():
                studies = [
                    s.study_uid
                    for s in Study.select(Study.study_uid)
                    .join(Patient)
                    .where(Patient.patient_id == uid)
                ]
            return sum(self.delete("STUDY", study, who, reason) for study in studies)
        with self.archive.placing:  # not while the indexer links an instance into what goes
            return self._delete(level, uid, who, reason)

    def _delete(self, level: str, uid: str, who: str, reason: str) -> int:
        if level not in ("STUDY", "SERIES", "IMAGE"):
            raise ValueError(f"cannot delete at level {level!r}")
        target = self._path_of(level, uid)
        trash = self.archive.root / TRASH / f"{level}.{uid}.{uuid.uuid4().hex}"
        record = self.archive.files.deleting(self._objects_of(level, uid))
        moved = True
        try:
            if target is None:
                raise FileNotFoundError(uid)
            trash.parent.mkdir(exist_ok=True)
            os.rename(target, trash)
            if self.archive.fsync:
                fsync_path(target.parent)
        except FileNotFoundError:
            moved = False  # no files (or another node took them): the rows still go
        removed = self.archive.write(self.delete_rows, level, uid, who, reason)
        self.archive.files.deleted(record)  # its objects go now that its rows have
        if moved:
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        return removed

    def _objects_of(self, level: str, uid: str) -> list[str]:
        """The instances' paths, which are their object keys too (an object store's)."""
        if not self.archive.files.remote:
            return []
        with db.connection_context():
            return [instance_path(*uids) for uids in index.uids_under(level, uid)]

    def _path_of(self, level: str, uid: str) -> Path | None:
        if level == "STUDY":
            return self.archive.root / uid
        with db.connection_context():
            if level == "SERIES":
                study = (
                    Study.select(Study.study_uid)
                    .join(Series)
                    .where(Series.series_uid == uid)
                    .scalar()
                )
                return self.archive.root / study / uid if study else None
            path = Instance.select(Instance.path).where(Instance.sop_uid == uid).scalar()
            return self.archive.root / path if path else None

    def delete_rows(self, level: str, uid: str, who: str, reason: str) -> int:
        gone = index.uids_under(level, uid)
        removed, patient_id, study_uid = index.delete_rows(level, uid)
        self.archive.record([Pending("delete", *uids, who=who) for uids in gone])
        events.deleted(gone, who, self.archive.events.options)
        if study_uid:
            detail = {"level": level, "uid": uid, "instances": removed, "reason": reason}
            self.archive.chain.append(
                db,
                audit.Event(
                    "delete", who=who, patient_id=patient_id, study_uid=study_uid, detail=detail
                ),
            )
        return removed

    def set_protected(self, study_uid: str, protected: bool, who: str = "") -> bool:
        """Protect a study from retention (or release it), audited; False when there is no
        such study."""
        return self.archive.write(self._protect, study_uid, protected, who)

    def _protect(self, study_uid: str, protected: bool, who: str) -> bool:
        if not Study.update(protected=protected).where(Study.study_uid == study_uid).execute():
            return False
        event = audit.Event("protect", who=who, study_uid=study_uid, detail={"on": protected})
        self.archive.chain.append(db, event)
        return True

    def enforce_quota(self, max_bytes: int, max_instances: int) -> list[tuple[str, int, int]]:
        """Remove the least recently updated unprotected studies until the archive is within
        both limits (0 = no limit); returns (StudyInstanceUID, instances, bytes) removed."""
        totals = self.archive.catalog.stats()
        removed: list[tuple[str, int, int]] = []
        for study_uid, instances, size in self._retention_candidates():
            if (not max_bytes or totals["bytes"] <= max_bytes) and (
                not max_instances or totals["instances"] <= max_instances
            ):
                break
            self.delete("STUDY", study_uid, who="retention", reason="over quota")
            totals["bytes"] -= size
            totals["instances"] -= instances
            removed.append((study_uid, instances, size))
            log.warning(
                "retention removed study %s (%d instances, %d bytes): over quota",
                study_uid,
                instances,
                size,
            )
        return removed

    def _retention_candidates(self) -> Iterator[tuple[str, int, int]]:
        with db.connection_context():
            rows = (
                Study.select(Study.study_uid, Study.num_instances, fn.SUM(Instance.size))
                .join(Series, on=(Series.study == Study.id))
                .join(Instance, on=(Instance.series == Series.id))
                .where(~Study.protected)
                .group_by(Study.id, Study.study_uid, Study.num_instances, Study.updated_at)
                .order_by(Study.updated_at, Study.id)
                .tuples()
            )
            candidates = list(rows.iterator())  # release the connection before deleting
        for study_uid, instances, size in candidates:
            yield study_uid, instances, int(size or 0)
