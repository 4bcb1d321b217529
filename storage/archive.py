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
from dataclasses import replace
from pathlib import Path
from typing import Any
from typing import cast

from peewee import OperationalError

from storage import audit
from storage import changefeed
from storage import events
from storage import index
from storage import journal
from storage import metrics
from storage import objects
from storage import objectstore
from storage import querytags
from storage import routing
from storage import schema
from storage import worklist
from storage.catalog import Catalog
from storage.dataset import SERIES_INSTANCE_UID
from storage.dataset import SOP_CLASS_UID
from storage.dataset import SOP_INSTANCE_UID
from storage.dataset import STUDY_INSTANCE_UID
from storage.dataset import ParsedInstance
from storage.dataset import read_instance
from storage.dataset import read_received
from storage.dataset import same_dataset
from storage.dataset import validate_uid
from storage.engine import describe
from storage.engine import is_sqlite
from storage.engine import open_database
from storage.errors import DuplicateRejected
from storage.errors import InstanceConflict
from storage.errors import InvalidDataset
from storage.errors import InvalidUID
from storage.errors import OutOfResources
from storage.errors import SeriesConflict
from storage.errors import StorageError
from storage.errors import StoreUnavailable
from storage.errors import UIDConflict
from storage.errors import UIDMismatch
from storage.files import CHUNK
from storage.files import drop_cached
from storage.files import fsync_path
from storage.files import hash_file
from storage.files import instance_path
from storage.files import make_dirs
from storage.files import reraise_full
from storage.maintenance import Maintenance
from storage.models import AuditEvent
from storage.models import Instance
from storage.models import db
from storage.retention import Retention
from storage.rows import AuditRecord

