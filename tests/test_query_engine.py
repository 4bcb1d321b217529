"""storage.query in-process, on both index engines: each PS3.4 C.2.2.2 matching rule, the
levels of both information models, derived counts, paging and streaming, over the test
corpus (tests/corpus.py) ingested through the archive's real ingest.

What only C-FIND has (statuses, cancel, the models at the wire, the answers' character
set, negotiation, settings reaching the engine) is tested with real clients in
test_query.py."""

import json
import shutil
import tracemalloc

import pydicom
import pytest
from corpus import SOP_CLASS
from corpus import build
from dicom_files import CHARSET_FILES
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode
from pynetdicom.dsutils import encode

from pacs import scu
from storage import Archive
from storage import query
from storage.engine import is_sqlite
from storage.models import Patient
from storage.models import db

# Files of pydicom's charset set added to the corpus: (label, file).
CHARSET_STUDIES = {
    "X2": "chrX2.dcm",  # GB18030
    "I2": "chrI2.dcm",  # ISO 2022 IR 149 (Korean)
    "H32": "chrH32.dcm",  # ISO 2022 IR 13 + IR 87 (Japanese katakana and kanji)
    "X1": "chrX1.dcm",  # UTF-8
    "Fren": "chrFren.dcm",  # Latin-1
}
CORPUS = {"A", "B", "C", "D", "J"}
EVERY_STUDY = CORPUS | set(CHARSET_STUDIES)
# AcquisitionDateTime (DT, no index column: matched on the stored JSON) given to the
# instances of two studies.
ACQUIRED = {"A": "20200105103000", "C": "20200620080000.5"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, module_engine):
    """The corpus and the charset files, imported one by one into an archive of each engine;
    yields (archive, {label: {"uid": study uid, "series": [(uid, [sop uids])]}})."""
    root = tmp_path_factory.mktemp("query-engine")
    made = build(root / "corpus")
    for label, when in ACQUIRED.items():
        for _, sops in made[label]["series"]:
            for sop in sops:
                path = root / "corpus" / f"{sop}.dcm"
                ds = pydicom.dcmread(path)
                ds.AcquisitionDateTime = when
                ds.save_as(path)
    for label, name in CHARSET_STUDIES.items():
        shutil.copy(CHARSET_FILES / name, root / "corpus" / name)
        made[label] = {"uid": pydicom.dcmread(CHARSET_FILES / name).StudyInstanceUID}
    with Archive(root / "data", fsync=False, index_url=module_engine) as archive:
        for path in sorted((root / "corpus").iterdir()):
            archive.import_file(path)
        yield archive, made


def keys(level: str, **values) -> list[query.Key]:
    """The keys of an identifier made as `minipacs find` makes it."""
    return query.keys_from_dataset(scu.identifier(level, values))


def find(corpus, level: str, keys: list[query.Key], model: str = "STUDY", **options) -> list:
    archive, _ = corpus
    return list(archive.catalog.find(level, keys, model, query.Options(**options)))


def labels(corpus, answers) -> set[str]:
    _, made = corpus
    by_uid = {v["uid"]: k for k, v in made.items()}
    return {by_uid[a["0020000D"]["Value"][0]] for a in answers}


def studies(corpus, **values) -> set[str]:
    """Labels of the studies a STUDY-level query with these keys finds."""
    values.setdefault("StudyInstanceUID", "")
    return labels(corpus, find(corpus, "STUDY", keys("STUDY", **values)))


