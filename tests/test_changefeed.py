"""The change feed (storage.changefeed): every create, update (a replace) and delete of an
instance, numbered in commit order in the transaction of the change, on both engines;
read in-process here, over HTTP and through `minipacs changes` below."""

import json
import select
import signal
import subprocess
import sys
import time
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import ROOT
from conftest import Server
from conftest import add_user
from conftest import index_args
from conftest import index_rows
from conftest import minipacs
from conftest import storescu
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
    assert json.loads(entries[3].metadata)["0008103E"]["Value"] == ["corrected"]
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


# -- over HTTP and through `minipacs changes`, on a real server ------------------------


@pytest.fixture(scope="module")
def fed(tmp_path_factory, module_engine):
    """A server (duplicates replaced, the feed pruned after 30 days, looked at every
    second) that received three instances by C-STORE, a replacement of the second and a
    deletion of the third: entries 1-5."""
    root = tmp_path_factory.mktemp("changefeed")
    env = {"MINIPACS_CHANGEFEED_DAYS": "30", "MINIPACS_RETENTION_INTERVAL": "1"}
    server = Server(root / "data", "--duplicates", "replace", env=env, index=module_engine)
    server.start()
    server.empty_latest = feed(server, path="/changefeed/latest")  # before any change
    study = generate_uid()
    sent = [make_instance(root / "in", study, n) for n in (1, 2, 3)]
    storescu(server.port, *[path_of(root / "in", ds) for ds in sent])
    changed = pydicom.dcmread(path_of(root / "in", sent[1]))
    changed.SeriesDescription = "corrected"
    changed.save_as(root / "changed.dcm", enforce_file_format=True)
    storescu(server.port, root / "changed.dcm")
    data = ["--data", str(server.data), *index_args(module_engine)]
    minipacs("delete", *data, "--instance", sent[2].SOPInstanceUID)
    server.sent = sent
    yield server
    server.kill()


def feed(server, query: str = "", path: str = "/changefeed", **headers) -> requests.Response:
    return requests.get(f"{server.url}{path}{query}", headers=headers, timeout=30)


def test_the_feed_over_http_in_azure_s_shape(fed):
    sops = [ds.SOPInstanceUID for ds in fed.sent]

    answer = feed(fed)
    entries = answer.json()

    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Minipacs-Feed-Start"] == "1"
    assert [(e["Sequence"], e["Action"], e["SopInstanceUid"], e["State"]) for e in entries] == [
        (1, "create", sops[0], "current"),
        (2, "create", sops[1], "replaced"),
        (3, "create", sops[2], "deleted"),
        (4, "update", sops[1], "current"),
        (5, "delete", sops[2], "deleted"),
    ]
    assert list(entries[0]) == [
        "Sequence",
        "StudyInstanceUid",
        "SeriesInstanceUid",
        "SopInstanceUid",
        "Action",
        "Timestamp",
        "State",
        "Metadata",
        "Minipacs",
    ]
    assert {(e["StudyInstanceUid"], e["SeriesInstanceUid"]) for e in entries} == {
        (fed.sent[0].StudyInstanceUID, fed.sent[0].SeriesInstanceUID)
    }
    assert [e["Minipacs"]["Who"] for e in entries[:4]] == ["STORESCU"] * 4
    assert "minipacs delete" in entries[4]["Minipacs"]["Who"]
    assert entries[3]["Metadata"]["0008103E"]["Value"] == ["corrected"]
    assert entries[0]["Metadata"]["00080018"]["Value"] == [sops[0]]
    pixels = entries[0]["Metadata"]["7FE00010"]["BulkDataURI"]  # as WADO-RS metadata has it
    assert requests.get(pixels, timeout=30).status_code == 200
    assert [e["Metadata"] for e in entries[1:3] + entries[4:]] == [None, None, None]
    stamps = [datetime.fromisoformat(e["Timestamp"]) for e in entries]
    assert stamps == sorted(stamps) and stamps[0].tzinfo == UTC

    def sequences(query: str) -> list[int]:
        return [e["Sequence"] for e in feed(fed, query).json()]

    assert sequences("?limit=2") == [1, 2]
    assert sequences("?offset=2&limit=2") == [3, 4]
    assert sequences("?after=3") == [4, 5]
    assert sequences("?after=1&offset=1&limit=1") == [3]
    update = entries[3]["Timestamp"]
    assert sequences(f"?startTime={update}") == [4, 5]
    assert sequences(f"?endtime={update}") == [1, 2, 3]  # names in any case, as Azure
    assert sequences(f"?startTime={update[:-1]}%2B00:00&endTime={update[:-1]}") == []
    assert sequences("?startTime=2000-01-01&endTime=9999-12-31T23:59:59.9999999Z") == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert "Metadata" not in feed(fed, "?includemetadata=false").json()[0]

    latest = feed(fed, path="/changefeed/latest")
    assert latest.json() == entries[-1]
    empty = fed.empty_latest  # as Azure's answers its null
    assert (empty.status_code, empty.content, empty.headers["Minipacs-Feed-Start"]) == (
        204,
        b"",
        "1",
    )
    assert "Metadata" not in feed(fed, "?includeMetadata=false", "/changefeed/latest").json()


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=201", "limit=ten", "offset=-1", "after=x", "startTime=yesterday",
     "endTime=2026-13-01", "includemetadata=maybe"],
)  # fmt: skip
def test_bad_parameters_answer_400(fed, query):
    answer = feed(fed, f"?{query}")

    assert answer.status_code == 400
    assert query.split("=")[0].lower() in answer.json()["error"].lower()


