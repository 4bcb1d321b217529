"""The change feed (storage.changefeed): every create, update (a replace) and delete of an
instance, numbered in commit order in the transaction of the change, on both engines;
read in-process here, over HTTP and through `minipacs changes` below."""

import subprocess
import sys
import threading
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


def test_concurrent_writers_on_postgresql_never_show_a_gap(postgres, tmp_path):
    """Three importers write to one PostgreSQL index at once while a reader polls: what
    it sees is always 1..N without a hole (a number committed before a lower one would
    show as one), and in the end every instance has exactly one entry."""
    index = postgres.database()
    data = tmp_path / "data"
    Archive(data, fsync=False, index_url=index).open().close()  # the schema, once
    folders = [tmp_path / f"in{n}" for n in range(3)]
    sops = {make_instance(f, generate_uid(), n).SOPInstanceUID for f in folders for n in range(8)}
    seen: list[list[int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(
                [row[0] for row in index_rows(data, "SELECT sequence FROM changefeed", index=index)]
            )

    reader = threading.Thread(target=poll)
    reader.start()
    importers = [
        subprocess.Popen(
            [sys.executable, "-m", "pacs", "import", "--data", str(data), *index_args(index)]
            + ["--no-fsync", str(folder)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for folder in folders
    ]
    try:
        outcomes = [importer.communicate(timeout=120) for importer in importers]
    finally:
        done.set()
        reader.join()
    assert [importer.returncode for importer in importers] == [0, 0, 0], outcomes

    rows = index_rows(data, "SELECT sequence, sop_uid FROM changefeed ORDER BY 1", index=index)
    assert [row[0] for row in rows] == list(range(1, len(sops) + 1))
    assert {row[1] for row in rows} == sops
    assert any(0 < len(numbers) < len(sops) for numbers in seen)  # read while they wrote
    for numbers in seen:
        assert sorted(numbers) == list(range(1, len(numbers) + 1))