def value(answer: dict, tag: str):
    """The first value of an answer's element (None when it has none)."""
    return (answer[tag].get("Value") or [None])[0]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"PatientID": "PID1"}, {"A", "B"}),  # single value (indexed)
        ({"PatientID": "pid1"}, set()),  # single value is case-sensitive for LO
        ({"BodyPartExamined": "HEAD"}, {"A"}),  # single value on a key with no column
        ({"PatientID": "NOBODY"}, set()),
        ({"AccessionNumber": "ACC-?"}, {"A", "B", "C", "D"}),  # ? (indexed)
        ({"StudyDescription": "study ?"}, {"A", "B", "C", "D"}),
        ({"PatientName": "doe*"}, {"A", "B", "C"}),  # * (and PN ignores case)
        ({"PatientName": "D?E^J?NE"}, {"C"}),
        ({"PatientID": "PID*"}, {"A", "B", "C", "D"}),
        ({"BodyPartExamined": "C*T"}, {"B", "C", "D"}),  # * on the stored JSON
        ({"BodyPartExamined": "HEA?"}, {"A"}),
        ({"PatientName": "D[O]E*"}, set()),  # [ is literal: no character class (SQL)
        ({"BodyPartExamined": "[CH]*"}, set()),  # nor on the stored JSON
        ({"ModalitiesInStudy": "MR"}, {"B", "C"}),
        ({"ModalitiesInStudy": "SR"}, {"C"}),
        ({"ModalitiesInStudy": ["CR", "SR"]}, {"C", "D"}),  # any of the values
        ({"PatientName": "Doe*", "StudyDate": "20210101-"}, {"B"}),  # every key
        ({"PatientID": "PID1", "BodyPartExamined": "CHEST"}, {"B"}),  # SQL and JSON keys
    ],
)
def test_single_value_and_wildcard_matching(corpus, values, expected):
    assert studies(corpus, **values) == expected


def test_universal_matching_matches_everything_and_returns_the_key(corpus):
    """An empty key restricts nothing, absent values included, and comes back (empty where
    the archive has no value)."""
    answers = find(corpus, "STUDY", keys("STUDY", StudyInstanceUID="", AccessionNumber=""))
    assert labels(corpus, answers) == EVERY_STUDY
    accession = {labels(corpus, [a]).pop(): a["00080050"] for a in answers}
    assert accession["A"] == {"vr": "SH", "Value": ["ACC-A"]}
    assert accession["X2"] == {"vr": "SH"}


def test_uid_list_matching(corpus):
    _, made = corpus
    a, d = made["A"]["uid"], made["D"]["uid"]
    assert studies(corpus, StudyInstanceUID=[a, d]) == {"A", "D"}  # multi-valued
    found = find(corpus, "STUDY", [query.Key(0x0020000D, "UI", f"{a}\\{d}")])  # one string
    assert labels(corpus, found) == {"A", "D"}
    assert studies(corpus, StudyInstanceUID=a[:-2] + "*") == set()  # no wildcards in UIDs
    series = [uid for uid, _ in made["A"]["series"]]
    found = find(corpus, "SERIES", keys("SERIES", SeriesInstanceUID=series))
    assert {value(s, "0020000E") for s in found} == set(series)


