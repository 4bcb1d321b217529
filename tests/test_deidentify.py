"""De-identification (PS3.15 Annex E): the profile on pydicom's own files, then every way
out: `minipacs anonymize` to a folder and to a dcmtk storescp, WADO-URI `anonymize=yes`
and WADO-RS `anonymize=yes`; consistent pseudonyms under one key; audited."""

import copy
import io
import json
import subprocess
import time

import pydicom
import pytest
import requests
from conftest import TEST_FILES
from conftest import free_port
from conftest import minipacs
from conftest import run
from conftest import storescu
from make_study import make_study
from pydicom.charset import convert_encodings
from pydicom.charset import encode_string
from pydicom.dataset import Dataset

from storage import deidentify
from storage.deid_table import TABLE

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
    its items go, codes and numbers stay."""

    def report() -> Dataset:
        ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
        item = Dataset()
        item.ValueType, item.TextValue = "TEXT", "Seen John Smith 1CT1 on 2020-01-01"
        item.Date, item.NumericValue = "20200101", "42"
        ds.ContentSequence = [item]
        return ds

    basic = report()
    data = deidentified(basic)
    (item,) = basic.ContentSequence
    assert b"Smith" not in data and item.Date != "20200101"
    assert item.ValueType == "TEXT" and item.NumericValue == 42
    cleaned = report()
    deidentified(cleaned, deidentify.Profile(b"k", frozenset({"struct"})))
    assert "1CT1" not in cleaned.ContentSequence[0].TextValue
    assert cleaned.ContentSequence[0].TextValue.startswith("Seen John Smith")  # not an ID


def test_burned_in_annotation_is_refused():
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(deidentify.NotDeidentifiable):
        deidentify.deidentify(ds, KEY)


def archive_args(server) -> list[str]:
    return ["--data", str(server.data)]


def test_anonymize_to_a_folder_and_over_the_web_agree(server, tmp_path):
    """The CLI and both web routes use the archive's key: the same study gets the same new
    UIDs whichever way it leaves. The archive keeps the originals."""
    study = make_study(tmp_path / "study", 3, size=32)
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
        lines = minipacs("audit", "--json", *archive_args(server)).stdout.splitlines()
        kinds = [json.loads(line)["event"] for line in lines]
        if kinds.count("deidentify") == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "export" in kinds and kinds.count("deidentify") == 2


def test_web_requests_that_cannot_be_anonymized(server, tmp_path):
    burned = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
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


def test_anonymize_to_a_peer(start_server, tmp_path):
    dest_port, received = free_port(), tmp_path / "received"
    received.mkdir()
    storescp = subprocess.Popen(
        ["storescp", "-aet", "RESEARCH", "-od", str(received), str(dest_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        server = start_server("--peer", f"RESEARCH=127.0.0.1:{dest_port}")
        study = make_study(tmp_path / "study", 2, size=32)
        storescu(server.port, *study)
        original = pydicom.dcmread(study[0])
        time.sleep(0.5)  # storescp listening
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
        storescp.terminate()
        storescp.wait(10)
