"""One DICOM wildcard matcher (storage.wildcards, PS3.4 C.2.2.2.4): only `*` and `?` are
wildcards. Its SQL rendering (indexed columns) and its Python one (stored DICOM JSON,
routing rules) are held to the same cases, on both index engines, in-process."""

import pydicom
import pytest
from dicom_files import TEST_FILES
from pydicom.uid import generate_uid

from storage import Archive
from storage import wildcards
from storage.models import Patient
from storage.models import db
from storage.query import Key

VALUES = ["A[B]C", "ABC", "A]C", "A%C", "AXC", "A_C", "A\\C", "A", "", "a[b]c", "AB%", "A\nC"]
CASES = [
    ("A[B]C", {"A[B]C"}),  # brackets are literal, not a character class (fnmatch: ABC)
    ("A[B]*", {"A[B]C"}),
    ("[AB]*", set()),
    ("A]?", {"A]C"}),
    ("A?C", {"ABC", "A]C", "A%C", "AXC", "A_C", "A\\C", "A\nC"}),
    ("A%C", {"A%C"}),  # % and _ are literal (LIKE: any run, one character)
    ("A_C", {"A_C"}),
    ("*%", {"AB%"}),
    ("*_*", {"A_C"}),
    ("A\\C", {"A\\C"}),  # a backslash is literal (LIKE's escape character)
    ("A\\*", {"A\\C"}),
    ("?", {"A"}),
    ("A*", {v for v in VALUES if v.startswith("A")}),
    ("*", set(VALUES)),
    ("a*", {"a[b]c"}),  # case-sensitive (PN's case folding is the caller's)
    ("A??", {"ABC", "A]C", "A%C", "AXC", "A_C", "A\\C", "AB%", "A\nC"}),
]


@pytest.fixture(scope="module")
def archive(tmp_path_factory, module_engine):
    """An index holding one patient per value, on each engine."""
    root = tmp_path_factory.mktemp("wildcards")
    with Archive(root / "data", fsync=False, index_url=module_engine) as opened:
        with db.connection_context():
            Patient.insert_many([{"patient_id": v, "issuer": "W"} for v in VALUES]).execute()
        yield opened


@pytest.mark.parametrize(("pattern", "expected"), CASES, ids=[c[0] for c in CASES])
def test_sql_and_python_agree(archive, pattern, expected):
    with db.connection_context():
        where = (Patient.issuer == "W") & wildcards.condition(Patient.patient_id, pattern)
        in_sql = {p.patient_id for p in Patient.select(Patient.patient_id).where(where)}
    in_python = {v for v in VALUES if wildcards.matches(pattern, v)}
    assert in_sql == expected
    assert in_python == expected


def test_a_query_matches_brackets_literally_in_sql_and_python(archive, tmp_path):
    """InstitutionName has no index column (matched in Python on the stored JSON),
    PatientID has one (SQL): `A[B]*` finds the same study through both, and not the
    ABC one fnmatch's character class used to find."""
    studies = {}
    for value in ("A[B]C", "ABC"):
        ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = ds.InstitutionName = value
        path = tmp_path / f"{len(studies)}.dcm"
        ds.save_as(path, enforce_file_format=True)
        archive.import_file(path)
        studies[ds.StudyInstanceUID] = value
    for tag in (0x00080080, 0x00100020):  # InstitutionName (Python), PatientID (SQL)
        keys = [Key(0x0020000D, "UI", list(studies)), Key(tag, "LO", "A[B]*")]
        found = [a["0020000D"]["Value"][0] for a in archive.catalog.find("STUDY", keys)]
        assert [studies[uid] for uid in found] == ["A[B]C"], hex(tag)
