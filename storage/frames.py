"""Frames of a stored instance read by byte ranges, so that a frame of a large multi-frame
object in a bucket costs a few ranged GETs rather than the whole object (the reader,
storage.objects, decides when; this module only knows where the bytes are).

Where a frame is follows from the header and the pixel data's own structure: native
frames are Rows × Columns × Samples per Pixel × Bits Allocated / 8 bytes each, one after
the other (PS3.5 8.1.1); encapsulated ones are items after a Basic Offset Table (PS3.5
A.4), found by the Extended Offset Table (7FE0,0001) when there is one, else by the Basic
Offset Table, else by reading the items' headers (then only one fragment a frame can be
told apart without decoding).
"""

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from storage.dataset import read_head
from storage.errors import InvalidDataset

Read = Callable[[int, int], bytes]  # (start, length) -> bytes; fewer at the end
HEAD_READS = (64 << 10, 1 << 20, 16 << 20)  # bytes read for the header, in turn
WINDOW = 8 << 10  # bytes read at once while walking item headers
ITEM, SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
EXTENDED_OFFSETS, EXTENDED_LENGTHS = 0x7FE00001, 0x7FE00002
PIXEL_DATA = 0x7FE00010


@dataclass
class Subset:
    """The instance's header as a dataset whose Pixel Data holds only the frames asked
    for, in their order (Number of Frames: how many), and how many frames the instance
    has; no Pixel Data when none was asked for, or one beyond them."""

    dataset: Dataset
    count: int


def subset(read: Read, numbers: list[int], head: bytes = b"") -> Subset | None:
    """Frames `numbers` (from 1) of the instance whose bytes `read` gives (`head`: its
    first bytes, when read already); None when their place cannot be told from ranges (a
    header beyond the HEAD_READS, a deflated dataset, samples that are not whole bytes,
    fragments that are not one a frame without an offset table, a truncated object):
    read the whole instance then."""
    buffered = _Buffered(read, head)
    found = _head(buffered)
    if found is None:
        return None
    ds, syntax, offset, vr = found
    count = _frame_count(ds)
    if not numbers or any(not 1 <= n <= count for n in numbers):
        return Subset(ds, count)  # the header alone (bulk data before the pixels)
    try:
        if syntax.is_encapsulated:
            frames = _encapsulated(buffered, ds, offset, count, numbers)
        else:
            frames = _native(buffered, ds, syntax, offset, numbers)
    except (InvalidDataset, struct.error):
        return None
    if frames is None:
        return None
    if "NumberOfFrames" in ds:
        ds.NumberOfFrames = len(numbers)
    for tag in (EXTENDED_OFFSETS, EXTENDED_LENGTHS):
        ds.pop(tag, None)
    data = encapsulate(frames, has_bot=True) if syntax.is_encapsulated else b"".join(frames)
    ds.add_new(PIXEL_DATA, vr, data)
    return Subset(ds, count)


def _head(read: "_Buffered") -> tuple[Dataset, UID, int, str] | None:
    """(dataset without pixel data, transfer syntax, where Pixel Data's value starts, its
    VR) from the first bytes, read in growing parts until they hold the Pixel Data."""
    for length in HEAD_READS:
        data = read.first(length)
        try:
            header, ds = read_head(data)
        except InvalidDataset:
            if len(data) < length:  # the whole instance: no pixel data, or broken
                return None
            continue
        if header.pixel_offset is None:
            return None
        return ds, UID(header.syntax), header.pixel_offset, header.pixel_vrs[PIXEL_DATA]
    return None


def _native(
    read: "_Buffered", ds: Dataset, syntax: UID, offset: int, numbers: list[int]
) -> list[bytes] | None:
    bits = int(ds.get("BitsAllocated") or 0)
    if not bits or bits % 8:
        return None  # 1-bit frames start inside a byte
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * bits // 8
    order = "<" if syntax.is_little_endian else ">"
    (length,) = struct.unpack(order + "L", read(offset - 4, 4))  # the element's length
    frames = []
    for number in numbers:
        if number * size > length:
            return None
        frames.append(read(offset + (number - 1) * size, size))
        if len(frames[-1]) != size:
            return None
    return frames


def _encapsulated(
    read: "_Buffered", ds: Dataset, offset: int, count: int, numbers: list[int]
) -> list[bytes] | None:
    tag, table = _item(read, offset)
    if tag != ITEM:
        return None
    first = offset + 8 + table  # the first fragment's item: where offsets count from
    offsets, lengths = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
    if offsets and lengths:  # one fragment a frame (PS3.5 A.4)
        starts = struct.unpack(f"<{len(offsets) // 8}Q", offsets)
        sizes = struct.unpack(f"<{len(lengths) // 8}Q", lengths)
        if len(starts) != count or len(sizes) != count:
            return None
        return [read(first + starts[n - 1] + 8, sizes[n - 1]) for n in numbers]
    if table:
        basic = struct.unpack(f"<{table // 4}L", read(offset + 8, table))
        if (
            len(basic) != count
            or basic[0] != 0
            or any(a >= b for a, b in itertools.pairwise(basic))
        ):
            return None  # not a table of this object's frames (PS3.5 A.4): read it whole
        frames = []
        for number in numbers:
            start = first + basic[number - 1]
            if number < count:  # the frame's items up to the next frame's: one read
                end = first + basic[number]
                part = _in_memory(read(start, end - start), start)
                fragments = _items(part, start, end)
            else:
                part, fragments = read, _items(read, start, None)
            frames.append(b"".join(part(at, size) for at, size in fragments))
        return frames
    fragments = _items(read, first, None, limit=count + 1)
    if len(fragments) != count:
        return None  # several fragments a frame: where each frame ends needs decoding
    return [read(*fragments[n - 1]) for n in numbers]


def _items(read: Read, pos: int, end: int | None, limit: int = 0) -> list[tuple[int, int]]:
    """(value start, length) of the items from `pos` to `end`, or to the Sequence
    Delimitation Item; at most `limit` of them when it is set (a walk of a cold object
    costs a ranged read an item: one item more than the frames is already a no)."""
    found: list[tuple[int, int]] = []
    while (end is None or pos < end) and not (limit and len(found) >= limit):
        tag, length = _item(read, pos)
        if tag == SEQUENCE_END:
            break
        if tag != ITEM:
            raise InvalidDataset(f"expected an item at byte {pos}")
        found.append((pos + 8, length))
        pos += 8 + length
    return found


def _item(read: Read, pos: int) -> tuple[tuple[int, int], int]:
    group, elem, length = struct.unpack("<HHL", read(pos, 8))
    return (group, elem), length


def _in_memory(block: bytes, start: int) -> Read:
    """A Read over bytes read already, `block` being those from `start`."""

    def read(at: int, size: int) -> bytes:
        return block[at - start : at - start + size]

    return read


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


class _Buffered:
    """`read` keeping the first bytes and the last small window read: the header, and
    item headers that lie close together, cost one request each, not one per read."""

    def __init__(self, read: Read, head: bytes) -> None:
        self._read = read
        self._head = head
        self._window = (0, b"")

    def first(self, length: int) -> bytes:
        if len(self._head) < length:
            self._head = self._read(0, length)
        return self._head

    def __call__(self, start: int, length: int) -> bytes:
        for at, data in ((0, self._head), self._window):
            if at <= start and start + length <= at + len(data):
                return data[start - at : start + length - at]
        if length >= WINDOW:
            return self._read(start, length)
        self._window = (start, self._read(start, WINDOW))
        return self._window[1][:length]
