"""C-FIND through storage.query: every PS3.4 C.2.2.2 rule, both models, real clients."""

import pydicom
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


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"PatientID": "PID1"}, {"A", "B"}),  # single value
        ({"PatientID": "pid1"}, set()),  # single value is case-sensitive for LO
        ({"PatientName": "Doe^John"}, {"A", "B"}),
        ({"PatientName": "DOE^JOHN"}, {"A", "B"}),  # PN: case-insensitive by default
        ({"PatientName": "doe*"}, {"A", "B", "C"}),  # wildcard *
        ({"PatientName": "D?E^J?NE"}, {"C"}),  # wildcard ?
        ({"PatientName": "Yamada^Tarou"}, {"J"}),  # alphabetic group of a 3-group name
        ({"PatientName": "=山田^太郎"}, {"J"}),  # ideographic group only
        ({"PatientName": "*=*=やまだ*"}, {"J"}),  # phonetic group, wildcards
        ({"AccessionNumber": "ACC-?"}, {"A", "B", "C", "D"}),
        ({"StudyDate": "20200101-20201231"}, {"A", "C"}),  # closed range
        ({"StudyDate": "-20191231"}, {"D"}),  # open start
        ({"StudyDate": "20210101-"}, {"B"}),  # open end
        ({"StudyDate": "20200620"}, {"C"}),
        ({"StudyTime": "0800-1100"}, {"A", "C"}),  # TM range (independent of the date)
        ({"StudyTime": "2359"}, {"D"}),  # TM single value covers its precision
        ({"ModalitiesInStudy": "MR"}, {"B", "C"}),
        ({"ModalitiesInStudy": "SR"}, {"C"}),
        ({"ModalitiesInStudy": ["CR", "SR"]}, {"C", "D"}),  # any of the values
        ({"StudyDescription": "study ?"}, {"A", "B", "C", "D"}),
        ({"PatientName": "Doe*", "StudyDate": "20210101-"}, {"B"}),
        ({"BodyPartExamined": "HEAD"}, {"A"}),  # a key the index has no column for
        ({"PatientID": "NOBODY"}, set()),
    ],
)
def test_study_level_matching(archive, keys, expected):
    server, made = archive
    answers = ask(server, "STUDY", StudyInstanceUID="", **keys)
    assert study_labels(made, answers) == expected


def test_uid_list_matching(archive):
    server, made = archive
    uids = [made["A"]["uid"], made["D"]["uid"]]
    answers = ask(server, "STUDY", StudyInstanceUID=uids)
    assert study_labels(made, answers) == {"A", "D"}


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


def test_max_results_ends_with_a700(tmp_path, archive):
    server, _ = archive
    capped = Server(
        server.data, "--config", str(_config(tmp_path, "max_results = 2\n")), index=server.index
    )  # same archive, second server process
    capped.log_path = tmp_path / "capped.log"
    capped.start()
    try:
        with pytest.raises(scu.ScuError) as error:
            ask(capped, "STUDY", StudyInstanceUID="")
        assert error.value.status == 0xA700
        assert "narrow the query" in str(error.value)
        assert "stopped at max_results=2" in capped.log()
    finally:
        capped.kill()


def test_case_sensitive_names_when_configured(tmp_path, archive):
    server, made = archive
    strict = Server(
        server.data,
        "--config",
        str(_config(tmp_path, "pn_case_insensitive = false\n")),
        index=server.index,
    )
    strict.log_path = tmp_path / "strict.log"
    strict.start()
    try:
        answers = ask(strict, "STUDY", PatientName="DOE*", StudyInstanceUID="")
        assert study_labels(made, answers) == {"C"}
    finally:
        strict.kill()


def _config(tmp_path, text):
    path = tmp_path / "minipacs.toml"
    path.write_text(text)
    return path


def test_sequence_matching(archive):
    server, made = archive
    item = Dataset()
    item.CodeValue = "PROC-B"
    item.CodingSchemeDesignator = ""
    query = scu.identifier("STUDY", {"StudyInstanceUID": ""})
    query.ProcedureCodeSequence = [item]
    answers = list(scu.find(scu.Remote(port=server.port), query))
    assert study_labels(made, answers) == {"B"}
    assert answers[0].ProcedureCodeSequence[0].CodingSchemeDesignator == "LOCAL"
    item.CodeValue = "PROC-?"  # wildcards inside an item
    answers = list(scu.find(scu.Remote(port=server.port), query))
    assert study_labels(made, answers) == {"A", "B", "C", "D"}


@pytest.mark.parametrize(
    ("source", "charset", "name"),
    [
        ("chrX2.dcm", "GB18030", "=王^小东"),
        ("chrI2.dcm", ["", "ISO 2022 IR 149"], "==홍^길동"),
        ("chrH32.dcm", ["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田*"),
        ("chrX1.dcm", "ISO_IR 192", "Wang^XiaoDong=王^小東"),
        ("chrFren.dcm", "ISO_IR 100", "Buc^Jérôme"),
    ],
)
def test_queries_in_other_character_sets(start_server, tmp_path, source, charset, name):
    from dicom_files import CHARSET_FILES

    minipacs("import", "--data", str(tmp_path / "data"), str(CHARSET_FILES / source))
    server = start_server(data=tmp_path / "data")
    query = Dataset()
    query.SpecificCharacterSet = charset
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientName = name
    query.PatientID = ""
    answers = list(scu.find(scu.Remote(port=server.port), query, "PATIENT"))
    assert len(answers) == 1
    stored = pydicom.dcmread(CHARSET_FILES / source).PatientName
    assert str(answers[0].PatientName) == str(stored)


def test_paging_with_limit_and_offset(archive, tmp_path):
    from storage import Archive

    server, _ = archive
    with Archive(server.data, fsync=False, index_url=server.index) as store:
        keys = query_keys({"StudyInstanceUID": ""})
        every = [a["0020000D"]["Value"][0] for a in store.catalog.find("STUDY", keys)]
        page = [
            a["0020000D"]["Value"][0] for a in store.catalog.find("STUDY", keys, limit=2, offset=1)
        ]
        past = list(store.catalog.find("STUDY", keys, limit=2, offset=len(every)))
        filtered = list(
            store.catalog.find(
                "STUDY", query_keys({"BodyPartExamined": "CHEST"}), limit=1, offset=1
            )
        )
    assert page == every[1:3]
    assert past == []
    assert len(filtered) == 1


def query_keys(values):
    from storage import query

    return query.keys_from_dataset(scu.identifier("STUDY", values))