def test_instance_elements_are_the_stored_jsons_elements_asked_for(corpus):
    """instance_elements (how the viewer finds a study's current report) answers each
    instance's stored JSON cut to the tags asked for, a tag it lacks left out, as
    instance_json in the same order: json_extract on SQLite, Python on PostgreSQL. No tag,
    or SOP Instance UID alone, as well (json_extract answers a single path's value bare)."""
    archive, made = corpus
    _, sops = made["A"]["series"][0]
    study = query.Key(0x0020000D, "UI", made["A"]["uid"])
    chosen = [study, query.Key(0x00080018, "UI", sops[:2])]
    tags = ["00100010", "00080060", "00200013", "0040A043"]  # PN, CS, IS; no A043 in images
    whole = list(archive.catalog.instance_json("IMAGE", chosen))
    picked = list(archive.catalog.instance_elements("IMAGE", chosen, tags))
    assert sorted(sop for sop, _ in picked) == sorted(sops[:2])
    assert [sop for sop, _ in picked] == [sop for sop, _ in whole]
    for (_, text), (_, elements) in zip(whole, picked, strict=True):
        stored = json.loads(text)
        assert elements == {tag: stored[tag] for tag in tags[:3]}
    for few in ([], ["00080018"]):
        cut = list(archive.catalog.instance_elements("IMAGE", chosen, few))
        assert [sop for sop, _ in cut] == [sop for sop, _ in whole]
        for (_, text), (_, elements) in zip(whole, cut, strict=True):
            assert elements == {tag: json.loads(text)[tag] for tag in few}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"StudyDate": "20200101-20201231"}, {"A", "C"}),  # closed
        ({"StudyDate": "-20191231"}, {"D"}),  # open start
        ({"StudyDate": "20210101-"}, {"B"}),  # open end
        ({"StudyDate": "20200620"}, {"C"}),  # single value
        ({"StudyDate": "20200106-20200619"}, set()),  # between two studies
        ({"StudyTime": "0800-1100"}, {"A", "C"}),  # TM, independent of the date
        ({"StudyTime": "1400-"}, {"B", "D"}),
        ({"StudyTime": "-0800"}, {"C"}),  # the upper bound covers its whole minute
        ({"StudyTime": "2359"}, {"D"}),  # single value covers its precision
        ({"SeriesDate": "19970101-19971231"}, {"A", "B", "C", "D"}),  # DA on the JSON
        ({"SeriesDate": "-19961231"}, set()),
        ({"AcquisitionDateTime": "20200101-20200301"}, {"A"}),  # DT, closed
        ({"AcquisitionDateTime": "20200301000000-"}, {"C"}),  # DT, open end
        ({"AcquisitionDateTime": "-20200105103000"}, {"A"}),  # DT, open start, inclusive
    ],
)
def test_date_time_and_datetime_ranges(corpus, values, expected):
    assert studies(corpus, **values) == expected


def test_combined_date_and_time_range_when_negotiated(corpus):
    """With combined datetime matching (PS3.4 C.2.2.2.5.1) StudyDate and StudyTime are one
    range: 2020-01-01 10:00 … 2020-12-31 09:00 holds A (Jan 5 10:30) and C (Jun 20
    08:00); apart, the time range 10:00-09:00 is empty."""
    identifier = keys(
        "STUDY", StudyInstanceUID="", StudyDate="20200101-20201231", StudyTime="1000-0900"
    )
    combined = find(corpus, "STUDY", identifier, combined_datetime=True)
    assert labels(corpus, combined) == {"A", "C"}
    assert find(corpus, "STUDY", identifier) == []


@pytest.mark.parametrize(
    ("name", "case_insensitive", "expected"),
    [
        ("Doe^John", True, {"A", "B"}),
        ("DOE^JOHN", True, {"A", "B"}),  # PN ignores case by default
        ("doe*", True, {"A", "B", "C"}),
        ("Doe^John^", True, {"A", "B"}),  # trailing empty components are not significant
        ("DOE*", False, {"C"}),  # case-sensitive when configured
        ("Doe*", False, {"A", "B"}),
        ("DOE^JOHN", False, set()),
        ("Yamada^Tarou", True, {"J"}),  # alphabetic group of a three-group name
        ("=山田^太郎", True, {"J", "H32"}),  # ideographic group only
        ("*=*=やまだ*", True, {"J", "H32"}),  # phonetic group, wildcards
        ("yamada^tarou=山田^太郎", True, {"J"}),
        ("yamada^tarou=山田^太郎", False, set()),
    ],
)
def test_person_name_rules(corpus, name, case_insensitive, expected):
    answers = find(
        corpus,
        "STUDY",
        keys("STUDY", StudyInstanceUID="", PatientName=name),
        pn_case_insensitive=case_insensitive,
    )
    assert labels(corpus, answers) == expected


def test_fuzzy_names_match_the_start_of_any_component(corpus):
    """QIDO-RS fuzzymatching: 'joh' finds Doe^John, 'ANN' Smith^Anna."""
    for start, expected in (("joh", {"A", "B"}), ("ANN", {"D"}), ("oe", set())):
        answers = find(
            corpus, "STUDY", keys("STUDY", StudyInstanceUID="", PatientName=start), fuzzy_names=True
        )
        assert labels(corpus, answers) == expected, start


def arrived(identifier: Dataset) -> list[query.Key]:
    """The keys of an identifier as a C-FIND SCP gets them: encoded in its character set
    the way pynetdicom sends it, decoded the way pynetdicom receives it."""
    wire = encode(identifier, True, True)
    return query.keys_from_dataset(decode(pydicom.filebase.DicomBytesIO(wire), True, True))


