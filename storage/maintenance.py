"""Keeping files and index in agreement: start-up repair, reindex from the files alone
(or the bucket), verification of every file, copying the index to another database."""

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from itertools import islice
from pathlib import Path
from typing import IO
from typing import TYPE_CHECKING

from peewee import OperationalError

from storage import audit
from storage import changefeed
from storage import index
from storage import schema
from storage.dataset import ParsedInstance
from storage.dataset import read_instance
from storage.engine import describe
from storage.engine import is_sqlite
from storage.engine import open_database
from storage.errors import InvalidDataset
from storage.errors import StorageError
from storage.errors import StoreUnavailable
from storage.files import hash_file
from storage.files import instance_path
from storage.models import FROM_FILES
from storage.models import Instance
from storage.models import QueryTag
from storage.models import Study
from storage.models import db
from storage.objects import ObjectFiles
from storage.retention import TRASH

if TYPE_CHECKING:
    from storage.archive import Archive

log = logging.getLogger(__name__)
SHARED_TEMPORARY_AGE = 3600  # s: younger temporaries may be another node's, in flight
OBJECT_READERS = 8  # objects' headers read at once by reindex from a bucket


@dataclass
class Problem:
    """One finding of `verify` or `reconcile`: a path and what is wrong with it."""

    path: str
    reason: str


@dataclass
class ReconcileReport:
    removed_temporary: int = 0
    deletions_finished: int = 0
    indexed: int = 0
    rehashed: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Listing:
    """The instance objects under the prefix, listed once: `minipacs reindex` counts them
    for its progress, then reads them. Their keys wait in a temporary file, not in memory
    (a few hundred bytes an object, millions of them in a large bucket)."""

    spool: IO[str]
    count: int = 0

    def __iter__(self) -> Iterator[tuple[str, int]]:
        """(path under the data folder, size) of each object, in the bucket's order."""
        self.spool.seek(0)
        for line in self.spool:
            rel, size = json.loads(line)
            yield rel, size


