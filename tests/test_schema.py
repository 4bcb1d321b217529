"""Schema versions: an index made by the previous release is migrated at start-up.

tests/data/index-v1.*.sql are dumps of a real version-1 index (the release before schema
versioning) holding CT_small, MR_small and JPEG2000 from pydicom, one per engine.
"""

import json
import shutil
from pathlib import Path

import psycopg
import pydicom
import pytest
from conftest import TEST_FILES
from conftest import add_user
from conftest import index_rows
from conftest import minipacs
from conftest import storescu
from corpus import build
from make_study import make_study

from pacs import scu
from storage import Archive
from storage.schema import COPY_ORDER
from storage.schema import SCHEMA_VERSION

V1_FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")
DATA = Path(__file__).parent / "data"
WORKLIST_ITEM = {
    "PatientID": "W1",
    "PatientName": "Doe^Jane",
    "Modality": "CT",
    "ScheduledStationAETitle": "CT01",
    "ScheduledProcedureStepStartDate": "20261205",
}


def make_v1_archive(data: Path, index: str) -> None:
    for name in V1_FILES:
        ds = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True)
        folder = data / ds.StudyInstanceUID / ds.SeriesInstanceUID
        folder.mkdir(parents=True)
        shutil.copyfile(TEST_FILES / name, folder / f"{ds.SOPInstanceUID}.dcm")
    if index:
        dump = (DATA / "index-v1.postgresql.sql").read_text()
        with psycopg.connect(index, autocommit=True) as conn:
            conn.execute(dump)
    else:
        import sqlite3

        with sqlite3.connect(data / "index.sqlite") as conn:
            conn.executescript((DATA / "index-v1.sqlite.sql").read_text())


def test_version_1_index_is_migrated_once_and_keeps_its_data(start_server, tmp_path, engine):
    data = tmp_path / "data"
    make_v1_archive(data, engine)
    server = start_server(data=data)
    assert f"index migrated from schema version 1 to {SCHEMA_VERSION}" in server.log()
    assert server.rows("SELECT version FROM schemaversion") == [(SCHEMA_VERSION,)]
    assert server.rows("SELECT count(*) FROM study WHERE protected") == [(0,)]
    answers = list(
        scu.find(scu.Remote(port=server.port), scu.identifier("STUDY", {"StudyInstanceUID": ""}))
    )
    assert len(answers) == 3
    uid = pydicom.dcmread(TEST_FILES / "CT_small.dcm", stop_before_pixels=True).StudyInstanceUID
    outcome = scu.get(scu.Remote(port=server.port), "STUDY", [uid], tmp_path / "got")
    assert outcome.ok and outcome.completed == 1

    server.stop()
    server.start()  # already current: nothing to migrate
    assert server.log().count("index migrated") == 1


def test_index_newer_than_the_code_refuses_to_start(start_server, tmp_path, engine):
    data = tmp_path / "data"
    with Archive(data, fsync=False, index_url=engine):
        pass  # a current index, as a server makes it
    index_rows(data, "UPDATE schemaversion SET version = 99", index=engine)
    with pytest.raises(RuntimeError) as failed:
        start_server(data=data)
    assert "schema version 99" in str(failed.value)
    assert "upgrade minipacs" in str(failed.value)


def test_migrate_index_copies_sqlite_to_postgresql(start_server, postgres, tmp_path):
    data = tmp_path / "data"
    build(tmp_path / "corpus")
    minipacs("import", "--data", str(data), str(tmp_path / "corpus"))
    keys = {"StudyInstanceUID": "", "PatientName": "", "ModalitiesInStudy": ""}
    sqlite_server = start_server(data=data, index="")
    before = sorted(str(a.to_json_dict()) for a in find_studies(sqlite_server, keys))
    sqlite_server.stop()
    add_user(data, "reader", "viewer", "a long enough password")
    with Archive(data, fsync=False) as archive:  # rows of every other kind, copied too
        archive.worklist.add(WORKLIST_ITEM)
    tables = [model._meta.table_name for model in COPY_ORDER]
    counts = {t: index_rows(data, f"SELECT count(*) FROM {t}")[0][0] for t in tables}
    assert counts["worklistitem"] == counts["apitoken"] == 1

    url = postgres.database()
    result = minipacs("migrate-index", "--data", str(data), "--to", url)
    stats = json.loads(minipacs("stats", "--data", str(data), "--json").stdout)
    count = stats["instances"]
    assert f"patient: {stats['patients']}  study: {stats['studies']}" in result.stdout
    assert f"series: {stats['series']}  instance: {count}" in result.stdout
    assert "copying the index" in result.stderr

    server = start_server(data=data, index=url)
    after = sorted(str(a.to_json_dict()) for a in find_studies(server, keys))
    assert after == before
    for table, rows in counts.items():  # every table: worklist, users, queue, feed...
        assert server.rows(f"SELECT count(*) FROM {table}") == [(rows,)], table
    storescu(server.port, *make_study(tmp_path / "new", 2, size=32))  # ids after the copied
    assert server.rows("SELECT count(*) FROM instance") == [(count + 2,)]
    server.stop()
    again = minipacs("migrate-index", "--data", str(data), "--to", url, check=False)
    assert again.returncode == 2
    assert "not empty" in again.stderr


def find_studies(server, keys):
    return scu.find(scu.Remote(port=server.port), scu.identifier("STUDY", keys))
