"""C-FIND with real clients: statuses, cancel, both models and their levels at the wire,
query and answer character sets, extended negotiation, the settings that reach the query
engine. The matching rules themselves are tested in-process (test_query_engine.py)."""

import pytest
from conftest import Server
from conftest import index_args
from conftest import minipacs
from conftest import run
from corpus import build
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pacs import scu


@pytest.fixture(scope="module")
def archive(tmp_path_factory, module_engine):
    """The corpus on a server, once per index engine."""
    root = tmp_path_factory.mktemp("query")
    made = build(root / "corpus")
    minipacs(
        "import", "--data", str(root / "data"), *index_args(module_engine), str(root / "corpus")
    )
    server = Server(root / "data", index=module_engine).start()
    yield server, made
    server.kill()


def ask(server, level, model="STUDY", **keys) -> list[Dataset]:
    remote = scu.Remote(port=server.port)
    return list(scu.find(remote, scu.identifier(level, keys), model))


def study_labels(made, answers) -> set[str]:
    by_uid = {v["uid"]: k for k, v in made.items()}
    return {by_uid[a.StudyInstanceUID] for a in answers}


def test_one_answer_per_entity_with_computed_keys(archive):
    server, made = archive
    (answer,) = ask(
        server,
        "STUDY",
        StudyInstanceUID=made["C"]["uid"],
        ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
        SOPClassesInStudy="",
        InstanceAvailability="",
        RetrieveAETitle="",
        StudyDescription="",
        PatientName="",
    )
    assert list(answer.ModalitiesInStudy) == ["MR", "SR"]
    assert (answer.NumberOfStudyRelatedSeries, answer.NumberOfStudyRelatedInstances) == (2, 3)
    assert set(answer.SOPClassesInStudy) == {
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.88.11",
    }
    assert answer.InstanceAvailability == "ONLINE"
    assert answer.RetrieveAETitle == "MINIPACS"
    assert answer.StudyDescription == "study C"
    assert answer.SpecificCharacterSet == "ISO_IR 192"


def test_patient_level_patient_root(archive):
    server, _ = archive
    answers = ask(
        server,
        "PATIENT",
        "PATIENT",
        PatientID="PID1",
        PatientName="",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    assert len(answers) == 1
    answer = answers[0]
    assert str(answer.PatientName) == "Doe^John"
    assert (
        answer.NumberOfPatientRelatedStudies,
        answer.NumberOfPatientRelatedSeries,
        answer.NumberOfPatientRelatedInstances,
    ) == (2, 3, 7)


def test_study_root_has_no_patient_level(archive):
    server, _ = archive
    with pytest.raises(scu.ScuError) as error:
        ask(server, "PATIENT", "STUDY", PatientID="")
    assert error.value.status == 0xA900


def test_a_date_that_is_not_one_is_a900(archive):
    """StudyDate=2003 is no DA (PS3.5 6.2): refused with its reason, not Success with
    nothing; a valid range still answers."""
    server, made = archive
    with pytest.raises(scu.ScuError) as error:
        ask(server, "STUDY", StudyInstanceUID="", StudyDate="2003")
    assert error.value.status == 0xA900
    assert "StudyDate: not a DA" in str(error.value)
    answers = ask(server, "STUDY", StudyInstanceUID="", StudyDate="20200101-20201231")
    assert study_labels(made, answers) == {"A", "C"}


def test_series_and_image_levels_lenient_hierarchy(archive):
    server, made = archive
    # Without the study UID (lenient), by modality, across studies.
    series = ask(
        server,
        "SERIES",
        SeriesInstanceUID="",
        Modality="MR",
        NumberOfSeriesRelatedInstances="",
        SeriesDescription="",
    )
    assert sorted(int(s.NumberOfSeriesRelatedInstances) for s in series) == [2, 2]
    # With it, restricted.
    series = ask(server, "SERIES", StudyInstanceUID=made["A"]["uid"], SeriesInstanceUID="")
    assert {s.SeriesInstanceUID for s in series} == {uid for uid, _ in made["A"]["series"]}
    series_uid, sops = made["A"]["series"][0]
    images = ask(
        server,
        "IMAGE",
        SeriesInstanceUID=series_uid,
        SOPInstanceUID="",
        InstanceNumber="",
        AvailableTransferSyntaxUID="",
    )
    assert sorted(i.SOPInstanceUID for i in images) == sorted(sops)
    assert {i.AvailableTransferSyntaxUID for i in images} == {"1.2.840.10008.1.2.1"}
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 2, 3]


