"""The one query engine: PS3.4 C.2.2.2 matching over the index, answers as DICOM JSON.

C-FIND (and later QIDO-RS and the viewer's study list) call `find`. Keys the index keeps
as columns are matched in SQL, through indexes; any other key with a value is matched
against the stored DICOM JSON of the entity, in Python, after the SQL has narrowed the
rows. Answers stream from the database cursor: a query matching 100,000 rows never holds
them all. One answer per matching entity of the level, never per instance.

Hierarchy is lenient (PS3.4 C.4.1.2.2 allows it): unique keys of the levels above the
query level restrict the answer when given and are not required.

Extended query tags (storage.querytags) are matched in SQL too, once back-filled: the same
conditions, on the indexed `queryvalue` rows of the tag instead of a column. Private keys
name their Private Creator (Key.creator); their block is looked up in each dataset.
"""

import base64
import json
import re
import struct
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path
from typing import Any

from peewee import SQL
from peewee import ColumnBase
from peewee import CommaNodeList
from peewee import Expression
from peewee import Field
from peewee import Node
from peewee import fn
from pydicom.datadict import dictionary_VR
from pydicom.datadict import keyword_for_tag
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from storage import dates
from storage.dataset import name_key
from storage.dataset import time_key
from storage.engine import is_sqlite
from storage.models import Instance
from storage.models import Patient
from storage.models import QueryValue
from storage.models import Series
from storage.models import Study
from storage.models import StudyModality
from storage.models import WorklistItem
from storage.models import db
from storage.rows import InstanceLocation
from storage.wildcards import condition as wildcard_condition
from storage.wildcards import has_wildcards
from storage.wildcards import matches as wildcard_matches

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
LEVEL_MODELS = (Patient, Study, Series, Instance)
MODELS = ("PATIENT", "STUDY")  # Patient Root, Study Root
# VRs on which * and ? are wildcards (PS3.4 C.2.2.2.4); elsewhere they are plain text.
WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
RANGE_VRS = {"DA", "TM", "DT"}
# Numbers match by value ("5" finds 5.0); PS3.4 C.2.2.2.5 defines ranges for DA/TM/DT only.
BINARY_NUMBERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d",
                  "UV": "Q", "SV": "q"}  # fmt: skip
NUMBER_VRS = {"IS", "DS", *BINARY_NUMBERS}


class QueryError(ValueError):
    """The identifier cannot be a query (bad level or model); C-FIND answers 0xA900."""


@dataclass(frozen=True)
class Key:
    """One key of the identifier: its tag, VR and the value as text ('' = universal)."""

    tag: int
    vr: str
    value: Any  # str, list of str (UID lists), or list of item dicts (sequence matching)
    creator: str = ""  # a private element's Private Creator: its block varies by dataset

    @property
    def hex(self) -> str:
        return f"{self.tag:08X}"


# Index columns by tag, with the level they belong to.
COLUMNS: dict[int, tuple[str, Field]] = {
    0x00100020: ("PATIENT", Patient.patient_id),
    0x00100021: ("PATIENT", Patient.issuer),
    0x00100030: ("PATIENT", Patient.birth_date),
    0x00100040: ("PATIENT", Patient.sex),
    0x0020000D: ("STUDY", Study.study_uid),
    0x00080020: ("STUDY", Study.study_date),
    0x00080050: ("STUDY", Study.accession_number),
    0x00200010: ("STUDY", Study.study_id),
    0x00081030: ("STUDY", Study.description),
    0x0020000E: ("SERIES", Series.series_uid),
    0x00080060: ("SERIES", Series.modality),
    0x0008103E: ("SERIES", Series.description),
    0x00080018: ("IMAGE", Instance.sop_uid),
    0x00080016: ("IMAGE", Instance.sop_class_uid),
}
PATIENT_NAME, STUDY_TIME, MODALITIES = 0x00100010, 0x00080030, 0x00080061
STUDY_DATE = 0x00080020
SPECIAL = {PATIENT_NAME: "PATIENT", STUDY_TIME: "STUDY", MODALITIES: "STUDY"}
LEVEL_OF_UNIQUE = {
    0x00100020: "PATIENT",
    0x0020000D: "STUDY",
    0x0020000E: "SERIES",
    0x00080018: "IMAGE",
}

# Computed return keys (PS3.4 C.6.1.1.x): tag → (VR, level it is defined at, column).
COMPUTED: dict[int, tuple[str, str, Field]] = {
    0x00201200: ("IS", "PATIENT", Patient.num_studies),  # NumberOfPatientRelatedStudies
    0x00201202: ("IS", "PATIENT", Patient.num_series),  # NumberOfPatientRelatedSeries
    0x00201204: ("IS", "PATIENT", Patient.num_instances),  # NumberOfPatientRelatedInstances
    0x00201206: ("IS", "STUDY", Study.num_series),  # NumberOfStudyRelatedSeries
    0x00201208: ("IS", "STUDY", Study.num_instances),  # NumberOfStudyRelatedInstances
    0x00201209: ("IS", "SERIES", Series.num_instances),  # NumberOfSeriesRelatedInstances
    0x00080061: ("CS", "STUDY", Study.modalities),  # ModalitiesInStudy
    0x00080062: ("UI", "STUDY", Study.sop_classes),  # SOPClassesInStudy
    0x00083002: ("UI", "IMAGE", Instance.transfer_syntax),  # AvailableTransferSyntaxUID
}
INSTANCE_AVAILABILITY, RETRIEVE_AET, QUERY_LEVEL, CHARSET = (
    0x00080056,
    0x00080054,
    0x00080052,
    0x00080005,
)


@dataclass(frozen=True)
class Options:
    """Matching switches; `pn_case_insensitive` is PS3.4's optional PN rule."""

    pn_case_insensitive: bool = True
    retrieve_aet: str = ""
    combined_datetime: bool = False  # negotiated by the SCU (PS3.4 C.5.1.1.2)
    # QIDO-RS fuzzymatching=true: a PN value without wildcards matches names in which any
    # component (or word) starts with it, ignoring case: "joh" finds DOE^JOHN and JOHNSON.
    fuzzy_names: bool = False
    # QIDO-RS includefield=all: every stored attribute of the level, not only the keys.
    all_attributes: bool = False


