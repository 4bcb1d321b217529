"""Stored objects in the transfer syntax a web client asked for: whole instances
(WADO-URI, WADO-RS), single frames and bulk data (WADO-RS).

What is stored is sent as stored whenever the client accepts it. Otherwise the only
conversion is to uncompressed little endian (pydicom decodes every compressed syntax it
has a plugin for); encoding into a compressed syntax is not offered (406).
"""

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import ImplicitVRLittleEndian

from storage.dataset import read_dataset
from storage.errors import OverPixelBudget
from storage.recode import RecodeError
from storage.recode import check_frame_size
from storage.recode import to_little_endian
from viewer import render
from viewer.errors import WebError

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
PIXEL_DATA = 0x7FE00010
# Media types of compressed frames (PS3.18 Table 8.7.3-2).
FRAME_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
OCTETS = "application/octet-stream"


class TranscodeError(WebError):
    """The object cannot be delivered as asked (406 when the syntax is not offered, 422
    when the stored pixel data does not decode, 404 for a frame or bulk data not there)."""


def can_send(stored: str, wanted: str) -> bool:
    """Can an instance stored in `stored` go out in `wanted` ("*" = as stored)?"""
    return wanted in ("*", stored) or wanted in UNCOMPRESSED


def instance_bytes(
    path: Path,
    stored: str,
    wanted: str,
    change: Callable[[Dataset], object] | None = None,
    pixel_budget: int | None = None,
) -> bytes:
    """The Part 10 file in `wanted` (as stored when "*" or equal), after `change` (which
    edits the dataset in place: de-identification) when given; another syntax through
    storage.recode (decompressed within `pixel_budget` bytes, or byte-swapped)."""
    if wanted in ("*", stored) and change is None:
        return path.read_bytes()
    if wanted not in ("*", stored, *UNCOMPRESSED):
        raise TranscodeError(406, f"cannot transcode {UID(stored).name} to {wanted}")
    ds = read_dataset(path)
    if change is not None:
        change(ds)
    syntax = UID(stored if wanted == "*" else wanted)
    if syntax != stored:
        try:
            to_little_endian(ds, pixel_budget)
        except RecodeError as exc:
            raise TranscodeError(422, str(exc)) from exc
        except OverPixelBudget as exc:
            raise TranscodeError(422, f"{exc} (pixel_budget_mb)") from exc
    buffer = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = syntax
    dcmwrite(
        buffer,
        ds,
        implicit_vr=syntax.is_implicit_VR,
        little_endian=syntax.is_little_endian,
        enforce_file_format=True,
    )
    return buffer.getvalue()


def frame_media_type(stored: str) -> str:
    """The media type of a frame sent as stored."""
    return FRAME_TYPES.get(stored, OCTETS)


def frame_bytes(ds: Dataset, number: int, as_stored: bool) -> bytes:
    """Frame `number` (from 1): as stored (compressed frames as their codestream), or
    uncompressed little endian."""
    frames = render.number_of_frames(ds)
    if not 1 <= number <= frames:
        raise TranscodeError(404, f"frame {number} is outside 1-{frames}")
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if syntax.is_encapsulated and as_stored:
        return get_frame(ds.PixelData, number - 1, number_of_frames=frames)
    bits = int(ds.get("BitsAllocated", 16))
    if not syntax.is_encapsulated and syntax.is_little_endian and bits % 8 == 0:
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        data = ds.PixelData[(number - 1) * size : number * size]
        if len(data) != size:
            raise TranscodeError(422, f"frame {number} is truncated in the stored file")
        return data
    try:
        if syntax.is_encapsulated:  # its codestream's own size, before a decoder
            check_frame_size(get_frame(ds.PixelData, number - 1, number_of_frames=frames), ds)
        arr = render.decode_frame(ds, number)  # the dataset is read already
    except Exception as exc:
        raise TranscodeError(422, f"cannot decode frame {number}: {exc}") from exc
    if bits == 1:
        return np.packbits(arr.astype(np.uint8).ravel(), bitorder="little").tobytes()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def bulk_bytes(ds: Dataset, path: list[str]) -> bytes:
    """The value of a binary element by its path: TAG[/ITEM/TAG...] (PixelData excluded)."""
    current: Dataset = ds
    for position in range(0, len(path) - 1, 2):
        seq = current.get(Tag(int(path[position], 16)))
        index = int(path[position + 1])
        if seq is None or seq.VR != "SQ" or not 0 <= index < len(seq.value):
            raise TranscodeError(404, "no such bulk data")
        current = seq.value[index]
    element = current.get(Tag(int(path[-1], 16)))
    if element is None or not isinstance(element.value, bytes | bytearray):
        raise TranscodeError(404, "no such bulk data")
    return bytes(element.value)
