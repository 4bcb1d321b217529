"""Storage Commitment Push Model (PS3.4 Annex J) with pynetdicom as the modality: the
report comes over the requesting association while it is open, else over a new one to
the modality; instances not stored, or whose file changed on disk, are not committed."""

import time

import pydicom
import pytest
from conftest import Server
from conftest import free_port
from conftest import minipacs
from conftest import storescu
from make_study import make_study
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom import evt

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
WELL_KNOWN = "1.2.840.10008.1.20.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def commitment_request(transaction: str, references: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = []
    for sop_class, sop_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
        ds.ReferencedSOPSequence.append(item)
    return ds


def wait_for(reports: list, seconds: float = 15) -> tuple[int, Dataset]:
    deadline = time.monotonic() + seconds
    while not reports and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reports, "no N-EVENT-REPORT"
    return reports[0]


def recorder(reports: list):
    def on_report(event):
        reports.append((event.event_type, event.event_information))
        return 0x0000, None

    return on_report


def stored_study(server, tmp_path, count: int) -> list[Dataset]:
    files = make_study(tmp_path / "study", count, size=16)
    storescu(server.port, *files)
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in files]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, knowing MODALITY (a listener a test starts on
    `server.modality_port`); each test commits only instances it stored itself."""
    port = free_port()
    running = Server(
        tmp_path_factory.mktemp("commitment") / "data", "--peer", f"MODALITY=127.0.0.1:{port}"
    )
    running.modality_port = port
    yield running.start()
    running.kill()


def test_report_over_the_requesting_association(server, tmp_path):
    stored = stored_study(server, tmp_path, 3)
    reports: list = []
    modality = AE(ae_title="MODALITY")
    modality.add_requested_context(STORAGE_COMMITMENT)
    assoc = modality.associate(
        "127.0.0.1",
        server.port,
        ae_title="MINIPACS",
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, recorder(reports))],
    )
    assert assoc.is_established
    transaction = pydicom.uid.generate_uid()
    references = [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in stored] + [(CT, "1.2.3.4.5")]
    status, _ = assoc.send_n_action(
        commitment_request(transaction, references), 1, STORAGE_COMMITMENT, WELL_KNOWN
    )
    assert status.Status == 0x0000
    event_type, report = wait_for(reports)
    assoc.release()
    assert event_type == 2  # some failed
    assert report.TransactionUID == transaction
    assert sorted(r.ReferencedSOPInstanceUID for r in report.ReferencedSOPSequence) == sorted(
        ds.SOPInstanceUID for ds in stored
    )
    (failed,) = report.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == "1.2.3.4.5" and failed.FailureReason == 0x0112


def test_report_over_a_new_association_and_a_changed_file(server, tmp_path):
    reports: list = []
    modality = AE(ae_title="MODALITY")
    # minipacs, the requestor of this association, acts as the SCP (role selection)
    modality.add_supported_context(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
    listener = modality.start_server(
        ("127.0.0.1", server.modality_port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, recorder(reports))],
    )
    try:
        stored = stored_study(server, tmp_path, 2)
        changed = next(server.data.glob(f"*/*/{stored[1].SOPInstanceUID}.dcm"))
        changed.write_bytes(changed.read_bytes() + b"\0\0")  # the disk no longer holds it
        caller = AE(ae_title="MODALITY")
        caller.add_requested_context(STORAGE_COMMITMENT)
        assoc = caller.associate("127.0.0.1", server.port, ae_title="MINIPACS")
        transaction = pydicom.uid.generate_uid()
        references = [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in stored]
        status, _ = assoc.send_n_action(
            commitment_request(transaction, references), 1, STORAGE_COMMITMENT, WELL_KNOWN
        )
        assoc.release()  # at once: the report must come over a new association
        assert status.Status == 0x0000
        event_type, report = wait_for(reports)
        assert event_type == 2 and report.TransactionUID == transaction
        (committed,) = report.ReferencedSOPSequence
        assert committed.ReferencedSOPInstanceUID == stored[0].SOPInstanceUID
        (failed,) = report.FailedSOPSequence
        assert failed.ReferencedSOPInstanceUID == stored[1].SOPInstanceUID
        assert failed.FailureReason == 0x0110
        trail = minipacs("audit", "--event", "commit", "--data", str(server.data)).stdout
        assert transaction in trail
    finally:
        listener.shutdown()


def test_a_malformed_request_is_refused(server):
    modality = AE(ae_title="MODALITY")
    modality.add_requested_context(STORAGE_COMMITMENT)
    assoc = modality.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    no_references = Dataset()
    no_references.TransactionUID = pydicom.uid.generate_uid()
    status, _ = assoc.send_n_action(no_references, 1, STORAGE_COMMITMENT, WELL_KNOWN)
    assert status.Status == 0x0120  # missing attribute
    status, _ = assoc.send_n_action(no_references, 7, STORAGE_COMMITMENT, WELL_KNOWN)
    assert status.Status == 0x0123  # no such action
    assoc.release()