log = logging.getLogger(__name__)
DUPLICATE_POLICIES = ("keep", "replace", "reject")
UNINDEXED = ".unindexed"  # journal entries the indexer could not read (never deleted)
# A free-space reading over disk_reserve + FREE_MARGIN is trusted for FREE_TRUSTED s, not
# asked again for each instance: each statfs releases the GIL, a hand-off between the
# receivers of one worker. The margin is 0.25 s of C-STOREs at 2 GB/s.
FREE_TRUSTED = 0.25
FREE_MARGIN = 512 << 20
PREPARSED = 512  # entries parsed by idle DICOM workers kept for the indexer, at most
SERIES_REMEMBERED = 4096  # series whose study a process remembers (_refuse_other_study)
PATH_UIDS = (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID)  # instance_path's
UID_NAMES = {
    SOP_CLASS_UID: "SOP Class UID",
    SOP_INSTANCE_UID: "SOP Instance UID",
    STUDY_INSTANCE_UID: "Study Instance UID",
    SERIES_INSTANCE_UID: "Series Instance UID",
}


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
        event_options: events.Options | None = None,
        pixel_budget: int | None = None,
        disk_reserve: int = 0,
        object_store: objectstore.Settings | None = None,
    ) -> None:
        """`parse_processes` > 0: parse incoming files in that many child processes (started
        on first use), so concurrent ingests are not bound to one core by the GIL.
        `index_url`: empty for SQLite in the root, else a PostgreSQL URL (storage.engine).
        `routes`: auto-routing rules; what they select is queued with its index row.
        `event_options`: the source and stability delay of events for subscribers
        (storage.events), queued with the index rows too (None: the defaults).
        `pixel_budget`: bytes of decoded pixel data an incoming dataset may declare (None:
        any); more is refused (OverPixelBudget) before it is stored.
        `disk_reserve`: bytes the journal leaves free on the disk for the index (0: none).
        `object_store`: keep the instances in that bucket too, the data folder being the
        durable first stop and a cache (storage.objects); None: files only."""
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
        self.disk_reserve = disk_reserve
        self._free_until = 0.0  # monotonic time until which the disk has room (_check_reserve)
        self._series_studies: dict[str, str] = {}  # the study each series came with (accept)
        # Journal entries parsed by idle DICOM workers (storage.indexer.parse_ahead).
        self._preparsed: dict[str, tuple[ParsedInstance, str]] = {}
        self._preparsed_lock = threading.Lock()
        self._writer: index.IndexWriter | None = None
        self._audits: list[audit.Event] = []  # waiting for the writer (Archive.audit)
        self._audit_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")
        self.parse_processes = parse_processes
        self._parsers: ProcessPoolExecutor | None = None
        self._parsers_lock = threading.Lock()
        self.placing = threading.Lock()  # the indexer's batches and deletions, one at a time
        self.files: objects.LocalFiles = (
            objects.ObjectFiles(self.root, object_store, fsync)
            if object_store is not None
            else objects.LocalFiles(self.root)
        )
        self.catalog = Catalog(self.root, self.files)
        self.retention = Retention(self)
        self.maintenance = Maintenance(self)
        self.worklist = worklist.Worklist(self.write)
        self.route_queue = routing.RouteQueue(self.write)
        self.events = events.Events(self.write, event_options or events.Options())
        self.changes = changefeed.ChangeFeed(self.write)
        self.query_tags = querytags.QueryTags(self.write)

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> "Archive":
        """Create the folders and the index; raise StorageError when the root is unusable."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Patient data: the owner's alone, whatever the umask (an older folder too).
            os.chmod(self.root, self.root.stat().st_mode & 0o700)
            self.incoming.mkdir(exist_ok=True)
            self.journal.open()
            self.files.open()
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
        self.statements = index.Statements(db)
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
        self.journal.close()
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
                    self.write(self._index_rows, [write])
                except StorageError as exc:
                    if stored.outcome is Outcome.STORED:  # no row: take the file back out
                        (self.root / stored.path).unlink(missing_ok=True)
                    kept = _kept_instead(stored, exc, self.duplicates)
                    if kept is None:
                        raise
                    stored = kept
            metrics.stored(stored.size)
            if self.files.synchronous and stored.outcome is not Outcome.KEPT:
                self.files.upload_now(stored.sop_uid)  # storage_sync: in the bucket first
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
        outcome = self._place(tmp, rel, sha, sync_dir)
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

    def _index_rows(self, writes: list["_RowWrite"]) -> list[Exception | None]:
        """Index rows, audit events, route items and event notifications, in the writer's
        transaction; each in a savepoint of its own, so one that fails does not take the
        others with it. Each row's failure (None: indexed); a single row's is raised."""
        done: list[Exception | None] = []
        changes = []
        subscribers = events.subscribers() if any(w.new for w in writes) else []
        tags = querytags.active(db)  # in this transaction: see storage.querytags
        for write in writes:
            try:
                with db.atomic():
                    action = index.apply_row(write.row, self.statements, db, tags)
                    self.chain.append(db, write.event)
                    if write.new:
                        routing.enqueue(self.routes, write.row.parsed, write.row.calling_aet)
                    if subscribers and action is not None:
                        events.indexed(subscribers, action, write.row, self.events.options)
                if action is not None:
                    changes.append(changefeed.indexed(action, write.row.parsed, write.event.who))
                done.append(None)
            except OperationalError:
                raise  # the transaction itself is broken (disk full, lost lock): all fail
            except Exception as exc:
                if len(writes) == 1:
                    raise
                done.append(exc)
        self.record(changes)
        return done

    def record(self, changes: list[changefeed.Pending]) -> None:
        """Enter changes in the change feed at the end of the index write now running (call
        it from a function the writer runs): numbered in that write's transaction."""
        assert self._writer is not None, "archive is not open"
        if changes:
            self._writer.at_commit(changefeed.append, db, changes)

    # -- the journal: C-STORE acknowledged before indexing (storage.journal) ------------

    def receive(
        self, sop_class_uid: str, sop_uid: str, syntax: str, calling_aet: str, address: str
    ) -> journal.Receipt:
        """A receipt for a dataset about to arrive (its file meta written from the
        request): write the dataset's bytes to it, then `accept` it (or `discard` it)."""
        meta = journal.file_meta(sop_class_uid, sop_uid, syntax, calling_aet)
        return journal.Receipt(self.journal, meta, syntax, calling_aet, address)

    def accept(self, receipt: journal.Receipt, sop_class_uid: str, sop_uid: str) -> journal.Entry:
        """Check a whole receipt and make it durable: once this returns, the instance
        survives any crash and becomes queryable when the indexer has taken it.

        Raises (and discards the receipt) when the bytes are no dataset or a truncated
        one (InvalidDataset), a UID is invalid (InvalidUID) or differs from the request
        (UIDMismatch), different bytes are stored under the UID and the policy is
        `reject` (DuplicateRejected), it declares more pixel data than the pixel budget
        (OverPixelBudget), or the disk is full (OutOfResources)."""
        try:
            if receipt.error is not None:
                if receipt.full():
                    raise OutOfResources(f"no space left to receive the dataset ({receipt.error})")
                raise StorageError(f"cannot receive the dataset: {receipt.error}")
            self._check_reserve()
            header = receipt.header(self.pixel_budget)
            uids = {tag: validate_uid(header.uid(tag), name) for tag, name in UID_NAMES.items()}
            _as_requested(uids[SOP_CLASS_UID], uids[SOP_INSTANCE_UID], sop_class_uid, sop_uid)
            self._refuse_other_study(uids[SERIES_INSTANCE_UID], uids[STUDY_INSTANCE_UID])
            if self.duplicates != "keep":  # reject and replace refuse a move before Success
                rel = instance_path(*(uids[tag] for tag in PATH_UIDS))
                self._refuse_different(uids[SOP_INSTANCE_UID], rel, receipt)
            entry = self.journal.commit(receipt)
        except OSError as exc:
            receipt.discard()
            reraise_full(exc)
            raise
        except BaseException:
            receipt.discard()
            raise
        if self.files.synchronous and not self.wait_uploaded(
            entry.path, uids[SOP_INSTANCE_UID], objects.SYNC_WAIT
        ):
            raise StoreUnavailable(
                f"{uids[SOP_INSTANCE_UID]} is kept, but the object store has not confirmed it "
                f"within {objects.SYNC_WAIT:.0f} s (storage_sync); it goes up when it can"
            )
        return entry

    def _check_reserve(self) -> None:
        """An acknowledged entry is indexed after Success: keep `disk_reserve` bytes free so
        its rows always have room. A filling disk then refuses C-STOREs (0xA700) instead
        of acknowledging instances that could not become queryable."""
        if self.disk_reserve and time.monotonic() >= self._free_until:
            free = shutil.disk_usage(self.root).free
            if free < self.disk_reserve:
                raise OutOfResources(
                    f"no space left: under {self.disk_reserve >> 20} MiB free, kept for the index"
                )
            if free > self.disk_reserve + FREE_MARGIN:
                self._free_until = time.monotonic() + FREE_TRUSTED

    def _refuse_other_study(self, series_uid: str, study_uid: str) -> None:
        """SeriesConflict when the index files this series under another study. One index
        read per series a process receives: the study a series arrived with is remembered,
        and only an instance naming another one is looked up again (a series deleted and
        sent again under a new study is accepted; one not indexed yet is the indexer's to
        refuse, index.apply_row)."""
        if self._series_studies.get(series_uid) == study_uid:
            return
        with db.connection_context():
            stored = index.study_of_series(db, series_uid)
        if stored is not None and stored != study_uid:
            raise SeriesConflict(index.series_conflict(series_uid, stored, study_uid))
        if len(self._series_studies) >= SERIES_REMEMBERED:
            self._series_studies.clear()
        self._series_studies[series_uid] = study_uid

    def _refuse_different(self, sop_uid: str, rel: str, receipt: journal.Receipt) -> None:
        """Policies `reject` and `replace`: refuse the instance stored elsewhere (moving it
        is no replacement: the indexer would set it aside after Success); `reject` also
        refuses different bytes."""
        with db.connection_context():
            row = (
                Instance.select(Instance.sha256, Instance.path)
                .where(Instance.sop_uid == sop_uid)
                .tuples()
                .first()
            )
        if row is None:
            return
        if row[1] != rel:
            raise index.instance_conflict(sop_uid, row[1], rel)
        if self.duplicates != "reject":
            return
        try:
            stored = self.files.local(self.root / row[1])
        except StorageError:  # not at hand (object store): the indexer decides
            return
        receipt.flush()
        if stored.is_file() and not same_dataset(stored, receipt.path):
            raise DuplicateRejected(f"{sop_uid} is stored with different content")

    def index_entries(self, paths: list[Path]) -> int:
        """Index journal entries (storage.indexer): parse each, put it in place, and
        commit all their rows at once; an entry is unlinked once its row is durable.
        Entries another indexer holds are left to it. Returns how many were taken."""
        with contextlib.ExitStack() as held, self.placing:
            taken: list[tuple[journal.Entry, Stored, _RowWrite | None]] = []
            folders: set[Path] = set()
            for path in paths:
                if held.enter_context(journal.claimed(path)) is None:
                    continue
                try:
                    entry = journal.Entry.parse(path)
                    parsed, sha = self._take_parsed(path.name) or read_received(path)
                except (InvalidDataset, InvalidUID, ValueError) as exc:
                    # Not readable after all: kept for a person (the walk let it pass).
                    self._set_aside(path, exc)
                    continue
                try:
                    stored, write = self._settle(
                        path,
                        parsed,
                        entry.size,
                        entry.sha256 or sha,
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
            self.files.sync()  # and what is queued for the object store
            writes = [write for _, _, write in taken if write is not None]
            try:
                failures = iter(self.write(self._index_rows, writes) if writes else [])
            except UIDConflict as exc:  # the one row refused
                failures = iter([exc])
            for entry, stored, write in taken:
                failed = next(failures) if write is not None else None
                if failed is None:
                    metrics.stored(stored.size)
                    drop_cached(entry.path)
                    entry.path.unlink(missing_ok=True)
                    continue
                if stored.outcome is Outcome.STORED:  # no row names the file placed
                    (self.root / stored.path).unlink(missing_ok=True)
                if _kept_instead(stored, failed, self.duplicates) is not None:
                    entry.path.unlink(missing_ok=True)
                else:  # its row failed alone: not for a retry every round
                    self._set_aside(entry.path, failed)
        self.files.wake()
        return len(taken)

    def offer_parsed(self, name: str, parsed: ParsedInstance, sha: str) -> None:
        """A journal entry a DICOM worker parsed while idle (storage.indexer.parse_ahead),
        for index_entries to take instead of reading it again; the oldest of more than
        PREPARSED are dropped (an entry indexed meanwhile is never asked for)."""
        with self._preparsed_lock:
            self._preparsed[name] = (parsed, sha)
            while len(self._preparsed) > PREPARSED:
                del self._preparsed[next(iter(self._preparsed))]

    def _take_parsed(self, name: str) -> tuple[ParsedInstance, str] | None:
        with self._preparsed_lock:
            found = self._preparsed.pop(name, None)
        if found is not None:
            metrics.INDEX_PREPARSED.inc()
        return found

    def wait_uploaded(self, entry: Path, sop_uid: str, timeout: float) -> bool:
        """Wait until an acknowledged instance (its journal entry) is indexed and, with
        an object store, in the bucket (storage_sync), at most `timeout` s."""
        deadline = time.monotonic() + timeout
        if not self.wait_indexed([entry], timeout):
            return False
        return self.files.wait_uploaded(sop_uid, max(0.0, deadline - time.monotonic()))

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
            return self.write(fn, *args)
        with db.connection_context():
            return fn(*args)

    def audit(self, event: audit.Event) -> None:
        """Append an audit event; returns at once (the writer commits it with its next batch,
        failures are logged): queries and retrievals do not wait for a disk flush. Events
        wait here rather than as a job each in the writer's queue: the first of a batch
        hands the writer one job that appends every event come by then (one savepoint,
        one read of the chain's end, no wake-up of the writer for each)."""
        assert self._writer is not None, "archive is not open"
        with self._audit_lock:
            self._audits.append(event)
            first = len(self._audits) == 1
        if first:
            self._writer.submit(self._append_audits)

    def _append_audits(self) -> None:
        with self._audit_lock:
            events, self._audits = self._audits, []
        self.chain.extend(db, events)

    def audit_events(self, **filters: str) -> Iterator[AuditRecord]:
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
            rows = cast(Iterable[dict[str, Any]], query.dicts().iterator())  # peewee: models
            for row in rows:
                yield AuditRecord(**row)

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

    def _place(self, tmp: Path, rel: str, sha: str, sync_dir: bool = True) -> Outcome:
        """Put the file in place, or decide what a file already there means; queue what
        is placed for the object store, if there is one."""
        final = self.root / rel
        try:
            make_dirs(self.root, os.path.dirname(rel), self.fsync)
            decided = self._without_copy(tmp, final, sha) if self.files.remote else None
            if decided is not None:
                outcome = decided
            else:
                try:
                    os.link(tmp, final)
                    outcome = Outcome.STORED
                except FileExistsError:
                    outcome = self._duplicate(tmp, final)
            if outcome is not Outcome.KEPT:  # a duplicate too: its upload may be unconfirmed
                self.files.placed(final.stem, final, sync_dir)
            if self.fsync and sync_dir and outcome in (Outcome.STORED, Outcome.REPLACED):
                fsync_path(final.parent)
        except OSError as exc:
            reraise_full(exc)
        return outcome

    def _without_copy(self, tmp: Path, final: Path, sha: str) -> Outcome | None:
        """With an object store, a stored instance may have no local copy (evicted, or
        stored through another node): a second copy is then decided from the index and
        the object, not the file system. None: nothing stored, or its copy is back in
        place (fetched), for `_place` to decide as on files."""
        if final.exists():
            return None
        with db.connection_context():
            query = Instance.select(Instance.sha256, Instance.path)
            found = query.where(Instance.sop_uid == final.stem).tuples().first()
        if found is None or self.root / found[1] != final:  # elsewhere: for the index
            return None
        recorded = found[0]
        if recorded == sha:  # the same bytes: they become the local copy
            with contextlib.suppress(FileExistsError):
                os.link(tmp, final)
            return Outcome.DUPLICATE
        try:
            self.files.local(final)
            return None
        except StorageError as exc:  # the stored copy cannot be compared now
            log.warning("%s: stored copy not at hand (%s); taken as different", final.stem, exc)
        if self.duplicates == "keep":
            return Outcome.KEPT
        if self.duplicates == "reject":
            raise DuplicateRejected(f"{final.stem} is stored with different content")
        self.write(index.mark_replacing, final.stem)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, final)
        return Outcome.REPLACED

    def _duplicate(self, tmp: Path, final: Path) -> Outcome:
        if same_dataset(final, tmp):  # File Meta aside: who wrote the file is no difference
            return Outcome.DUPLICATE
        if self.duplicates == "keep":
            return Outcome.KEPT
        if self.duplicates == "reject":
            raise DuplicateRejected(f"{final.stem} is stored with different content")
        self.write(index.mark_replacing, final.stem)
        aside = self.incoming_path()  # a link of its own: `tmp` stays until its row commits
        os.link(tmp, aside)
        os.replace(aside, final)
        return Outcome.REPLACED

    def write(self, fn, *args):
        assert self._writer is not None, "archive is not open"
        try:
            return self._writer.call(fn, *args)
        except OperationalError as exc:
            if "full" in str(exc):
                raise OutOfResources(f"no space left for the index ({exc})") from exc
            raise StorageError(f"index write failed: {exc}") from exc
        except OSError as exc:  # a file made beside the rows (the audit key) on a full disk
            reraise_full(exc)

    def pending_writes(self) -> int:
        """Index writes queued for the writer (a metric: a growing queue is a slow disk)."""
        return self._writer.pending() if self._writer is not None else 0


def _kept_instead(stored: Stored, exc: BaseException, policy: str) -> Stored | None:
    """Policy `keep` for an instance stored under another series or study: the stored one
    stays and the arrival is discarded, as one with different bytes (Outcome.KEPT, named
    where it is kept). None: `exc` is a failure."""
    if not isinstance(exc, InstanceConflict) or policy != "keep":
        return None
    log.warning("kept stored %s: %s", stored.sop_uid, exc)
    study_uid, series_uid, _ = exc.stored.split("/")
    return replace(
        stored,
        outcome=Outcome.KEPT,
        path=exc.stored,
        study_uid=study_uid,
        series_uid=series_uid,
        size=0,
    )


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
