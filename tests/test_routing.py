"""Auto-routing: rules pick what arrives, a durable queue in the index forwards it — to a
dcmtk storescp that is down, then up again after a restart of minipacs, to a DICOMweb
server (a second minipacs) over STOW-RS, and whole studies once they are stable."""

import json
import subprocess
import time

import pydicom
import pytest
from conftest import TEST_FILES
from conftest import free_port
from conftest import index_args
from conftest import minipacs
from conftest import storescu
from make_study import make_study

pytestmark = pytest.mark.usefixtures("engine")  # the queue is a table: both engines


def storescp(port: int, out) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        ["storescp", "-aet", "DEST", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def queue(server) -> list[dict]:
    result = minipacs("queue", "--json", "--data", str(server.data), *index_args(server.index))
    return [json.loads(line) for line in result.stdout.splitlines()]


def wait_until(check, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


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
    receiver = storescp(port, received)
    time.sleep(0.5)  # listening
    storescu(server.port, study[0])
    assert wait_until(lambda: len(list(received.iterdir())) == 1)
    receiver.terminate()
    receiver.wait(10)
    storescu(server.port, *study[1:], TEST_FILES / "MR_small.dcm")  # MR: not for this route
    assert wait_until(lambda: len(queue(server)) == 2 and all(i["attempts"] for i in queue(server)))
    waiting = queue(server)
    assert {i["sop_uid"] for i in waiting} == {pydicom.dcmread(p).SOPInstanceUID for p in study[1:]}
    assert all(i["last_error"] and i["status"] in ("pending", "sending") for i in waiting)
    server.stop()
    receiver = storescp(port, received)
    try:
        server.start()  # the queue was in the index: nothing lost
        assert wait_until(lambda: len(list(received.iterdir())) == 3)
        assert wait_until(lambda: queue(server) == [])
    finally:
        receiver.terminate()
        receiver.wait(10)
    trail = minipacs(
        "audit", "--event", "export", "--data", str(server.data), *index_args(server.index)
    ).stdout
    assert "auto-routing" in trail


def test_a_stable_study_goes_as_a_whole(start_server, tmp_path):
    port, received = free_port(), tmp_path / "received"
    receiver = storescp(port, received)
    try:
        server = routed_server(start_server, tmp_path, port, "DEST stable=3")
        study = make_study(tmp_path / "study", 2, size=16)
        storescu(server.port, study[0])
        time.sleep(1)
        storescu(server.port, study[1])  # the study is not stable yet: the wait starts again
        (item,) = queue(server)
        assert (
            item["sop_uid"] is None
            and item["study_uid"] == pydicom.dcmread(study[0]).StudyInstanceUID
        )
        time.sleep(1.5)
        assert list(received.iterdir()) == []
        assert wait_until(lambda: len(list(received.iterdir())) == 2)
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
    assert wait_until(lambda: queue(server) == [])
