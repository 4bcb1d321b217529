"""Several `minipacs serve` processes on one PostgreSQL index and one data folder."""

from concurrent.futures import ThreadPoolExecutor

import pydicom
from conftest import storescu
from make_study import make_study

from pacs import scu


def test_two_servers_ingest_concurrently_and_each_serves_everything(
    start_server, postgres, tmp_path
):
    index = postgres.database()
    data = tmp_path / "data"
    first = start_server(data=data, index=index)
    second = start_server(data=data, index=index)  # one PACS: the same AE title
    # Six studies of one patient: every instance updates the same patient row, so the two
    # servers' transactions contend for it (and may deadlock: a lost one must be retried).
    studies = [make_study(tmp_path / f"s{n}", 20, size=32) for n in range(6)]
    sends = [(first.port, paths[:10]) for paths in studies]
    sends += [(second.port, paths[10:]) for paths in studies]
    sends += [(second.port, studies[0])]  # the same instances through both servers
    errors = storescu_concurrently_to(sends)
    assert errors == []

    rows = first.rows("SELECT count(*), count(DISTINCT sop_uid) FROM instance")
    assert rows == [(120, 120)]
    assert first.rows("SELECT num_studies, num_series, num_instances FROM patient") == [(6, 6, 120)]
    assert first.rows("SELECT DISTINCT num_series, num_instances, modalities FROM study") == [
        (1, 20, "CT")
    ]
    assert first.rows("SELECT DISTINCT num_instances FROM series") == [(20,)]

    study_uids = {pydicom.dcmread(p[0]).StudyInstanceUID for p in studies}
    for server in (first, second):
        remote = scu.Remote(port=server.port)
        keys = {"StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""}
        answers = list(scu.find(remote, scu.identifier("STUDY", keys)))
        assert {a.StudyInstanceUID for a in answers} == study_uids
        assert {int(a.NumberOfStudyRelatedInstances) for a in answers} == {20}
    # Each retrieves what the other stored.
    outcome = scu.get(
        scu.Remote(port=second.port),
        "STUDY",
        [pydicom.dcmread(studies[1][0]).StudyInstanceUID],
        tmp_path / "got",
    )
    assert outcome.ok and outcome.completed == 20
    assert "index write failed" not in first.log() + second.log()


def storescu_concurrently_to(sends: list[tuple[int, list]]) -> list[str]:
    """One storescu per (port, paths), all at once; the stderr of each that failed."""
    with ThreadPoolExecutor(len(sends)) as pool:
        results = pool.map(lambda send: storescu(send[0], *send[1], check=False), sends)
    return [result.stderr for result in results if result.returncode]
