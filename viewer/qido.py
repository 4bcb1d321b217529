"""QIDO-RS query parameters (PS3.18 8.3.4) turned into `storage.query` keys.

Match keys are named by keyword or by tag (`PatientName`, `00100010`), sequence keys by a
dotted path (`RequestAttributesSequence.ScheduledProcedureStepID`). UID keys take lists
(comma or backslash, or the key repeated); ModalitiesInStudy takes a list too. Return keys
are the level's defaults (PS3.18 Tables 10.6.3-3 to -5, plus the upper levels' when the
search is not scoped to them) and every `includefield`; `includefield=all` returns every
stored attribute of the level. A private attribute registered as an extended query tag
(`minipacs tags add`) is named as it is listed, `ggggxxee`; answers carry it in block
gggg,10xx (then 11, … for another creator of the group) beside its Private Creator.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.datadict import tag_for_keyword
from werkzeug.datastructures import MultiDict

from storage.query import Key
from storage.query import is_creator
from storage.rows import QueryTagRow
from viewer.errors import WebError
from viewer.errors import int_param

RESERVED = {"limit", "offset", "fuzzymatching", "includefield", "accept", "charset"}
MODALITIES_IN_STUDY = 0x00080061
RETRIEVE_URL = 0x00081190
PRIVATE_NAME = re.compile(r"([0-9A-Fa-f]{4})[xX]{2}([0-9A-Fa-f]{2})")
# The registered private tags gggg,xxee: (group, element) → every creator's.
PrivateTags = Callable[[int, int], list[QueryTagRow]]

STUDY_DEFAULTS = (
    0x00080005, 0x00080020, 0x00080030, 0x00080050, 0x00080056, 0x00080061, 0x00080090,
    0x00080201, 0x00081030, 0x00100010, 0x00100020, 0x00100030, 0x00100040, 0x0020000D,
    0x00200010, 0x00201206, 0x00201208,
)  # fmt: skip
SERIES_DEFAULTS = (
    0x00080005, 0x00080060, 0x00080201, 0x0008103E, 0x0020000E, 0x00200011, 0x00201209,
    0x00400244, 0x00400245, 0x00400275,
)  # fmt: skip
INSTANCE_DEFAULTS = (
    0x00080005, 0x00080016, 0x00080018, 0x00080056, 0x00080201, 0x00200013, 0x00280008,
    0x00280010, 0x00280011, 0x00280100,
)  # fmt: skip
LEVEL_DEFAULTS = {"STUDY": STUDY_DEFAULTS, "SERIES": SERIES_DEFAULTS, "IMAGE": INSTANCE_DEFAULTS}
LEVELS = ("STUDY", "SERIES", "IMAGE")


@dataclass(frozen=True)
class Search:
    keys: list[Key]
    limit: int | None
    offset: int
    fuzzy: bool
    all_attributes: bool


def parse(
    args: MultiDict, level: str, scope: dict[int, str], private: PrivateTags | None = None
) -> Search:
    """The search a query string asks for at `level`; `scope` holds the UIDs of the path
    (StudyInstanceUID for /studies/{study}/series, …); `private` finds registered private
    tags."""
    keys: dict[int, Key] = {}
    for name in args:
        if name in RESERVED:
            continue
        values = [v for v in args.getlist(name)]
        key = _private_key(name, values, keys, private) or _match_key(name, values)
        keys[key.tag] = key
    for tag, uid in scope.items():
        keys[tag] = Key(tag, "UI", uid)
    first = LEVELS.index(_scope_level(scope))
    wanted = [t for lvl in LEVELS[first : LEVELS.index(level) + 1] for t in LEVEL_DEFAULTS[lvl]]
    all_attributes = False
    for value in args.getlist("includefield"):
        for name in (v.strip() for v in value.split(",")):
            if name == "all":
                all_attributes = True
            elif key := _private_key(name, [""], keys, private):
                keys.setdefault(key.tag, key)
            elif name:
                wanted.append(_tag(name))
    for tag in wanted:
        if tag not in keys and tag != RETRIEVE_URL:
            keys[tag] = Key(tag, _vr(tag), "")
    return Search(
        keys=list(keys.values()),
        limit=int_param(args, "limit", None, minimum=1),
        offset=int_param(args, "offset", 0, minimum=0),
        fuzzy=_flag(args, "fuzzymatching"),
        all_attributes=all_attributes,
    )


def _scope_level(scope: dict[int, str]) -> str:
    if 0x0020000E in scope:
        return "IMAGE"
    if 0x0020000D in scope:
        return "SERIES"
    return "STUDY"


def _private_key(
    name: str, values: list[str], keys: dict[int, Key], private: PrivateTags | None
) -> Key | None:
    """The key of a registered private tag `ggggxxee`, its Private Creator added to `keys`
    in the group's next free block; None when `name` is not of that form."""
    found = PRIVATE_NAME.fullmatch(name)
    if found is None:
        return None
    group, element = int(found[1], 16), int(found[2], 16)
    tags = private(group, element) if private else []
    if not tags:
        raise WebError(400, f"{name} is not a registered private query tag (minipacs tags add)")
    if len(tags) > 1:
        creators = ", ".join(repr(t.creator) for t in tags)
        raise WebError(400, f"{name} is registered for several Private Creators: {creators}")
    tag = tags[0]
    used = {t & 0xFF: k.value for t, k in keys.items() if t >> 16 == group and is_creator(t)}
    block = next((b for b, c in used.items() if c == tag.creator), None)
    if block is None:
        block = next(b for b in range(0x10, 0x100) if b not in used)
        keys[(group << 16) | block] = Key((group << 16) | block, "LO", tag.creator)
    if tag.vr == "UI":
        items = [u.strip() for v in values for u in re.split(r"[,\\]", v) if u.strip()]
        value: str | list[str] = items[0] if len(items) == 1 else items
    else:
        value = _one(name, values)
    return Key((group << 16) | (block << 8) | element, tag.vr, value, tag.creator)