def test_sequence_matching(corpus):
    """An item of the query matches when one stored item matches all its non-empty keys;
    the answer carries the stored item (the identifier as it comes off the wire)."""
    item = Dataset()
    item.CodeValue = "PROC-B"
    item.CodingSchemeDesignator = ""
    identifier = scu.identifier("STUDY", {"StudyInstanceUID": ""})
    identifier.ProcedureCodeSequence = [item]
    answers = find(corpus, "STUDY", arrived(identifier))
    assert labels(corpus, answers) == {"B"}
    (stored,) = answers[0]["00081032"]["Value"]
    assert stored["00080102"] == {"vr": "SH", "Value": ["LOCAL"]}
    item.CodeValue = "PROC-?"  # wildcards inside an item
    assert labels(corpus, find(corpus, "STUDY", arrived(identifier))) == {
        "A",
        "B",
        "C",
        "D",
    }
    item.CodingSchemeDesignator = "OTHER"  # every key of the item must match
    assert find(corpus, "STUDY", arrived(identifier)) == []


def test_sequence_answers_carry_only_the_requested_item_attributes(corpus):
    """PS3.4 C.2.2.2.6: "A sequence of matching Items containing only the requested
    Attributes"; an empty item asks for the entire sequence; an item of return keys only
    restricts nothing (universal matching: studies without the sequence too)."""
    identifier = scu.identifier("STUDY", {"StudyInstanceUID": ""})
    item = Dataset()
    item.CodeValue = "PROC-B"
    identifier.ProcedureCodeSequence = [item]
    (answer,) = find(corpus, "STUDY", arrived(identifier))
    assert answer["00081032"] == {"vr": "SQ", "Value": [{"00080100": item_value("PROC-B")}]}
    identifier.ProcedureCodeSequence = [Dataset()]
    answers = find(corpus, "STUDY", arrived(identifier))
    whole = {labels(corpus, [a]).pop(): a["00081032"] for a in answers}
    assert whole["B"]["Value"][0]["00080104"] == {"vr": "LO", "Value": ["procedure B"]}
    item = Dataset()
    item.CodeMeaning = ""
    item.ContextIdentifier = ""  # asked for, not stored: empty, as a return key is
    identifier.ProcedureCodeSequence = [item]
    answers = find(corpus, "STUDY", arrived(identifier))
    assert labels(corpus, answers) == EVERY_STUDY
    asked = {labels(corpus, [a]).pop(): a["00081032"] for a in answers}
    assert asked["A"]["Value"] == [
        {"00080104": {"vr": "LO", "Value": ["procedure A"]}, "0008010F": {"vr": "CS"}}
    ]
    assert asked["X2"] == {"vr": "SQ"}


def item_value(code: str) -> dict:
    return {"vr": "SH", "Value": [code]}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"StudyDate": ["20200105", "20200620"]}, {"A", "C"}),  # a list: any of them
        ({"StudyDate": "20200105\\20210101-"}, {"A", "B"}),  # a date and a range
        ({"StudyTime": "13:00-"}, {"B", "D"}),  # ACR-NEMA colons, as before
        ({"AcquisitionDateTime": "2020-2020"}, {"A", "C"}),  # DT years: all of 2020
        ({"AcquisitionDateTime": "202001-202001"}, {"A"}),
        (  # DT with negative offsets, their '-' apart from the range's
            {"AcquisitionDateTime": "20200101000000-0500-20200301000000-0500"},
            {"A"},
        ),
    ],
)
def test_date_lists_partial_datetimes_and_offsets(corpus, values, expected):
    assert studies(corpus, **values) == expected


