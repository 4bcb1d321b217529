"""The DICOM files that ship inside pydicom, sorted into what an archive must store and
what it must refuse."""

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom.sop_class import _STORAGE_CLASSES

from storage.dataset import is_uid

TEST_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
CHARSET_FILES = TEST_FILES.parent / "charset_files"
STORAGE_CLASSES = set(_STORAGE_CLASSES.values())

# Part 10 files with the UIDs of an instance that are nevertheless broken inside.
MALFORMED = {
    "MR_truncated.dcm": "truncated",  # pixel data shorter than its length
    "rtplan_truncated.dcm": "truncated",
    "SC_rgb_jpeg.dcm": "Implicit VR",  # encoded implicit under an explicit syntax
}


@dataclass(frozen=True)
class SampleFile:
    path: Path
    transfer_syntax: str
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    meta_sop_uid: str  # what a sender that trusts the File Meta announces


def sample_files() -> list[SampleFile]:
    """Every shipped Part 10 file whose UIDs make it an instance of a storage class."""
    found = []
    for path in sorted([*TEST_FILES.iterdir(), *CHARSET_FILES.iterdir()]):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            syntax = str(ds.file_meta.TransferSyntaxUID)
        except Exception:
            continue
        uids = [str(ds.get(k, "")) for k in ("SOPClassUID", "SOPInstanceUID")]
        uids += [str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID")]
        if uids[0] in STORAGE_CLASSES and all(map(is_uid, uids)):
            meta_uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
            found.append(SampleFile(path, syntax, *uids, meta_uid))
    return found


def storable() -> list[SampleFile]:
    return [f for f in sample_files() if f.path.name not in MALFORMED]


def malformed() -> list[SampleFile]:
    return [f for f in sample_files() if f.path.name in MALFORMED]


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information (what C-STORE carries)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    offset = 132
    while data[offset : offset + 2] == b"\x02\x00":
        vr = data[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
            length = int.from_bytes(data[offset + 8 : offset + 12], "little")
            offset += 12 + length
        else:
            offset += 8 + int.from_bytes(data[offset + 6 : offset + 8], "little")
    return data[offset:]
