"""`minipacs delete`: an instance, a series, a study or a patient; files and rows together,
counts kept right, audited, finished at start-up after a crash."""

import json
import os

import pydicom
import pytest
from conftest import index_args
from conftest import minipacs
from conftest import storescu
from make_study import make_study

from pacs import scu

pytestmark = pytest.mark.usefixtures("engine")


def delete(server, *args: str, check: bool = True):
    return minipacs(
        "delete", "--data", str(server.data), *index_args(server.index), *args, check=check
    )


def studies(server) -> dict[str, int]:
    keys = {"StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""}
    answers = scu.find(scu.Remote(port=server.port), scu.identifier("STUDY", keys))
    return {a.StudyInstanceUID: int(a.NumberOfStudyRelatedInstances) for a in answers}


def test_delete_instance_series_study_patient(server, tmp_path):
    first = make_study(tmp_path / "a", 4, size=32)
    second = make_study(tmp_path / "b", 2, size=32)  # the same patient (CT_small's)
    storescu(server.port, *first, *second)
    a, b = (pydicom.dcmread(paths[0]) for paths in (first, second))
    victim = pydicom.dcmread(first[1])

    result = delete(server, "--instance", victim.SOPInstanceUID)
    assert "instances deleted: 1" in result.stdout
    assert studies(server) == {a.StudyInstanceUID: 3, b.StudyInstanceUID: 2}
    assert not (
        server.data / a.StudyInstanceUID / a.SeriesInstanceUID / f"{victim.SOPInstanceUID}.dcm"
    ).exists()
    assert server.rows("SELECT num_studies, num_series, num_instances FROM patient") == [(2, 2, 5)]

    delete(server, "--series", b.SeriesInstanceUID)  # its only series: the study goes too
    assert studies(server) == {a.StudyInstanceUID: 3}
    assert not (server.data / b.StudyInstanceUID / b.SeriesInstanceUID).exists()
    assert server.rows("SELECT num_studies, num_instances FROM patient") == [(1, 3)]

    delete(server, "--patient", a.PatientID)
    assert studies(server) == {}
    assert server.rows("SELECT count(*) FROM patient") == [(0,)]
    assert list((server.data / ".trash").iterdir()) == []

    missing = delete(server, "--study", "1.2.3", check=False)
    assert missing.returncode == 1 and "1.2.3: nothing stored under it" in missing.stdout
    audit = minipacs(
        "audit",
        "--data",
        str(server.data),
        *index_args(server.index),
        "--event",
        "delete",
        "--json",
    ).stdout
    levels = [json.loads(json.loads(line)["detail"])["level"] for line in audit.splitlines()]
    assert levels == ["IMAGE", "SERIES", "STUDY"]


def test_instance_deletion_interrupted_by_a_crash_is_finished(start_server, tmp_path):
    server = start_server()
    paths = make_study(tmp_path / "s", 2, size=32)
    storescu(server.port, *paths)
    server.kill()
    ds = pydicom.dcmread(paths[0])
    stored = server.data / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    (server.data / ".trash").mkdir()
    os.rename(stored, server.data / ".trash" / f"IMAGE.{ds.SOPInstanceUID}.0a1b")  # then the crash
    server.start()
    assert "1 deletion(s) finished" in server.log()
    assert studies(server) == {ds.StudyInstanceUID: 1}
    assert list((server.data / ".trash").iterdir()) == []
