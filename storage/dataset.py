"""Reading a received Part 10 file: structure check, UIDs, index keys and DICOM JSON.

Nothing here re-encodes the dataset: the archive stores the bytes as received and
only reads them to index them.
"""

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom.config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.uid import ExplicitVRBigEndian
from pydicom.uid import ImplicitVRLittleEndian

from storage.dicomjson import dataset_to_json
from storage.errors import InvalidDataset
from storage.errors import InvalidUID
from storage.errors import NotDicom

# Stored as received: value validation is the sender's business, not a reason to warn per file.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UNDEFINED = 0xFFFFFFFF
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
IMPLICIT_PIXEL_VR = {0x0008: "OF", 0x0009: "OD", 0x0010: "OW"}
BULK_THRESHOLD = 1024  # bytes; longer binary values become BulkDataURI in the stored JSON


@dataclass(frozen=True)
class ParsedInstance:
    """What the index needs from one instance, read once at ingest."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    patient: dict[str, str]
    study: dict[str, str]
    series: dict[str, object]
    instance_number: int | None
    json: str


def validate_uid(value: object, name: str) -> str:
    """Return `value` as a UID safe to use as a path component, or raise InvalidUID."""
    uid = str(value or "").rstrip("\0 ")
    if not uid:
        raise InvalidUID(f"{name} is missing")
    if len(uid) > 64 or not UID_RE.match(uid):
        raise InvalidUID(f"{name} is not a valid UID: {uid[:80]!r}")
    return uid


def read_instance(path: Path) -> ParsedInstance:
    """Check that `path` is a whole Part 10 file and extract its index keys."""
    with open(path, "rb") as fp:
        size = fp.seek(0, 2)
        fp.seek(0)
        start, syntax = _read_meta(fp)
        pixel_vrs: dict[int, str] = {}
        deflated = syntax == DeflatedExplicitVRLittleEndian
        if not deflated:  # a deflated stream is checked by inflating it in dcmread below
            implicit = syntax == ImplicitVRLittleEndian
            little = syntax != ExplicitVRBigEndian
            fp.seek(start)
            if not implicit and not fp.read(6)[4:6].isalpha():
                raise InvalidDataset(f"dataset is Implicit VR but the Transfer Syntax is {syntax}")
            fp.seek(start)
            _walk_dataset(fp, size, implicit, little, until_delimiter=False, pixel_vrs=pixel_vrs)
        try:
            fp.seek(0)
            ds = dcmread(fp, stop_before_pixels=not deflated)
        except Exception as exc:  # pydicom raises many types on malformed input
            raise InvalidDataset(f"dataset does not parse: {exc}") from exc
    return _parse(ds, syntax, pixel_vrs)


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a stored Part 10 file, exactly as received (what C-STORE sends)."""
    with open(path, "rb") as fp:
        start, _ = _read_meta(fp)
        fp.seek(start)
        return fp.read()


def _read_meta(fp: BinaryIO) -> tuple[int, str]:
    """Return the dataset's offset and the transfer syntax from the File Meta (PS3.10 7.1)."""
    fp.seek(128)
    if fp.read(4) != b"DICM":
        raise NotDicom("not a DICOM Part 10 file (no DICM prefix)")
    syntax = ""
    while True:
        pos = fp.tell()
        head = fp.read(8)
        if len(head) < 8:
            raise InvalidDataset("file ends inside the File Meta Information")
        group, elem = struct.unpack("<HH", head[:4])
        if group != 0x0002:
            fp.seek(pos)
            break
        if head[4:6] in LONG_VRS:
            (length,) = struct.unpack("<L", fp.read(4))
        else:
            (length,) = struct.unpack("<H", head[6:8])
        value = fp.read(length)
        if len(value) < length:
            raise InvalidDataset("file ends inside the File Meta Information")
        if elem == 0x0010:
            syntax = value.decode("ascii", "replace").rstrip("\0 ")
    if not syntax:
        raise InvalidDataset("File Meta Information has no Transfer Syntax UID")
    return pos, syntax


def _walk_dataset(
    fp: BinaryIO,
    size: int,
    implicit: bool,
    little: bool,
    until_delimiter: bool,
    pixel_vrs: dict[int, str] | None = None,
) -> None:
    """Walk element headers to the end without reading values: finds truncation anywhere.

    Top-level pixel data tags (group 7FE0, which dcmread stops before) go into `pixel_vrs`.
    """
    order = "<" if little else ">"
    while True:
        pos = fp.tell()
        head = fp.read(8)
        if not head and not until_delimiter:
            return
        if len(head) < 8:
            raise InvalidDataset(f"dataset truncated in an element header at byte {pos}")
        group, elem = struct.unpack(order + "HH", head[:4])
        if group == 0xFFFE:
            if elem == 0xE00D and until_delimiter:
                return
            raise InvalidDataset(f"unexpected delimiter ({group:04X},{elem:04X}) at byte {pos}")
        vr = b""
        if implicit:
            (length,) = struct.unpack(order + "L", head[4:8])
        else:
            vr = head[4:6]
            if vr in LONG_VRS:
                more = fp.read(4)
                if len(more) < 4:
                    raise InvalidDataset(f"dataset truncated in an element header at byte {pos}")
                (length,) = struct.unpack(order + "L", more)
            else:
                (length,) = struct.unpack(order + "H", head[6:8])
        if pixel_vrs is not None and group == 0x7FE0:
            pixel_vrs[(group << 16) | elem] = vr.decode(
                "ascii", "replace"
            ) or IMPLICIT_PIXEL_VR.get(elem, "OW")
        if length == UNDEFINED:
            # PS3.5 6.2.2: UN of undefined length is encoded Implicit VR Little Endian inside.
            if vr == b"UN":
                _walk_items(fp, size, True, True)
            else:
                _walk_items(fp, size, implicit, little)
            continue
        end = fp.tell() + length
        if end > size:
            raise InvalidDataset(
                f"dataset truncated: ({group:04X},{elem:04X}) needs {length} bytes at byte {pos}"
            )
        fp.seek(end)


