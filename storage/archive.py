"""The archive: files under one root, indexed in SQLite or PostgreSQL, written by one ingest
path.

Order of a write (docs/architecture.md): the bytes land in `.incoming/`, are fsynced,
hard-linked into `<study>/<series>/<sop>.dcm` (which never clobbers: the filesystem
decides duplicates, even across processes), the directory is fsynced, then the index
row commits. Only then does the caller hear success. A crash at any point leaves
either nothing, a temporary file (removed at start-up) or a file without a row
(indexed at start-up).
"""

import contextlib
import enum
import fcntl
import hashlib
import logging
import multiprocessing
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from peewee import OperationalError
from peewee import fn

from storage import audit
from storage import index
from storage import journal
from storage import metrics
from storage import query
from storage import routing
from storage import schema
from storage import worklist
from storage.dataset import SERIES_INSTANCE_UID
from storage.dataset import SOP_CLASS_UID
from storage.dataset import SOP_INSTANCE_UID
from storage.dataset import STUDY_INSTANCE_UID
from storage.dataset import ParsedInstance
from storage.dataset import read_header
from storage.dataset import read_instance
from storage.dataset import same_dataset
from storage.dataset import validate_uid
from storage.engine import describe
from storage.engine import is_sqlite
from storage.engine import open_database
from storage.errors import DuplicateRejected
from storage.errors import InvalidDataset
from storage.errors import InvalidUID
from storage.errors import OutOfResources
from storage.errors import StorageError
from storage.errors import UIDMismatch
from storage.files import CHUNK
from storage.files import fsync_path
from storage.files import hash_file
from storage.files import instance_path
from storage.files import make_dirs
from storage.files import reraise_full
from storage.models import MODELS
from storage.models import AuditEvent
from storage.models import Instance
from storage.models import Patient
from storage.models import Series
from storage.models import Study
from storage.models import db

log = logging.getLogger(__name__)
DUPLICATE_POLICIES = ("keep", "replace", "reject")
TRASH = ".trash"  # what is being deleted: <LEVEL>.<UID>.<random>, a folder or a file
UNINDEXED = ".unindexed"  # journal entries the indexer could not read (never deleted)
UID_NAMES = {
    SOP_CLASS_UID: "SOP Class UID",
    SOP_INSTANCE_UID: "SOP Instance UID",
    STUDY_INSTANCE_UID: "Study Instance UID",
    SERIES_INSTANCE_UID: "Series Instance UID",
}
SHARED_TEMPORARY_AGE = 3600  # s: younger temporaries may be another node's, in flight


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, identical bytes: nothing to do
    KEPT = "kept"  # same UID, different bytes, policy `keep`: the stored copy stays
    REPLACED = "replaced"  # same UID, different bytes, policy `replace`


@dataclass(frozen=True)
class Stored:
    outcome: Outcome
    sop_uid: str
    path: str
    sop_class_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    size: int = 0  # bytes written to the archive (0: nothing new)


@dataclass(frozen=True)
class _RowWrite:
    """What indexing one instance writes: its row, its audit event, whether it is new."""

    row: index.Row
    event: audit.Event
    new: bool


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


def _wait(future: Future) -> None:
    """Wait for a background fsync; a disk-full error becomes OutOfResources."""
    try:
        future.result()
    except OSError as exc:
        reraise_full(exc)