def find(
    level: str,
    keys: list[Key],
    model: str = "STUDY",
    options: Options = Options(),
    limit: int | None = None,
    offset: int = 0,
) -> Iterator[dict[str, Any]]:
    """Yield one DICOM JSON answer per matching entity at `level`.

    `keys` are the identifier's keys (match keys with a value, return keys without);
    each answer carries every requested key, empty where the archive has no value.
    """
    level = level.upper().strip()
    if level not in LEVELS:
        raise QueryError(f"Query/Retrieve Level {level!r} is not one of {', '.join(LEVELS)}")
    resolved = _resolve(keys)
    keys = resolved[0]
    query, post = _select(level, keys, model, options, resolved=resolved)
    if not post:
        if offset:
            query = query.offset(offset)
        if limit is not None:
            query = query.limit(limit)
    skipped = produced = 0
    plan = _plan(level, keys, options)
    needs_json = bool(post) or options.all_attributes or _needs_json(keys, level)
    picked = None if post or options.all_attributes or not is_sqlite(db) else _picked(keys)
    rows = _rows(query)
    for row, stored in _with_stored(rows, level, picked) if needs_json else _bare(rows):
        if post and not all(_matches(element_of(stored, k), k, options) for k in post):
            continue
        if post:
            if skipped < offset:
                skipped += 1
                continue
            if limit is not None and produced >= limit:
                return
        produced += 1
        yield _answer(level, plan, row, stored, options)


def locate(level: str, keys: list[Key], model: str = "STUDY") -> Iterator[InstanceLocation]:
    """Every instance under the entities the keys select (C-MOVE, C-GET, WADO-RS), its path
    relative to the archive root."""
    level = level.upper().strip()
    if level not in LEVELS:
        raise QueryError(f"Query/Retrieve Level {level!r} is not one of {', '.join(LEVELS)}")
    if model == "STUDY" and level == "PATIENT":
        raise QueryError("the Study Root information model has no PATIENT level")
    sql, params = (
        _by_uids(level, keys, model) or _select("IMAGE", keys, model, Options(), level)[0].sql()
    )
    for row in _fetch(sql, params):
        yield InstanceLocation(
            pk=row["instance_pk"],
            study_uid=row["study_study_uid"],
            series_uid=row["series_series_uid"],
            sop_uid=row["instance_sop_uid"],
            sop_class_uid=row["instance_sop_class_uid"],
            transfer_syntax=row["instance_transfer_syntax"],
            instance_number=row["instance_instance_number"],
            path=Path(row["instance_path"]),
        )


# The SQL of a retrieval naming its entities by single UIDs (every WADO request), by
# database class, level, model and tags: (SQL, its parameters, and for each the index of
# the key whose value it is, or -1). peewee took ~0.35 ms to build what SQLite ran in
# ~0.015 ms.
_UID_SQL: dict[tuple, tuple[str, list, list[int]]] = {}
_MARK = "0.0.424242."  # a UID no parameter but a key's can hold


def _by_uids(level: str, keys: list[Key], model: str) -> tuple[str, list] | None:
    """locate's (SQL, parameters) when every key is one UID of an indexed column, from
    the statement made once for keys of those tags; None for any other keys."""
    if not keys or any(
        key.vr != "UI" or key.tag not in COLUMNS or key.creator or not _single_uid(key.value)
        for key in keys
    ):
        return None
    shape = (type(db.obj), level, model, tuple(key.tag for key in keys))
    made = _UID_SQL.get(shape)
    if made is None:
        marked = [replace(key, value=f"{_MARK}{n}") for n, key in enumerate(keys)]
        sql, params = _select("IMAGE", marked, model, Options(), limit_to=level)[0].sql()
        slots = [
            int(p[len(_MARK) :]) if isinstance(p, str) and p.startswith(_MARK) else -1
            for p in params
        ]
        made = _UID_SQL.setdefault(shape, (sql, params, slots))
    sql, params, slots = made
    return sql, [p if n < 0 else keys[n].value for p, n in zip(params, slots, strict=True)]