def _match_key(name: str, values: list[str]) -> Key:
    path = name.split(".")
    tags = [_tag(part) for part in path]
    vr = _vr(tags[-1])
    if len(tags) > 1:
        if any(_vr(t) != "SQ" for t in tags[:-1]):
            raise WebError(400, f"{name}: only a sequence can have a nested key")
        item: dict = {f"{tags[-1]:08X}": _json_value(vr, _one(name, values))}
        for tag in reversed(tags[1:-1]):
            item = {f"{tag:08X}": {"vr": "SQ", "Value": [item]}}
        return Key(tags[0], "SQ", [item])
    if vr == "SQ":
        raise WebError(400, f"{name}: a sequence is matched through one of its attributes")
    if vr == "UI" or tags[0] == MODALITIES_IN_STUDY:
        items = [u.strip() for v in values for u in re.split(r"[,\\]", v) if u.strip()]
        return Key(tags[0], vr, items[0] if len(items) == 1 else items)
    return Key(tags[0], vr, _one(name, values))


def _one(name: str, values: list[str]) -> str:
    if len(set(values)) > 1:
        raise WebError(400, f"{name} is given more than once with different values")
    return values[0]


def _json_value(vr: str, value: str) -> dict:
    if not value:
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    return {"vr": vr, "Value": [value]}


def _tag(name: str) -> int:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        tag = int(name, 16)
    else:
        tag = tag_for_keyword(name)
        if tag is None:
            raise WebError(400, f"{name!r} is neither a DICOM keyword nor a tag (ggggeeee)")
    _vr(tag)
    return tag


def _vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise WebError(
            400, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not in the DICOM dictionary"
        ) from None
    return vr.split(" or ")[0]


def _flag(args: MultiDict, name: str) -> bool:
    value = args.get(name, "false").strip().lower()
    if value not in ("true", "false"):
        raise WebError(400, f"{name} must be true or false")
    return value == "true"
