"""De-identification (PS3.15 Annex E): the profile on pydicom's own files, then every way
out: `minipacs anonymize` to a folder and to a dcmtk storescp, WADO-URI `anonymize=yes`
and WADO-RS `anonymize=yes`; consistent pseudonyms under one key; audited."""

import copy
import io
import json
import time

import pydicom
import pytest
import requests
from conftest import TEST_FILES
from conftest import Server
from conftest import free_port
from conftest import minipacs
from conftest import run
from conftest import storescp
from conftest import storescu
from make_study import make_study
from pydicom.charset import convert_encodings
from pydicom.charset import encode_string
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import generate_uid

from storage import deidentify
from storage.deid_table import TABLE
from storage.journal import IMPLEMENTATION_UID

CHARSET_FILES = TEST_FILES.parent / "charset_files"
KEY = deidentify.Profile(b"project key")


def deidentified(ds: Dataset, profile=KEY) -> bytes:
    deidentify.deidentify(ds, profile)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def with_meta():
    """pydicom's test and character-set files that are Part 10 files."""
    for path in sorted([*TEST_FILES.glob("*.dcm"), *CHARSET_FILES.glob("*.dcm")]):
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue
        if ds.file_meta.get("MediaStorageSOPInstanceUID") and "SOPInstanceUID" in ds:
            yield path.name, ds


def test_the_table_is_the_standards():
    rows = [line for line in TABLE.splitlines() if line.strip()]
    assert len(rows) == 460
    assert deidentify.rule_for(0x00100010).action(frozenset()) == "Z"  # Patient's Name
    study_uid = deidentify.rule_for(0x0020000D)
    assert study_uid.action(frozenset()) == "U"
    assert study_uid.action(frozenset({"uids"})) == "K"
    assert deidentify.rule_for(0x60004000).action(frozenset()) == "X"  # overlay comments
    assert deidentify.rule_for(0x00080022).action(frozenset({"modifdates"})) == "C"
    with pytest.raises(ValueError):
        deidentify.parse_options("uids,nonsense")
    with pytest.raises(ValueError):
        deidentify.parse_options("fulldates,modifdates")


def test_no_identity_survives_in_any_pydicom_file():
    checked = 0
    for name, ds in with_meta():
        words = {str(ds.get("PatientID", ""))} | set(str(ds.get("PatientName", "")).split("^"))
        words |= {str(ds.get("PatientBirthDate", "")), str(ds.get("AccessionNumber", ""))}
        uids = {str(ds.SOPInstanceUID), str(ds.get("StudyInstanceUID", ""))}
        encodings = convert_encodings(ds.get("SpecificCharacterSet", "ISO_IR 6"))
        try:
            data = deidentified(ds)
        except deidentify.NotDeidentifiable:
            continue
        back = pydicom.dcmread(io.BytesIO(data))
        assert back.PatientIdentityRemoved == "YES", name
        assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
        assert not any(elem.tag.is_private for elem in back.iterall()), name
        for word in words - {""}:
            if len(word) >= 3:
                assert encode_string(word, encodings) not in data, (name, word)
        for uid in uids - {""}:
            assert uid.encode() not in data, (name, uid)
        checked += 1
    assert checked > 50


def test_pseudonyms_and_uids_follow_the_key():
    first = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    again = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    other = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    deidentified(first)
    deidentified(again)
    deidentified(other, deidentify.Profile(b"another project"))
    assert first.StudyInstanceUID == again.StudyInstanceUID != other.StudyInstanceUID
    assert first.PatientID == again.PatientID != other.PatientID
    assert first.PatientName == first.PatientID
    assert first.StudyInstanceUID.startswith("2.25.") and len(first.StudyInstanceUID) <= 64
    assert [c.CodeValue for c in first.DeidentificationMethodCodeSequence] == ["113100"]
    assert first.LongitudinalTemporalInformationModified == "REMOVED"