def _single_uid(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and value.replace(".", "").isdigit()


def _rows(query) -> Iterator[dict[str, Any]]:
    return _fetch(*query.sql())


def _fetch(sql: str, params: Any, batch: int = 256) -> Iterator[dict[str, Any]]:
    """Stream a SELECT as dicts, `batch` rows per fetch: one GIL round trip per batch, not
    per row, while the association thread competes with pynetdicom's for the GIL."""
    cursor = db.execute_sql(sql, params)
    names = [column[0] for column in cursor.description]
    while rows := cursor.fetchmany(batch):
        for values in rows:
            yield dict(zip(names, values, strict=True))


def _select(
    level: str,
    keys: list[Key],
    model: str,
    options: Options,
    limit_to: str = "",
    resolved: tuple[list[Key], list["Extended | None"]] | None = None,
):
    """The SQL for `level` with every indexed condition, and the keys left for Python;
    `resolved`: what _resolve made of `keys` already."""
    if model not in MODELS:
        raise QueryError(f"unknown information model {model!r}")
    if model == "STUDY" and level == "PATIENT":
        raise QueryError("the Study Root information model has no PATIENT level")
    depth = LEVELS.index(limit_to or level)
    allowed = set(LEVELS[: depth + 1])
    query = _base(level)
    post: list[Key] = []
    combined = _combined_datetime(keys) if options.combined_datetime else None
    if combined is not None:
        query = query.where(combined)
    keys, extended = resolved or _resolve(keys)
    check_values(keys)
    for key, tag in zip(keys, extended, strict=True):
        if key.tag in (QUERY_LEVEL, CHARSET) or _empty(key.value) or is_creator(key.tag):
            continue
        if combined is not None and key.tag in (STUDY_DATE, STUDY_TIME):
            continue
        if tag is not None:
            # Until back-filled, and at a level above the tag's (which answers from the
            # first instance's JSON, as before), it is matched on the stored JSON.
            ready = tag.state == "ready" and tag.level in allowed
            condition = _extended_condition(key, tag, options) if ready else None
            if condition is None:
                post.append(key)
            else:
                query = query.where(condition)
            continue
        owner = COLUMNS.get(key.tag, (SPECIAL.get(key.tag), None))[0]
        if owner is not None and owner not in allowed:
            continue  # a key below the query level cannot restrict it
        condition = _condition(key, options)
        if condition is None:
            post.append(key)
        else:
            query = query.where(condition)
    return query, post


def check_values(keys: list[Key]) -> None:
    """Refuse a DA, TM or DT key (in a sequence item too) whose value is not a date, time
    or datetime, a range of them, or a list of either (storage.dates): matched as text it
    found nothing, or the wrong things ("2003-2004" as a date), with Success."""
    for key in keys:
        values = key.value if isinstance(key.value, list) else [key.value]
        if key.vr == "SQ":
            for item in values:
                check_values(_item_keys(item) if isinstance(item, dict) else [])
            continue
        if key.vr not in RANGE_VRS or _empty(key.value):
            continue
        for value in (v for text in values for v in str(text).split("\\")):
            if (why := dates.problem(key.vr, value)) is not None:
                raise QueryError(f"{_name(key.tag)}: {why}")


def _item_keys(item: dict) -> list[Key]:
    return [Key(int(tag, 16), e.get("vr", ""), _query_value(e)) for tag, e in item.items()]


def _name(tag: int) -> str:
    try:
        return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    except ValueError:
        return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def is_creator(tag: int) -> bool:
    """A Private Creator element (gggg,0010-00FF of an odd group): it names a block, it is
    not a match key."""
    return bool((tag >> 16) & 1) and 0x10 <= (tag & 0xFFFF) <= 0xFF


def registered_tag(tag: int) -> int:
    """A key's tag as extended query tags register it: a private element without its block
    (gggg,00ee)."""
    if (tag >> 16) & 1 and (tag & 0xFFFF) >= 0x1000:
        return tag & 0xFFFF00FF
    return tag


def _resolve(keys: list[Key]) -> tuple[list[Key], list["Extended | None"]]:
    """The keys with the VR of their extended query tag (storage.querytags), and the tag of
    each (None: not one). The tags are read with each query that has a candidate (match
    keys beyond the columns, private keys): the table is a few rows, and a tag added or
    removed a moment ago is seen at once."""
    wanted = [
        registered_tag(key.tag)
        if key.vr != "SQ"
        and not is_creator(key.tag)
        and (
            key.creator
            or (key.tag not in COLUMNS and key.tag not in SPECIAL and not _empty(key.value))
        )
        else None
        for key in keys
    ]
    numbers = sorted({tag for tag in wanted if tag is not None})
    if not numbers:
        return keys, [None] * len(keys)
    marks = ", ".join([db.param] * len(numbers))
    rows = db.execute_sql(
        f"SELECT id, tag, creator, vr, level, state FROM querytag WHERE tag IN ({marks})",
        numbers,
    ).fetchall()
    by_tag = {(row[1], row[2]): Extended(*row) for row in rows}
    tags = [by_tag.get((tag or 0, key.creator)) for key, tag in zip(keys, wanted, strict=True)]
    return [
        key if tag is None else replace(key, vr=tag.vr, value=_as_vr(key.value, key.vr, tag.vr))
        for key, tag in zip(keys, tags, strict=True)
    ], tags


@dataclass(frozen=True)
class Extended:
    """An extended query tag (storage.querytags) as matching needs it."""

    id: int
    tag: int
    creator: str
    vr: str
    level: str
    state: str


def identifier(level: str, keys: dict[str, str]) -> Dataset:
    """A query identifier from `Keyword=value` pairs ('' = return key, a sequence asked
    for empty), UTF-8 when a value is not ASCII: what `minipacs find` and `pacs.scu` send
    and cohort export selects with. ValueError names a word that is not a keyword."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level.upper()
    for keyword, value in keys.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword} is not a DICOM keyword")
        setattr(ds, keyword, [] if dictionary_VR(keyword) == "SQ" else value)
    if any(not str(value).isascii() for value in keys.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def keys_from_dataset(ds: Dataset) -> list[Key]:
    """The keys of a C-FIND/C-MOVE/C-GET identifier, text decoded by its character set; a
    private element with the Private Creator of its block."""
    keys = []
    for elem in ds:
        if elem.tag.group == 0x0002:
            continue
        tag = int(elem.tag)
        creator = ""
        if registered_tag(tag) != tag:
            found = ds.get(((tag >> 16) << 16) | ((tag >> 8) & 0xFF))
            creator = str(found.value or "").strip() if found is not None else ""
        if elem.VR == "SQ":
            items = [item.to_json_dict(1024, lambda e: "") for item in elem.value]
            keys.append(Key(tag, "SQ", items, creator))
        elif isinstance(elem.value, bytes):  # UN (implicit VR, private): bytes as latin-1
            keys.append(Key(tag, elem.VR, elem.value.decode("latin-1"), creator))
        elif elem.VM > 1:
            keys.append(Key(tag, elem.VR, [str(v) for v in elem.value], creator))
        else:
            value = elem.value
            keys.append(Key(tag, elem.VR, "" if value is None else str(value), creator))
    return keys


def _empty(value: Any) -> bool:
    if isinstance(value, list):
        return all(_empty(v) for v in value) if value else True
    if isinstance(value, dict):  # a sequence's query item: no key in it has a value
        return all(_empty(_query_value(element)) for element in value.values())
    return value is None or str(value).strip() == "" or str(value).strip() == "*"


def _base(level: str):
    """The SELECT for a level: its ids, its columns and those of the levels above."""
    columns = _Columns(level)
    if level == "PATIENT":
        return Patient.select(columns).order_by(Patient.id)
    if level == "STUDY":
        return (
            Study.select(columns).join(Patient, on=(Study.patient == Patient.id)).order_by(Study.id)
        )
    if level == "SERIES":
        return (
            Series.select(columns)
            .join(Study, on=(Series.study == Study.id))
            .join(Patient, on=(Study.patient == Patient.id))
            .order_by(Series.id)
        )
    return (
        Instance.select(columns)
        .join(Series, on=(Instance.series == Series.id))
        .join(Study, on=(Series.study == Study.id))
        .join(Patient, on=(Study.patient == Patient.id))
        .order_by(Instance.id)
    )


def _fields(level: str) -> list:
    """The selected columns of a level: ids and columns of it and the levels above."""
    fields = [Patient.id.alias("patient_pk"), *_columns(Patient)]
    if level != "PATIENT":
        fields += [Study.id.alias("study_pk"), *_columns(Study)]
    if level in ("SERIES", "IMAGE"):
        fields += [Series.id.alias("series_pk"), *_columns(Series)]
    if level == "IMAGE":
        fields += [Instance.id.alias("instance_pk"), *_columns(Instance, skip={"json"})]
    return fields


class _Columns(Node):
    """A level's select list, rendered once per kind of database and reused: peewee rebuilt its
    ~30 aliased columns on every query, most of the time a query's SQL took (~0.3 ms a
    study-level query, ~0.6 at IMAGE level). Rendering it first assigns the table aliases
    in the order the columns name the tables (t1 patient, t2 study, …), as peewee does, so
    the joins and conditions after it read the same."""

    _rendered: dict[tuple, str] = {}

    def __init__(self, level: str) -> None:
        self.level = level

    def __sql__(self, ctx):
        key = (self.level, type(db.obj))  # the SQL dialect is the database class's
        text = self._rendered.get(key)
        if text is None:
            fresh = db.get_sql_context()
            with fresh.scope_source(in_projection=True):
                fresh.sql(CommaNodeList(_fields(self.level)))
            text, params = fresh.query()
            assert not params, "a select list has no parameters"
            self._rendered[key] = text
        models = LEVEL_MODELS[: LEVELS.index(self.level) + 1]
        aliases = [ctx.alias_manager.add(model._meta.table) for model in models]
        if aliases != [f"t{n}" for n in range(1, len(models) + 1)]:  # inside another query
            return ctx.sql(CommaNodeList(_fields(self.level)))
        return ctx.literal(text)


def _columns(model, skip: Collection[str] = ()) -> list:
    prefix = model._meta.table_name
    return [
        field.alias(f"{prefix}_{name}")
        for name, field in model._meta.fields.items()
        if name not in skip and name != "id" and name not in ("patient", "study", "series")
    ]


# -- SQL conditions ----------------------------------------------------------------


def _condition(key: Key, options: Options) -> Expression | None:
    """The SQL condition for an indexed key, or None to match it in Python."""
    if key.tag == PATIENT_NAME:
        return _name_condition(str(key.value), options)
    if key.tag == MODALITIES:
        values = key.value if isinstance(key.value, list) else str(key.value).split("\\")
        matching = StudyModality.select(StudyModality.study).where(
            _any_of(StudyModality.modality, [v.strip() for v in values], "CS")
        )
        return Study.id.in_(matching)
    if key.tag == STUDY_TIME:
        return _ranges(Study.time_key, key.value, "TM")
    if key.tag not in COLUMNS:
        return None
    return _value_condition(COLUMNS[key.tag][1], key)


def _value_condition(field: Field, key: Key) -> Expression | None:
    """`field` (a column, or the text of extended tag values) matches the key's value."""
    if key.vr == "SQ":
        return None
    if key.vr in RANGE_VRS:
        return _ranges(field, key.value, key.vr)
    values = key.value if isinstance(key.value, list) else [key.value]
    if key.vr == "UI":  # list of UIDs (PS3.4 C.2.2.2.2): backslash or multi-valued
        uids = [u.strip() for v in values for u in str(v).split("\\") if u.strip()]
        return field.in_(uids)
    if len(values) > 1:
        return None
    return _single(field, str(values[0]).strip(), key.vr)


