"""DICOM access control: one association policy (pacs.policy), real dcmtk clients."""

import json

import pydicom
import pytest
from conftest import TEST_FILES
from conftest import minipacs
from conftest import run
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pacs import scu
from pacs.config import Config
from pacs.config import ConfigError
from pacs.config import load
from pacs.config import parse_peer

CT = TEST_FILES / "CT_small.dcm"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def echo(server, calling: str = "ECHOSCU", called: str = "MINIPACS"):
    return run(
        "echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(server.port), check=False
    )


def find(server, calling: str):
    return run(
        "findscu",
        "-S",
        "-aet",
        calling,
        "-aec",
        "MINIPACS",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        str(server.port),
        check=False,
    )


def audit(server) -> list[dict]:
    out = minipacs("audit", "--data", str(server.data), "--event", "rejected", "--json").stdout
    return [json.loads(line) for line in out.splitlines()]


def test_wrong_called_ae_is_rejected(server):
    result = echo(server, called="SOMEONE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr
    assert "called AE 'SOMEONE' is not us" in server.log()
    assert echo(server).returncode == 0


def test_known_ae_gets_only_its_services(start_server):
    server = start_server("--peer", "CT1=127.0.0.1:1?allow=echo+store&check_host=yes")
    assert echo(server, "CT1").returncode == 0
    assert (
        run(
            "storescu", "-aet", "CT1", "-aec", "MINIPACS", "127.0.0.1", str(server.port), str(CT)
        ).returncode
        == 0
    )
    result = find(server, "CT1")
    assert result.returncode != 0
    assert "No Acceptable Presentation Contexts" in result.stderr
    assert find(server, "WORKSTATION").returncode == 0  # unknown AEs: all, on loopback


def test_unknown_ae_denied_a_find_when_configured(start_server, tmp_path):
    server = start_server("--config", str(config(tmp_path, 'unknown_aet = "echo+store"\n')))
    assert "No Acceptable Presentation Contexts" in find(server, "STRANGER").stderr
    assert echo(server, "STRANGER").returncode == 0


def test_unknown_ae_rejected_and_audited_when_nothing_is_allowed(start_server, tmp_path):
    server = start_server("--config", str(config(tmp_path, 'unknown_aet = "none"\n')))
    result = echo(server, "STRANGER")
    assert "Calling AE Title Not Recognized" in result.stderr
    (event,) = audit(server)
    assert (event["who"], event["address"]) == ("STRANGER", "127.0.0.1")
    assert event["outcome"] == "failure: unknown calling AE"


def test_host_check_rejects_a_known_ae_from_elsewhere_by_default(start_server):
    """A peer's AE title is not a password: only its host may use it (check_host=no opts
    out). Before, `findscu -aet WS1` from any address listed every patient."""
    server = start_server(
        "--peer", "WS1=192.0.2.7:104", "--peer", "LAPTOP=192.0.2.8:104?check_host=no"
    )
    result = find(server, "WS1")
    assert "Calling AE Title Not Recognized" in result.stderr
    assert "WS1 is expected from 192.0.2.7, not 127.0.0.1" in server.log()
    assert find(server, "LAPTOP").returncode == 0
    assert [e["who"] for e in audit(server)] == ["WS1"]
    assert parse_peer("A=h:1").check_host and not parse_peer("A=h:1?check_host=no").check_host


def test_get_without_store_can_retrieve_but_not_store(start_server, tmp_path):
    server = start_server("--peer", "VIEWER=127.0.0.1:1?allow=find+get")
    ds_uid = pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID
    assert minipacs("send", "--port", str(server.port), str(CT)).returncode == 0
    viewer = scu.Remote(port=server.port, calling_aet="VIEWER")
    outcome = scu.get(viewer, "STUDY", [ds_uid], tmp_path / "got")
    assert outcome.ok and outcome.completed == 1
    # A storage association: every storage context is refused, none is left to store on.
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert not assoc.is_established
    # With C-FIND asked for too, storage contexts stay for C-GET's sub-operations (SCP
    # role): a C-STORE the viewer sends on one is refused with 0x0124.
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(CT).Status == 0x0124
    finally:
        assoc.release()


def test_unknown_aes_get_echo_and_store_beyond_loopback():
    assert Config(host="0.0.0.0").unknown_aet_services() == {"echo", "store"}
    assert Config().unknown_aet_services() == {"echo", "store", "find", "move", "get"}
    assert parse_peer("A=h:1?allow=find").allow == {"find"}
    with pytest.raises(ConfigError, match="unknown service"):
        parse_peer("A=h:1?allow=delete")
    with pytest.raises(ConfigError, match="cert= needs tls_ca"):
        load(None, {}, {"peer": ("WS1=h:1?cert=ws1",)})


def config(tmp_path, text: str):
    path = tmp_path / "minipacs.toml"
    path.write_text(text)
    return path
