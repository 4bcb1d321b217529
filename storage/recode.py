"""A stored dataset made uncompressed little endian: the one conversion behind WADO-URI
and WADO-RS in a transfer syntax other than the stored one, and C-MOVE/C-GET/routing
to a peer that did not accept the stored one.

pydicom decompresses, but it does not change byte order: `save_as` refuses, and
`write_dataset` (pynetdicom's encoder) writes the values of OW, OF, OL, OD and OV
elements as read, so a big endian file came out with its pixel data byte-swapped.
"""

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import ImplicitVRLittleEndian

from storage.dataset import check_pixel_budget
from storage.dataset import dataset_pixel_bytes

PIXEL_DATA = 0x7FE00010
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


def _swapped(value: bytes, size: int) -> bytes:
    whole = len(value) - len(value) % size
    words = np.frombuffer(value, dtype=f">u{size}", count=whole // size)
    return words.astype(f"<u{size}").tobytes() + bytes(value[whole:])
