"""Moving an archive's instances between the data folder and an object store
(`minipacs migrate-storage`): every instance the index lists, copied, then verified.

Both directions are resumable: what is already at the target with the index's size and
SHA-256 is left as it is, so a run cut short (or one made while a server on files keeps
receiving) is finished by running it again. The index itself is not touched: its paths
are the object keys under the prefix, and the files left in the data folder become the
cache of the object store.
"""

import logging
import os
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from itertools import islice
from typing import TYPE_CHECKING

from storage.errors import ObjectStoreError
from storage.errors import StoreUnavailable
from storage.files import fsync_path
from storage.files import hash_file
from storage.files import make_dirs
from storage.models import Instance
from storage.models import db
from storage.objects import UPLOAD
from storage.objects import object_problem
from storage.objectstore import ObjectStore

if TYPE_CHECKING:
    from storage.archive import Archive

log = logging.getLogger(__name__)
THREADS = 8  # instances copied (or checked) at once: requests wait on the network
BATCH = 1000  # index rows read at a time


@dataclass
class Migration:
    """What a run did: instances copied, found already at the target, and those that
    could not be copied or did not verify (path, reason)."""

    copied: int = 0
    present: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"copied": self.copied, "present": self.present, "problems": len(self.problems)}


def to_bucket(archive: "Archive", store: ObjectStore, progress: Callable[[str], None]) -> Migration:
    """Upload every indexed file to `store` (each file's SHA-256 checked first, and by the
    store as it receives it), then check every object by HEAD. `progress(step)` after
    each instance of each step ("copy", "verify"). StoreUnavailable ends the run."""
    root = archive.root

    def copy(row: tuple[str, int, str]) -> str:
        rel, size, sha256 = row
        if not object_problem(store.head(rel), size, sha256):
            return "present"
        try:
            if hash_file(root / rel) != (size, sha256):
                return "file differs from the index (size or SHA-256): not copied"
        except FileNotFoundError:
            return "file is missing"
        try:
            store.put(rel, root / rel, size, sha256)
        except StoreUnavailable:
            raise
        except ObjectStoreError as exc:
            return f"not copied: {exc}"
        return "copied"

    migration = _run(copy, lambda: progress("copy"))
    return _verify(migration, lambda row: object_problem(store.head(row[0]), *row[1:]), progress)


def to_folder(archive: "Archive", store: ObjectStore, progress: Callable[[str], None]) -> Migration:
    """Download every indexed instance into the data folder where no file has its size
    and SHA-256 (each download hashed before it is put in place), then check that every
    file is there at its size. The `.upload` links go: on files nothing is to upload.
    StoreUnavailable ends the run."""
    root = archive.root

    def copy(row: tuple[str, int, str]) -> str:
        rel, size, sha256 = row
        path = root / rel
        try:
            if hash_file(path) == (size, sha256):
                return "present"
        except FileNotFoundError:
            pass
        tmp = archive.incoming / f"{uuid.uuid4().hex}.fetch"
        try:
            store.fetch(rel, tmp)
            if hash_file(tmp) != (size, sha256):
                return "object differs from the index (size or SHA-256): not copied"
            if archive.fsync:
                fsync_path(tmp)
            make_dirs(root, os.path.dirname(rel), archive.fsync)
            os.replace(tmp, path)  # a wrong local copy is replaced
        except StoreUnavailable:
            raise
        except ObjectStoreError as exc:
            return f"not copied: {exc}"
        finally:
            tmp.unlink(missing_ok=True)
        return "copied"

    def check(row: tuple[str, int, str]) -> str:
        try:
            found = (root / row[0]).stat().st_size
        except FileNotFoundError:
            return "file is missing"
        return "" if found == row[1] else f"size is {found}, index says {row[1]}"

    migration = _verify(_run(copy, lambda: progress("copy")), check, progress)
    if not migration.problems:
        for link in (root / UPLOAD).glob("*.dcm"):
            link.unlink()
    return migration


def _run(copy: Callable[[tuple[str, int, str]], str], step: Callable[[], None]) -> Migration:
    migration = Migration()
    with ThreadPoolExecutor(THREADS, thread_name_prefix="migrate") as pool:
        for batch in _batches():
            for row, outcome in zip(batch, pool.map(copy, batch), strict=True):
                if outcome == "copied":
                    migration.copied += 1
                elif outcome == "present":
                    migration.present += 1
                else:
                    migration.problems.append((row[0], outcome))
                step()
    return migration


def _verify(
    migration: Migration,
    check: Callable[[tuple[str, int, str]], str],
    progress: Callable[[str], None],
) -> Migration:
    """Check every instance at the target (not those that could not be copied: their
    problem is said already)."""
    failed = {path for path, _ in migration.problems}
    with ThreadPoolExecutor(THREADS, thread_name_prefix="migrate") as pool:
        for batch in _batches():
            wanted = [row for row in batch if row[0] not in failed]
            for row, problem in zip(wanted, pool.map(check, wanted), strict=True):
                if problem:
                    migration.problems.append((row[0], problem))
            for _ in batch:
                progress("verify")
    return migration


def _batches() -> Iterator[list[tuple[str, int, str]]]:
    """The index's (path, size, SHA-256) of every instance, BATCH at a time."""
    with db.connection_context():
        rows = (
            Instance.select(Instance.path, Instance.size, Instance.sha256)
            .order_by(Instance.path)
            .tuples()
            .iterator()
        )
        typed = ((path, int(size), sha) for path, size, sha in rows)
        while batch := list(islice(typed, BATCH)):
            yield batch


def count() -> int:
    """Instances the index lists (the length of each step)."""
    with db.connection_context():
        return Instance.select().count()