def test_options():
    original = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    original.StudyDescription = f"CT head of {original.PatientName.family_name} please"
    original.PatientSex = "F"
    chosen = deidentify.parse_options("uids,patchars,modifdates,desc")
    ds = copy.deepcopy(original)
    deidentified(ds, deidentify.Profile(b"k", chosen))
    assert ds.StudyInstanceUID == original.StudyInstanceUID  # Retain UIDs
    assert ds.PatientSex == "F"  # Retain Patient Characteristics
    assert ds.StudyDescription == "CT head of * please"  # Clean Descriptors
    shift = pydicom.valuerep.DA(original.StudyDate) - pydicom.valuerep.DA(ds.StudyDate)
    assert 1 <= shift.days <= deidentify.MAX_SHIFT_DAYS  # Modified Dates: shifted back
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = {c.CodeValue for c in ds.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113110", "113108", "113107", "113105"}
    full = copy.deepcopy(original)
    deidentified(full, deidentify.Profile(b"k", frozenset({"fulldates"})))
    assert full.StudyDate == original.StudyDate
    assert full.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_free_text_and_dates_inside_content_sequences():
    """SR content (Content Sequence: D, C with Clean Structured Content): text and dates in
    its items go, codes and numbers stay (a concept name or unit of "ANONYMIZED", as
    dciodvfy found in a de-identified Measurement Report, is no code)."""

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        found = Dataset()
        found.CodeValue, found.CodingSchemeDesignator, found.CodeMeaning = value, scheme, meaning
        return found

    def report() -> Dataset:
        ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
        item = Dataset()
        item.ValueType, item.TextValue = "TEXT", "Seen John Smith 1CT1 on 2020-01-01"
        item.Date, item.NumericValue = "20200101", "42"
        measured = Dataset()
        measured.ValueType = "NUM"
        measured.ConceptNameCodeSequence = [code("410668003", "SCT", "Length")]
        value = Dataset()
        value.NumericValue = "10"
        value.MeasurementUnitsCodeSequence = [code("mm", "UCUM", "CT1 mm")]  # meaning: cleaned
        measured.MeasuredValueSequence = [value]
        ds.ContentSequence = [item, measured]
        return ds

    basic = report()
    data = deidentified(basic)
    item, measured = basic.ContentSequence
    assert b"Smith" not in data and item.Date != "20200101"
    assert item.ValueType == "TEXT" and item.NumericValue == 42
    name = measured.ConceptNameCodeSequence[0]
    assert (name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning) == (
        "410668003",
        "SCT",
        "Length",
    )
    unit = measured.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning) == ("mm", "UCUM", "* mm")
    cleaned = report()
    deidentified(cleaned, deidentify.Profile(b"k", frozenset({"struct"})))
    assert "1CT1" not in cleaned.ContentSequence[0].TextValue
    assert cleaned.ContentSequence[0].TextValue.startswith("Seen John Smith")  # not an ID


# A value of each VR that must not survive de-identification; MARKERS show it did.
PHI = {
    "PN": "Secret^Person",
    "LT": "SECRET note",
    "ST": "SECRET note",
    "UT": "SECRET note",
    "LO": "Doe PID42",  # short strings: the patient's name and ID cleaned out
    "SH": "Doe PID42",
    "UC": "Doe PID42",
    "DA": "19800102",
    "DT": "19800102030405",
    "TM": "030405",
    "AE": "SECRETAE",
    "UR": "http://secret.example/PID42",
}
MARKERS = [b"Secret", b"SECRET", b"secret", b"PID42", b"Doe", b"19800102", b"030405"]
SAMPLES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "test-SR.dcm"]


def unlisted_tag(vr: str) -> int:
    """The first standard attribute of this VR that Table E.1-1 does not list."""
    return next(
        tag
        for tag, (entry_vr, vm, _, retired, _) in sorted(DicomDictionary.items())
        if entry_vr == vr and vm == "1" and not retired and tag >> 16 not in (0, 2)
        and deidentify.rule_for(tag) is None
    )  # fmt: skip


def fill(ds: Dataset, depth: int) -> None:
    """PHI in an attribute of every VR the table leaves out, in codes, and (below the top)
    one more level down, to depth 3."""
    for vr, value in PHI.items():
        ds.add(DataElement(unlisted_tag(vr), vr, value))
    ds.EvaluatorName = PHI["PN"]  # the review's: unlisted, kept before
    ds.InstanceCreationDate, ds.ObservationDateTime = PHI["DA"], PHI["DT"]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-A0100", "SRT", "Doe PID42"
    ds.AnatomicRegionSequence = [code]
    if depth < 3:
        item = Dataset()
        fill(item, depth + 1)
        code.AnatomicRegionModifierSequence = [item]


def probe() -> Dataset:
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^John", "PID42", "CT"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.1"
    fill(ds, 1)
    frame = Dataset()
    frame.FrameAcquisitionDateTime = frame.FrameReferenceDateTime = PHI["DT"]
    shared, per_frame = Dataset(), Dataset()
    shared.FrameContentSequence, per_frame.FrameContentSequence = [frame], [copy.deepcopy(frame)]
    ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence = [shared], [per_frame]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "SECRETAE"
    ds.file_meta.SendingApplicationEntityTitle = "SECRETAE"
    ds.file_meta.ImplementationVersionName = "SECRET_IMPL"
    return ds


