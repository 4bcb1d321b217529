"""The change feed (storage.changefeed): every create, update (a replace) and delete of an
instance, numbered in commit order in the transaction of the change, on both engines;
read in-process here, over HTTP and through `minipacs changes` below."""

import subprocess
import sys
import time
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT
from conftest import index_args
from conftest import index_rows
from dicom_files import TEST_FILES
from pydicom.uid import generate_uid

from storage import Archive
from storage import changefeed
from storage.engine import open_database
from storage.models import Change


def make_instance(folder: Path, study_uid: str, number: int, **values) -> pydicom.Dataset:
    """CT_small as a new instance of `study_uid`, saved as <folder>/<SOP UID>.dcm."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_of(study_uid)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return ds


def series_of(study_uid: str) -> str:
    """The one series of each test study."""
    return generate_uid(entropy_srcs=[study_uid, "series"])


def path_of(folder: Path, ds: pydicom.Dataset) -> Path:
    return folder / f"{ds.SOPInstanceUID}.dcm"


@pytest.fixture
def archive(tmp_path, engine):
    with Archive(tmp_path / "data", fsync=False, duplicates="replace", index_url=engine) as opened:
        yield opened


def test_creates_updates_and_deletes_are_numbered_in_order(archive, tmp_path):
    study = generate_uid()
    sent = [make_instance(tmp_path / "in", study, n) for n in (1, 2, 3)]
    for ds in sent:
        archive.import_file(path_of(tmp_path / "in", ds))
    archive.import_file(path_of(tmp_path / "in", sent[0]))  # the same bytes: no change
    replaced = pydicom.dcmread(path_of(tmp_path / "in", sent[1]))
    replaced.SeriesDescription = "corrected"
    replaced.save_as(tmp_path / "replaced.dcm", enforce_file_format=True)
    archive.import_file(tmp_path / "replaced.dcm")  # different bytes, policy replace
    archive.retention.delete("IMAGE", sent[2].SOPInstanceUID, who="admin")

    entries = archive.changes.read()

    assert [(e.sequence, e.action, e.sop_uid) for e in entries] == [
        (1, "create", sent[0].SOPInstanceUID),
        (2, "create", sent[1].SOPInstanceUID),
        (3, "create", sent[2].SOPInstanceUID),
        (4, "update", sent[1].SOPInstanceUID),
        (5, "delete", sent[2].SOPInstanceUID),
    ]
    assert [e.state for e in entries] == ["current", "replaced", "deleted", "current", "deleted"]
    assert [e.who for e in entries] == ["import", "import", "import", "import", "admin"]
    assert all(e.study_uid == study and e.series_uid == series_of(study) for e in entries)
    assert entries[0].at <= entries[-1].at and entries[0].at.endswith("Z")
    assert entries[3].metadata["0008103E"]["Value"] == ["corrected"]
    assert entries[1].metadata is None and entries[2].metadata is None
    assert archive.changes.latest(metadata=False) == entries[-1]
    assert [e.sequence for e in archive.changes.read(after=2, offset=1, limit=1)] == [4]


def test_pruning_keeps_the_newest_and_numbering_goes_on(archive, tmp_path):
    study = generate_uid()
    for number in (1, 2, 3):
        archive.import_file(path_of(tmp_path, make_instance(tmp_path, study, number)))

    assert archive.changes.prune(datetime.now(UTC) - timedelta(days=1)) == 0
    assert archive.changes.prune(datetime.now(UTC) + timedelta(days=1)) == 2
    assert archive.changes.first() == 3
    archive.import_file(path_of(tmp_path, make_instance(tmp_path, study, 4)))

    assert [e.sequence for e in archive.changes.read()] == [3, 4]


def test_reindex_keeps_the_feed_and_announces_every_file(archive, tmp_path):
    study = generate_uid()
    for number in (1, 2):
        archive.import_file(path_of(tmp_path, make_instance(tmp_path, study, number)))

    archive.maintenance.reindex()

    entries = archive.changes.read()
    assert [(e.sequence, e.action) for e in entries] == [
        (1, "create"),
        (2, "create"),
        (3, "create"),
        (4, "create"),
    ]
    assert [e.who for e in entries[2:]] == ["reindex", "reindex"]
    assert [e.state for e in entries] == ["replaced", "replaced", "current", "current"]


def test_a_number_is_never_visible_before_a_lower_one_commits(postgres, tmp_path):
    """PostgreSQL, two writers: while one transaction holds feed entry N+1 uncommitted, an
    importer's entry must not appear as N+2 before it (a reader paging by number would
    skip N+1 for good); it waits, then follows."""
    index = postgres.database()
    data = tmp_path / "data"
    with Archive(data, fsync=False, index_url=index) as archive:
        archive.import_file(path_of(tmp_path, make_instance(tmp_path, generate_uid(), 1)))
    held = open_database(index, data, fsync=False)
    late = make_instance(tmp_path / "late", generate_uid(), 2)
    with held.connection_context(), held.bind_ctx([Change]), held.atomic():
        changefeed.append(held, [changefeed.Pending("create", "1.2", "1.2.3", "1.2.3.4", "T")])
        importer = subprocess.Popen(
            [sys.executable, "-m", "pacs", "import", "--data", str(data), *index_args(index)]
            + ["--no-fsync", str(tmp_path / "late")],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
        while index_rows(data, waiting, index=index) == [(0,)] and importer.poll() is None:
            time.sleep(0.05)
        visible = index_rows(data, "SELECT sequence FROM changefeed ORDER BY 1", index=index)
    _, errors = importer.communicate(timeout=60)
    held.close_all()

    assert visible == [(1,)]  # the importer waited for the lock, its entry not yet in
    assert importer.returncode == 0, errors
    assert index_rows(data, "SELECT sequence, sop_uid FROM changefeed ORDER BY 1", index=index) == [
        (1, index_rows(data, "SELECT sop_uid FROM instance ORDER BY id", index=index)[0][0]),
        (2, "1.2.3.4"),
        (3, late.SOPInstanceUID),
    ]