def _combined_datetime(keys: list[Key]) -> Expression | None:
    """StudyDate and StudyTime as one datetime range (PS3.4 C.2.2.2.5.1, when negotiated)."""
    date = next((k for k in keys if k.tag == STUDY_DATE and not _empty(k.value)), None)
    time = next((k for k in keys if k.tag == STUDY_TIME and not _empty(k.value)), None)
    if (
        date is None
        or time is None
        or any(isinstance(k.value, list) or "\\" in str(k.value) for k in (date, time))
    ):
        return None  # a list of dates or times is matched key by key
    d1, _, d2 = (
        str(date.value).strip().partition("-")
        if "-" in str(date.value)
        else (str(date.value).strip(), "", str(date.value).strip())
    )
    t1, _, t2 = (
        str(time.value).strip().partition("-")
        if "-" in str(time.value)
        else (str(time.value).strip(), "", str(time.value).strip())
    )
    stamp = Study.study_date.concat(Study.time_key)
    condition = Study.study_date != ""
    if d1.strip():
        condition &= stamp >= d1.strip() + (time_key(t1) or "000000.000000")
    if d2.strip():
        condition &= stamp <= d2.strip() + (time_key(t2, upper=True) or "235959.999999")
    return condition


def _any_of(field: Field, values: list[str], vr: str) -> Expression | None:
    condition: Expression | None = None
    for value in values:
        part = _single(field, value, vr)
        condition = part if condition is None else (condition | part)
    return condition


def _single(field: Field, value: str, vr: str) -> Expression:
    if vr in WILDCARD_VRS and has_wildcards(value):
        return wildcard_condition(field, value)
    return field == value


def _name_condition(
    value: str, options: Options, name: Field = Patient.patient_name, key: Field = Patient.name_key
) -> Expression | None:
    """PN: the alphabetic group through the indexed key (`key`: dataset.name_key of the
    `name`); other groups are matched in Python."""
    groups = value.split("=")
    if len(groups) > 1 and any(g.strip() for g in groups[1:]):
        return None
    alphabetic = groups[0].rstrip("^ ")
    if options.fuzzy_names and not any(c in alphabetic for c in "*?"):
        start = name_key(alphabetic)
        return (
            wildcard_condition(key, f"{start}*")
            | wildcard_condition(key, f"*^{start}*")
            | wildcard_condition(key, f"* {start}*")
        )
    if not options.pn_case_insensitive:
        return _single(name, value, "PN") if "=" not in value else None
    return _single(key, name_key(alphabetic), "PN")


LEVEL_IDS = {"STUDY": Study.id, "SERIES": Series.id, "IMAGE": Instance.id}


def _extended_condition(key: Key, tag: "Extended", options: Options) -> Node | None:
    """The entities of the tag's level with a value matching the key (any value of a
    multi-valued attribute, PS3.4 C.2.2.2): the rules of the standard keys, applied to
    the tag's indexed values. None: matched in Python (a multi-valued query, PN groups)."""
    value = key.value
    condition: Node | None
    if isinstance(value, list) and key.vr != "UI":
        return None
    if key.vr == "PN":
        condition = _name_condition(str(value), options, QueryValue.text, QueryValue.folded)
    elif key.vr in NUMBER_VRS:
        number = to_number(str(value))
        condition = SQL("1 = 0") if number is None else QueryValue.number == number
    elif key.vr == "TM":
        condition = _ranges(QueryValue.text, value, "TM")
    else:
        condition = _value_condition(QueryValue.text, key)
    if condition is None:
        return None
    entities = QueryValue.select(QueryValue.entity).where((QueryValue.tag == tag.id) & condition)
    return LEVEL_IDS[tag.level].in_(entities)


def _as_vr(value: Any, vr: str, wanted: str) -> Any:
    """A key's value read as the tag's registered VR: a private element of an implicit VR
    identifier arrives as UN (its bytes, as latin-1 text; keys_from_dataset)."""
    if vr != "UN" or not isinstance(value, str):
        return value
    if wanted in BINARY_NUMBERS:
        values = [str(v) for v in _unpack(value.encode("latin-1"), wanted)]
    else:
        values = [v.strip(" \0") for v in value.rstrip("\0 ").split("\\")]
    return values[0] if len(values) == 1 else values