@pytest.mark.parametrize(
    "values",
    [
        {"StudyDate": "2003"},  # a year is not a DA (PS3.5 6.2: YYYYMMDD)
        {"StudyDate": "2003-2004"},  # nor a range of years
        {"StudyDate": "notadate"},
        {"StudyDate": "2020*"},  # * is no wildcard in a date
        {"StudyDate": "20200230"},  # no such day
        {"StudyDate": "2003.01.19"},  # ACR-NEMA dates were never matched
        {"StudyDate": ["20200105", "2020"]},  # every value of a list
        {"PatientBirthDate": "19700101-1971"},
        {"StudyTime": "25"},
        {"SeriesDate": "-"},
        {"AcquisitionDateTime": "2020-13"},
        {"AcquisitionDateTime": "20200101+1500"},  # offsets end at +1400
    ],
)
def test_dates_times_and_datetimes_that_are_not_are_refused(corpus, values):
    """Not a query (C-FIND 0xA900, QIDO-RS 400): before, each matched nothing, or
    compared as text, with Success."""
    with pytest.raises(query.QueryError, match=": not a (DA|TM|DT) "):
        studies(corpus, **values)


def test_a_bad_date_in_a_sequence_item_or_a_worklist_query_is_refused(corpus):
    archive, _ = corpus
    identifier = scu.identifier("STUDY", {"StudyInstanceUID": ""})
    item = Dataset()
    item.ReferencedDateTime = "yesterday"
    identifier.ReferencedRequestSequence = [item]
    with pytest.raises(query.QueryError, match="ReferencedDateTime"):
        find(corpus, "STUDY", arrived(identifier))
    step = {"00400002": {"vr": "DA", "Value": ["2003"]}}  # Scheduled Procedure Step Start Date
    with pytest.raises(query.QueryError, match="ScheduledProcedureStepStartDate"):
        list(archive.worklist.find([query.Key(query.SPS, "SQ", [step])]))


