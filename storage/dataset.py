"""Reading a received Part 10 file: structure check, UIDs, index keys and DICOM JSON.

Nothing here re-encodes the dataset: the archive stores the bytes as received and
only reads them to index them.
"""

import contextlib
import hashlib
import io
import json
import mmap
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom.config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset as pydicom_read_dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.uid import ExplicitVRBigEndian
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import ImplicitVRLittleEndian

from storage.dicomjson import dataset_to_json
from storage.errors import InvalidDataset
from storage.errors import InvalidUID
from storage.errors import NotDicom
from storage.errors import OverPixelBudget
from storage.files import CHUNK
from storage.files import hash_file

# Stored as received: value validation is the sender's business, not a reason to warn per file.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")  # whole values only: see is_uid
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
# An element header (PS3.5 7.1): (implicit, byte order) -> tag and length, or tag, VR and
# 2-byte length (a long VR's 4-byte length follows: _LONG).
_HEADS = {
    (implicit, order): struct.Struct(order + ("HHL" if implicit else "HH2sH"))
    for implicit in (True, False)
    for order in "<>"
}
_LONG = {order: struct.Struct(order + "L") for order in "<>"}
BULK_THRESHOLD = 1024  # bytes; longer binary values become BulkDataURI in the stored JSON
MAX_DEPTH = 64  # nested sequences; a deeper dataset is refused, not recursed into
MAX_INFLATED = 1 << 28  # bytes a deflated dataset may inflate to (256 MiB)
WHOLE_READ = 1 << 22  # bytes: a journal entry up to this size is read into memory at once
# Where dcmread(stop_before_pixels=True) stops: the first of the pixel data elements.
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
SOP_CLASS_UID, SOP_INSTANCE_UID = 0x00080016, 0x00080018
SPECIFIC_CHARACTER_SET = 0x00080005
STUDY_INSTANCE_UID, SERIES_INSTANCE_UID = 0x0020000D, 0x0020000E
SAMPLES_PER_PIXEL, NUMBER_OF_FRAMES = 0x00280002, 0x00280008
ROWS, COLUMNS, BITS_ALLOCATED = 0x00280010, 0x00280011, 0x00280100
# The top-level elements the receive check reads (Archive.accept): the UIDs compared
# with the request and used as path components, and what the pixel budget needs.
HEADER_TAGS = frozenset(
    {
        SOP_CLASS_UID,
        SOP_INSTANCE_UID,
        STUDY_INSTANCE_UID,
        SERIES_INSTANCE_UID,
        SAMPLES_PER_PIXEL,
        NUMBER_OF_FRAMES,
        ROWS,
        COLUMNS,
        BITS_ALLOCATED,
    }
)


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


def is_uid(value: str) -> bool:
    """Digits and dots, at most 64 characters (PS3.5 9.1). fullmatch: a pattern ending in
    `$` would also take a trailing newline, which would then reach paths, URLs and logs."""
    return len(value) <= 64 and UID_RE.fullmatch(value) is not None


def validate_uid(value: object, name: str) -> str:
    """Return `value` as a UID safe to use as a path component, or raise InvalidUID."""
    uid = str(value or "").rstrip("\0 ")
    if not uid:
        raise InvalidUID(f"{name} is missing")
    if not is_uid(uid):
        raise InvalidUID(f"{name} is not a valid UID: {uid[:80]!r}")
    return uid