def _ranges(field: Field, value: Any, vr: str) -> Expression:
    """A DA, TM or DT key's condition: any of its values (multi-valued or backslashes),
    each a single value or a range."""
    texts = [t for v in (value if isinstance(value, list) else [value]) for t in str(v).split("\\")]
    condition = _range(field, texts[0], vr)
    for text in texts[1:]:
        condition |= _range(field, text, vr)
    return condition


def _range(field: Field, value: str, vr: str) -> Expression:
    """Single value or range (PS3.4 C.2.2.2.5): 'A-B', '-B', 'A-' (check_values made sure
    of the form). A single DA or DT is matched exactly; a TM covers its precision."""
    bounds = _split(value, vr)
    if bounds.single and vr != "TM":
        return field == bounds.low
    low, high = _bounds(bounds, vr)
    condition = field != ""
    if low:
        condition &= field >= low
    if high:
        condition &= field <= high
    return condition


def _split(value: str, vr: str) -> dates.Range:
    """The bounds of a range value; one not checked (not a range) stands for itself."""
    return dates.split(vr, value) or dates.Range(value.strip(), value.strip(), True)


def _bounds(bounds: dates.Range, vr: str) -> tuple[str, str]:
    """A range's bounds as the stored text compares: a TM as HHMMSS.ffffff (13 is up to
    13:59:59.999999), a DT's end padded to the last moment it names (2004 is up to
    20041231235959.999999: as text, "20040119" > "2004")."""
    low, high = bounds.low, bounds.high
    if vr == "TM":
        return time_key(low), time_key(high, upper=True)
    if vr == "DT":
        return dates.dt_lower(low) if low else "", dates.dt_upper(high) if high else ""
    return low, high


# -- matching in Python, on stored DICOM JSON ---------------------------------------


def _matches(element: dict | None, key: Key, options: Options) -> bool:
    """Does the stored element match `key` (a key with a value)?"""
    if key.vr == "SQ":
        items = (element or {}).get("Value") or []
        wanted = [item for item in key.value if not _empty(item)]
        return all(any(_item_matches(item, q, options) for item in items) for q in wanted)
    values = element_texts(element, key.vr)
    queries = key.value if isinstance(key.value, list) else [key.value]
    queries = [str(q) for q in queries]
    if key.vr == "UI":
        uids = {u.strip() for q in queries for u in q.split("\\") if u.strip()}
        return any(v in uids for v in values)
    query = queries[0].strip()
    if key.vr in NUMBER_VRS:
        number = to_number(query)
        return number is not None and number in element_numbers(element, key.vr)
    if key.vr in RANGE_VRS:
        texts = [t for q in queries for t in q.split("\\")]
        return any(_in_range(values, text, key.vr) for text in texts)
    compare = _comparator(query, key.vr, options)
    return any(compare(v) for v in values)


def _in_range(values: list[str], value: str, vr: str) -> bool:
    """As the SQL compares (_range): any stored value in the range, or equal to it."""
    bounds = _split(value, vr)
    if bounds.single and vr != "TM":
        return bounds.low in values
    low, high = _bounds(bounds, vr)
    if vr == "TM":
        values = [time_key(v) for v in values]
    return any(v and (not low or v >= low) and (not high or v <= high) for v in values)


def _item_matches(item: dict, query: dict, options: Options) -> bool:
    for tag_hex, element in query.items():
        key = Key(int(tag_hex, 16), element.get("vr", ""), _query_value(element))
        if not _empty(key.value) and not _matches(item.get(tag_hex), key, options):
            return False
    return True


def _query_value(element: dict) -> Any:
    values = element.get("Value") or []
    if element.get("vr") == "SQ":
        return values
    if element.get("vr") == "PN":
        values = [_pn_text(v) for v in values]
    return values[0] if len(values) == 1 else [str(v) for v in values] if values else ""


def _comparator(query: str, vr: str, options: Options) -> Callable[[str], bool]:
    fold = vr == "PN" and (options.pn_case_insensitive or options.fuzzy_names)
    if vr == "PN":
        query = "=".join(g.rstrip("^ ") for g in query.split("="))
        if options.fuzzy_names and not any(c in query for c in "*?="):
            start = query.upper()
            return lambda value: any(
                word.startswith(start) for word in re.split(r"[\^= ]+", value.upper())
            )
    if fold:
        query = query.upper()
    wildcard = vr in WILDCARD_VRS and has_wildcards(query)

    def compare(value: str) -> bool:
        if vr == "PN":
            value = "=".join(g.rstrip("^ ") for g in value.split("="))
            groups_q, groups_v = query.split("="), value.split("=")
            return all(
                not q or _text_match(q, groups_v[i] if i < len(groups_v) else "", fold)
                for i, q in enumerate(groups_q)
            )
        return wildcard_matches(query, value) if wildcard else value == query

    return compare


def _text_match(query: str, value: str, fold: bool) -> bool:
    value = value.upper() if fold else value
    return wildcard_matches(query, value) if has_wildcards(query) else value == query


def element_of(stored: dict, key: Key) -> dict | None:
    """The stored element a key names: a private one by its creator's block in `stored`."""
    if not key.creator:
        return stored.get(key.hex)
    group = f"{key.tag >> 16:04X}"
    for tag_hex, element in stored.items():
        if not tag_hex.startswith(group) or not is_creator(int(tag_hex, 16)):
            continue
        if [str(v).strip() for v in element.get("Value") or []] == [key.creator]:
            return stored.get(f"{group}{tag_hex[6:8]}{key.tag & 0xFF:02X}")
    return None


def element_texts(element: dict | None, vr: str) -> list[str]:
    """The values of a stored element as text (PN as 'A=I=P'); a UN element (a private one
    of an implicit VR file) decoded as `vr` says."""
    if element and "InlineBinary" in element and element.get("vr") == "UN" and vr != "UN":
        raw = base64.b64decode(element["InlineBinary"])
        if vr in BINARY_NUMBERS:
            return [str(n) for n in _unpack(raw, vr)]
        text = raw.decode("utf-8", "replace").rstrip("\0 ")
        return [v.strip(" \0") for v in text.split("\\")] if text else []
    return _values(element)


def element_numbers(element: dict | None, vr: str) -> list[float]:
    """The values of a stored number element (IS, DS, US, FD, …) as numbers."""
    if element and "Value" in element:
        found = [to_number(str(v)) for v in element["Value"] if v is not None]
    else:
        found = [to_number(v) for v in element_texts(element, vr)]
    return [n for n in found if n is not None]