def test_a_probe_with_phi_in_every_vr_and_depth():
    """Issue 17: attributes the table does not list kept their values, at every depth
    and in the file meta."""
    ds = probe()
    raw = io.BytesIO()
    ds.save_as(raw, enforce_file_format=True)
    assert all(marker in raw.getvalue() for marker in MARKERS)
    data = deidentified(ds)
    for marker in MARKERS:
        assert marker not in data, marker
    back = pydicom.dcmread(io.BytesIO(data))
    code = back.AnatomicRegionSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "T-A0100",
        "SRT",
        "* *",
    )
    assert back.Modality == "CT"  # codes stay
    frame = back.SharedFunctionalGroupsSequence[0].FrameContentSequence[0]
    assert frame.FrameAcquisitionDateTime == "19000101000000"  # Type 1C: a dummy, not gone
    assert "SourceApplicationEntityTitle" not in back.file_meta
    assert back.file_meta.ImplementationVersionName == "MINIPACS_01"


@pytest.mark.parametrize("name", SAMPLES)
def test_no_date_time_or_name_survives_in_the_review_samples(name):
    """CT_small kept InstanceCreationDate (the exam day), test-SR ObservationDateTime,
    every file its file meta, while saying LongitudinalTemporalInformationModified
    REMOVED."""
    original = pydicom.dcmread(TEST_FILES / name)
    back = pydicom.dcmread(io.BytesIO(deidentified(copy.deepcopy(original))))
    assert back.LongitudinalTemporalInformationModified == "REMOVED"
    dummies = {"DA": "19000101", "DT": "19000101000000", "TM": "000000"}
    for elem in [*back.iterall(), *back.file_meta]:
        if elem.VR in dummies and elem.value:
            assert str(elem.value) == dummies[elem.VR], elem
        if elem.VR == "PN" and elem.value:
            assert str(elem.value) in (back.PatientID, "ANONYMIZED"), elem  # pseudonym, dummy
    meta = back.file_meta
    assert "SourceApplicationEntityTitle" not in meta
    assert (meta.ImplementationClassUID, meta.ImplementationVersionName) == (
        IMPLEMENTATION_UID,
        "MINIPACS_01",
    )


def test_an_empty_or_wildcard_selection_is_refused(tmp_path):
    """`--patient ''` matched every patient (an empty key is universal matching)."""
    for value in ("", " ", "PID*"):
        result = minipacs(
            "anonymize", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--patient", value, check=False,
        )  # fmt: skip
        assert result.returncode == 2
        assert "would match more than one" in result.stderr
    assert not (tmp_path / "out").exists()


def test_attributes_the_iod_requires_keep_a_conformant_value():
    """What dciodvfy found missing or empty in de-identified copies of pydicom's files:
    Treatment Machine Name (X/Z, Type 2 in a beam) stays, empty; a waveform annotation's
    Unformatted Text Value (unlisted free text, Type 1C) becomes a dummy, not empty."""
    plan = pydicom.dcmread(io.BytesIO(deidentified(pydicom.dcmread(TEST_FILES / "rtplan.dcm"))))
    assert [beam.get("TreatmentMachineName", "gone") for beam in plan.BeamSequence] == [""]
    ecg = pydicom.dcmread(TEST_FILES / "waveform_ecg.dcm")
    texts = [a for a in ecg.WaveformAnnotationSequence if "UnformattedTextValue" in a]
    assert texts and all(a.UnformattedTextValue for a in texts)
    back = pydicom.dcmread(io.BytesIO(deidentified(ecg)))
    found = [a.UnformattedTextValue for a in back.WaveformAnnotationSequence if a.get(0x00700006)]
    assert found == ["ANONYMIZED"] * len(texts)


def test_burned_in_annotation_is_refused():
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(deidentify.NotDeidentifiable):
        deidentify.deidentify(ds, KEY)


