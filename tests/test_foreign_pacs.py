"""Our SCU against a PACS we did not write: dcmtk's dcmqrscp, configured by the test."""

import subprocess
import time

import pytest
from conftest import free_port
from conftest import run
from corpus import build

from pacs import scu


@pytest.fixture
def dcmqrscp(tmp_path, start_server):
    """dcmqrscp with one RW archive AE (DCMQR) that can C-MOVE to a minipacs (MINIPACS)."""
    ours = start_server(data=tmp_path / "ours")
    port = free_port()
    storage = tmp_path / "dcmqr"
    storage.mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        "HostTable BEGIN\n"
        f"minipacs = (MINIPACS, 127.0.0.1, {ours.port})\n"
        "HostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nDCMQR {storage} RW (200, 1024mb) ANY\nAETable END\n"
    )
    proc = subprocess.Popen(
        ["dcmqrscp", "-c", str(config), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while run("echoscu", "-aec", "DCMQR", "127.0.0.1", str(port), check=False).returncode:
        assert time.monotonic() < deadline, "dcmqrscp did not start"
        time.sleep(0.1)
    made = build(tmp_path / "corpus")
    files = sorted((tmp_path / "corpus").glob("*.dcm"))
    run("storescu", "-aec", "DCMQR", "127.0.0.1", str(port), *map(str, files))
    yield scu.Remote(port=port, aet="DCMQR"), made, ours
    proc.terminate()
    proc.wait(10)


def test_find_against_dcmqrscp(dcmqrscp):
    remote, made, _ = dcmqrscp
    query = scu.identifier("STUDY", {"PatientID": "PID1", "StudyInstanceUID": "", "StudyDate": ""})
    answers = list(scu.find(remote, query, "PATIENT"))
    assert {a.StudyInstanceUID for a in answers} == {made["A"]["uid"], made["B"]["uid"]}
    assert scu.echo(remote) == 0


def test_get_from_dcmqrscp(dcmqrscp, tmp_path):
    remote, made, _ = dcmqrscp
    outcome = scu.get(remote, "STUDY", [made["C"]["uid"]], tmp_path / "got")
    assert outcome.ok, outcome
    assert outcome.completed == 3
    assert len(list((tmp_path / "got").iterdir())) == 3


def test_move_from_dcmqrscp_into_minipacs(dcmqrscp):
    remote, made, ours = dcmqrscp
    outcome = scu.move(remote, "STUDY", [made["A"]["uid"]], "MINIPACS")
    assert outcome.ok, outcome
    assert outcome.completed == 5
    assert len(list(ours.data.glob(f"{made['A']['uid']}/*/*.dcm"))) == 5


def test_send_to_dcmqrscp(dcmqrscp, tmp_path):
    # One association: dcmqrscp's forked children sometimes refuse concurrent stores.
    remote, _, _ = dcmqrscp
    from make_study import make_study

    paths = make_study(tmp_path / "extra", 12, size=32)
    outcome = scu.send(remote, paths)
    assert outcome.ok and outcome.completed == 12