def _decoded(element: dict, vr: str) -> dict:
    """A UN element as DICOM JSON of the VR its extended query tag registers."""
    values: list[Any]
    if vr in NUMBER_VRS:
        numbers = element_numbers(element, vr)
        values = [int(n) if vr not in ("DS", "FL", "FD") else n for n in numbers]
    elif vr == "PN":
        names = ("Alphabetic", "Ideographic", "Phonetic")
        values = [dict(zip(names, v.split("="), strict=False)) for v in element_texts(element, vr)]
    else:
        values = element_texts(element, vr)
    return {"vr": vr, "Value": values} if values else {"vr": vr}


def to_number(text: str) -> float | None:
    try:
        number = float(text.strip())
    except ValueError:
        return None
    return number if number == number else None  # NaN matches nothing


def _unpack(raw: bytes, vr: str) -> tuple:
    size = struct.calcsize("<" + BINARY_NUMBERS[vr])
    return struct.unpack(
        "<" + BINARY_NUMBERS[vr] * (len(raw) // size), raw[: len(raw) // size * size]
    )


def _values(element: dict | None) -> list[str]:
    """The values of a stored JSON element as text (PN as 'A=I=P')."""
    if not element:
        return []
    out = []
    for value in element.get("Value") or []:
        if isinstance(value, dict):
            out.append(_pn_text(value))
        elif value is not None:
            out.append(str(value) if not isinstance(value, float) else f"{value:g}")
    return out


def _pn_text(value: Any) -> str:
    if not isinstance(value, dict):
        return str(value)
    groups = [value.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


# -- answers ------------------------------------------------------------------------


# Return keys answered from the row's own columns (no JSON parse): tag → (column, VR).
FROM_COLUMNS = {
    0x00100020: ("patient_patient_id", "LO"),
    0x00100021: ("patient_issuer", "LO"),
    0x00100010: ("patient_patient_name", "PN"),
    0x00100030: ("patient_birth_date", "DA"),
    0x00100040: ("patient_sex", "CS"),
    0x0020000D: ("study_study_uid", "UI"),
    0x00080020: ("study_study_date", "DA"),
    0x00080030: ("study_study_time", "TM"),
    0x00080050: ("study_accession_number", "SH"),
    0x00200010: ("study_study_id", "SH"),
    0x00080090: ("study_referring_physician", "PN"),
    0x00081030: ("study_description", "LO"),
    0x0020000E: ("series_series_uid", "UI"),
    0x00080060: ("series_modality", "CS"),
    0x00200011: ("series_series_number", "IS"),
    0x0008103E: ("series_description", "LO"),
    0x00080018: ("instance_sop_uid", "UI"),
    0x00080016: ("instance_sop_class_uid", "UI"),
    0x00200013: ("instance_instance_number", "IS"),
}
COLUMN_LEVEL = {"patient": "PATIENT", "study": "STUDY", "series": "SERIES", "instance": "IMAGE"}
NOT_STORED = (QUERY_LEVEL, CHARSET, INSTANCE_AVAILABILITY, RETRIEVE_AET)


def _from_columns(tag: int, level: str) -> bool:
    column = FROM_COLUMNS.get(tag)
    if column is None:
        return False
    owner = COLUMN_LEVEL[column[0].split("_")[0]]
    return LEVELS.index(owner) <= LEVELS.index(level)


def _needs_json(keys: list[Key], level: str) -> bool:
    return any(
        k.tag not in COMPUTED and k.tag not in NOT_STORED and not _from_columns(k.tag, level)
        for k in keys
    )


def _column_value(tag: int, row: dict) -> dict:
    column, vr = FROM_COLUMNS[tag]
    value = row.get(column)
    if value is None or value == "":
        return {"vr": vr}
    if vr == "IS":
        return {"vr": vr, "Value": [int(value)]}
    if vr == "PN":
        names = []
        for name in str(value).split("\\"):
            groups = dict(
                zip(("Alphabetic", "Ideographic", "Phonetic"), name.split("="), strict=False)
            )
            names.append({k: v for k, v in groups.items() if v})
        return {"vr": vr, "Value": names}
    return {"vr": vr, "Value": str(value).split("\\")}


# The stored DICOM JSON of a chunk of entities by their ids (for the levels above IMAGE,
# of each one's first instance), in one statement; {ids} is a chunk's parameters.
_JSON_SQL = {
    "IMAGE": "SELECT i.id, {json} FROM instance i WHERE i.id IN ({ids})",
    "SERIES": (
        "SELECT s.id, (SELECT {json} FROM instance i WHERE i.series_id = s.id "
        "ORDER BY i.id LIMIT 1) FROM series s WHERE s.id IN ({ids})"
    ),
    "STUDY": (
        "SELECT st.id, (SELECT {json} FROM instance i JOIN series s ON i.series_id = s.id "
        "WHERE s.study_id = st.id ORDER BY i.id LIMIT 1) FROM study st WHERE st.id IN ({ids})"
    ),
    "PATIENT": (
        "SELECT p.id, (SELECT {json} FROM instance i JOIN series s ON i.series_id = s.id "
        "JOIN study st ON s.study_id = st.id WHERE st.patient_id = p.id ORDER BY i.id LIMIT 1) "
        "FROM patient p WHERE p.id IN ({ids})"
    ),
}
_PK = {"IMAGE": "instance_pk", "SERIES": "series_pk", "STUDY": "study_pk", "PATIENT": "patient_pk"}
FIRST_JSON_CHUNK = 16  # rows whose JSON the first statement reads: the first answer waits
JSON_CHUNK = 256  # rows whose JSON each further statement reads: _fetch's batch


def _bare(rows: Iterator[dict]) -> Iterator[tuple[dict, dict]]:
    return ((row, {}) for row in rows)


def _with_stored(
    rows: Iterator[dict], level: str, picked: list[str] | None
) -> Iterator[tuple[dict, dict]]:
    """Each row with the DICOM JSON of its entity (of one of its instances, for the levels
    above IMAGE), read a chunk of rows at a time by one statement: one SELECT a row cost a
    C-FIND or QIDO-RS answer of N entities N statements. The first chunk is small
    (FIRST_JSON_CHUNK), so the first answer, which FindAnswers sends at once, does not
    wait for JSON_CHUNK rows and their JSON; the others are JSON_CHUNK. A short chunk
    repeats its last id, so there are two statements a query at most, each made once
    (SQLite prepares it once); at most one chunk's JSON is held. With `picked`, only those
    top-level elements, cut out by SQLite's JSON functions: Python's parse of whole
    instances (~11 KB a CT slice) was most of an IMAGE-level query's time (500 instances:
    134 ms, against 22 ms picked)."""
    column = "i.json"
    if picked:
        paths = ", ".join(f"'$.\"{tag}\"'" for tag in picked)  # hex tags: nothing to escape
        column = f"json_extract(i.json, {paths})"
    sizes = (FIRST_JSON_CHUNK, JSON_CHUNK)
    sql = {n: _JSON_SQL[level].format(json=column, ids=", ".join([db.param] * n)) for n in sizes}
    pk = _PK[level]
    size = FIRST_JSON_CHUNK
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield from _chunk_stored(sql[size], size, pk, chunk, picked)
            chunk, size = [], JSON_CHUNK
    if chunk:
        yield from _chunk_stored(sql[size], size, pk, chunk, picked)


def _chunk_stored(
    sql: str, size: int, pk: str, chunk: list[dict], picked: list[str] | None
) -> Iterator[tuple[dict, dict]]:
    ids = [row[pk] for row in chunk]
    ids += ids[-1:] * (size - len(ids))
    texts = dict(db.execute_sql(sql, ids).fetchall())
    for row in chunk:
        yield row, _parsed(texts.get(row[pk]), picked)


def _parsed(text: str | None, picked: list[str] | None) -> dict:
    """The stored JSON as a dict ({} for an entity without instances)."""
    if text is None:
        return {}
    if not picked:
        return json.loads(text)
    values = json.loads(text)  # an array: the elements in `picked` order, null if absent
    return {tag: value for tag, value in zip(picked, values, strict=True) if value is not None}


def _picked(keys: list[Key]) -> list[str] | None:
    """The top-level elements an answer takes from the stored JSON, SOP Instance UID first
    (a pick is then never empty where the JSON is not, as answers expect) and at least
    two (json_extract answers an array); None when a key needs more: a private one,
    found by its creator's block."""
    picked = ["00080018", "00080016"]
    for key in keys:
        constant = is_creator(key.tag) and isinstance(key.value, str) and key.value.strip()
        if key.tag in NOT_STORED or key.tag in COMPUTED or constant:
            continue
        if key.creator:
            return None
        if key.hex not in picked:
            picked.append(key.hex)
    return picked


Getter = Callable[[dict, dict], dict]


def _plan(level: str, keys: list[Key], options: Options) -> list[tuple[str, Getter]]:
    """How each return key of an answer is made, decided once per query, in tag order:
    building answers is most of a large query's time."""
    constants = {"00080005": "ISO_IR 192", "00080052": level}  # answers are UTF-8
    getters = {tag: _constant(value) for tag, value in constants.items()}
    for key in keys:
        if key.tag not in (QUERY_LEVEL, CHARSET):
            getters[key.hex] = _getter(key, level, options)
    return sorted(getters.items())


def _constant(value: str) -> Getter:
    return lambda row, stored: {"vr": "CS", "Value": [value]}


def _answer(level: str, plan: list[tuple[str, Getter]], row: dict, stored: dict, options) -> dict:
    answer = {tag: get(row, stored) for tag, get in plan}
    if options.all_attributes:
        return dict(sorted((_level_attributes(level, stored) | answer).items()))
    return answer


def _getter(key: Key, level: str, options: Options) -> Getter:
    tag = key.tag
    if tag in COMPUTED:
        vr, _, field = COMPUTED[tag]
        column = f"{field.model._meta.table_name}_{field.name}"

        def computed(row: dict, stored: dict) -> dict:
            value = row.get(column)
            if value is None or value == "":
                return {"vr": vr}
            if vr == "IS":
                return {"vr": vr, "Value": [int(value)]}
            return {"vr": vr, "Value": str(value).split("\\")}

        return computed
    if tag == INSTANCE_AVAILABILITY:
        return lambda row, stored: {"vr": "CS", "Value": ["ONLINE"]}
    if is_creator(tag) and isinstance(key.value, str) and key.value.strip():
        creator = {"vr": "LO", "Value": [key.value.strip()]}  # the block the query chose
        return lambda row, stored: creator
    from_columns = _from_columns(tag, level)
    empty = key.vr or "UN"

    def returned(row: dict, stored: dict) -> dict:
        if not stored and from_columns:
            return _column_value(tag, row)
        if tag == RETRIEVE_AET:
            aet = options.retrieve_aet
            return {"vr": "AE", "Value": [aet]} if aet else {"vr": "AE"}
        element = element_of(stored, key)
        if element is None:
            return {"vr": empty}
        if element.get("vr") == "UN" and "InlineBinary" in element and key.vr not in ("", "UN"):
            return _decoded(element, key.vr)  # a registered private tag of an implicit VR file
        if "BulkDataURI" in element or "InlineBinary" in element:
            return {"vr": element["vr"]}  # binary values are not C-FIND answers
        if key.vr == "SQ" and isinstance(key.value, list):
            return requested_items(element, key.value, options)
        return element

    return returned


def requested_items(element: dict, query: list[dict], options: Options) -> dict:
    """A sequence as a C-FIND answer carries it (PS3.4 C.2.2.2.6): the stored items that
    match the query item, each with only the attributes the query item names ("A
    sequence of matching Items containing only the requested Attributes"), nested
    sequences likewise; a requested attribute an item lacks is empty, as a return key
    is. A key with no item, or an empty one, asks for the entire sequence."""
    wanted = [item for item in query if item]
    if not wanted or element.get("vr") != "SQ":
        return element
    conditions = [item for item in wanted if not _empty(item)]
    names = {tag: q for item in wanted for tag, q in item.items()}
    items = [
        {tag: _requested(item.get(tag), q, options) for tag, q in sorted(names.items())}
        for item in element.get("Value") or []
        if all(_item_matches(item, q, options) for q in conditions)
    ]
    return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}


def _requested(element: dict | None, query: dict, options: Options) -> dict:
    vr = query.get("vr") or "UN"
    if element is None:
        return {"vr": vr}
    if vr == "SQ" and isinstance(query.get("Value"), list):
        return requested_items(element, query["Value"], options)
    return element


# Attributes `includefield=all` returns above the IMAGE level, beyond the patient group
# (0010,xxxx): the study and series modules' common attributes (PS3.3 C.7.2, C.7.3).
STUDY_ATTRIBUTES = {
    0x00080020,
    0x00080030,
    0x00080050,
    0x00080051,
    0x00080090,
    0x00080096,
    0x00081030,
    0x00081032,
    0x00081060,
    0x00081080,
    0x00080201,
    0x0020000D,
    0x00200010,
    0x00101010,
    0x00101020,
    0x00101030,
    0x00321032,
    0x00321060,
}
SERIES_ATTRIBUTES = {
    0x00080021,
    0x00080031,
    0x00080060,
    0x00080070,
    0x00080080,
    0x00081010,
    0x0008103E,
    0x00081040,
    0x00081050,
    0x00081070,
    0x00081090,
    0x00180015,
    0x00181030,
    0x00185100,
    0x0020000E,
    0x00200011,
    0x00200052,
    0x00200060,
    0x00400244,
    0x00400245,
    0x00400254,
    0x00400275,
}


def _level_attributes(level: str, stored: dict) -> dict[str, Any]:
    """The stored attributes that belong to `level` and the levels above it."""
    if level == "IMAGE":
        return dict(stored)
    wanted = STUDY_ATTRIBUTES if level == "STUDY" else set()
    if level == "SERIES":
        wanted = STUDY_ATTRIBUTES | SERIES_ATTRIBUTES
    return {
        tag: element
        for tag, element in stored.items()
        if (tag.startswith("0010") or int(tag, 16) in wanted) and "BulkDataURI" not in element
    }


def instance_json(level: str, keys: list[Key], model: str = "STUDY") -> Iterator[tuple[str, str]]:
    """(SOP Instance UID, stored DICOM JSON text) of every instance under the entities the
    keys select, in series then instance order: WADO-RS metadata, read without a parse."""
    query, _ = _select("IMAGE", keys, model, Options(), limit_to=level)
    query = query.select_extend(Instance.json.alias("instance_json")).order_by(
        Series.series_number, Series.id, Instance.instance_number, Instance.id
    )
    for row in _rows(query):
        yield row["instance_sop_uid"], row["instance_json"]


def instance_elements(
    level: str, keys: list[Key], tags: list[str], model: str = "STUDY"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(SOP Instance UID, {tag: element}) of every instance under the entities the keys
    select, in `instance_json`'s order, with only the top-level elements `tags` (hex, as in
    DICOM JSON) the instance has. On SQLite json_extract cuts them out, so a document's
    header is read without Python parsing the rest (an SR's content tree); PostgreSQL's
    rows are parsed whole here."""
    # Two tags at least, as _picked's: json_extract answers one path's value bare.
    picked = ["00080018", "00080016"]
    picked += [tag for tag in tags if tag not in picked]
    sqlite = is_sqlite(db)
    query, _ = _select("IMAGE", keys, model, Options(), limit_to=level)
    column: ColumnBase = Instance.json
    if sqlite:
        column = fn.json_extract(Instance.json, *(f'$."{tag}"' for tag in picked))
    query = query.select_extend(column.alias("instance_elements")).order_by(
        Series.series_number, Series.id, Instance.instance_number, Instance.id
    )
    for row in _rows(query):
        stored = _parsed(row["instance_elements"], picked if sqlite else None)
        yield row["instance_sop_uid"], {tag: stored[tag] for tag in tags if tag in stored}


# -- Modality Worklist (PS3.4 K.6) ----------------------------------------------------

SPS, SPS_STATUS = 0x00400100, 0x00400020  # Scheduled Procedure Step Sequence, its status
WORKLIST_COLUMNS = {
    0x00100020: WorklistItem.patient_id,
    0x00080050: WorklistItem.accession_number,
}
STEP_COLUMNS = {
    0x00080060: WorklistItem.modality,
    0x00400001: WorklistItem.station_aet,
    0x00400002: WorklistItem.start_date,
    0x00400009: WorklistItem.step_id,
}
FINAL_STEP_STATUSES = ("COMPLETED", "DISCONTINUED")


def find_worklist(keys: list[Key], options: Options) -> Iterator[dict[str, Any]]:
    """Worklist items matching every key, by the rules of `find` (the Scheduled Procedure
    Step Sequence by sequence matching); answers carry the requested keys, as DICOM JSON.
    Indexed keys (patient, accession, modality, station, start date, step ID) narrow the
    SQL. Steps COMPLETED or DISCONTINUED are left out unless a status is asked for."""
    check_values(keys)
    query = WorklistItem.select(WorklistItem.json).order_by(
        WorklistItem.start_date, WorklistItem.id
    )
    status_asked = False
    for key in keys:
        if key.tag in WORKLIST_COLUMNS and key.vr != "SQ" and not _empty(key.value):
            query = query.where(_column_condition(WORKLIST_COLUMNS[key.tag], key))
        if key.tag == PATIENT_NAME and not _empty(key.value):
            # Names are not a column: the literal start of the pattern narrows the scan
            # (LIKE/ILIKE on the stored JSON, case-insensitive: a superset, matched below).
            start = re.split(r"[*?^=\\]", str(key.value), maxsplit=1)[0].strip()
            if len(start) >= 2 and start.isascii():
                query = query.where(WorklistItem.json.contains(start))
        if key.tag != SPS or not isinstance(key.value, list):
            continue
        for item in key.value:
            for tag_hex, element in (item or {}).items():
                step_key = Key(int(tag_hex, 16), element.get("vr", ""), _query_value(element))
                if _empty(step_key.value):
                    continue
                status_asked |= step_key.tag == SPS_STATUS
                if step_key.tag in STEP_COLUMNS:
                    query = query.where(_column_condition(STEP_COLUMNS[step_key.tag], step_key))
    if not status_asked:
        query = query.where(WorklistItem.status.not_in(FINAL_STEP_STATUSES))
    for (text,) in query.tuples().iterator():
        stored = json.loads(text)
        if all(_empty(k.value) or _matches(stored.get(k.hex), k, options) for k in keys):
            yield _worklist_answer(stored, keys, options)


def _column_condition(field: Field, key: Key) -> Expression | None:
    values = key.value if isinstance(key.value, list) else [key.value]
    if key.vr in RANGE_VRS:
        return _ranges(field, key.value, key.vr)
    return _any_of(field, [str(v).strip() for v in values], key.vr)


def _worklist_answer(stored: dict, keys: list[Key], options: Options) -> dict[str, Any]:
    """The requested keys with the item's values; sequence keys as `find` answers them
    (requested_items)."""
    answer: dict[str, Any] = {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}}
    for key in keys:
        if key.tag == CHARSET:
            continue
        element = stored.get(key.hex) or {"vr": key.vr}
        if key.vr == "SQ" and isinstance(key.value, list):
            element = requested_items(element, key.value, options)
        answer[key.hex] = element
    return answer


def explain(level: str, keys: list[Key], model: str = "STUDY") -> list[str]:
    """SQLite's plan for a query (EXPLAIN QUERY PLAN details): how tests prove the common
    keys are answered through indexes."""
    query, _ = _select(level.upper(), keys, model, Options())
    sql, params = query.sql()
    return [row[-1] for row in db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()]
