"""DICOM JSON (PS3.18 F.2) straight from the raw elements pydicom read.

pydicom's `Dataset.to_json_dict` converts every element to a DataElement first, which
costs ~5 ms for a CT header: half of what ingest spends per instance. The common VRs
(numbers, ASCII strings, text in a single-byte or UTF-8 character set, binary) are
encoded here from their bytes, as are private numbers and bytes of implicit VR once
their VR is found as pydicom finds it; anything else (PN, sequences, ISO 2022 text, other implicit
VR elements of an ambiguous or private VR, big endian binary) goes through pydicom's own
element encoder. The output is pydicom's but where PS3.18 says otherwise
(tests/test_dicomjson.py), and the same from one version to the next
(tests/test_indexer_read.py): it is what an archive stored.
"""

import base64
import functools
import logging
import math
import struct
from collections.abc import Callable
from collections.abc import MutableSequence
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.datadict import private_dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

log = logging.getLogger(__name__)

BulkHandler = Callable[[int], str]

NUMBERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
ASCII_STRINGS = {"AE", "AS", "CS", "DA", "DT", "TM", "UI", "DS", "IS"}
TEXT_MULTI = {"LO", "SH", "UC"}  # backslash separates values
TEXT_SINGLE = {"LT", "ST", "UT", "UR"}  # one value, backslash is text
BINARY = {"OB", "OD", "OF", "OL", "OV", "OW"}  # UN: pydicom may know the real VR
# Private text of implicit VR: pydicom's JSON of it is remembered (_remembered); values
# of (PN: nested dicts) and long ones (LT, UT...: seldom repeated) are not.
REMEMBERED_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"}
REMEMBERED = 64  # bytes of value at most
REMEMBERED_ELEMENTS = 2048  # then forgotten all at once (~1 MB)
_MEMORY: dict[tuple, dict] = {}
SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
# Character sets whose text decodes with one Python codec (PS3.3 C.12.1.1.2).
SIMPLE_CHARSETS = {
    "": "latin_1",
    "ISO_IR 6": "latin_1",
    "ISO_IR 100": "latin_1",
    "ISO_IR 192": "utf_8",
}


def dataset_to_json(
    ds: Dataset, threshold: int, bulk: BulkHandler, parent_codec: str | None = "latin_1"
) -> dict[str, Any]:
    """The DICOM JSON object of `ds`; binary values longer than `threshold` bytes of
    base64 become {"BulkDataURI": bulk(tag)} (prefixed by SEQ/ITEM/ inside sequence items).
    Items inherit their parent's character set."""
    codec = _codec(ds, parent_codec)
    body: dict[str, Any] = {}
    elements = ds._dict
    charset: object = None  # pydicom's for this dataset, once needed
    for tag in sorted(elements, key=int):  # int: BaseTag compares in Python
        raw = elements[tag]
        try:
            value = None
            if isinstance(raw, RawDataElement) and raw.value is not None:
                vr = raw.VR or _implicit_vr(tag)
                if vr is None and (tag >> 16) % 2:
                    vr, creator = _private_vr(ds, tag)
                    fast = _PRIVATE_FAST.get(vr)  # type: ignore[arg-type]
                    if fast is None and vr in REMEMBERED_VRS and len(raw.value) <= REMEMBERED:
                        if charset is None:
                            charset = _charset(ds)
                        key = (int(tag), creator, raw.value, charset)
                        value = _remembered(key, ds, tag, codec, threshold, bulk)
                else:
                    fast = _FAST.get(vr)  # type: ignore[arg-type]
                if fast is not None:
                    value = fast(vr, raw.value, raw.is_little_endian, codec, tag, threshold, bulk)
            if value is None:
                value = _element(ds, tag, codec, threshold, bulk)
            body[f"{tag:08X}"] = value
        except Exception as exc:  # an invalid value: leave it out, as pydicom does
            log.warning("(%04X,%04X) left out of the DICOM JSON: %s", tag >> 16, tag & 0xFFFF, exc)
    return body


def _codec(ds: Dataset, parent_codec: str | None) -> str | None:
    """Python codec for the dataset's text, or None when pydicom must decode it."""
    raw = ds._dict.get(SPECIFIC_CHARACTER_SET)
    if raw is None:
        return parent_codec
    value = raw.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    return SIMPLE_CHARSETS.get(value.strip(" \0"))


def _in_item(bulk: BulkHandler, tag: int, index: int) -> BulkHandler:
    """Bulk data inside a sequence item is named by its path: SEQ/ITEM/TAG."""
    return lambda inner: f"{tag:08X}/{index}/{bulk(inner)}"


def _element(
    ds: Dataset, tag: BaseTag, codec: str | None, threshold: int, bulk: BulkHandler
) -> dict:
    """The JSON of an element the fast encoders leave to pydicom."""
    elem = ds[tag]
    if elem.VR == "SQ":
        items = [
            dataset_to_json(item, threshold, _in_item(bulk, tag, index), codec)
            for index, item in enumerate(elem.value)
        ]
        return {"vr": "SQ", "Value": items}
    return elem.to_json_dict(lambda e: bulk(int(e.tag)), threshold)