def test_text_reads_back_exactly_in_any_query_charset(archive):
    server, made = archive
    (answer,) = ask(server, "STUDY", StudyInstanceUID=made["J"]["uid"], PatientName="")
    assert str(answer.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    # The same query sent in ISO 2022 IR 87 (as a Japanese modality would) matches too.
    query = Dataset()
    query.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = "=山田^太郎"
    query.StudyInstanceUID = ""
    answers = list(scu.find(scu.Remote(port=server.port), query))
    assert [a.StudyInstanceUID for a in answers] == [made["J"]["uid"]]


def test_findscu_gets_the_same_answers(archive):
    server, made = archive
    result = run(
        "findscu",
        "-v",
        "-S",
        "-aec",
        "MINIPACS",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientName=DOE*",
        "-k",
        "StudyInstanceUID",
        "-k",
        "ModalitiesInStudy",
        "127.0.0.1",
        str(server.port),
    )
    assert result.stderr.count("(Pending)") == 3
    assert "Received Final Find Response (Success)" in result.stderr
    for label in ("A", "B", "C"):
        assert made[label]["uid"] in result.stderr
    assert made["D"]["uid"] not in result.stderr


def test_combined_datetime_range_when_negotiated(archive):
    server, made = archive
    query = scu.identifier(
        "STUDY",
        {"StudyDate": "20200101-20201231", "StudyTime": "1000-0900", "StudyInstanceUID": ""},
    )
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    item.service_class_application_information = b"\x00\x01"
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS", ext_neg=[item])
    answers = [
        a
        for s, a in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        if s.Status == 0xFF00
    ]
    assoc.release()
    # 2020-01-01 10:00 … 2020-12-31 09:00 as one range: A (Jan 5 10:30) and C (Jun 20 08:00).
    assert study_labels(made, answers) == {"A", "C"}
    # Without negotiation, date and time match separately: only A is at 10:00-09:00?
    # (an empty time range) — nothing.
    assert (
        study_labels(
            made,
            ask(
                server,
                "STUDY",
                StudyDate="20200101-20201231",
                StudyTime="1000-0900",
                StudyInstanceUID="",
            ),
        )
        == set()
    )


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_answers_are_the_same_in_both_transfer_syntaxes(archive, syntax):
    """Answers are written by minipacs (seam.FindAnswers), not by pynetdicom."""
    server, made = archive
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, [syntax])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    query = scu.identifier(
        "STUDY",
        {"PatientName": "", "StudyInstanceUID": "", "ModalitiesInStudy": "", "StudyDate": ""},
    )
    answers = [
        ds
        for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        if status.Status == 0xFF00
    ]
    assoc.release()
    assert {a.StudyInstanceUID for a in answers} == {v["uid"] for v in made.values()}
    japanese = next(a for a in answers if a.StudyInstanceUID == made["J"]["uid"])
    assert japanese.SpecificCharacterSet == "ISO_IR 192"
    assert str(japanese.PatientName.ideographic) == "山田^太郎"


def test_cancel_ends_with_fe00(start_server, tmp_path):
    from make_study import make_study

    make_study(tmp_path / "big", 400, size=16)
    minipacs("import", "--data", str(tmp_path / "data"), str(tmp_path / "big"), "--no-fsync")
    server = start_server(data=tmp_path / "data")
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    # A return key outside the index columns makes each answer read the instance's JSON:
    # the 400 answers take long enough for a cancel sent on the first to arrive between
    # them (it lands after ~10; the first answer is sent alone, the others in batches).
    query = scu.identifier("IMAGE", {"SOPInstanceUID": "", "ImageType": ""})
    statuses = []
    for status, _ in assoc.send_c_find(
        query, PatientRootQueryRetrieveInformationModelFind, msg_id=7
    ):
        statuses.append(status.Status)
        if len(statuses) == 1:
            assoc.send_c_cancel(7, query_model=PatientRootQueryRetrieveInformationModelFind)
    assoc.release()
    assert statuses[-1] == 0xFE00
    assert len(statuses) < 400  # stopped between answers, not after all of them
    assert "cancelled after" in server.log()


@pytest.fixture(scope="module")
def configured(archive, tmp_path_factory):
    """A second server on the same archive, with the settings the query engine is given."""
    server, made = archive
    folder = tmp_path_factory.mktemp("configured")
    config = folder / "minipacs.toml"
    config.write_text("max_results = 2\npn_case_insensitive = false\n")
    other = Server(server.data, "--config", str(config), index=server.index)
    other.log_path = folder / "configured.log"
    yield other.start(), made
    other.kill()


def test_max_results_ends_with_a700(configured):
    server, _ = configured
    with pytest.raises(scu.ScuError) as error:
        ask(server, "STUDY", StudyInstanceUID="")
    assert error.value.status == 0xA700
    assert "narrow the query" in str(error.value)
    assert "stopped at max_results=2" in server.log()


def test_case_sensitive_names_when_configured(configured):
    server, made = configured
    answers = ask(server, "STUDY", PatientName="DOE*", StudyInstanceUID="")
    assert study_labels(made, answers) == {"C"}
