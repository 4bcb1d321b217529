"""Modality Worklist and MPPS: items imported with `minipacs worklist import` and added
over the HTTP API, queried with dcmtk's `findscu -W` (matching on the Scheduled Procedure
Step Sequence, date ranges, wildcards), and moved through IN PROGRESS to COMPLETED by
pynetdicom as the modality's MPPS SCU, with the state checks of PS3.4 F.7."""

import csv

import pydicom
import pytest
import requests
from conftest import Server
from conftest import index_args
from conftest import minipacs
from conftest import run
from pydicom.dataset import Dataset
from pynetdicom import AE

MPPS = "1.2.840.10008.3.1.2.3.3"
ITEMS = [
    {"PatientID": "P1", "PatientName": "DOE^JANE", "Modality": "CT", "AccessionNumber": "A1",
     "ScheduledStationAETitle": "CT01", "ScheduledProcedureStepStartDate": "20261126",
     "ScheduledProcedureStepStartTime": "0900", "RequestedProcedureDescription": "CT head"},
    {"PatientID": "P2", "PatientName": "DOE^JOHN", "Modality": "CT", "AccessionNumber": "A2",
     "ScheduledStationAETitle": "CT01", "ScheduledProcedureStepStartDate": "20261126",
     "ScheduledProcedureStepStartTime": "1000"},
    {"PatientID": "P3", "PatientName": "ROE^RICHARD", "Modality": "MR", "AccessionNumber": "A3",
     "ScheduledStationAETitle": "MR01", "ScheduledProcedureStepStartDate": "20261127"},
]  # fmt: skip
# The MPPS test's own items (it changes their states): on a station, with names, that the
# queries of ITEMS do not match.
MPPS_ITEMS = [
    {**ITEMS[0], "PatientID": "M1", "PatientName": "POE^MARY", "AccessionNumber": "MA1",
     "ScheduledStationAETitle": "CT02"},
    {**ITEMS[1], "PatientID": "M2", "PatientName": "POE^MARK", "AccessionNumber": "MA2",
     "ScheduledStationAETitle": "CT02"},
]  # fmt: skip


@pytest.fixture(scope="module")
def worklist_server(tmp_path_factory, module_engine):
    """One server per engine for the module, its worklist imported with `minipacs worklist
    import`; each test changes only items of its own."""
    root = tmp_path_factory.mktemp("worklist")
    source = root / "worklist.csv"
    columns = sorted({k for item in ITEMS for k in item})
    with source.open("w", newline="") as fp:
        writer = csv.DictWriter(fp, columns)
        writer.writeheader()
        writer.writerows(ITEMS + MPPS_ITEMS)
    server = Server(root / "data", index=module_engine).start()
    result = minipacs("worklist", "import", str(source), "--data", str(server.data),
                      *index_args(server.index))  # fmt: skip
    assert "items added: 5" in result.stdout
    yield server
    server.kill()


def findscu_worklist(server, tmp_path, *keys: str) -> list[Dataset]:
    out = tmp_path / f"answers-{len(list(tmp_path.glob('answers-*')))}"
    out.mkdir()
    step = "ScheduledProcedureStepSequence[0]"
    returned = [f"{step}.{k}" for k in ("Modality", "ScheduledStationAETitle",
                "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStatus")]  # fmt: skip
    given = {k.split("=")[0] for k in keys}
    wanted = [*keys, *(k for k in [*returned, "PatientName", "PatientID", "AccessionNumber"]
                       if k not in given)]  # fmt: skip
    args = [a for key in wanted for a in ("-k", key)]
    run("findscu", "-W", "-X", "-od", str(out), "-aec", "MINIPACS", *args,
        "127.0.0.1", str(server.port))  # fmt: skip
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())]


def step(key: str, value: str) -> str:
    return f"ScheduledProcedureStepSequence[0].{key}={value}"