def _implicit_vr(tag: int) -> str | None:
    if (tag >> 16) % 2:  # private: see _private_vr
        return None
    vr = _dictionary_vr(int(tag))
    return vr if vr is not None and " or " not in vr else None


def _private_vr(ds: Dataset, tag: int) -> tuple[str | None, str]:
    """The VR pydicom gives a private element of implicit VR (pydicom.hooks.raw_element_vr
    and _private_vr_for_tag), and the Private Creator it looked it up under: the data
    dictionary's VR, else the private dictionary's under the creator, else UN. None when
    pydicom would warn (a creator that is not one string): it decodes those itself."""
    vr = _dictionary_vr(int(tag))  # pydicom asks it first (it holds no private tag)
    if vr is not None:
        return vr, ""
    element = tag & 0xFFFF
    if 0x0010 <= element < 0x0100:
        return "LO", ""  # a Private Creator
    if element & 0xFF00:
        creator = ds.get(((tag >> 16) << 16) | (element >> 8), "")
        if creator:
            if not isinstance(creator.value, str):
                return None, ""
            vr = _private_dictionary_vr(int(tag), creator.value)
            if vr is not None:
                return vr, creator.value
    return "UN", ""


def _charset(ds: Dataset) -> object:
    """The character set pydicom decodes the dataset's text with (Dataset.__getitem__)."""
    charset = ds.original_character_set or ds._character_set
    return tuple(charset) if isinstance(charset, list | MutableSequence) else charset


def _remembered(
    key: tuple, ds: Dataset, tag: BaseTag, codec: str | None, threshold: int, bulk: BulkHandler
) -> dict:
    """pydicom's JSON of a private text element of implicit VR, kept under what it depends
    on (`key`: the tag, its Private Creator, its bytes, the character set). pydicom takes
    ~25 µs an element and a vendor's private text repeats from one instance of a series
    to the next. A copy: the caller may change what it gets."""
    found = _MEMORY.get(key)
    if found is None:
        found = _element(ds, tag, codec, threshold, bulk)  # raises: nothing kept
        if len(_MEMORY) >= REMEMBERED_ELEMENTS:
            _MEMORY.clear()
        _MEMORY[key] = found
    if "Value" in found:
        return {**found, "Value": list(found["Value"])}
    return dict(found)


# Both dictionaries are fixed (minipacs adds no entries): their answers are kept.
@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def _private_dictionary_vr(tag: int, creator: str) -> str | None:
    try:
        return private_dictionary_VR(tag, creator)
    except KeyError:
        return None


# The fast encoders: the JSON of one element from its bytes, or None for pydicom to do
# it. Called as f(vr, value, little, codec, tag, threshold, bulk), chosen by VR.


def _numbers_binary(vr, value, little, codec, tag, threshold, bulk) -> dict | None:
    code = NUMBERS[vr]
    size = _SIZES[code]
    if len(value) % size:
        return None
    count = len(value) // size
    numbers = struct.unpack(("<" if little else ">") + code * count, value)
    return {"vr": vr, "Value": list(numbers)} if numbers else {"vr": vr}


