"""Auto-routing: rules pick what arrives, a durable queue in the index forwards it — to a
dcmtk storescp that is down, then up again after a restart of minipacs, to a DICOMweb
server (a second minipacs) over STOW-RS, and whole studies once they are stable."""

import datetime
import json

import pydicom
import pytest
from conftest import TEST_FILES
from conftest import free_port
from conftest import index_args
from conftest import minipacs
from conftest import storescp
from conftest import storescu
from conftest import wait_until
from make_study import make_study

pytestmark = pytest.mark.usefixtures("engine")  # the queue is a table: both engines


def queue(server) -> list[dict]:
    """The queue as `minipacs queue --json` shows it."""
    result = minipacs("queue", "--json", "--data", str(server.data), *index_args(server.index))
    return [json.loads(line) for line in result.stdout.splitlines()]


def attempts(server) -> list[int]:
    """Attempts of each queued item, read from the index here: cheap enough to poll (a
    `minipacs queue` a poll started a Python process every 0.2 s)."""
    return [count for (count,) in server.rows("SELECT attempts FROM routeitem")]


def routed_server(start_server, tmp_path, port: int, *rules: str):
    config = tmp_path / "routes.toml"
    config.write_text(f"route = {json.dumps(list(rules))}\nroute_retry = 1\n")
    return start_server("--config", str(config), "--peer", f"DEST=127.0.0.1:{port}")


def test_a_peer_stopped_and_restarted_gets_everything(start_server, tmp_path):
    """storescp takes the first instance, is stopped; the next ones wait in the queue,
    across a restart of minipacs too, and arrive once storescp is back."""
    port, received = free_port(), tmp_path / "received"
    server = routed_server(start_server, tmp_path, port, "DEST modality=CT")
    study = make_study(tmp_path / "study", 3, size=16)
    receiver = storescp(port, received, "-aet", "DEST")
    storescu(server.port, study[0])
    assert wait_until(lambda: len(list(received.iterdir())) == 1)
    receiver.terminate()
    receiver.wait(10)
    storescu(server.port, *study[1:], TEST_FILES / "MR_small.dcm")  # MR: not for this route
    assert wait_until(lambda: len(tries := attempts(server)) == 2 and all(tries))
    waiting = queue(server)
    assert {i["sop_uid"] for i in waiting} == {pydicom.dcmread(p).SOPInstanceUID for p in study[1:]}
    assert all(i["last_error"] and i["status"] in ("pending", "sending") for i in waiting)
    server.stop()
    receiver = storescp(port, received, "-aet", "DEST")
    try:
        server.start()  # the queue was in the index: nothing lost
        assert wait_until(lambda: len(list(received.iterdir())) == 3)
        assert wait_until(lambda: attempts(server) == [])
        assert queue(server) == []
    finally:
        receiver.terminate()
        receiver.wait(10)
    trail = minipacs(
        "audit", "--event", "export", "--data", str(server.data), *index_args(server.index)
    ).stdout
    assert "auto-routing" in trail


def utc(value) -> datetime.datetime:
    """A naive UTC time from the index (a datetime, or text on SQLite) as an aware one."""
    return datetime.datetime.fromisoformat(str(value)).replace(tzinfo=datetime.UTC)


def test_a_stable_study_goes_as_a_whole(start_server, tmp_path):
    """One queue item for the study, its wait started again by each new instance, sent
    whole once due: checked on the queue's own times, no window on the test's clock."""
    port, received = free_port(), tmp_path / "received"
    receiver = storescp(port, received, "-aet", "DEST")
    try:
        server = routed_server(start_server, tmp_path, port, "DEST stable=3")
        study = make_study(tmp_path / "study", 2, size=16)
        storescu(server.port, *study)
        ((study_uid, sop_uid, created, due),) = server.rows(
            "SELECT study_uid, sop_uid, created_at, due_at FROM routeitem"
        )
        assert sop_uid is None and study_uid == pydicom.dcmread(study[0]).StudyInstanceUID
        # Due 3 s after the second instance, not the first: the wait started again.
        assert utc(due) - utc(created) > datetime.timedelta(seconds=3)
        assert wait_until(lambda: len(list(received.iterdir())) == 2)
        for path in received.iterdir():  # written once the item fell due (mtime is coarse)
            written = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
            assert written > utc(due) - datetime.timedelta(seconds=0.1), path.name
        assert wait_until(lambda: attempts(server) == [])
        assert queue(server) == []
    finally:
        receiver.terminate()
        receiver.wait(10)


def test_stow_rs_to_another_dicomweb_server(start_server, tmp_path):
    target = start_server(data=tmp_path / "target", index="")  # an index of its own
    server = routed_server(
        start_server, tmp_path, free_port(), f"{target.url}/dicom-web match=PatientID:1C*"
    )
    storescu(server.port, TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm")
    assert wait_until(lambda: len(list(target.data.glob("*/*/*.dcm"))) == 1)
    (arrived,) = target.data.glob("*/*/*.dcm")
    assert pydicom.dcmread(arrived).PatientID == "1CT1"
    assert wait_until(lambda: attempts(server) == [])
    assert queue(server) == []
