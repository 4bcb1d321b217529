"""Where an instance's bytes are: the data folder, and with an object store the bucket too.

Every reader of an instance file (C-GET/C-MOVE, forwards, WADO-URI, WADO-RS, rendering,
ZIP downloads, exports, storage commitment) asks `local(path)` for it: on files that is
the path itself; with an object store (storage.objectstore) it is the same path in the
data folder, fetched from the bucket first when no local copy is there. WADO-RS frames
and bulk data ask `frames(path, numbers)` first: a large object with no local copy has
only its header and those frames read, by ranged GETs (storage.frames says where).

With an object store the data folder is the durable first stop and a cache:
- A file is placed exactly as on files (`<study>/<series>/<sop>.dcm`, Success once
  durable), and a hard link `.upload/<sop>.dcm` beside it says "not in the bucket yet".
  Both are made before the index row commits, so after kill -9 every acknowledged
  instance either has its link or is still in the journal, which places it again.
- The uploader (one thread of the server's main process) uploads each linked file whose
  index row agrees with it (size and SHA-256: the store checks the bytes against that
  SHA-256), then removes the link. A file without a link (one hard link left) is a copy
  of an object: evictable, least recently used first, above `cache_bytes`; the same goes
  for copies fetched from the bucket.
- A deletion writes `.delete/<id>.wait` (the object keys) before its rows go and renames
  it to `.json` after; the uploader removes those objects (each only while no index row
  names the instance again) and retries while the store is down.
"""

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from storage import frames
from storage import metrics
from storage.dataset import ParsedInstance
from storage.dataset import read_head_instance
from storage.dataset import read_instance
from storage.errors import InvalidDataset
from storage.errors import ObjectStoreError
from storage.errors import StoreUnavailable
from storage.files import fsync_path
from storage.files import hash_file
from storage.files import make_dirs
from storage.models import Instance
from storage.models import db
from storage.objectstore import Head
from storage.objectstore import ObjectStore
from storage.objectstore import Settings
from storage.objectstore import checksum

log = logging.getLogger(__name__)
UPLOAD = ".upload"  # <sop>.dcm: hard links of files the bucket does not have yet
DELETE = ".delete"  # <id>.wait (deletion under way), <id>.json (objects to remove)
UPLOADERS = 4  # files uploaded at once
TOUCH = 30.0  # s: a read marks its copy as used (atime) at most this often
RECENT = 60.0  # s: a copy used this recently is never evicted (a reader may be opening it)
TRIM_EVERY = 10.0  # s between looks at the cache's size
LOOK = 2.0  # s between looks at the queues when nothing wakes the uploader (another
# process queued: `minipacs delete`, `minipacs import`)
ORPHAN_AGE = 3600.0  # s: a link whose file and row are gone is dropped after this
FETCH_WAIT = 60.0  # s a reader waits for another thread's fetch of the same object
SYNC_WAIT = 60.0  # s a C-STORE waits for its upload under storage_sync
PAUSE_MAX = 10.0  # s between tries while the store is down
NICE = 10  # as the indexer's: receiving comes first
HEAD_READS = frames.HEAD_READS  # bytes read for an object's header, in turn
RANGED_ABOVE = 2 << 20  # bytes: a larger object not in the data folder has frames read by range


class LocalFiles:
    """Files only: every instance's bytes are in the data folder."""

    remote = False
    synchronous = False  # Success only once the object store has the instance

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self) -> None:
        """Create what the backend keeps in the data folder."""

    def local(self, path: Path) -> Path:
        """A local path with the instance's bytes (the one reader: see the docstring)."""
        return path

    def placed(self, sop_uid: str, final: Path, sync: bool) -> None:
        """A file was put in place: queue it for the object store."""

    def sync(self) -> None:
        """Make the queue entries `placed` made without `sync` durable."""

    def deleting(self, rels: list[str]) -> Path | None:
        """These instances are about to be deleted: what `deleted` arms afterwards."""
        return None

    def deleted(self, record: Path | None) -> None:
        """Their rows are gone: remove their objects too."""

    def recover(self) -> None:
        """At start-up (exclusive): deletions a crash interrupted."""

    def wait_uploaded(self, sop_uid: str, timeout: float) -> bool:
        """Wait until an instance the indexer has placed is in the object store."""
        return True

    def upload_now(self, sop_uid: str) -> None:
        """Upload a placed instance in this thread (storage_sync); raise when it is not
        in the object store after."""

    def drain(self, progress: Callable[[], None] | None = None) -> int:
        """Upload everything waiting, in this thread; how many are still waiting."""
        return 0

    def frames(self, path: Path, numbers: list[int]) -> frames.Subset | None:
        """Frames `numbers` (from 1) of an instance, when reading only their byte ranges
        is cheaper than having the whole file (storage.frames); None: read `local(path)`."""
        return None

    def check(self, rel: str, size: int, sha256: str) -> str:
        """What is wrong with an instance's stored bytes ('' when nothing): its file
        against the recorded size and SHA-256."""
        path = self.root / rel
        if not path.is_file():
            return "file is missing"
        found_size, found_sha = hash_file(path)
        if found_size != size:
            return f"size is {found_size}, index says {size}"
        if found_sha != sha256:
            return "SHA-256 differs from the index (file corrupted)"
        return ""

    def wake(self) -> None:
        """Something was queued: the uploader looks now rather than later."""

    def run(self, stop: threading.Event) -> None:
        """The uploader's loop (nothing to do on files)."""