def test_each_read_is_audited(fed):
    feed(fed, "?limit=3&includemetadata=false")
    feed(fed, path="/changefeed/latest")
    data = ["--data", str(fed.data), *index_args(fed.index)]

    deadline = time.monotonic() + 15
    while True:  # audit events of reads are committed with the writer's next batch
        lines = minipacs("audit", *data, "--event", "query", "--json").stdout.splitlines()
        reads = [json.loads(json.loads(line)["detail"]) for line in lines]
        reads = [r for r in reads if r["path"].startswith("/changefeed")]
        if len(reads) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {"path": "/changefeed", "query": "limit=3&includemetadata=false"}.items() <= reads[
        -2
    ].items()
    assert reads[-2]["entries"] == 3
    assert reads[-1]["path"] == "/changefeed/latest"


def changes(server, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return minipacs("changes", "--url", server.url, *args, **kwargs)


def test_minipacs_changes_since_as_json_lines_and_as_text(fed):
    if fed.index:
        pytest.skip("the command reads over HTTP: the engine makes no difference")
    as_json = changes(fed, "--since", "2", "--json").stdout.splitlines()
    as_text = changes(fed).stdout.splitlines()

    entries = [json.loads(line) for line in as_json]
    assert [(e["Sequence"], e["Action"]) for e in entries] == [
        (3, "create"),
        (4, "update"),
        (5, "delete"),
    ]
    assert entries == feed(fed, "?after=2&includemetadata=false").json()
    assert len(as_text) == 5
    fields = as_text[3].split()
    assert fields[0] == "4" and fields[2:5] == ["update", "current", entries[1]["StudyInstanceUid"]]
    assert fields[-1] == "STORESCU"


def test_minipacs_changes_follow_picks_up_a_new_instance(fed, tmp_path):
    if fed.index:
        pytest.skip("the command reads over HTTP: the engine makes no difference")
    last = feed(fed, path="/changefeed/latest").json()["Sequence"]
    command = [sys.executable, "-m", "pacs", "changes", "--url", fed.url, "--since", str(last)]
    follower = subprocess.Popen(
        [*command, "--follow", "--json", "--interval", "0.2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        new = make_instance(tmp_path, generate_uid(), 1)
        storescu(fed.port, path_of(tmp_path, new))
        ready = select.select([follower.stdout], [], [], 30)[0]
        line = follower.stdout.readline() if ready else ""
        follower.send_signal(signal.SIGINT)
        _, errors = follower.communicate(timeout=30)
    finally:
        follower.kill()

    assert line, "no entry within 30 s"
    entry = json.loads(line)
    assert (entry["Sequence"], entry["Action"]) == (last + 1, "create")
    assert entry["SopInstanceUid"] == new.SOPInstanceUID
    assert follower.returncode == 130 and "Traceback" not in errors


def test_old_entries_are_pruned_and_the_feed_says_where_it_starts(fed):
    fed.rows("UPDATE changefeed SET at = ? WHERE sequence <= 2", "2001-01-01T00:00:00.000000Z")

    deadline = time.monotonic() + 30
    while feed(fed, "?limit=1").headers["Minipacs-Feed-Start"] == "1":
        assert time.monotonic() < deadline, "not pruned within 30 s"
        time.sleep(0.2)

    answer = feed(fed)
    assert answer.headers["Minipacs-Feed-Start"] == "3"
    assert answer.json()[0]["Sequence"] == 3
    if not fed.index:
        warned = changes(fed, "--since", "0").stderr
        assert "entries 1 to 2 were pruned unread" in warned


def test_with_users_the_feed_needs_a_token(fed):
    if fed.index:
        pytest.skip("access control does not depend on the engine")
    token = add_user(fed.data, "reader", "viewer", "correct horse battery")

    refused = feed(fed)
    wrong = feed(fed, Authorization="Bearer not-a-token")
    allowed = feed(fed, "?limit=1", Authorization=f"Bearer {token}")
    without = changes(fed, check=False)
    with_token = changes(fed, "--since", "4", env={"MINIPACS_TOKEN": token})

    assert refused.status_code == wrong.status_code == 401
    assert "bearer" in refused.json()["error"].lower()
    assert allowed.status_code == 200 and len(allowed.json()) == 1
    assert without.returncode == 1 and "HTTP 401" in without.stderr
    assert with_token.stdout.split()[0] == "5"