class Maintenance:
    """Repair and checks of one archive."""

    def __init__(self, archive: "Archive") -> None:
        self.archive = archive

    def reconcile(self) -> ReconcileReport:
        """Start-up repair: drop temporaries, index unindexed files, rehash rows being
        replaced, report rows whose file is gone."""
        report = ReconcileReport()
        # On a shared index other nodes may be receiving into the same folder right now.
        keep_after = time.time() - SHARED_TEMPORARY_AGE if not is_sqlite(db.obj) else None
        trash = self.archive.root / TRASH
        for folder in trash.iterdir() if trash.is_dir() else []:
            level, _, rest = folder.name.partition(".")  # LEVEL.UID.random
            reason = "finishing an interrupted deletion"
            uid = rest.rpartition(".")[0]
            self.archive.write(self.archive.retention.delete_rows, level, uid, "start-up", reason)
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
            report.deletions_finished += 1
        self.archive.files.recover()
        for leftover in [*self.archive.incoming.iterdir(), *self.archive.journal.partial()]:
            with contextlib.suppress(FileNotFoundError):
                if keep_after is not None and leftover.stat().st_mtime > keep_after:
                    continue
                leftover.unlink()
                report.removed_temporary += 1
        while entries := self.archive.journal.entries()[:256]:  # acknowledged, not yet indexed
            try:
                taken = self.archive.index_entries(entries)
            except Exception as exc:  # the indexer takes them up when it can
                report.problems.append(Problem(".queue", f"journal not indexed yet: {exc}"))
                break
            report.indexed += taken
            if not taken:  # another node's indexer holds them
                break
        with db.connection_context():
            flagged = list(Instance.select().where(Instance.state == 1))
            for row in flagged:
                self._adopt(self.archive.root / row.path, report, "start-up", replace=True)
                report.rehashed += 1
            for path in self._files():
                if self._copy_only(path):
                    continue  # a copy of an object whose row went: left to the cache
                if not Instance.select().where(Instance.sop_uid == path.stem).exists():
                    self._adopt(path, report, "start-up")
            for rel in self._paths() if not self.archive.files.remote else ():
                if not (self.archive.root / rel).is_file():
                    report.problems.append(Problem(rel, "indexed but the file is missing"))
        for problem in report.problems:
            log.warning("reconcile: %s: %s", problem.path, problem.reason)
        return report

    def _copy_only(self, path: Path) -> bool:
        """Whether a file is a copy of an object (object store): not a file to index
        (placed files keep their `.upload` link, a second hard link, until uploaded)."""
        try:
            return self.archive.files.remote and os.stat(path).st_nlink == 1
        except FileNotFoundError:  # evicted meanwhile
            return True

    def reindex(
        self,
        progress: Callable[[], None] | None = None,
        objects: Listing | None = None,
        who: str = "reindex",
    ) -> ReconcileReport:
        """Rebuild what the files tell (models.FROM_FILES) from the files alone; `progress()`
        after each file. Every other table is kept as it is: the audit trail, users and
        tokens, queues, subscriptions, the worklist and MPPS hold what no file can. So is
        which studies are protected from retention. The change feed numbers on: each file
        indexed is a "create" by "reindex" (what a follower holds stays valid; rows whose
        file had gone leave no "delete"). Extended query tags are kept; their values are
        written again with the rows. With an object store: the files still to upload (the
        newest bytes), then every object under the prefix (`objects`, when listed already
        for count_files), each parsed from its first bytes (ObjectFiles.parse_object). The
        reindex itself is audited, by `who`."""
        with db.connection_context():
            protected = [s.study_uid for s in Study.select(Study.study_uid).where(Study.protected)]
            with db.atomic():
                db.drop_tables(FROM_FILES)
                db.create_tables(FROM_FILES)
            QueryTag.delete().where(QueryTag.state == "removing").execute()
            QueryTag.update(
                state="ready", worker="", end_id=None, mark=0, done=0, total=0
            ).execute()
        report = ReconcileReport()
        try:
            self._reindex_files(report, progress, objects)
        except StorageError as exc:  # e.g. the store stopped answering: run it again
            with contextlib.suppress(StorageError):  # the index itself may be what failed
                self._audit_reindex(report, who, f"failure: {exc}")
            raise
        finally:  # whatever stops it (Ctrl-C too), the studies found keep their protection
            with contextlib.suppress(StorageError):
                self.archive.write(_protect_again, protected)
        outcome = f"failure: {len(report.problems)} problem(s)" if report.problems else "success"
        self._audit_reindex(report, who, outcome)
        return report

    def _reindex_files(
        self, report: ReconcileReport, progress: Callable[[], None] | None, objects: Listing | None
    ) -> None:
        for path in self._files():
            if self._copy_only(path):
                continue  # a copy of an object: indexed from the bucket below
            self._adopt(path, report, "reindex")
            if progress:
                progress()
        if isinstance(self.archive.files, ObjectFiles):
            listed = contextlib.nullcontext(objects) if objects is not None else self.list_objects()
            with listed as found:
                self._adopt_objects(self.archive.files, found, report, progress)

    def _audit_reindex(self, report: ReconcileReport, who: str, outcome: str) -> None:
        detail = {"indexed": report.indexed, "problems": len(report.problems)}
        event = audit.Event("reindex", outcome, who=who, detail=detail)
        self.archive.write(self.archive.chain.append, db, event)

    @contextlib.contextmanager
    def list_objects(self) -> Iterator[Listing]:
        """The instance objects under the prefix (none on files), listed now: the one
        listing `minipacs reindex` counts and then reads (a request per 1,000 keys)."""
        with tempfile.TemporaryFile("w+", dir=self.archive.incoming) as spool:
            found = Listing(spool)
            if isinstance(self.archive.files, ObjectFiles):
                for rel, size in self.archive.files.store.listing():
                    if _instance_key(rel):
                        spool.write(json.dumps([rel, size]) + "\n")
                        found.count += 1
            yield found

    def _adopt_objects(
        self,
        files: ObjectFiles,
        objects: Listing,
        report: ReconcileReport,
        progress: Callable[[], None] | None,
    ) -> None:
        """Index every object under the prefix; headers read OBJECT_READERS at a time (the
        requests wait on the network), rows written in the bucket's order."""

        def parse(found: tuple[str, int]) -> tuple[ParsedInstance, str] | StorageError:
            try:
                return files.parse_object(*found)
            except StoreUnavailable:
                raise
            except StorageError as exc:
                return exc

        listed = iter(objects)
        with ThreadPoolExecutor(OBJECT_READERS, thread_name_prefix="reindex") as pool:
            while batch := list(islice(listed, 256)):
                for (rel, size), parsed in zip(batch, pool.map(parse, batch), strict=True):
                    if isinstance(parsed, StorageError):
                        report.problems.append(Problem(rel, f"not indexed: {parsed}"))
                    else:
                        self._index(parsed[0], rel, size, parsed[1], report, "reindex")
                    if progress:
                        progress()

    def verify(self, progress: Callable[[], None] | None = None) -> Iterator[Problem]:
        """Check every indexed file's size and SHA-256 (with an object store: its object,
        by what the store says of it, and any local copy); also report unindexed files."""
        with db.connection_context():
            rows = Instance.select(Instance.path, Instance.size, Instance.sha256)
            for rel, size, sha in rows.tuples().iterator():
                if progress:
                    progress()
                try:
                    problem = self.archive.files.check(rel, size, sha)
                except StorageError as exc:  # the object store does not answer
                    problem = str(exc)
                if problem:
                    yield Problem(rel, problem)
            for path in self._files():
                if self._copy_only(path):
                    continue
                if not Instance.select().where(Instance.sop_uid == path.stem).exists():
                    yield Problem(str(path.relative_to(self.archive.root)), "file is not indexed")

    def copy_index_to(self, url: str, progress: Callable[[int], None]) -> dict:
        """Copy this archive's index into the empty index at `url` (storage.schema)."""
        target = open_database(url, self.archive.root, self.archive.fsync)
        try:
            return schema.copy_index(db.obj, target, progress)
        except (ValueError, RuntimeError, OperationalError) as exc:
            raise StorageError(f"index ({describe(url)}): {exc}") from exc
        finally:
            if hasattr(target, "close_all"):
                target.close_all()

    def count_files(self, objects: Listing) -> int:
        """Files reindex reads (with an object store: files to upload, and the objects)."""
        return objects.count + sum(1 for path in self._files() if not self._copy_only(path))

    def _adopt(self, path: Path, report: ReconcileReport, who: str, replace: bool = False) -> None:
        """Index a file that is already in place; `who` does it, for the change feed."""
        rel = str(path.relative_to(self.archive.root))
        try:
            parsed = read_instance(path)
            size, sha = hash_file(path)
        except (StorageError, OSError) as exc:
            report.problems.append(Problem(rel, f"not indexed: {exc}"))
            return
        self._index(parsed, rel, size, sha, report, who, replace)

    def _index(
        self,
        parsed: ParsedInstance,
        rel: str,
        size: int,
        sha: str,
        report: ReconcileReport,
        who: str,
        replace: bool = False,
    ) -> None:
        """Index an instance read from `rel` (a file, or an object's key under the prefix)."""
        try:
            expected = instance_path(parsed.study_uid, parsed.series_uid, parsed.sop_uid)
            if expected != rel:
                raise InvalidDataset(f"its UIDs say it belongs at {expected}")
            row = index.Row(parsed, rel, size, sha, replace=replace)
            self.archive.write(self._index_row, row, who)
            report.indexed += 1
        except (StorageError, OSError) as exc:
            report.problems.append(Problem(rel, f"not indexed: {exc}"))

    def _index_row(self, row: index.Row, who: str) -> None:
        action = index.apply_row(row, self.archive.statements, db)
        if action is not None:
            self.archive.record([changefeed.indexed(action, row.parsed, who)])

    def _files(self) -> Iterator[Path]:
        """Every `<study>/<series>/<sop>.dcm` under the root."""
        for study in _subdirs(self.archive.root):
            for series in _subdirs(study):
                with os.scandir(series) as entries:
                    for entry in entries:
                        if entry.is_file() and entry.name.endswith(".dcm"):
                            yield Path(entry.path)

    def _paths(self) -> Iterator[str]:
        for (rel,) in Instance.select(Instance.path).tuples().iterator():
            yield rel


def _protect_again(study_uids: list[str]) -> None:
    """Protection from retention is no file's: mark again the studies that had it."""
    for start in range(0, len(study_uids), 500):
        chunk = study_uids[start : start + 500]
        Study.update(protected=True).where(Study.study_uid.in_(chunk)).execute()


def _instance_key(rel: str) -> bool:
    """Whether an object's path under the prefix is an instance's, <study>/<series>/<sop>.dcm."""
    parts = rel.split("/")
    return len(parts) == 3 and parts[2].endswith(".dcm") and all(parts)


def _subdirs(path: Path) -> Iterator[Path]:
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith("."):
                yield Path(entry.path)