def _tags(vr, value, little, codec, tag, threshold, bulk) -> dict | None:
    if len(value) % 4:
        return None
    pairs = struct.unpack(("<" if little else ">") + "H" * (len(value) // 2), value)
    tags = [f"{g:04X}{e:04X}" for g, e in zip(pairs[::2], pairs[1::2], strict=True)]
    return {"vr": vr, "Value": tags} if tags else {"vr": vr}


def _binary(vr, value, little, codec, tag, threshold, bulk) -> dict | None:
    if not little and vr != "OB":
        return None
    if not value:
        return {"vr": vr}
    if len(value) > (threshold // 4) * 3:
        return {"vr": vr, "BulkDataURI": bulk(tag)}
    return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}


def _ascii(vr, value, little, codec, tag, threshold, bulk) -> dict | None:
    text = value.decode("ascii")
    strip = " \0" if vr == "UI" else " "
    if "\\" not in text:  # one value, the common case
        one = text.strip(strip)
        values = [one]
    else:
        values = [v.strip(strip) for v in text.split("\\")]
    if vr in ("DS", "IS"):
        return _numbers(vr, values)
    return _strings(vr, values)


def _text_multi(vr, value, little, codec, tag, threshold, bulk) -> dict | None:
    if codec is None:
        return None
    return _strings(vr, [v.strip(" ") for v in value.decode(codec).split("\\")])


def _text_single(vr, value, little, codec, tag, threshold, bulk) -> dict | None:
    if codec is None:
        return None
    text = value.decode(codec).rstrip(" \0")
    return {"vr": vr, "Value": [text]} if text else {"vr": vr}


_SIZES = {code: struct.calcsize("<" + code) for code in NUMBERS.values()}
_FAST: dict[str, Callable[..., dict | None]] = {
    **dict.fromkeys(NUMBERS, _numbers_binary),
    "AT": _tags,
    **dict.fromkeys(BINARY, _binary),
    **dict.fromkeys(ASCII_STRINGS, _ascii),
    **dict.fromkeys(TEXT_MULTI, _text_multi),
    **dict.fromkeys(TEXT_SINGLE, _text_single),
}
# For private elements of implicit VR, only the encoders whose output is pydicom's for
# every value: binary numbers and bytes (pydicom keeps those as read, UN included).
_PRIVATE_FAST: dict[str, Callable[..., dict | None]] = {
    **dict.fromkeys(NUMBERS, _numbers_binary),
    **dict.fromkeys([*BINARY, "UN"], _binary),
}


def _strings(vr: str, values: list[str]) -> dict:
    if not any(values):
        return {"vr": vr}
    return {"vr": vr, "Value": [v if v else None for v in values]}


def _numbers(vr: str, values: list[str]) -> dict | None:
    if not any(values):
        return {"vr": vr}
    numbers: list[int | float | None] = []
    for text in values:
        if not text:
            numbers.append(None)
        elif vr == "IS":
            number = float(text)  # IS may be written "12.0" by some writers
            if not number.is_integer():
                return None
            numbers.append(int(number))
        else:
            number = float(text)
            if not math.isfinite(number):
                return None
            numbers.append(number)
    return {"vr": vr, "Value": numbers}


def json_to_bytes(body: dict[str, Any], implicit: bool) -> bytes:
    """DICOM JSON encoded as a little endian dataset (C-FIND answers), text as UTF-8: the
    answer must declare ISO_IR 192. BulkDataURI values are sent empty.

    Building a pydicom Dataset and letting pydicom encode it cost ~0.3 ms an answer, more
    than the query found it in; this is a direct walk over the JSON.
    """
    out = bytearray()
    for tag_hex in sorted(body):
        _encode_element(out, int(tag_hex, 16), body[tag_hex], implicit)
    return bytes(out)


LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
UNDEFINED = 0xFFFFFFFF


def _encode_element(out: bytearray, tag: int, element: dict, implicit: bool) -> None:
    vr = element.get("vr", "UN")
    header = _HEADERS.get((tag, vr, implicit)) or _header(tag, vr, implicit)
    prefix, length = header
    out += prefix
    if vr == "SQ":
        out += length.pack(UNDEFINED)
        for item in element.get("Value") or []:
            out += struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
            for inner in sorted(item or {}):
                if inner != "00080005":  # an item's own character set: its text is UTF-8 now
                    _encode_element(out, int(inner, 16), item[inner], implicit)
            out += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        out += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        return
    value = _value_bytes(vr, element)
    out += length.pack(len(value))
    out += value


_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
_HEADERS: dict[tuple[int, str, bool], tuple[bytes, struct.Struct]] = {}


def _header(tag: int, vr: str, implicit: bool) -> tuple[bytes, struct.Struct]:
    """An element header as its fixed bytes (tag, VR, reserved) and how its length is
    packed; kept per tag and VR (C-FIND answers repeat the same few elements), up to a
    bound, as private tags are unbounded."""
    prefix = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        header = prefix, _U32
    elif vr in LONG_LENGTH_VRS:
        header = prefix + vr.encode("ascii") + b"\0\0", _U32
    else:
        header = prefix + vr.encode("ascii"), _U16
    if len(_HEADERS) < 4096:
        _HEADERS[(tag, vr, implicit)] = header
    return header


def _value_bytes(vr: str, element: dict) -> bytes:
    if "InlineBinary" in element:
        data = base64.b64decode(element["InlineBinary"])
        return data + b"\0" if len(data) % 2 else data
    values = element.get("Value") or []
    if not values:
        return b""
    if len(values) == 1 and type(values[0]) is str and vr not in NUMBERS and vr not in ("DS", "AT"):
        data = values[0].encode("utf-8")  # most answer values: one string
        return data + (b"\0" if vr == "UI" else b" ") if len(data) % 2 else data
    if vr in NUMBERS:
        return struct.pack(f"<{len(values)}{NUMBERS[vr]}", *values)
    if vr == "AT":
        return b"".join(struct.pack("<HH", int(v, 16) >> 16, int(v, 16) & 0xFFFF) for v in values)
    if vr == "PN":
        text = "\\".join(_pn_string(v) for v in values)
    elif vr == "DS":
        text = "\\".join(_ds(v) for v in values)
    else:
        text = "\\".join("" if v is None else str(v) for v in values)
    data = text.encode("utf-8")
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def _ds(value: Any) -> str:
    """A DS of at most 16 characters (PS3.5 6.2)."""
    if value is None:
        return ""
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = repr(float(value))
    for digits in range(15, 0, -1):
        if len(text) <= 16:
            break
        text = f"{float(value):.{digits}g}"
    return text


def _pn_string(value: Any) -> str:
    if not isinstance(value, dict):
        return "" if value is None else str(value)
    groups = [value.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)