@pytest.mark.parametrize(
    ("label", "charset", "name"),
    [
        ("X2", "GB18030", "=王^小东"),
        ("I2", ["", "ISO 2022 IR 149"], "==홍^길동"),
        ("H32", ["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田*"),
        ("X1", "ISO_IR 192", "Wang^XiaoDong=王^小東"),
        ("Fren", "ISO_IR 100", "Buc^Jérôme"),
        ("J", ["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),
    ],
)
def test_queries_in_other_character_sets(corpus, label, charset, name):
    """A query's text is decoded by its SpecificCharacterSet before matching; the answer
    is UTF-8 and holds the stored name exactly."""
    identifier = Dataset()
    identifier.SpecificCharacterSet = charset
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientName = name
    identifier.PatientID = ""
    answers = find(corpus, "PATIENT", arrived(identifier), "PATIENT")
    source = CHARSET_STUDIES.get(label, "chrH31.dcm")
    stored = pydicom.dcmread(CHARSET_FILES / source)
    assert [value(a, "00100020") for a in answers] == [stored.PatientID]
    assert value(answers[0], "00080005") == "ISO_IR 192"
    groups = value(answers[0], "00100010")
    assert _pn(groups) == str(stored.PatientName)


def _pn(groups: dict) -> str:
    """A DICOM JSON person name as PN text ('A=I=P', trailing empty groups left out)."""
    text = [groups.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")]
    while text and not text[-1]:
        text.pop()
    return "=".join(text)


def test_patient_root_levels_with_derived_counts(corpus):
    _, made = corpus
    (patient,) = find(
        corpus,
        "PATIENT",
        keys(
            "PATIENT",
            PatientID="PID1",
            PatientName="",
            NumberOfPatientRelatedStudies="",
            NumberOfPatientRelatedSeries="",
            NumberOfPatientRelatedInstances="",
        ),
        "PATIENT",
    )
    assert _pn(value(patient, "00100010")) == "Doe^John"
    assert [value(patient, t) for t in ("00201200", "00201202", "00201204")] == [2, 3, 7]
    assert value(patient, "00080052") == "PATIENT"
    found = find(corpus, "STUDY", keys("STUDY", PatientID="PID1", StudyInstanceUID=""), "PATIENT")
    assert labels(corpus, found) == {"A", "B"}
    series_a = {uid for uid, _ in made["A"]["series"]}
    found = find(
        corpus,
        "SERIES",
        keys("SERIES", StudyInstanceUID=made["A"]["uid"], SeriesInstanceUID=""),
        "PATIENT",
    )
    assert {value(s, "0020000E") for s in found} == series_a
    series_uid, sops = made["B"]["series"][0]
    found = find(
        corpus, "IMAGE", keys("IMAGE", SeriesInstanceUID=series_uid, SOPInstanceUID=""), "PATIENT"
    )
    assert sorted(value(i, "00080018") for i in found) == sorted(sops)


def test_study_root_levels_with_derived_counts(corpus):
    _, made = corpus
    (study,) = find(
        corpus,
        "STUDY",
        keys(
            "STUDY",
            StudyInstanceUID=made["C"]["uid"],
            ModalitiesInStudy="",
            NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="",
            SOPClassesInStudy="",
            InstanceAvailability="",
            StudyDescription="",
        ),
    )
    assert study["00080061"]["Value"] == ["MR", "SR"]
    assert (value(study, "00201206"), value(study, "00201208")) == (2, 3)
    assert set(study["00080062"]["Value"]) == {SOP_CLASS["MR"], SOP_CLASS["SR"]}
    assert value(study, "00080056") == "ONLINE"
    assert value(study, "00081030") == "study C"
    # SERIES without the study's UID (lenient hierarchy): by modality, across studies.
    series = find(
        corpus,
        "SERIES",
        keys(
            "SERIES",
            StudyInstanceUID="",
            SeriesInstanceUID="",
            Modality="MR",
            NumberOfSeriesRelatedInstances="",
        ),
    )
    assert labels(corpus, series) == {"B", "C"}
    assert sorted(value(s, "00201209") for s in series) == [2, 2]
    series_uid, sops = made["A"]["series"][0]
    images = find(
        corpus,
        "IMAGE",
        keys(
            "IMAGE",
            SeriesInstanceUID=series_uid,
            SOPInstanceUID="",
            InstanceNumber="",
            AvailableTransferSyntaxUID="",
        ),
    )
    assert sorted(value(i, "00080018") for i in images) == sorted(sops)
    assert {value(i, "00083002") for i in images} == {"1.2.840.10008.1.2.1"}
    assert sorted(value(i, "00200013") for i in images) == [1, 2, 3]
    # A key of a lower level cannot restrict a higher one: one answer per study.
    found = find(corpus, "STUDY", keys("STUDY", StudyInstanceUID="", SOPInstanceUID=sops[0]))
    assert labels(corpus, found) == EVERY_STUDY


def test_levels_and_models_that_are_not_queries(corpus):
    archive, _ = corpus
    for level, model in (("PATIENT", "STUDY"), ("FRAME", "STUDY"), ("STUDY", "WORKLIST")):
        with pytest.raises(query.QueryError):
            list(archive.catalog.find(level, keys("STUDY", PatientID=""), model))


def test_paging_with_limit_and_offset(corpus):
    archive, _ = corpus
    every = [
        value(a, "0020000D") for a in find(corpus, "STUDY", keys("STUDY", StudyInstanceUID=""))
    ]
    page = archive.catalog.find("STUDY", keys("STUDY", StudyInstanceUID=""), limit=2, offset=1)
    assert [value(a, "0020000D") for a in page] == every[1:3]
    past = archive.catalog.find("STUDY", keys("STUDY", StudyInstanceUID=""), offset=len(every))
    assert list(past) == []
    # Keys matched on the stored JSON page after matching, not before.
    chest = keys("STUDY", StudyInstanceUID="", BodyPartExamined="CHEST")
    matching = [value(a, "0020000D") for a in archive.catalog.find("STUDY", chest)]
    page = archive.catalog.find("STUDY", chest, limit=1, offset=1)
    assert len(matching) == 3
    assert [value(a, "0020000D") for a in page] == matching[1:2]


def test_a_large_answer_streams(corpus):
    """The first answer of 4,000 comes while the rest are still rows in the database: making
    it holds far less memory than the whole answer does."""
    archive, _ = corpus
    count = 4000
    with db.connection_context():
        rows = [{"patient_id": f"BULK{n:05}", "issuer": "BULK"} for n in range(count)]
        Patient.insert_many(rows).execute()
    bulk = keys("PATIENT", IssuerOfPatientID="BULK", PatientID="", PatientName="")
    tracemalloc.start()
    try:
        answers = archive.catalog.find("PATIENT", bulk, "PATIENT")
        first = next(answers)
        first_peak = tracemalloc.get_traced_memory()[1]
        rest = list(answers)
        whole = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert value(first, "00100020") == "BULK00000"
    assert len(rest) == count - 1
    assert first_peak * 4 < whole, (first_peak, whole)


JSON_SELECTS = tuple(f"SELECT {alias}.id, " for alias in ("i", "s", "st", "p"))  # _JSON_SQL


def test_stored_json_is_read_a_chunk_of_rows_at_a_time(corpus, monkeypatch):
    """Answers that need the stored DICOM JSON read it with one statement a chunk of rows,
    not a SELECT a row: with a first chunk of 2 (the first answer waits for no more) and
    chunks of 4 after it, each level's answers are the same, in the same order, and
    (counted by SQLite's trace callback) the statements grow with the chunks, not the rows,
    the first one reading 2 rows' JSON. Each instance's answer carries its own JSON
    (BodyPartExamined: HEAD in A)."""
    _, made = corpus
    cases = [
        ("IMAGE", keys("IMAGE", SOPInstanceUID="", BodyPartExamined=""), {}),  # picked
        ("IMAGE", keys("IMAGE", SOPInstanceUID=""), {"all_attributes": True}),  # whole JSON
        ("SERIES", keys("SERIES", SeriesInstanceUID="", BodyPartExamined=""), {}),
        ("STUDY", keys("STUDY", StudyInstanceUID="", BodyPartExamined=""), {}),
    ]
    for level, identifier, options in cases:
        whole = find(corpus, level, identifier, **options)
        monkeypatch.setattr(query, "FIRST_JSON_CHUNK", 2)
        monkeypatch.setattr(query, "JSON_CHUNK", 4)
        ran: list[str] = []
        with db.connection_context():
            sqlite = is_sqlite(db)
            if sqlite:
                db.connection().set_trace_callback(ran.append)
            try:
                chunked = list(query.find(level, identifier, options=query.Options(**options)))
            finally:
                if sqlite:
                    db.connection().set_trace_callback(None)
        monkeypatch.undo()
        assert len(whole) > 4
        assert chunked == whole
        if sqlite:  # one a chunk, the query, and the extended query tags' look-up
            chunks = 1 + -(-(len(whole) - 2) // 4)  # the first of 2 rows, then 4 each
            assert chunks <= len(ran) <= chunks + 2, ran
            json_ran = [sql for sql in ran if sql.startswith(JSON_SELECTS)]
            ids = [sql.rpartition(" IN (")[2].count(",") + 1 for sql in json_ran]
            assert ids == [2] + [4] * (chunks - 1), json_ran  # short chunks padded
    images = find(corpus, "IMAGE", keys("IMAGE", SOPInstanceUID="", BodyPartExamined=""))
    body = {value(a, "00080018"): value(a, "00180015") for a in images}
    for label, part in (("A", "HEAD"), ("B", "CHEST"), ("C", "CHEST"), ("D", "CHEST")):
        for _, sops in made[label]["series"]:
            assert {body[sop] for sop in sops} == {part}
    # Matched on the stored JSON after the SQL, then paged, through chunks of 2 then 4.
    chest = keys("IMAGE", SOPInstanceUID="", BodyPartExamined="CHEST")
    every = find(corpus, "IMAGE", chest)
    monkeypatch.setattr(query, "FIRST_JSON_CHUNK", 2)
    monkeypatch.setattr(query, "JSON_CHUNK", 4)
    assert find(corpus, "IMAGE", chest) == every
    archive, _ = corpus
    assert list(archive.catalog.find("IMAGE", chest, limit=3, offset=4)) == every[4:7]