def archive_args(server) -> list[str]:
    return ["--data", str(server.data)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the web and CLI tests, knowing RESEARCH (a storescp a test starts on
    `server.research_port`); each test stores a study of its own patient and looks at it
    alone."""
    running = Server(
        tmp_path_factory.mktemp("deidentify") / "data",
        "--peer",
        f"RESEARCH=127.0.0.1:{(research_port := free_port())}",
    )
    running.research_port = research_port
    yield running.start()
    running.kill()


def test_anonymize_to_a_folder_and_over_the_web_agree(server, tmp_path):
    """The CLI and both web routes use the archive's key: the same study gets the same new
    UIDs whichever way it leaves. The archive keeps the originals."""
    study = make_study(tmp_path / "study", 3, size=32, patient_id="DEID-WEB")
    storescu(server.port, *study)
    original = pydicom.dcmread(study[0])
    out = tmp_path / "out"
    result = minipacs(
        "anonymize", "--study", original.StudyInstanceUID, "--out", str(out), *archive_args(server)
    )
    assert "instances de-identified: 3" in result.stdout
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 3
    exported = {pydicom.dcmread(p).SOPInstanceUID for p in written}
    assert run("dcmdump", str(written[0])).returncode == 0  # a file dcmtk reads
    new_study = pydicom.dcmread(written[0]).StudyInstanceUID
    assert new_study != original.StudyInstanceUID

    uri = requests.get(
        f"{server.url}/wado",
        params={
            "requestType": "WADO",
            "studyUID": original.StudyInstanceUID,
            "seriesUID": original.SeriesInstanceUID,
            "objectUID": original.SOPInstanceUID,
            "contentType": "application/dicom",
            "anonymize": "yes",
        },
        timeout=30,
    )
    assert uri.status_code == 200, uri.text
    via_uri = pydicom.dcmread(io.BytesIO(uri.content))
    assert via_uri.PatientIdentityRemoved == "YES"
    assert via_uri.StudyInstanceUID == new_study and via_uri.SOPInstanceUID in exported
    assert str(original.PatientID).encode() not in uri.content

    rs = requests.get(
        f"{server.url}/dicom-web/studies/{original.StudyInstanceUID}",
        params={"anonymize": "yes"},
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert rs.status_code == 200
    assert rs.content.count(b"Content-Type: application/dicom") == 3
    assert str(original.PatientID).encode() not in rs.content
    assert original.StudyInstanceUID.encode() not in rs.content
    assert new_study.encode() in rs.content

    kept = requests.get(f"{server.url}/dicom-web/studies/{original.StudyInstanceUID}/metadata")
    assert kept.status_code == 200 and original.PatientID in kept.text  # originals kept
    deadline = time.monotonic() + 10  # web events are queued, not awaited
    while True:
        lines = minipacs(
            "audit", "--json", "--patient", original.PatientID, *archive_args(server)
        ).stdout.splitlines()
        kinds = [json.loads(line)["event"] for line in lines]
        if kinds.count("deidentify") == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "export" in kinds and kinds.count("deidentify") == 2


def test_web_requests_that_cannot_be_anonymized(server, tmp_path):
    burned = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    burned.StudyInstanceUID, burned.SeriesInstanceUID = generate_uid(), generate_uid()
    burned.SOPInstanceUID = burned.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    burned.BurnedInAnnotation = "YES"
    burned.save_as(tmp_path / "burned.dcm")
    storescu(server.port, tmp_path / "burned.dcm")
    base = f"{server.url}/dicom-web/studies/{burned.StudyInstanceUID}"
    params = {
        "requestType": "WADO",
        "studyUID": burned.StudyInstanceUID,
        "seriesUID": burned.SeriesInstanceUID,
        "objectUID": burned.SOPInstanceUID,
        "anonymize": "yes",
    }
    assert requests.get(f"{server.url}/wado", params=params, timeout=10).status_code == 400
    params["contentType"] = "application/dicom"
    refused = requests.get(f"{server.url}/wado", params=params, timeout=10)
    assert refused.status_code == 409 and "burned-in" in refused.text
    assert requests.get(base, params={"anonymize": "yes"}, timeout=10).status_code == 409
    metadata = requests.get(f"{base}/metadata", params={"anonymize": "yes"}, timeout=10)
    assert metadata.status_code == 400  # never identified data under an anonymize flag
    assert requests.get(base, params={"anonymize": "no"}, timeout=10).status_code == 400


def test_anonymize_to_a_peer(server, tmp_path):
    dest_port, received = server.research_port, tmp_path / "received"
    receiver = storescp(dest_port, received, "-aet", "RESEARCH")
    try:
        study = make_study(tmp_path / "study", 2, size=32, patient_id="DEID-PEER")
        storescu(server.port, *study)
        original = pydicom.dcmread(study[0])
        key = tmp_path / "project.key"
        args = ["--patient", original.PatientID, "--dest", "RESEARCH", "--key-file", str(key)]
        result = minipacs(
            "anonymize", *args, "--options", "patchars", "--peer",
            f"RESEARCH=127.0.0.1:{dest_port}", *archive_args(server),
        )  # fmt: skip
        assert "instances de-identified: 2" in result.stdout, result.stdout + result.stderr
        files = sorted(received.iterdir())
        assert len(files) == 2 and key.stat().st_mode & 0o777 == 0o600
        got = pydicom.dcmread(files[0])
        assert got.PatientID != original.PatientID and got.PatientSex == original.PatientSex
        assert deidentify.Profile(key.read_bytes()).uid(original.StudyInstanceUID) == (
            got.StudyInstanceUID
        )
        missing = minipacs(
            "anonymize", "--study", "1.2.3.4", "--dest", "RESEARCH", "--peer",
            f"RESEARCH=127.0.0.1:{dest_port}", *archive_args(server), check=False,
        )  # fmt: skip
        assert missing.returncode == 1 and "nothing stored under it" in missing.stdout
    finally:
        receiver.terminate()
        receiver.wait(10)