def test_findscu_worklist_matching(worklist_server, tmp_path):
    ct01 = findscu_worklist(worklist_server, tmp_path, step("Modality", "CT"),
                            step("ScheduledStationAETitle", "CT01"),
                            step("ScheduledProcedureStepStartDate", "20261126"))  # fmt: skip
    assert sorted(a.PatientID for a in ct01) == ["P1", "P2"]
    answer = next(a for a in ct01 if a.PatientID == "P1")
    assert str(answer.PatientName) == "DOE^JANE" and answer.AccessionNumber == "A1"
    (scheduled,) = answer.ScheduledProcedureStepSequence
    assert scheduled.Modality == "CT" and scheduled.ScheduledProcedureStepStatus == "SCHEDULED"
    days = findscu_worklist(worklist_server, tmp_path,
                            step("ScheduledProcedureStepStartDate", "20261127-"))  # fmt: skip
    assert [a.PatientID for a in days] == ["P3"]
    names = findscu_worklist(worklist_server, tmp_path, "PatientName=doe*")  # case-insensitive
    assert sorted(a.PatientID for a in names) == ["P1", "P2"]
    assert findscu_worklist(worklist_server, tmp_path, step("Modality", "US")) == []


def test_the_http_api(worklist_server):
    url = f"{worklist_server.url}/api/worklist"
    added = requests.post(url, json={**ITEMS[2], "PatientID": "P4", "AccessionNumber": "A4"},
                          timeout=10)  # fmt: skip
    assert added.status_code == 201
    (new_id,) = added.json()["ids"]
    listed = requests.get(url, timeout=10).json()
    assert [i["patient_id"] for i in listed].count("P4") == 1
    bad = requests.post(url, json={"PatientID": "P5"}, timeout=10)
    assert bad.status_code == 400 and "missing" in bad.json()["error"]
    assert requests.delete(f"{url}/{new_id}", timeout=10).status_code == 204
    assert requests.delete(f"{url}/{new_id}", timeout=10).status_code == 404


def performed(accession: str, status: str) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepID = "PPS1"
    ds.Modality = "CT"
    ref = Dataset()
    ref.AccessionNumber = accession
    ds.ScheduledStepAttributesSequence = [ref]
    return ds


def test_mpps_moves_the_item_through_its_states(worklist_server, tmp_path):
    modality = AE(ae_title="CT02")  # the station of MPPS_ITEMS
    modality.add_requested_context(MPPS)
    assoc = modality.associate("127.0.0.1", worklist_server.port, ae_title="MINIPACS")
    assert assoc.is_established
    uid = pydicom.uid.generate_uid()
    status, _ = assoc.send_n_create(performed("MA1", "IN PROGRESS"), MPPS, uid)
    assert status.Status == 0x0000
    status, _ = assoc.send_n_create(performed("MA1", "IN PROGRESS"), MPPS, uid)
    assert status.Status == 0x0111  # duplicate
    status, _ = assoc.send_n_create(performed("MA2", "COMPLETED"), MPPS, pydicom.uid.generate_uid())
    assert status.Status == 0x0106  # must start IN PROGRESS
    statuses = {i["patient_id"]: i["status"] for i in requests.get(
        f"{worklist_server.url}/api/worklist", timeout=10).json()}  # fmt: skip
    assert statuses["M1"] == "STARTED" and statuses["M2"] == "SCHEDULED"

    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    status, _ = assoc.send_n_set(done, MPPS, uid)
    assert status.Status == 0x0000
    status, _ = assoc.send_n_set(done, MPPS, uid)
    assert status.Status == 0x0110  # no longer updatable
    status, _ = assoc.send_n_set(done, MPPS, pydicom.uid.generate_uid())
    assert status.Status == 0x0112  # no such instance
    assoc.release()
    remaining = findscu_worklist(worklist_server, tmp_path, step("Modality", "CT"),
                                 step("ScheduledStationAETitle", "CT02"))  # fmt: skip
    assert [a.PatientID for a in remaining] == ["M2"]  # completed steps leave the worklist