class Archive:
    """One archive root. Open it once per process; every thread may call `ingest`."""

    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        duplicates: str = "keep",
        parse_processes: int = 0,
        index_url: str = "",
        routes: tuple[routing.Rule, ...] = (),
        pixel_budget: int | None = None,
    ) -> None:
        """`parse_processes` > 0: parse incoming files in that many child processes (started
        on first use), so concurrent ingests are not bound to one core by the GIL.
        `index_url`: empty for SQLite in the root, else a PostgreSQL URL (storage.engine).
        `routes`: auto-routing rules; what they select is queued with its index row.
        `pixel_budget`: bytes of decoded pixel data an incoming dataset may declare (None:
        any); more is refused (OverPixelBudget) before it is stored."""
        if duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicate policy must be one of {', '.join(DUPLICATE_POLICIES)}")
        self.root = Path(root).absolute()
        self.incoming = self.root / ".incoming"
        self.journal = journal.Journal(self.root, fsync)
        self.chain = audit.Chain(self.root / audit.KEY_FILE)  # the key: outside the index
        self.fsync = fsync
        self.duplicates = duplicates
        self.index_url = index_url
        self.routes = routes
        self.pixel_budget = pixel_budget
        self._writer: index.IndexWriter | None = None
        self._lock_fd: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")
        self.parse_processes = parse_processes
        self._parsers: ProcessPoolExecutor | None = None
        self._parsers_lock = threading.Lock()
        self._placing = threading.Lock()  # the indexer's batches and deletions, one at a time

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> "Archive":
        """Create the folders and the index; raise StorageError when the root is unusable."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Patient data: the owner's alone, whatever the umask (an older folder too).
            os.chmod(self.root, self.root.stat().st_mode & 0o700)
            self.incoming.mkdir(exist_ok=True)
            self.journal.open()
            probe = self.incoming / f"probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"data folder {self.root} is not writable: {exc.strerror}") from exc
        try:
            database = open_database(self.index_url, self.root, self.fsync)
            db.initialize(database)
            with db.connection_context():
                found, now = schema.upgrade(db)
        except (ValueError, RuntimeError, OSError, OperationalError) as exc:
            raise StorageError(f"index ({describe(self.index_url)}): {exc}") from exc
        if found and found != now:
            log.info("index migrated from schema version %d to %d", found, now)
        self._writer = index.IndexWriter(db, immediate=is_sqlite(database))
        self._sql = index.Statements(db)
        return self

    def lock(self, exclusive: bool) -> bool:
        """Take the archive lock: shared for servers and imports, exclusive for start-up repair
        and reindex. Returns False when another process holds it incompatibly."""
        if self._lock_fd is None:
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o640)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._lock_fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def health(self) -> list[str]:
        """What keeps the archive from working (for /healthz): the index does not answer,
        or the data folder takes no file (read-only, full)."""
        problems = []
        try:
            with db.connection_context():
                db.execute_sql("SELECT 1 FROM instance LIMIT 1")
        except Exception as exc:
            problems.append(f"index: {exc}")
        probe = self.incoming / f"health-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(probe, "wb") as fp:
                fp.write(b"\0" * 4096)
                fp.flush()
                os.fsync(fp.fileno())
            probe.unlink()
        except OSError as exc:
            problems.append(f"data folder: {exc.strerror or exc}")
            with contextlib.suppress(OSError):
                probe.unlink()
        return problems

    def close(self) -> None:
        self._pool.shutdown()
        if self._parsers is not None:
            self._parsers.shutdown(cancel_futures=True)
            self._parsers = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        db.close()
        if hasattr(db.obj, "close_all"):  # a connection pool (PostgreSQL)
            db.obj.close_all()

    def __enter__(self) -> "Archive":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ingest ------------------------------------------------------------------

    def incoming_path(self) -> Path:
        """A fresh temporary path on the archive's filesystem, for a file about to be ingested."""
        return self.incoming / f"{uuid.uuid4().hex}.part"

    def spool(self, chunks: Iterable[bytes]) -> tuple[Path, tuple[int, str]]:
        """Receive a whole Part 10 file (a STOW-RS part, an imported file) into `.incoming/`:
        its path and (size, SHA-256) for `ingest`. C-STORE datasets, which arrive without
        a file meta, go to the journal instead (`receive`). Nothing is left behind when
        the chunks break off or the disk is full (OutOfResources)."""
        tmp = self.incoming_path()
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "xb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                reraise_full(exc)
            raise
        return tmp, (size, digest.hexdigest())

    def ingest(
        self,
        tmp: Path,
        *,
        digest: tuple[int, str] | None = None,
        sop_class_uid: str | None = None,
        sop_uid: str | None = None,
        study_uid: str | None = None,
        calling_aet: str = "",
        who: str = "",
        address: str = "",
    ) -> Stored:
        """Store the Part 10 file at `tmp` (consumed) and index it; return once durable.

        `sop_class_uid`/`sop_uid` are what the request announced (C-STORE), `study_uid` the
        study a STOW-RS request was addressed to; `digest` is
        (size, SHA-256) when the caller hashed the bytes while receiving them. `who` (user,
        else the calling AE) and `address` go into the audit event, committed with the row.
        """
        # The file's fsync (disk time, GIL released) overlaps the parsing (CPU time).
        synced = self._pool.submit(fsync_path, tmp) if self.fsync else None
        try:
            parsed = self._parse(tmp)
            if synced is not None:
                _wait(synced)
            if sop_uid is not None and sop_class_uid is not None:
                _as_requested(parsed.sop_class_uid, parsed.sop_uid, sop_class_uid, sop_uid)
            if study_uid is not None and study_uid != parsed.study_uid:
                raise UIDMismatch(
                    f"instance {parsed.sop_uid} belongs to study {parsed.study_uid}, "
                    f"not {study_uid}"
                )
            size, sha = digest or hash_file(tmp)
            stored, write = self._settle(tmp, parsed, size, sha, calling_aet, who, address)
            if write is not None:
                try:
                    self._write(self._index_rows, [write])
                except StorageError:
                    if stored.outcome is Outcome.STORED:  # no row: take the file back out
                        (self.root / stored.path).unlink(missing_ok=True)
                    raise
            metrics.stored(stored.size)
            return stored
        finally:
            if synced is not None:
                synced.exception()  # never unlink under a running fsync
            tmp.unlink(missing_ok=True)

    def _settle(
        self,
        tmp: Path,
        parsed: ParsedInstance,
        size: int,
        sha: str,
        calling_aet: str,
        who: str,
        address: str,
        sync_dir: bool = True,
    ) -> tuple[Stored, "_RowWrite | None"]:
        """Put a parsed file in place; the index write it needs (None: nothing to index)."""
        rel = instance_path(parsed.study_uid, parsed.series_uid, parsed.sop_uid)
        outcome = self._place(tmp, rel, sync_dir)
        stored = Stored(
            outcome,
            parsed.sop_uid,
            rel,
            parsed.sop_class_uid,
            parsed.study_uid,
            parsed.series_uid,
            size if outcome in (Outcome.STORED, Outcome.REPLACED) else 0,
        )
        if outcome is Outcome.KEPT:
            log.warning("kept stored %s: different bytes arrived under its UID", parsed.sop_uid)
            return stored, None
        row = index.Row(parsed, rel, size, sha, calling_aet, outcome is Outcome.REPLACED)
        event = audit.Event(
            "store",
            who=who or calling_aet,
            address=address,
            patient_id=parsed.patient["patient_id"],
            study_uid=parsed.study_uid,
            detail={"series": parsed.series_uid, "sop": parsed.sop_uid, "as": outcome.value},
        )
        return stored, _RowWrite(row, event, outcome is not Outcome.DUPLICATE)

    def _index_rows(self, writes: list["_RowWrite"]) -> list[bool]:
        """Index rows, audit events and route items, in the writer's transaction; each in
        a savepoint of its own, so one that fails does not take the others with it."""
        done = []
        for write in writes:
            try:
                with db.atomic():
                    index.apply_row(write.row, self._sql, db)
                    self.chain.append(db, write.event)
                    if write.new:
                        routing.enqueue(self.routes, write.row.parsed, write.row.calling_aet)
                done.append(True)
            except OperationalError:
                raise  # the transaction itself is broken (disk full, lost lock): all fail
            except Exception as exc:
                if len(writes) == 1:
                    raise
                log.error("cannot index %s: %s", write.row.parsed.sop_uid, exc)
                done.append(False)
        return done

    # -- the journal: C-STORE acknowledged before indexing (storage.journal) ------------

    def receive(
        self, sop_class_uid: str, sop_uid: str, syntax: str, calling_aet: str, address: str
    ) -> journal.Receipt:
        """A receipt for a dataset about to arrive (its file meta written from the
        request): write the dataset's bytes to it, then `accept` it (or `discard` it)."""
        meta = journal.file_meta(sop_class_uid, sop_uid, syntax, calling_aet)
        return journal.Receipt(self.journal, meta, calling_aet, address)

    def accept(self, receipt: journal.Receipt, sop_class_uid: str, sop_uid: str) -> journal.Entry:
        """Check a whole receipt and make it durable: once this returns, the instance
        survives any crash and becomes queryable when the indexer has taken it.

        Raises (and discards the receipt) when the bytes are no dataset or a truncated
        one (InvalidDataset), a UID is invalid (InvalidUID) or differs from the request
        (UIDMismatch), different bytes are stored under the UID and the policy is
        `reject` (DuplicateRejected), it declares more pixel data than the pixel budget
        (OverPixelBudget), or the disk is full (OutOfResources)."""
        try:
            receipt.finish()
            if receipt.error is not None:
                if receipt.full():
                    raise OutOfResources(f"no space left to receive the dataset ({receipt.error})")
                raise StorageError(f"cannot receive the dataset: {receipt.error}")
            header = read_header(receipt.path, self.pixel_budget)
            uids = {tag: validate_uid(header.uid(tag), name) for tag, name in UID_NAMES.items()}
            _as_requested(uids[SOP_CLASS_UID], uids[SOP_INSTANCE_UID], sop_class_uid, sop_uid)
            if self.duplicates == "reject":
                self._refuse_different(uids[SOP_INSTANCE_UID], receipt)
            return self.journal.commit(receipt)
        except OSError as exc:
            receipt.discard()
            reraise_full(exc)
            raise
        except BaseException:
            receipt.discard()
            raise

    def _refuse_different(self, sop_uid: str, receipt: journal.Receipt) -> None:
        with db.connection_context():
            row = (
                Instance.select(Instance.sha256, Instance.path)
                .where(Instance.sop_uid == sop_uid)
                .tuples()
                .first()
            )
        if row is None:
            return
        stored = self.root / row[1]
        if stored.is_file() and not same_dataset(stored, receipt.path):
            raise DuplicateRejected(f"{sop_uid} is stored with different content")

    def index_entries(self, paths: list[Path]) -> int:
        """Index journal entries (storage.indexer): parse each, put it in place, and
        commit all their rows at once; an entry is unlinked once its row is durable.
        Entries another indexer holds are left to it. Returns how many were taken."""
        with contextlib.ExitStack() as held, self._placing:
            taken: list[tuple[journal.Entry, Stored, _RowWrite | None]] = []
            folders: set[Path] = set()
            for path in paths:
                if held.enter_context(journal.claimed(path)) is None:
                    continue
                try:
                    entry = journal.Entry.parse(path)
                    parsed = read_instance(path)
                except (InvalidDataset, InvalidUID, ValueError) as exc:
                    # Not readable after all: kept for a person (the walk let it pass).
                    self._set_aside(path, exc)
                    continue
                try:
                    stored, write = self._settle(
                        path,
                        parsed,
                        entry.size,
                        entry.sha256 or hash_file(path)[1],
                        entry.calling_aet,
                        "",
                        entry.address,
                        sync_dir=False,
                    )
                except DuplicateRejected as exc:  # a twin acknowledged meanwhile (reject)
                    self._set_aside(path, exc)
                    continue
                if stored.outcome in (Outcome.STORED, Outcome.REPLACED):
                    folders.add((self.root / stored.path).parent)
                taken.append((entry, stored, write))
            if self.fsync:
                for folder in folders:  # the links, durable before the rows that name them
                    fsync_path(folder)
            writes = [write for _, _, write in taken if write is not None]
            done = iter(self._write(self._index_rows, writes) if writes else [])
            for entry, stored, write in taken:
                if write is None or next(done):
                    metrics.stored(stored.size)
                    entry.path.unlink(missing_ok=True)
                else:  # its row failed alone (logged): not for a retry every round
                    self._set_aside(entry.path, StorageError("its index row failed"))
        return len(taken)

    def settle(self, timeout: float) -> bool:
        """Wait until every instance acknowledged so far is indexed (at most `timeout` s)."""
        return self.wait_indexed(self.journal.entries(), timeout)

    def _set_aside(self, path: Path, exc: BaseException) -> None:
        """An acknowledged entry the indexer cannot take: kept for a person, never lost
        (`minipacs_index_set_aside` counts them; `minipacs import` can take them back)."""
        log.error("cannot index %s (set aside in %s): %s", path.name, UNINDEXED, exc)
        aside = self.root / UNINDEXED
        aside.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # another indexer took it meanwhile
            os.rename(path, aside / path.name)

    def set_aside(self) -> int:
        """Journal entries set aside as unreadable (a metric: each needs a person)."""
        aside = self.root / UNINDEXED
        return sum(1 for _ in aside.iterdir()) if aside.is_dir() else 0

    def wait_indexed(self, entries: list[Path], timeout: float) -> bool:
        """Wait until the indexer has taken these journal entries (at most `timeout` s)."""
        deadline = time.monotonic() + timeout
        waiting = sorted(entries)
        self.journal.wake(urgent=True)
        pause = 0.0005
        while waiting:
            if waiting[-1].exists():  # the newest first: they are indexed in order
                if time.monotonic() > deadline:
                    return False
                pause = min(pause * 2, 0.02)
                time.sleep(pause)
                continue
            waiting = [path for path in waiting if path.exists()]
        return True

    def accounts(self, fn: Callable, *args, write: bool = False):
        """Run a storage.users function on the index (writes go through the index writer)."""
        if write:
            return self._write(fn, *args)
        with db.connection_context():
            return fn(*args)

    def audit(self, event: audit.Event) -> None:
        """Append an audit event; returns at once (the writer commits it with its next batch,
        failures are logged): queries and retrievals do not wait for a disk flush."""
        assert self._writer is not None, "archive is not open"
        self._writer.submit(self.chain.append, db, event)

    def audit_events(self, **filters: str) -> Iterator[dict]:
        """The audit trail in order, filtered by exact event/who/patient_id/study_uid and
        `since`/`until` (ISO 8601 prefixes of `at`)."""
        with db.connection_context():
            query = AuditEvent.select().order_by(AuditEvent.id)
            for name in ("event", "who", "patient_id", "study_uid"):
                if filters.get(name):
                    query = query.where(getattr(AuditEvent, name) == filters[name])
            if filters.get("since"):
                query = query.where(AuditEvent.at >= filters["since"])
            if filters.get("until"):
                query = query.where(AuditEvent.at < filters["until"] + "~")  # prefix-inclusive
            yield from query.dicts().iterator()

    def verify_audit(self) -> list[str]:
        """Breaks in the audit trail's hash chain (an edited, inserted or removed event)."""
        with db.connection_context():
            return self.chain.verify(AuditEvent.select().order_by(AuditEvent.id).iterator())

    def _parse(self, tmp: Path) -> ParsedInstance:
        if not self.parse_processes:
            return read_instance(tmp, self.pixel_budget)
        with self._parsers_lock:
            if self._parsers is None:
                context = multiprocessing.get_context("spawn")  # no fork of a threaded server
                self._parsers = ProcessPoolExecutor(
                    self.parse_processes,
                    mp_context=context,
                    initializer=_exit_with_parent,
                    initargs=(os.getpid(),),
                )
            parsers = self._parsers
        try:
            return parsers.submit(read_instance, tmp, self.pixel_budget).result()
        except BrokenProcessPool:  # a parser died (killed, out of memory): start afresh
            log.warning("a parser process died; parsing %s in-process", tmp.name)
            with self._parsers_lock:
                if self._parsers is parsers:
                    self._parsers = None
            return read_instance(tmp, self.pixel_budget)

    def import_file(self, source: Path, calling_aet: str = "") -> Stored:
        """Copy a file from elsewhere into `.incoming/` and ingest it."""
        with open(source, "rb") as src:
            tmp, digest = self.spool(iter(lambda: src.read(CHUNK), b""))
        return self.ingest(tmp, digest=digest, calling_aet=calling_aet, who="import")

    def _place(self, tmp: Path, rel: str, sync_dir: bool = True) -> Outcome:
        """Put the file in place, or decide what a file already there means."""
        final = self.root / rel
        try:
            make_dirs(self.root, os.path.dirname(rel), self.fsync)
            try:
                os.link(tmp, final)
                outcome = Outcome.STORED
            except FileExistsError:
                outcome = self._duplicate(tmp, final)
            if self.fsync and sync_dir and outcome in (Outcome.STORED, Outcome.REPLACED):
                fsync_path(final.parent)
        except OSError as exc:
            reraise_full(exc)
        return outcome

    def _duplicate(self, tmp: Path, final: Path) -> Outcome:
        if same_dataset(final, tmp):  # File Meta aside: who wrote the file is no difference
            return Outcome.DUPLICATE
        if self.duplicates == "keep":
            return Outcome.KEPT
        if self.duplicates == "reject":
            raise DuplicateRejected(f"{final.stem} is stored with different content")
        self._write(index.mark_replacing, final.stem)
        aside = self.incoming_path()  # a link of its own: `tmp` stays until its row commits
        os.link(tmp, aside)
        os.replace(aside, final)
        return Outcome.REPLACED

    def _write(self, fn, *args):
        assert self._writer is not None, "archive is not open"
        try:
            return self._writer.call(fn, *args)
        except OperationalError as exc:
            if "full" in str(exc):
                raise OutOfResources(f"no space left for the index ({exc})") from exc
            raise StorageError(f"index write failed: {exc}") from exc

    # -- deletion and retention ------------------------------------------------------

    def delete(self, level: str, uid: str, who: str = "", reason: str = "") -> int:
        """Remove a patient (by Patient ID), study, series or instance (IMAGE): files and
        rows together, audited; returns the instances removed. Crash-safe: the rename of
        the folder or file into `.trash/` is the point of no return, and start-up finishes
        (rows, then files) whatever a crash interrupted."""
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
        with self._placing:  # not while the indexer links an instance into what goes
            return self._delete(level, uid, who, reason)

    def _delete(self, level: str, uid: str, who: str, reason: str) -> int:
        if level not in ("STUDY", "SERIES", "IMAGE"):
            raise ValueError(f"cannot delete at level {level!r}")
        target = self._path_of(level, uid)
        trash = self.root / TRASH / f"{level}.{uid}.{uuid.uuid4().hex}"
        try:
            if target is None:
                raise FileNotFoundError(uid)
            trash.parent.mkdir(exist_ok=True)
            os.rename(target, trash)
            if self.fsync:
                fsync_path(target.parent)
        except FileNotFoundError:
            trash = None  # no files (or another node took them): the rows still go
        removed = self._write(self._delete_rows, level, uid, who, reason)
        if trash is not None:
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        return removed

    def _path_of(self, level: str, uid: str) -> Path | None:
        if level == "STUDY":
            return self.root / uid
        with db.connection_context():
            if level == "SERIES":
                study = (
                    Study.select(Study.study_uid)
                    .join(Series)
                    .where(Series.series_uid == uid)
                    .scalar()
                )
                return self.root / study / uid if study else None
            path = Instance.select(Instance.path).where(Instance.sop_uid == uid).scalar()
            return self.root / path if path else None

    def _delete_rows(self, level: str, uid: str, who: str, reason: str) -> int:
        removed, patient_id, study_uid = index.delete_rows(level, uid)
        if study_uid:
            detail = {"level": level, "uid": uid, "instances": removed, "reason": reason}
            self.chain.append(
                db,
                audit.Event(
                    "delete", who=who, patient_id=patient_id, study_uid=study_uid, detail=detail
                ),
            )
        return removed

    def set_protected(self, study_uid: str, protected: bool, who: str = "") -> bool:
        """Protect a study from retention (or release it), audited; False when there is no
        such study."""
        return self._write(self._protect, study_uid, protected, who)

    def _protect(self, study_uid: str, protected: bool, who: str) -> bool:
        if not Study.update(protected=protected).where(Study.study_uid == study_uid).execute():
            return False
        event = audit.Event("protect", who=who, study_uid=study_uid, detail={"on": protected})
        self.chain.append(db, event)
        return True

    def enforce_quota(self, max_bytes: int, max_instances: int) -> list[tuple[str, int, int]]:
        """Remove the least recently updated unprotected studies until the archive is within
        both limits (0 = no limit); returns (StudyInstanceUID, instances, bytes) removed."""
        totals = self.stats()
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

    # -- maintenance ---------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Start-up repair: drop temporaries, index unindexed files, rehash rows being
        replaced, report rows whose file is gone."""
        report = ReconcileReport()
        # On a shared index other nodes may be receiving into the same folder right now.
        keep_after = time.time() - SHARED_TEMPORARY_AGE if not is_sqlite(db.obj) else None
        for folder in (self.root / TRASH).iterdir() if (self.root / TRASH).is_dir() else []:
            level, _, rest = folder.name.partition(".")  # LEVEL.UID.random
            reason = "finishing an interrupted deletion"
            self._write(self._delete_rows, level, rest.rpartition(".")[0], "start-up", reason)
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
            report.deletions_finished += 1
        for leftover in [*self.incoming.iterdir(), *self.journal.partial()]:
            with contextlib.suppress(FileNotFoundError):
                if keep_after is not None and leftover.stat().st_mtime > keep_after:
                    continue
                leftover.unlink()
                report.removed_temporary += 1
        while entries := self.journal.entries()[:256]:  # acknowledged, not yet indexed
            try:
                taken = self.index_entries(entries)
            except Exception as exc:  # the indexer takes them up when it can
                report.problems.append(Problem(".queue", f"journal not indexed yet: {exc}"))
                break
            report.indexed += taken
            if not taken:  # another node's indexer holds them
                break
        with db.connection_context():
            flagged = list(Instance.select().where(Instance.state == 1))
            for row in flagged:
                self._adopt(self.root / row.path, report, replace=True)
                report.rehashed += 1
            for path in self._files():
                if not Instance.select().where(Instance.sop_uid == path.stem).exists():
                    self._adopt(path, report)
            for rel in self._paths():
                if not (self.root / rel).is_file():
                    report.problems.append(Problem(rel, "indexed but the file is missing"))
        for problem in report.problems:
            log.warning("reconcile: %s: %s", problem.path, problem.reason)
        return report

    def reindex(self, progress: Callable[[], None] | None = None) -> ReconcileReport:
        """Rebuild the index from the files alone; `progress()` after each file."""
        with db.connection_context():
            db.drop_tables(MODELS)
            schema.upgrade(db)
        report = ReconcileReport()
        for path in self._files():
            self._adopt(path, report)
            if progress:
                progress()
        return report

    def verify(self, progress: Callable[[], None] | None = None) -> Iterator[Problem]:
        """Check every indexed file's size and SHA-256; also report unindexed files."""
        with db.connection_context():
            rows = Instance.select(Instance.path, Instance.size, Instance.sha256)
            for rel, size, sha in rows.tuples().iterator():
                if progress:
                    progress()
                path = self.root / rel
                if not path.is_file():
                    yield Problem(rel, "file is missing")
                    continue
                actual_size, actual_sha = hash_file(path)
                if actual_size != size:
                    yield Problem(rel, f"size is {actual_size}, index says {size}")
                elif actual_sha != sha:
                    yield Problem(rel, "SHA-256 differs from the index (file corrupted)")
            for path in self._files():
                if not Instance.select().where(Instance.sop_uid == path.stem).exists():
                    yield Problem(str(path.relative_to(self.root)), "file is not indexed")

    def find(self, level: str, keys: list, model: str = "STUDY", options=None, **paging):
        """Answers of the query engine (storage.query.find), on this thread's connection."""
        with db.connection_context():
            yield from query.find(level, keys, model, options or query.Options(), **paging)

    def locate(self, level: str, keys: list, model: str = "STUDY") -> Iterator[dict]:
        """Every instance under the entities the keys select (storage.query.locate); each
        row's `instance_path` is made absolute."""
        with db.connection_context():
            for row in query.locate(level, keys, model):
                row["instance_path"] = self.root / row["instance_path"]
                yield row

    def instance_json(self, level: str, keys: list) -> Iterator[tuple[str, str]]:
        """(SOP Instance UID, stored DICOM JSON) under the entities the keys select
        (storage.query.instance_json)."""
        with db.connection_context():
            yield from query.instance_json(level, keys)

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

    # -- modality worklist and performed procedure steps (storage.worklist) -----------

    def worklist_add(self, fields: dict[str, str]) -> int:
        return self._write(worklist.add, fields)

    def worklist_remove(self, item_id: int) -> bool:
        return self._write(worklist.remove, item_id)

    def worklist_items(self) -> list[dict]:
        with db.connection_context():
            return worklist.listing()

    def find_worklist(self, keys: list, options=None) -> Iterator[dict]:
        with db.connection_context():
            yield from query.find_worklist(keys, options or query.Options())

    def create_step(self, sop_uid: str, attributes) -> None:
        self._write(worklist.create_step, sop_uid, attributes)

    def set_step(self, sop_uid: str, changes) -> str:
        return self._write(worklist.set_step, sop_uid, changes)

    # -- auto-routing queue (storage.routing; pacs.router sends) ------------------------

    def routes_due(self) -> list[dict]:
        with db.connection_context():
            if not routing.any_due():
                return []
        return self._write(routing.claim)

    def routes_sent(self, ids: list[int]) -> None:
        self._write(routing.sent, ids)

    def routes_not_sent(self, ids: list[int], error: str, base_delay: float) -> None:
        self._write(routing.not_sent, ids, error, base_delay)

    def routes_retry(self, ids: list[int] | None = None) -> int:
        return self._write(routing.retry, ids)

    def route_items(self, status: str = "") -> list[dict]:
        with db.connection_context():
            return routing.items(status)

    def route_depth(self) -> dict[str, int]:
        with db.connection_context():
            return routing.depth()

    def pending_writes(self) -> int:
        """Index writes queued for the writer (a metric: a growing queue is a slow disk)."""
        return self._writer.pending() if self._writer is not None else 0

    def commitment_problem(self, sop_class_uid: str, sop_uid: str) -> str:
        """Why the archive cannot take responsibility for an instance ('' when it can):
        stored, under that SOP class, its file still the size and SHA-256 recorded."""
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
            if hash_file(self.root / row[1]) != (row[2], row[3]):
                return "file missing or changed"
        except OSError:
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

    def copy_index_to(self, url: str, progress: Callable[[int], None]) -> dict:
        """Copy this archive's index into the empty index at `url` (storage.schema)."""
        target = open_database(url, self.root, self.fsync)
        try:
            return schema.copy_index(db.obj, target, progress)
        except (ValueError, RuntimeError, OperationalError) as exc:
            raise StorageError(f"index ({describe(url)}): {exc}") from exc
        finally:
            if hasattr(target, "close_all"):
                target.close_all()

    def count_files(self) -> int:
        return sum(1 for _ in self._files())

    def _adopt(self, path: Path, report: ReconcileReport, replace: bool = False) -> None:
        """Index a file that is already in place."""
        rel = str(path.relative_to(self.root))
        try:
            parsed = read_instance(path)
            expected = instance_path(parsed.study_uid, parsed.series_uid, parsed.sop_uid)
            if expected != rel:
                raise InvalidDataset(f"its UIDs say it belongs at {expected}")
            size, sha = hash_file(path)
            row = index.Row(parsed, rel, size, sha, replace=replace)
            self._write(index.apply_row, row, self._sql, db)
            report.indexed += 1
        except (StorageError, OSError) as exc:
            report.problems.append(Problem(rel, f"not indexed: {exc}"))

    def _files(self) -> Iterator[Path]:
        """Every `<study>/<series>/<sop>.dcm` under the root."""
        for study in _subdirs(self.root):
            for series in _subdirs(study):
                with os.scandir(series) as entries:
                    for entry in entries:
                        if entry.is_file() and entry.name.endswith(".dcm"):
                            yield Path(entry.path)

    def _paths(self) -> Iterator[str]:
        for (rel,) in Instance.select(Instance.path).tuples().iterator():
            yield rel


def _as_requested(found_class: str, found_uid: str, sop_class_uid: str, sop_uid: str) -> None:
    """UIDMismatch unless the dataset's SOP Class/Instance UIDs are the request's."""
    if found_uid != sop_uid.rstrip("\0 "):
        raise UIDMismatch(f"dataset SOP Instance UID differs from request: {found_uid}")
    if found_class != sop_class_uid.rstrip("\0 "):
        raise UIDMismatch(f"dataset SOP Class UID differs from request: {found_class}")


def _exit_with_parent(parent: int) -> None:
    """In a parser child: exit when the server is gone. A killed server (kill -9, OOM) never
    shuts its pool down, and the idle child would otherwise live on, orphaned."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _subdirs(path: Path) -> Iterator[Path]:
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith("."):
                yield Path(entry.path)
