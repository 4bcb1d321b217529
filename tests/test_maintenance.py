"""import, reindex, verify and stats: the archive repairs and checks itself from its files."""

import json
import os
import resource

import pydicom
from conftest import TEST_FILES
from conftest import index_args
from conftest import index_rows
from conftest import minipacs
from conftest import minipacs as run_minipacs
from make_study import make_study
from pydicom.dataset import Dataset
from test_schema import WORKLIST_ITEM

from storage import Archive
from storage import events
from storage import users
from storage.models import FROM_FILES
from storage.models import MODELS


def test_import_reindex_verify_round_trip(tmp_path, engine):
    data = tmp_path / "data"

    def minipacs(verb, *args, **kwargs):
        return run_minipacs(verb, *index_args(engine), *args, **kwargs)

    def rows(data, sql):
        return index_rows(data, sql, index=engine)

    study = make_study(tmp_path / "study", 10, size=64)
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")
    result = minipacs("import", "--data", str(data), "--json", str(tmp_path / "study"))
    summary = json.loads(result.stdout)
    assert (summary["stored"], summary["skipped"], summary["rejected"]) == (10, 1, 0)
    assert "notes.txt" in summary["details"][0]["path"]
    assert "not a DICOM Part 10 file" in summary["details"][0]["reason"]
    # Importing again stores nothing twice.
    again = json.loads(minipacs("import", "--data", str(data), "--json", *map(str, study)).stdout)
    assert (again["stored"], again["duplicate"]) == (0, 10)

    stats = json.loads(minipacs("stats", "--data", str(data), "--json").stdout)
    assert (stats["studies"], stats["series"], stats["instances"]) == (1, 1, 10)
    assert stats["bytes"] == sum(p.stat().st_size for p in data.glob("*/*/*.dcm"))
    assert minipacs("verify", "--data", str(data)).returncode == 0

    # Lose the index: reindex rebuilds it from the files alone.
    before = rows(data, "SELECT sop_uid, path, size, sha256 FROM instance ORDER BY sop_uid")
    if not engine:  # SQLite: the index file itself is lost
        (data / "index.sqlite").unlink()
        for suffix in ("-wal", "-shm"):
            (data / f"index.sqlite{suffix}").unlink(missing_ok=True)
    result = minipacs("reindex", "--data", str(data))
    assert "indexed: 10" in result.stdout
    after = rows(data, "SELECT sop_uid, path, size, sha256 FROM instance ORDER BY sop_uid")
    assert after == before
    assert rows(data, "SELECT num_instances FROM study") == [(10,)]

    # Corrupt one file (same size), delete another: verify names both, exits 1.
    victim, gone = sorted(data.glob("*/*/*.dcm"))[:2]
    content = bytearray(victim.read_bytes())
    content[-1] ^= 0xFF
    victim.write_bytes(bytes(content))
    gone.unlink()
    result = minipacs("verify", "--data", str(data), check=False)
    assert result.returncode == 1
    assert f"{victim.relative_to(data)}: SHA-256 differs" in result.stdout
    assert f"{gone.relative_to(data)}: file is missing" in result.stdout
    assert "problems: 2" in result.stdout


def test_import_rejects_with_reasons_and_exits_1(tmp_path):
    data = tmp_path / "data"
    result = minipacs(
        "import",
        "--data",
        str(data),
        str(TEST_FILES / "MR_truncated.dcm"),
        str(TEST_FILES / "CT_small.dcm"),
        check=False,
    )
    assert result.returncode == 1
    assert "MR_truncated.dcm: rejected: dataset truncated" in result.stdout
    assert "stored: 1" in result.stdout


def test_start_up_indexes_unindexed_files_and_reports_missing(start_server, tmp_path, engine):
    data = tmp_path / "data"
    study = make_study(tmp_path / "study", 3, size=64)
    minipacs("import", "--data", str(data), *index_args(engine), *map(str, study))
    stray = data / ".incoming" / "leftover.part"
    stray.write_bytes(b"half a dataset")
    os.utime(stray, (0, 0))  # old: a shared index keeps recent ones (another node's)
    first, second, _ = sorted(data.glob("*/*/*.dcm"))
    index_rows(
        data, "DELETE FROM instance WHERE path = ?", str(first.relative_to(data)), index=engine
    )
    second.unlink()
    server = start_server(data=data)
    log = server.log()
    assert (
        "1 temporary file(s) removed, 0 deletion(s) finished, 1 file(s) indexed, 1 problem(s)"
        in log
    )
    assert f"{second.relative_to(data)}: indexed but the file is missing" in log
    assert not stray.exists()
    assert server.rows("SELECT count(*) FROM instance") == [(3,)]


