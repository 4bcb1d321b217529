"""A stored dataset made uncompressed little endian: the one conversion behind WADO-URI
and WADO-RS in a transfer syntax other than the stored one, and C-MOVE/C-GET/routing
to a peer that did not accept the stored one.

pydicom decompresses, but it does not change byte order: `save_as` refuses, and
`write_dataset` (pynetdicom's encoder) writes the values of OW, OF, OL, OD and OV
elements as read, so a big endian file came out with its pixel data byte-swapped.
"""

import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.encaps import get_frame
from pydicom.uid import UID
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import ImplicitVRLittleEndian

from storage.dataset import check_pixel_budget
from storage.dataset import dataset_pixel_bytes
from storage.dataset import read_header

PIXEL_DATA = 0x7FE00010
# JPEG start-of-frame markers (ITU T.81 B.1.1.3; 0xF7: JPEG-LS, T.87): after the marker,
# length (2), precision (1), lines (2), samples per line (2).
SOF_MARKERS = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}
J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ (ISO 15444-1 A.5.1): Xsiz, Ysiz, XOsiz, YOsiz
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # a JP2 file (ISO 15444-1 I.5.1)
HEADER_SEARCH = 1 << 16  # bytes of a JP2 frame searched for its codestream (boxes first)
# Bytes per value of the binary VRs whose values are numbers in the dataset's byte order
# (PS3.5 6.2); OB and UN are bytes (UN's inner encoding is unknown: left as it is).
WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class RecodeError(ValueError):
    """The stored pixel data cannot be decompressed (no decoder, a corrupt stream)."""


def to_little_endian(ds: Dataset, pixel_budget: int | None) -> None:
    """Make `ds` (read by storage.dataset.read_dataset) uncompressed little endian in place,
    same SOP Instance UID: decompressed (after the pixel budget check), byte-swapped from
    big endian, or relabelled from deflated (already inflated). An uncompressed little
    endian dataset is left as it is; others are labelled Explicit VR Little Endian."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return
    if syntax.is_compressed and not syntax.is_deflated:
        check_pixel_budget(dataset_pixel_bytes(ds), pixel_budget)
        frames = int(ds.get("NumberOfFrames") or 1)
        for frame in generate_frames(ds.PixelData, number_of_frames=frames):
            check_frame_size(frame, ds)
        try:
            ds.decompress(generate_instance_uid=False)  # same instance, another syntax
        except Exception as exc:  # no decoder, corrupt stream: pydicom raises many types
            raise RecodeError(f"cannot decompress {syntax.name}: {exc}") from exc
    elif not syntax.is_little_endian:
        _swap_bytes(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # What encoders check the syntax against (pynetdicom refuses a "big endian" dataset).
    ds.set_original_encoding(False, True, ds.original_character_set)


def _swap_bytes(ds: Dataset) -> None:
    """Big endian binary values to little endian, nested sequences included. Pixel data in
    OW is swapped per Bits Allocated (8- and 1-bit samples are packed in 16-bit words:
    PS3.5 8.1.1, 8.2)."""
    bits = int(ds.get("BitsAllocated", 16) or 16)
    for element in ds.iterall():
        size = WORD_SIZE.get(element.VR)
        if size is None or not isinstance(element.value, bytes | bytearray):
            continue
        if element.tag == PIXEL_DATA and element.VR == "OW":
            size = max(2, bits // 8)
        element.value = _swapped(element.value, size)


def _swapped(value: bytes | bytearray, size: int) -> bytes:
    whole = len(value) - len(value) % size
    words = np.frombuffer(value, dtype=f">u{size}", count=whole // size)
    return words.astype(f"<u{size}").tobytes() + bytes(value[whole:])


def check_stored_frame(path: Path, ds: Dataset, frame: int) -> None:
    """`check_frame_size` of frame `frame` (from 1) of the stored file at `path`, read
    alone (what a decoder reading the file by frame would take next)."""
    if not UID(ds.file_meta.TransferSyntaxUID).is_encapsulated:
        return
    offset = read_header(path).pixel_offset
    if offset is None:
        return
    with open(path, "rb") as fp:
        fp.seek(offset)
        data = get_frame(fp, frame - 1, number_of_frames=int(ds.get("NumberOfFrames") or 1))
    check_frame_size(data, ds)


def check_frame_size(frame: bytes, ds: Dataset) -> None:
    """Raise RecodeError when a compressed frame's own header declares more lines or
    columns than the dataset's Rows and Columns: decoders allocate for what the
    codestream says, so a header within the pixel budget would not bound them."""
    size = codestream_size(frame)
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if size is not None and (size[0] > rows or size[1] > columns):
        raise RecodeError(
            f"the compressed frame declares {size[0]}×{size[1]} pixels, the dataset "
            f"{rows}×{columns}: not decoded"
        )


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(lines, columns) from a JPEG, JPEG-LS or JPEG 2000 frame's header; None when the
    frame is of another kind (RLE) or no header is found."""
    head = bytes(frame[:HEADER_SEARCH])
    at = 0 if head.startswith(J2K_SIZ) else -1
    if head.startswith(JP2_SIGNATURE):
        at = head.find(J2K_SIZ)
    if at >= 0 and len(head) >= at + 24:
        width, height, left, top = struct.unpack_from(">4L", head, at + 8)
        return max(0, height - top), max(0, width - left)
    if not head.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 9 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in SOF_MARKERS:
            lines, columns = struct.unpack_from(">HH", head, pos + 5)
            return lines, columns
        (length,) = struct.unpack_from(">H", head, pos + 2)
        pos += 2 + length
    return None