def read_instance(path: Path, pixel_budget: int | None = None) -> ParsedInstance:
    """Check that `path` is a whole Part 10 file (within `pixel_budget` bytes of decoded
    pixel data, when given) and extract its index keys."""
    with _dataset(path) as (fp, start, syntax, encoded):
        header = _header(fp, start, syntax, encoded)
        check_pixel_budget(header.pixel_bytes(), pixel_budget)
        try:
            fp.seek(0)
            # An inflated stream has no File Meta (force); pixel data is never read.
            ds = dcmread(fp, force=encoded != syntax, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types on malformed input
            raise InvalidDataset(f"dataset does not parse: {exc}") from exc
    return _parse(ds, header.syntax, header.pixel_vrs)


def read_received(path: Path) -> tuple[ParsedInstance, str]:
    """A journal entry's index keys and the SHA-256 of its bytes (storage.indexer).

    Its every element header was walked when it was received (read_header, before the
    Success), so the walk here starts where pydicom stops, at the pixel data: only the
    pixel data elements' VRs are still needed from it. The file is read once, for the
    parse and the hash; pydicom reads the dataset from memory, not the file meta again.
    The same result as read_instance and hash_file (tests/test_indexer_read.py); an
    entry that is deflated, larger than WHOLE_READ or begins with command elements
    (which pydicom reads its own way) is read by them."""
    with open(path, "rb") as fp:
        if os.fstat(fp.fileno()).st_size > WHOLE_READ:
            return read_instance(path), hash_file(path)[1]
        data = fp.read()
    buf = io.BytesIO(data)
    start, syntax = _read_meta(buf)
    if syntax == DeflatedExplicitVRLittleEndian or data[start : start + 2] == b"\0\0":
        return read_instance(path), hashlib.sha256(data).hexdigest()
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    try:
        ds = pydicom_read_dataset(buf, implicit, little, stop_when=_at_pixels)
        # dcmread converts the Specific Character Set in place (it asks for the dataset's
        # encoding): its DICOM JSON is then pydicom's, as read_instance gives it.
        ds.get(SPECIFIC_CHARACTER_SET)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidDataset(f"dataset does not parse: {exc}") from exc
    walk = _Walk(data, len(data))
    walk.dataset(buf.tell(), implicit, "<" if little else ">", 0, delimited=False)
    return _parse(ds, syntax, walk.pixel_vrs), hashlib.sha256(data).hexdigest()


def _at_pixels(tag: int, vr: str | None, length: int) -> bool:
    return tag in PIXEL_TAGS


@dataclass(frozen=True)
class Header:
    """What the receive check needs of a dataset, read without pydicom."""

    syntax: str
    values: dict[int, bytes]  # raw values of the top-level HEADER_TAGS found
    pixel_vrs: dict[int, str]  # top-level pixel data elements (group 7FE0) and their VR
    # Where the value of the top-level Pixel Data is in the file (None: none, or inflated).
    pixel_offset: int | None = None

    def uid(self, tag: int) -> str:
        return self.values.get(tag, b"").decode("ascii", "replace").rstrip("\0 ")

    def pixel_bytes(self) -> int:
        """Bytes the pixel data takes decoded, by what the header declares."""
        order = ">" if self.syntax == ExplicitVRBigEndian else "<"

        def us(tag: int) -> int | None:
            raw = self.values.get(tag, b"")
            return struct.unpack(order + "H", raw[:2])[0] if len(raw) >= 2 else None

        frames = self.values.get(NUMBER_OF_FRAMES, b"").decode("ascii", "replace")
        return pixel_data_bytes(
            us(ROWS), us(COLUMNS), frames, us(SAMPLES_PER_PIXEL), us(BITS_ALLOCATED)
        )


def pixel_data_bytes(rows, columns, frames, samples, bits_allocated) -> int:
    """Rows × Columns × Number of Frames × Samples per Pixel × bytes a sample takes once
    decoded (1-bit samples take a byte): what decoding every frame costs. Missing or
    unreadable values count as 1 (0 without Rows or Columns: no pixels)."""

    def number(value: object) -> int:
        try:
            return max(1, int(str(value).strip("\0 ") or 1))
        except (TypeError, ValueError):
            return 1

    if not rows or not columns:
        return 0
    sample = max(1, -(-number(bits_allocated) // 8))
    return int(rows) * int(columns) * number(frames) * number(samples) * sample


def dataset_pixel_bytes(ds: Dataset) -> int:
    """`pixel_data_bytes` of a parsed dataset."""
    return pixel_data_bytes(
        ds.get("Rows"),
        ds.get("Columns"),
        ds.get("NumberOfFrames"),
        ds.get("SamplesPerPixel"),
        ds.get("BitsAllocated"),
    )


def check_pixel_budget(size: int, budget: int | None, what: str = "the pixel data") -> None:
    """Raise OverPixelBudget when `size` bytes (decoded pixel data, or what decoding takes)
    exceed `budget` (None: no budget): checked before anything is decoded. The message
    leads with the reason: a C-STORE ErrorComment keeps 64 characters."""
    if budget is not None and size > budget:
        raise OverPixelBudget(
            f"over the pixel budget ({budget / (1 << 20):.0f} MiB): {what} needs "
            f"{size / (1 << 20):.1f} MiB"
        )


def read_header(path: Path, pixel_budget: int | None = None) -> Header:
    """Walk every element header of a Part 10 file (truncation or a stray delimiter
    anywhere raises InvalidDataset) and read the top-level HEADER_TAGS; values are not
    decoded. With `pixel_budget`, a dataset declaring more pixel data is refused."""
    with _dataset(path) as (fp, start, syntax, encoded):
        header = _header(fp, start, syntax, encoded)
    check_pixel_budget(header.pixel_bytes(), pixel_budget)
    return header


def read_header_in(
    data, start: int, syntax: str, pixel_budget: int | None = None, end: int | None = None
) -> Header:
    """read_header of a Part 10 file held in memory (its first `end` bytes, default all)
    whose dataset begins at `start` in `syntax` (not deflated): a C-STORE's bytes, checked
    before they are written (no file to open, map and seek, ~17 system calls an instance,
    each a GIL hand-off between receivers)."""
    end = len(data) if end is None else end
    if end <= start:
        raise InvalidDataset("the dataset is empty")
    header = _walk_header(data, end, start, syntax, syntax, head_only=False)
    check_pixel_budget(header.pixel_bytes(), pixel_budget)
    return header


def read_dataset(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """A stored file as a pydicom Dataset, for decoding or re-encoding it. A deflated one
    is inflated by the bounded `_dataset` (pydicom would inflate it whole in memory,
    however large) and keeps its File Meta: its Transfer Syntax still says deflated."""
    with _dataset(path) as (fp, _, syntax, encoded):
        if encoded == syntax:
            return dcmread(path, stop_before_pixels=stop_before_pixels)
        fp.seek(0)
        ds = dcmread(fp, force=True, stop_before_pixels=stop_before_pixels)
    ds.file_meta = read_file_meta_info(path)
    return ds


def inflate(raw: bytes) -> bytes:
    """A deflated dataset's bytes inflated, at most MAX_INFLATED (InvalidDataset beyond)."""
    target = io.BytesIO()
    _inflate(io.BytesIO(raw), target)
    return target.getvalue()


@contextlib.contextmanager
def _dataset(path: Path) -> Iterator[tuple[BinaryIO, int, str, str]]:
    """(file, dataset offset, transfer syntax, syntax the bytes there are in): the file
    itself, or for a deflated dataset a temporary file next to it holding it inflated,
    at most MAX_INFLATED bytes (a stream of a few KB can claim gigabytes of zeros)."""
    with open(path, "rb") as fp:
        start, syntax = _read_meta(fp)
        if syntax != DeflatedExplicitVRLittleEndian:
            yield fp, start, syntax, syntax
            return
        with tempfile.TemporaryFile(dir=path.parent) as inflated:
            fp.seek(start)
            _inflate(fp, inflated)
            yield inflated, 0, syntax, ExplicitVRLittleEndian


def _header(fp: BinaryIO, start: int, syntax: str, encoded: str) -> Header:
    """The walk of the dataset from `start`, its bytes in the `encoded` syntax."""
    end = fp.seek(0, 2)
    if end <= start:
        raise InvalidDataset("the dataset is empty")
    with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _walk_header(buf, end, start, syntax, encoded, head_only=False)


def read_head(data: bytes) -> tuple[Header, Dataset]:
    """The header and the dataset (its pixel data left out) from the first bytes of a
    stored file, which must reach its top-level Pixel Data (else InvalidDataset): what a
    ranged read of an object gives (storage.frames). Not for a deflated dataset, whose
    bytes are not at their offsets."""
    fp = io.BytesIO(data)
    start, syntax = _read_meta(fp)
    if syntax == DeflatedExplicitVRLittleEndian:
        raise InvalidDataset("a deflated dataset is read whole")
    if len(data) <= start:
        raise InvalidDataset("the dataset is empty")
    header = _walk_header(data, len(data), start, syntax, syntax, head_only=True)
    fp.seek(0)
    try:
        ds = dcmread(fp, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidDataset(f"dataset does not parse: {exc}") from exc
    return header, ds


def read_head_instance(data: bytes) -> ParsedInstance:
    """The index keys from the first bytes of a stored file held in memory, which must
    reach its top-level Pixel Data (else InvalidDataset, as read_head): an object read by
    ranged GETs (reindex from the bucket), parsed as read_instance parses a whole file."""
    header, ds = read_head(data)
    return _parse(ds, header.syntax, header.pixel_vrs)


def _walk_header(buf, end: int, start: int, syntax: str, encoded: str, head_only: bool) -> Header:
    implicit = encoded == ImplicitVRLittleEndian
    if not implicit and not bytes(buf[start + 4 : min(start + 6, end)]).isalpha():
        raise InvalidDataset(f"dataset is Implicit VR but the Transfer Syntax is {syntax}")
    walk = _Walk(buf, end, stop_at_pixels=head_only)
    order = ">" if encoded == ExplicitVRBigEndian else "<"
    walk.dataset(start, implicit, order, 0, delimited=False)
    if head_only and walk.pixel_offset is None:
        raise InvalidDataset("no Pixel Data in the first bytes read")
    offset = walk.pixel_offset if encoded == syntax else None
    return Header(syntax, walk.values, walk.pixel_vrs, offset)


def _inflate(source: BinaryIO, target: BinaryIO) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    while chunk := source.read(CHUNK):
        while chunk:
            data = inflater.decompress(chunk, CHUNK)
            size += len(data)
            if size > MAX_INFLATED:
                raise InvalidDataset(f"the deflated dataset inflates beyond {MAX_INFLATED} bytes")
            target.write(data)
            chunk = inflater.unconsumed_tail
    target.write(inflater.flush())
    target.flush()


class _Walk:
    """Element headers of a dataset in a buffer (an mmap), values skipped, iterating over
    items and nested datasets; the top-level HEADER_TAGS and pixel data VRs are kept."""

    def __init__(self, buf, end: int, stop_at_pixels: bool = False) -> None:
        self.buf = buf
        self.end = end
        self.stop_at_pixels = stop_at_pixels  # the buffer may end inside the pixel data
        self.values: dict[int, bytes] = {}
        self.pixel_vrs: dict[int, str] = {}
        self.pixel_offset: int | None = None

    def dataset(self, pos: int, implicit: bool, order: str, depth: int, delimited: bool) -> int:
        """Walk from `pos` to the end of the buffer, or (`delimited`) past an Item
        Delimitation Item; return where it stopped."""
        buf, end = self.buf, self.end
        head = _HEADS[implicit, order]  # tag, then VR and length or length, in one call
        while True:
            if pos == end and not delimited:
                return pos
            if pos + 8 > end:
                raise InvalidDataset(f"dataset truncated in an element header at byte {pos}")
            if implicit:
                group, elem, length = head.unpack_from(buf, pos)
                vr = b""
            else:
                group, elem, vr, length = head.unpack_from(buf, pos)
            if group == 0xFFFE:
                if elem == 0xE00D and delimited:
                    return pos + 8
                raise InvalidDataset(f"unexpected delimiter ({group:04X},{elem:04X}) at byte {pos}")
            value = pos + 8
            if vr in LONG_VRS:
                if pos + 12 > end:
                    raise InvalidDataset(f"dataset truncated in an element header at byte {pos}")
                (length,) = _LONG[order].unpack_from(buf, pos + 8)
                value = pos + 12
            if depth == 0 and group == 0x7FE0:
                self.pixel_vrs[(group << 16) | elem] = vr.decode(
                    "ascii", "replace"
                ) or IMPLICIT_PIXEL_VR.get(elem, "OW")
                if elem == 0x0010:
                    self.pixel_offset = value
                    if self.stop_at_pixels:
                        return pos
            if length == UNDEFINED:
                # PS3.5 6.2.2: UN of undefined length is Implicit VR Little Endian inside.
                inner = (True, "<") if vr == b"UN" else (implicit, order)
                pos = self.items(value, *inner, depth + 1)
                continue
            if value + length > end:
                raise InvalidDataset(
                    f"dataset truncated: ({group:04X},{elem:04X}) needs {length} bytes "
                    f"at byte {pos}"
                )
            if depth == 0 and (group << 16) | elem in HEADER_TAGS:  # UIDs: 64 bytes at most
                self.values[(group << 16) | elem] = buf[value : value + min(length, 80)]
            pos = value + length

    def items(self, pos: int, implicit: bool, order: str, depth: int) -> int:
        """Items of a sequence (or fragments of encapsulated pixel data) up to the
        Sequence Delimitation Item; return the position after it."""
        if depth > MAX_DEPTH:
            raise InvalidDataset(f"sequences nested deeper than {MAX_DEPTH} levels")
        buf, end = self.buf, self.end
        while True:
            if pos + 8 > end:
                raise InvalidDataset(f"dataset truncated inside a sequence at byte {pos}")
            group, elem, length = _HEADS[True, order].unpack_from(buf, pos)
            if (group, elem) == (0xFFFE, 0xE0DD):
                return pos + 8
            if (group, elem) != (0xFFFE, 0xE000):
                raise InvalidDataset(
                    f"expected an item at byte {pos}, found ({group:04X},{elem:04X})"
                )
            pos += 8
            if length == UNDEFINED:
                pos = self.dataset(pos, implicit, order, depth, delimited=True)
            elif pos + length > end:
                raise InvalidDataset(f"dataset truncated inside an item at byte {pos - 8}")
            else:
                pos += length


@dataclass(frozen=True)
class FileMeta:
    """What a Part 10 file's File Meta Information says (PS3.10 7.1): where its dataset
    begins, its transfer syntax, and the SOP class and instance ("" when not there)."""

    start: int
    syntax: str
    sop_class_uid: str
    sop_uid: str


def open_dataset(path: Path) -> tuple[BinaryIO, FileMeta, int]:
    """A stored Part 10 file opened, its File Meta, and how many bytes its dataset has:
    for sending the dataset from the file itself (os.sendfile), not through memory, with
    what a C-STORE of it needs read in the same pass."""
    fp = open(path, "rb")  # noqa: SIM115 (the caller closes it)
    try:
        meta = _file_meta(fp)
        return fp, meta, fp.seek(0, io.SEEK_END) - meta.start
    except BaseException:
        fp.close()
        raise


def same_dataset(a: Path, b: Path) -> bool:
    """Whether two Part 10 files hold the same dataset bytes and transfer syntax, File
    Meta aside (who wrote the file, and when, is no difference in the instance)."""
    digests = []
    for path in (a, b):
        digest = hashlib.sha256()
        with open(path, "rb") as fp:
            start, syntax = _read_meta(fp)
            digest.update(syntax.encode())
            fp.seek(start)
            while chunk := fp.read(CHUNK):
                digest.update(chunk)
        digests.append(digest.digest())
    return digests[0] == digests[1]


def _read_meta(fp: BinaryIO) -> tuple[int, str]:
    """Return the dataset's offset and the transfer syntax from the File Meta (PS3.10 7.1)."""
    meta = _file_meta(fp)
    return meta.start, meta.syntax


def _file_meta(fp: BinaryIO) -> FileMeta:
    """The File Meta Information read (PS3.10 7.1), the file left at the dataset's start."""
    fp.seek(128)
    if fp.read(4) != b"DICM":
        raise NotDicom("not a DICOM Part 10 file (no DICM prefix)")
    uids: dict[int, str] = {}  # by element number: 0x0002, 0x0003, 0x0010
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
        if elem in (0x0002, 0x0003, 0x0010):
            uids[elem] = value.decode("ascii", "replace").rstrip("\0 ")
    if not uids.get(0x0010):
        raise InvalidDataset("File Meta Information has no Transfer Syntax UID")
    return FileMeta(pos, uids[0x0010], uids.get(0x0002, ""), uids.get(0x0003, ""))


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