def test_reindex_refuses_while_a_server_runs(server):
    result = minipacs("reindex", "--data", str(server.data), check=False)
    assert result.returncode == 2
    assert "stop it first" in result.stderr


def test_import_without_room_rejects_that_file_alone(tmp_path):
    """`minipacs import` receives through the archive's one spool, as STOW-RS does: a file
    the disk has no room for is rejected (and counted), the others are stored, nothing
    is left in .incoming. RLIMIT_FSIZE makes the write that crosses it fail with EFBIG,
    the errno of a full disk for a file that large."""
    data = tmp_path / "data"
    small = make_study(tmp_path / "small", 2, size=64)
    big = make_study(tmp_path / "big", 1, size=1024)  # ~2 MiB
    minipacs("import", "--data", str(data), str(small[0]))  # the index, below the limit

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = minipacs(
        "import", "--data", str(data), "--json", str(big[0]), str(small[1]),
        check=False, preexec_fn=limited,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["stored"], summary["rejected"]) == (1, 1)
    assert "no space" in summary["details"][0]["reason"]
    assert list((data / ".incoming").iterdir()) == []
    assert len(list(data.glob("*/*/*.dcm"))) == 2


def test_reindex_of_a_readable_index_keeps_what_the_files_cannot_tell(tmp_path, engine):
    """Only the rows the files tell are rebuilt (models.FROM_FILES); every other table keeps
    its rows: users and tokens (still able to log in), the audit trail (its chain intact,
    the reindex appended to it), the worklist and an MPPS step of it, a subscription and
    the notifications it waits to send, the change feed; and a study's protection."""
    data = tmp_path / "data"
    study = make_study(tmp_path / "study", 3, size=32)
    with Archive(data, fsync=False, index_url=engine) as archive:
        archive.events.add(events.make("http://127.0.0.1:9/", ["instance.created"], "s" * 16))
        for path in study:
            archive.import_file(path)
        archive.accounts(users.add, "ana", "admin", "a long enough password", write=True)
        token = archive.accounts(users.issue_token, "ana", 30, write=True)[0]
        archive.worklist.add({**WORKLIST_ITEM, "AccessionNumber": "A1"})
        step = Dataset()
        step.PerformedProcedureStepStatus = "IN PROGRESS"
        step.ScheduledStepAttributesSequence = [Dataset()]
        step.ScheduledStepAttributesSequence[0].AccessionNumber = "A1"
        archive.worklist.create_step("1.2.3.4", step)
        study_uid = pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
        assert archive.retention.set_protected(study_uid, True, who="test")

    tables = [model._meta.table_name for model in MODELS if model not in FROM_FILES]
    before = {t: index_rows(data, f"SELECT * FROM {t} ORDER BY id", index=engine) for t in tables}
    assert all(before[t] for t in ("webuser", "apitoken", "routeitem", "performedstep"))
    instances = "SELECT sop_uid, path, size, sha256 FROM instance ORDER BY sop_uid"
    files = index_rows(data, instances, index=engine)
    index_rows(data, "UPDATE instance SET sha256 = 'stale'", index=engine)  # rebuilt below

    result = minipacs("reindex", "--data", str(data), *index_args(engine))
    assert "indexed: 3" in result.stdout

    assert index_rows(data, instances, index=engine) == files
    after = {t: index_rows(data, f"SELECT * FROM {t} ORDER BY id", index=engine) for t in tables}
    grown = ("auditevent", "changefeed")  # the reindex's own event, its three creates
    assert {t: after[t] for t in tables if t not in grown} == {
        t: before[t] for t in tables if t not in grown
    }
    for table, more in (("auditevent", 1), ("changefeed", 3)):
        assert after[table][: len(before[table])] == before[table]
        assert len(after[table]) == len(before[table]) + more
    with Archive(data, fsync=False, index_url=engine) as archive:
        assert archive.verify_audit() == []
        last = list(archive.audit_events())[-1]
        assert (last.event, last.outcome) == ("reindex", "success")
        assert last.who.endswith("(minipacs reindex)")
        assert json.loads(last.detail) == {"indexed": 3, "problems": 0}
        assert archive.accounts(users.by_password, "ana", "a long enough password")
        assert archive.accounts(users.by_token, token) == ("ana", "admin")
    protected = "SELECT protected FROM study WHERE study_uid = ?"
    assert index_rows(data, protected, study_uid, index=engine) == [(True,)]