def _walk_items(fp: BinaryIO, size: int, implicit: bool, little: bool) -> None:
    order = "<" if little else ">"
    while True:
        pos = fp.tell()
        head = fp.read(8)
        if len(head) < 8:
            raise InvalidDataset(f"dataset truncated inside a sequence at byte {pos}")
        group, elem, length = struct.unpack(order + "HHL", head)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return
        if (group, elem) != (0xFFFE, 0xE000):
            raise InvalidDataset(f"expected an item at byte {pos}, found ({group:04X},{elem:04X})")
        if length == UNDEFINED:
            _walk_dataset(fp, size, implicit, little, until_delimiter=True)
        elif fp.tell() + length > size:
            raise InvalidDataset(f"dataset truncated inside an item at byte {pos}")
        else:
            fp.seek(fp.tell() + length)


def name_key(name: str) -> str:
    """The alphabetic component group of a PN, trailing empty components dropped, upper
    case: what case-insensitive PN matching compares (PS3.4 C.2.2.2.1)."""
    alphabetic = name.split("=")[0].rstrip("^ ")
    return alphabetic.upper()


def time_key(value: str, upper: bool = False) -> str:
    """A TM as HHMMSS.ffffff; missing parts are zeros, or their maximum when `upper` (the end
    of a range: "13" means up to 13:59:59.999999)."""
    value = value.replace(":", "").strip()
    if not value:
        return ""
    whole, _, fraction = value.partition(".")
    pad = "595959"[len(whole) :] if upper and len(whole) < 6 else "0" * (6 - len(whole))
    fraction = (fraction + ("9" if upper else "0") * 6)[:6]
    return f"{whole[:6]}{pad if len(whole) < 6 else ''}.{fraction}"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _parse(ds: Dataset, syntax: str, pixel_vrs: dict[int, str]) -> ParsedInstance:
    try:
        return ParsedInstance(
            sop_class_uid=validate_uid(ds.get("SOPClassUID"), "SOP Class UID"),
            sop_uid=validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID"),
            study_uid=validate_uid(ds.get("StudyInstanceUID"), "Study Instance UID"),
            series_uid=validate_uid(ds.get("SeriesInstanceUID"), "Series Instance UID"),
            transfer_syntax=syntax,
            patient={
                "patient_id": _text(ds, "PatientID"),
                "issuer": _text(ds, "IssuerOfPatientID"),
                "patient_name": _text(ds, "PatientName"),
                "name_key": name_key(_text(ds, "PatientName")),
                "birth_date": _text(ds, "PatientBirthDate"),
                "sex": _text(ds, "PatientSex"),
            },
            study={
                "study_date": _text(ds, "StudyDate"),
                "study_time": _text(ds, "StudyTime"),
                "time_key": time_key(_text(ds, "StudyTime")),
                "accession_number": _text(ds, "AccessionNumber"),
                "study_id": _text(ds, "StudyID"),
                "referring_physician": _text(ds, "ReferringPhysicianName"),
                "description": _text(ds, "StudyDescription"),
            },
            series={
                "modality": _text(ds, "Modality"),
                "series_number": _int(ds, "SeriesNumber"),
                "description": _text(ds, "SeriesDescription"),
            },
            instance_number=_int(ds, "InstanceNumber"),
            json=to_json(ds, pixel_vrs),
        )
    except InvalidUID:
        raise
    except Exception as exc:  # a value pydicom cannot decode (bad charset, bad number…)
        raise InvalidDataset(f"dataset values do not decode: {exc}") from exc


def to_json(ds: Dataset, pixel_vrs: dict[int, str]) -> str:
    """PS3.18 F.2 DICOM JSON of `ds`; long binary values, and the pixel data dcmread skipped,
    become a BulkDataURI holding the element's path, TAG[/ITEM/TAG...] (the web side puts
    the instance's bulkdata URL in front)."""
    body = dataset_to_json(ds, BULK_THRESHOLD, lambda tag: f"{tag:08X}")
    for tag, vr in sorted(pixel_vrs.items()):
        body.setdefault(f"{tag:08X}", {"vr": vr, "BulkDataURI": f"{tag:08X}"})
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)