class ObjectFiles(LocalFiles):
    """An object store behind the data folder (see the module's docstring)."""

    remote = True

    def __init__(self, root: Path, settings: Settings, fsync: bool) -> None:
        super().__init__(root)
        self.store = ObjectStore(settings)
        self.settings = settings
        self.synchronous = settings.sync
        self.fsync = fsync
        self.uploads = root / UPLOAD
        self.deletes = root / DELETE
        self.cached = 0  # bytes of evictable copies at the last look
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Event] = {}
        self._wake = threading.Event()

    def open(self) -> None:
        self.uploads.mkdir(exist_ok=True)
        self.deletes.mkdir(exist_ok=True)

    # -- reading -----------------------------------------------------------------------

    def local(self, path: Path) -> Path:
        try:
            status = os.stat(path)
        except FileNotFoundError:
            return self._fetch(path)
        metrics.OBJECT_CACHE_HITS.inc()
        now = time.time()
        if now - status.st_atime > TOUCH:  # least recently used: by atime, set here
            with contextlib.suppress(OSError):
                os.utime(path, ns=(time.time_ns(), status.st_mtime_ns))
        return path

    def _fetch(self, path: Path) -> Path:
        """Bring the object into place; one fetch per object at a time in this process
        (the others wait for it), atomically (a reader never sees part of a file)."""
        rel = path.relative_to(self.root).as_posix()
        while True:
            with self._lock:
                running = self._fetching.get(rel)
                if running is None:
                    mine = self._fetching[rel] = threading.Event()
                    break
            running.wait(FETCH_WAIT)
            if path.exists():
                metrics.OBJECT_CACHE_HITS.inc()
                return path
        try:
            if path.exists():  # fetched by a thread that finished just before
                return path
            metrics.OBJECT_CACHE_MISSES.inc()
            tmp = self.root / ".incoming" / f"{uuid.uuid4().hex}.fetch"
            try:
                self.store.fetch(rel, tmp)
                if self.fsync:
                    fsync_path(tmp)
                make_dirs(self.root, os.path.dirname(rel), self.fsync)
                with contextlib.suppress(FileExistsError):  # another process was quicker
                    os.link(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            log.debug("fetched %s from the object store", rel)
            return path
        finally:
            with self._lock:
                del self._fetching[rel]
            mine.set()

    def frames(self, path: Path, numbers: list[int]) -> frames.Subset | None:
        """A large object not in the data folder (above RANGED_ABOVE): only the ranges of
        its header and of those frames, by ranged GETs; a smaller one is better fetched
        whole, once, into the cache."""
        if path.exists():
            return None
        rel = path.relative_to(self.root).as_posix()
        head = self.store.read(rel, 0, frames.HEAD_READS[0])
        if head.size <= RANGED_ABOVE:
            return None
        return frames.subset(lambda at, size: self.store.read(rel, at, size).data, numbers,
                             head.data)  # fmt: skip

    def parse_object(self, rel: str, size: int) -> tuple[ParsedInstance, str]:
        """An object's index keys and SHA-256 without fetching all of it (reindex from the
        bucket): its first bytes parsed in memory, read by ranged GETs that each go on
        where the last ended, up to HEAD_READS bytes in all, until they hold its Pixel
        Data, and the SHA-256 its metadata records. Else (no pixel data within them, no
        SHA-256 recorded, an object no larger than the next read) the rest of it is
        fetched after them into a file, which read_instance checks whole and which is
        hashed. No byte is read twice, and memory holds the head (HEAD_READS[-1] bytes at
        most), never the whole object. The rest comes by a ranged GET, which the store's
        whole-object checksum does not cover: its hash is checked against the SHA-256
        recorded in the metadata, where there is one."""
        head, recorded = b"", ""
        for length in HEAD_READS:
            if length >= size:
                break
            part = self.store.read(rel, len(head), length - len(head))
            head += part.data
            recorded = part.sha256
            try:
                parsed = read_head_instance(head)
            except InvalidDataset:  # the header goes on beyond: read more
                continue
            if part.sha256:
                return parsed, part.sha256
            break
        tmp = self.root / ".incoming" / f"{uuid.uuid4().hex}.object"
        try:
            self.store.fetch(rel, tmp, head)
            found, sha256 = hash_file(tmp)
            if found != size:
                raise ObjectStoreError(f"{rel}: {found} bytes read, the listing said {size}")
            if recorded and recorded != sha256:
                raise ObjectStoreError(
                    f"{rel}: SHA-256 differs from the one its metadata records (object corrupted)"
                )
            return read_instance(tmp), sha256
        finally:
            tmp.unlink(missing_ok=True)

    def check(self, rel: str, size: int, sha256: str) -> str:
        """A file not uploaded yet is checked as on files; otherwise the object (HEAD:
        its size, and the store's SHA-256 where it keeps a whole-object one) and any
        local copy."""
        sop_uid = Path(rel).stem
        if (self.uploads / f"{sop_uid}.dcm").exists():
            return super().check(rel, size, sha256)
        problem = object_problem(self.store.head(rel), size, sha256)
        if problem:
            return problem
        if (self.root / rel).is_file():
            problem = super().check(rel, size, sha256)
            if problem:
                return f"local copy: {problem}"
        return ""

    # -- uploading ---------------------------------------------------------------------

    def placed(self, sop_uid: str, final: Path, sync: bool) -> None:
        link = self.uploads / f"{sop_uid}.dcm"
        aside = self.uploads / f"{sop_uid}.{uuid.uuid4().hex}.tmp"
        os.link(final, aside)
        os.replace(aside, link)  # a replaced file's link replaces the old one
        aside.unlink(missing_ok=True)  # still there when `link` was this very file
        if sync:
            self.sync()
        self._wake.set()

    def sync(self) -> None:
        if self.fsync:
            fsync_path(self.uploads)

    def wake(self) -> None:
        self._wake.set()

    def wait_uploaded(self, sop_uid: str, timeout: float) -> bool:
        link = self.uploads / f"{sop_uid}.dcm"
        deadline = time.monotonic() + timeout
        self._wake.set()
        while link.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def upload_now(self, sop_uid: str) -> None:
        link = self.uploads / f"{sop_uid}.dcm"
        if link.exists() and not self._upload(link) and link.exists():
            raise ObjectStoreError(f"{sop_uid} is kept, but could not be uploaded yet")

    def drain(self, progress: Callable[[], None] | None = None) -> int:
        """Upload what waits, in this thread (`minipacs import`, which no uploader
        follows unless a server runs); stops at a store that does not answer. Returns
        how many are still waiting."""
        for link in self._waiting():
            try:
                self._upload(link)
            except StoreUnavailable as exc:
                log.warning("%s: the rest goes up with the server", exc)
                break
            if progress is not None:
                progress()
        return self.backlog()

    def backlog(self) -> int:
        """Instances waiting for their upload (a metric)."""
        return sum(1 for name in os.listdir(self.uploads) if name.endswith(".dcm"))

    def deletions_pending(self) -> int:
        return sum(1 for name in os.listdir(self.deletes) if name.endswith(".json"))

    def run(self, stop: threading.Event) -> None:
        """Upload what waits, remove deleted objects, keep the cache within its size;
        until `stop`. A store that is down is tried again after a pause that doubles up
        to PAUSE_MAX; nothing is lost meanwhile (the links stay)."""
        pause = 0.0
        next_trim = 0.0
        down = False
        _lower_priority()
        with ThreadPoolExecutor(
            UPLOADERS, thread_name_prefix="upload", initializer=_lower_priority
        ) as pool:
            while not stop.is_set():
                self._wake.clear()
                try:
                    self._remove_deleted()
                    links = self._waiting()
                    done = list(pool.map(self._upload, links))
                    if down:
                        log.info("object store: reachable again")
                    down, pause = False, 0.0
                    if time.monotonic() >= next_trim:
                        self.trim()
                        next_trim = time.monotonic() + TRIM_EVERY
                    if any(done):
                        continue  # more may have come meanwhile
                except StoreUnavailable as exc:
                    if not down:
                        log.warning("%s: uploads wait until it answers", exc)
                    down, pause = True, min(max(pause * 2, 1.0), PAUSE_MAX)
                except Exception:
                    log.exception("object store uploader")
                    pause = min(max(pause * 2, 1.0), PAUSE_MAX)
                if pause:  # the store is down: wait, whatever is queued meanwhile
                    stop.wait(pause)
                else:
                    self._wake.wait(LOOK)

    def _waiting(self) -> list[Path]:
        """The links waiting, oldest first."""
        found = []
        with os.scandir(self.uploads) as entries:
            for entry in entries:
                if entry.name.endswith(".dcm"):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((entry.stat().st_mtime, Path(entry.path)))
        return [path for _, path in sorted(found)]

    def _upload(self, link: Path) -> bool:
        """Upload one linked file once its index row agrees with it; True when done."""
        sop_uid = link.stem
        try:
            status = os.stat(link)
            row = _row(sop_uid)
            if row is None:  # not committed yet, or gone (a failed ingest, a deletion)
                if status.st_nlink == 1 and time.time() - status.st_mtime > ORPHAN_AGE:
                    link.unlink(missing_ok=True)
                return False
            rel, size, sha256 = row
            if hash_file(link) != (size, sha256):  # a replacement under way: its row next
                log.debug("%s: file and index row differ, upload later", sop_uid)
                return False
            self.store.put(rel, link, size, sha256)
            if os.stat(link).st_ino == status.st_ino:  # not replaced meanwhile
                link.unlink()
        except FileNotFoundError:  # deleted meanwhile
            return False
        except StoreUnavailable:
            raise
        except ObjectStoreError as exc:
            log.error("cannot upload %s: %s", sop_uid, exc)
            return False
        metrics.OBJECTS_UPLOADED.inc()
        metrics.OBJECT_BYTES_UPLOADED.inc(size)
        return True

    # -- deleting ----------------------------------------------------------------------

    def deleting(self, rels: list[str]) -> Path | None:
        if not rels:
            return None
        record = self.deletes / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.wait"
        with open(record, "x") as fp:
            json.dump(rels, fp)
            fp.flush()
            if self.fsync:
                os.fsync(fp.fileno())
        self.sync_deletes()
        return record

    def deleted(self, record: Path | None) -> None:
        if record is not None:
            self._forget(record)
            self._wake.set()

    def recover(self) -> None:
        for record in self.deletes.glob("*.wait"):  # each object goes only if its row did
            self._forget(record)

    def _forget(self, record: Path) -> None:
        """A deletion's rows are gone (or it never happened): what was still to upload is
        not, and the record's objects are for the uploader to remove."""
        for rel in json.loads(record.read_text()):
            if _row(Path(rel).stem) is None:
                (self.uploads / Path(rel).name).unlink(missing_ok=True)
        os.replace(record, record.with_suffix(".json"))

    def sync_deletes(self) -> None:
        if self.fsync:
            fsync_path(self.deletes)

    def _remove_deleted(self) -> None:
        for record in sorted(self.deletes.glob("*.json")):
            for rel in json.loads(record.read_text()):
                if _row(Path(rel).stem) is None:  # not stored again since
                    self.store.delete(rel)
            record.unlink()

    # -- the cache ---------------------------------------------------------------------

    def trim(self) -> None:
        """Remove the least recently used copies of uploaded objects above cache_bytes
        (down to 90 % of it); a file still to upload is never one of them."""
        copies = []
        total = 0
        for path in _files(self.root):
            with contextlib.suppress(FileNotFoundError):
                status = os.stat(path)
                if status.st_nlink == 1:
                    copies.append((status.st_atime, status.st_size, path))
                    total += status.st_size
        if total > self.settings.cache_bytes:
            copies.sort()
            now = time.time()
            for used, size, path in copies:
                if total <= self.settings.cache_bytes * 0.9:
                    break
                if now - used < RECENT:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    total -= size
                    metrics.OBJECT_CACHE_EVICTED.inc()
        self.cached = total


def object_problem(head: Head | None, size: int, sha256: str) -> str:
    """What is wrong with an object by what the store says of it ('' when nothing): its
    size, and the store's whole-object SHA-256 (or, for a multipart upload, the one we
    recorded in its metadata) against the index's."""
    if head is None:
        return "object is missing from the object store"
    if head.size != size:
        return f"object's size is {head.size}, index says {size}"
    whole = head.checksum and "-" not in head.checksum
    if whole and head.checksum != checksum(sha256):
        return "object's SHA-256 differs from the index (object corrupted)"
    if not whole and head.sha256 and head.sha256 != sha256:
        return "object's recorded SHA-256 differs from the index"
    return ""


def _lower_priority() -> None:
    """This thread after the DICOM receivers and the indexer (Linux: nice is per thread)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)


def _row(sop_uid: str) -> tuple[str, int, str] | None:
    """(path, size, SHA-256) the index records for an instance."""
    with db.connection_context():
        row = (
            Instance.select(Instance.path, Instance.size, Instance.sha256)
            .where(Instance.sop_uid == sop_uid)
            .tuples()
            .first()
        )
    return None if row is None else (row[0], int(row[1]), row[2])


def _files(root: Path):
    """Every `<study>/<series>/<sop>.dcm` under the root."""
    for study in _subdirs(root):
        for series in _subdirs(study):
            with os.scandir(series) as entries:
                for entry in entries:
                    if entry.name.endswith(".dcm"):
                        yield Path(entry.path)


def _subdirs(path: Path):
    with contextlib.suppress(FileNotFoundError), os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith("."):
                yield Path(entry.path)
