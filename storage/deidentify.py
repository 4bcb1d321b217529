"""De-identification: PS3.15 Annex E, the Basic Application Level Confidentiality Profile
and its options, driven by Table E.1-1 (`storage.deid_table`).

One module for every way out (docs/architecture.md): `minipacs anonymize`, WADO-URI `anonymize=yes`
and the DICOMweb retrieve option. Replacement values come from a project key (HMAC-SHA256):
the same key maps the same UID, patient or date the same way every time, so exports made
months apart still link up, and nobody without the key can map them back.

Choices the table leaves to the implementation (docs/decisions.md, 2026-11-26):
- Compound actions keep the attribute whenever the IOD might require it: X/Z → Z,
  X/D, Z/D, X/Z/D → D, X/Z/U* → U (a sequence of references is kept, its UIDs replaced).
- Patient Name and Patient ID (Z) get the patient's pseudonym, not an empty value.
- C on dates (Modified Dates option) shifts them back by a per-patient number of days;
  C on text (Clean Descriptors) removes the patient's identifiers found in it; C on
  structured content cleans it the same way, item by item; C on graphics keeps them.
  Inside a sequence under D or C (SR content), codes are cleaned, not dummied (CODE_TAGS).
- Private attributes are removed (Retain Safe Private needs Table E.3.10-1: not offered).
- Pixel data is not cleaned: an instance that says BurnedInAnnotation YES is refused.
- Attributes the table does not list, at any depth (docs/decisions.md, 2026-12-04), are
  treated by their VR (`UNLISTED`): person names emptied; dates and times replaced like
  the table's (kept or shifted by the date options); free text (LT, ST, UT) replaced by
  a dummy (a waveform annotation's text is Type 1C: emptied, the instance was invalid), or
  cleaned with Clean Descriptors; short strings (LO, SH, UC: code meanings, device and
  protocol names) cleaned of the patient's identifiers; AE titles and URIs emptied.
  Codes (CS), numbers and binary data are kept.
- The file meta is rewritten as ours: it names the file's writer, and the sender's AE
  title or implementation version says where the data came from.
"""

import datetime
import hashlib
import hmac
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from storage.deid_table import TABLE
from storage.journal import IMPLEMENTATION_UID
from storage.journal import IMPLEMENTATION_VERSION

# Option name → (CID 7050 code, meaning); the Basic Profile itself is 113100.
OPTIONS = {
    "uids": ("113110", "Retain UIDs Option"),
    "devid": ("113109", "Retain Device Identity Option"),
    "instid": ("113112", "Retain Institution Identity Option"),
    "patchars": ("113108", "Retain Patient Characteristics Option"),
    "fulldates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "modifdates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "desc": ("113105", "Clean Descriptors Option"),
    "struct": ("113104", "Clean Structured Content Option"),
    "graph": ("113103", "Clean Graphics Option"),
}
BASIC = ("113100", "Basic Application Confidentiality Profile")
COMPOUND = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
DUMMY = {  # D: a value consistent with the VR that says nothing
    "AE": "ANONYMOUS",
    "AS": "000D",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
}
NUMERIC_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"}
TEXT_VRS = {"LO", "SH", "LT", "ST", "UT", "UC", "PN", "CS"}
# Inside a sequence the table says D or C for (SR content…): what may carry who and when.
# Codes (CS, CODE_TAGS), numbers and UIDs keep the structure and the measurements.
FREE_VRS = {"LO", "SH", "LT", "ST", "UT", "UC", "PN", "DA", "DT", "TM"}
# A code's parts (the Basic Code Sequence Macro): SH, LO, UC and UR, yet codes. Inside
# such a sequence they are cleaned (C), as outside it: a dummy would make every concept
# name and unit of an SR "ANONYMIZED", a tree no reader or template can make sense of.
CODE_TAGS = {
    0x00080100,  # Code Value
    0x00080102,  # Coding Scheme Designator
    0x00080103,  # Coding Scheme Version
    0x00080104,  # Code Meaning
    0x00080119,  # Long Code Value
    0x00080120,  # URN Code Value
}
PATIENT_NAME, PATIENT_ID = 0x00100010, 0x00100020
MAX_SHIFT_DAYS = 3650
# The file meta elements a de-identified file keeps (the others name the sender).
META_KEPT = {
    "FileMetaInformationGroupLength",
    "FileMetaInformationVersion",
    "MediaStorageSOPClassUID",
    "MediaStorageSOPInstanceUID",
    "TransferSyntaxUID",
}


class NotDeidentifiable(Exception):
    """The instance cannot be de-identified by this profile (burned-in annotation)."""


@dataclass(frozen=True)
class Rule:
    basic: str
    options: dict[str, str]

    def action(self, chosen: frozenset[str]) -> str:
        """The action under the chosen options: an option's column replaces the basic one."""
        action = self.basic
        for name in OPTIONS:
            if name in chosen and name in self.options:
                action = self.options[name]
        return COMPOUND.get(action, action)


def _parse(table: str) -> tuple[dict[int, Rule], list[tuple[re.Pattern, Rule]]]:
    exact: dict[int, Rule] = {}
    patterns: list[tuple[re.Pattern, Rule]] = []
    for line in table.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        tag, basic, *opts = fields
        if not re.fullmatch(r"[0-9a-fx]{8}", tag):
            continue  # "private attributes": removed by a rule of their own
        rule = Rule(basic, dict(opt.split("=", 1) for opt in opts))
        if "x" in tag:
            patterns.append((re.compile(tag.replace("x", "[0-9a-f]")), rule))
        else:
            exact[int(tag, 16)] = rule
    return exact, patterns


RULES, PATTERNS = _parse(TABLE)
_DATES = {"fulldates": "K", "modifdates": "C"}
UNLISTED = {  # VR → the rule of an attribute Table E.1-1 does not list
    "PN": Rule("Z", {}),
    "DA": Rule("D", _DATES),
    "DT": Rule("D", _DATES),
    "TM": Rule("D", _DATES),
    "LT": Rule("D", {"desc": "C"}),
    "ST": Rule("D", {"desc": "C"}),
    "UT": Rule("D", {"desc": "C"}),
    "LO": Rule("C", {}),
    "SH": Rule("C", {}),
    "UC": Rule("C", {}),
    "AE": Rule("Z", {"devid": "K"}),
    "UR": Rule("Z", {}),
}


def rule_for(tag: int) -> Rule | None:
    rule = RULES.get(tag)
    if rule is None and PATTERNS:
        text = f"{tag:08x}"
        rule = next((r for pattern, r in PATTERNS if pattern.fullmatch(text)), None)
    return rule


def parse_options(text: str | Iterable[str]) -> frozenset[str]:
    """Options by name ("uids,modifdates"); unknown names and both date options are refused."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    chosen = frozenset(n for n in names if n)
    unknown = chosen - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; known: {', '.join(OPTIONS)}")
    if {"fulldates", "modifdates"} <= chosen:
        raise ValueError("fulldates and modifdates exclude each other")
    return chosen


@dataclass(frozen=True)
class Profile:
    """The Basic Profile with `options` (names of OPTIONS), replacements keyed by `key`."""

    key: bytes
    options: frozenset[str] = field(default_factory=frozenset)

    def digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.key, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """A UID under 2.25 (PS3.5 B.2) from the keyed hash of the original."""
        return f"2.25.{uuid.UUID(bytes=self.digest('uid', uid)[:16], version=4).int}"

    def pseudonym(self, patient_id: str, issuer: str) -> str:
        return "ANON" + self.digest("patient", f"{issuer}\0{patient_id}").hex()[:12].upper()

    def shift_days(self, patient_id: str, issuer: str) -> int:
        value = int.from_bytes(self.digest("shift", f"{issuer}\0{patient_id}")[:4], "big")
        return 1 + value % MAX_SHIFT_DAYS


def deidentify(ds: Dataset, profile: Profile) -> Dataset:
    """De-identify `ds` in place (file meta included) and return it."""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise NotDeidentifiable("burned-in annotation: pixel data would need cleaning")
    patient_id, issuer = str(ds.get("PatientID", "")), str(ds.get("IssuerOfPatientID", ""))
    if not patient_id:  # Type 2, empty: one pseudonym for every such patient would merge them
        patient_id = "\0".join(
            str(ds.get(k, "")) for k in ("PatientName", "PatientBirthDate", "StudyInstanceUID")
        )
    work = _Work(
        profile,
        pseudonym=profile.pseudonym(patient_id, issuer),
        shift=datetime.timedelta(days=profile.shift_days(patient_id, issuer)),
        identifiers=_identifiers(ds),
    )
    work.clean(ds)
    _declare(ds, profile)
    _own_meta(ds)
    return ds


def _own_meta(ds: Dataset) -> None:
    """The file meta of the file we write: ours, with the new instance UID; the sender's AE
    titles, address, implementation and private information go."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for elem in list(meta):
        if elem.keyword not in META_KEPT:
            del meta[elem.tag]
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


@dataclass
class _Work:
    profile: Profile
    pseudonym: str
    shift: datetime.timedelta
    identifiers: re.Pattern | None

    def clean(self, ds: Dataset, inside: str = "") -> None:
        """Every element by the table; `inside` is the action of an enclosing sequence
        (D or C: its free content is replaced or cleaned too, not only its table tags)."""
        for elem in list(ds):
            if elem.tag.is_private:
                del ds[elem.tag]
                continue
            rule = rule_for(elem.tag)
            if rule is not None:
                self._apply(ds, elem, rule.action(self.profile.options), inside)
            elif elem.VR == "SQ":
                self._items(elem, inside)  # not in the table: kept, its items cleaned
            elif elem.VR == "UI":
                if _instance_uid(elem) and "uids" not in self.profile.options:
                    elem.value = _map_values(elem.value, self.profile.uid)  # links to originals
            elif inside and elem.tag in CODE_TAGS:
                self._apply(ds, elem, "C")
            elif inside and elem.VR in FREE_VRS:
                self._apply(ds, elem, inside)
            elif elem.VR in UNLISTED:
                self._apply(ds, elem, UNLISTED[elem.VR].action(self.profile.options))

    def _items(self, elem: DataElement, inside: str) -> None:
        for item in elem.value:
            self.clean(item, inside)

    def _apply(self, ds: Dataset, elem: DataElement, action: str, inside: str = "") -> None:
        if action == "X":
            del ds[elem.tag]
        elif elem.tag in (PATIENT_NAME, PATIENT_ID) and action in ("Z", "D"):
            elem.value = self.pseudonym
        elif elem.VR == "SQ":
            if action == "Z":
                elem.value = Sequence()
            else:  # kept; with D or C its items' free text and dates go too
                self._items(elem, action if action in ("D", "C") else inside)
        elif action == "Z":
            elem.value = None
        elif action == "D":
            elem.value = _dummy(elem.VR, elem.value)
        elif action == "U" and elem.VR == "UI":
            elem.value = _map_values(elem.value, self.profile.uid)
        elif action == "C":
            elem.value = self._cleaned(elem)
        # K (and U on a non-UID, which the table does not hold): kept as it is

    def _cleaned(self, elem: DataElement):
        if elem.VR in ("DA", "DT"):
            if "modifdates" in self.profile.options:
                return _map_values(elem.value, self._shift_date)
            if "fulldates" in self.profile.options:
                return elem.value
            return None  # no option keeps dates: cleaning one is removing it
        if elem.VR in TEXT_VRS and self.identifiers is not None:
            return _map_values(elem.value, lambda v: self.identifiers.sub("*", str(v)))
        return elem.value  # times, numbers, graphics: nothing of the patient's in them

    def _shift_date(self, value: str) -> str:
        try:
            day = datetime.datetime.strptime(value[:8], "%Y%m%d").date()
        except ValueError:
            return "" if value else value  # unparseable: cannot be shifted, so removed
        return (day - self.shift).strftime("%Y%m%d") + value[8:]


def _instance_uid(elem: DataElement) -> bool:
    """A UID naming an instance, series, study, frame of reference… (not a class, syntax
    or coding scheme, and not one of the standard's own): it must not keep its value."""
    keyword = elem.keyword or ""
    if keyword.endswith(("ClassUID", "SyntaxUID", "SchemeUID", "CreatorUID")):
        return False
    values = elem.value if isinstance(elem.value, (MultiValue, list)) else [elem.value]
    return any(v and not str(v).startswith("1.2.840.10008.") for v in values)


def _map_values(value, fn):
    if value is None or value == "":
        return value
    if isinstance(value, (MultiValue, list, tuple)):
        return [fn(str(v)) for v in value]
    return fn(str(value))


def _dummy(vr: str, value):
    if vr in NUMERIC_VRS:
        return 0
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return b""
    if vr == "UI":  # the table gives UIDs U, never D
        return value
    return DUMMY.get(vr, "ANONYMIZED")


def _identifiers(ds: Dataset) -> re.Pattern | None:
    """The patient's names, IDs and birth date as they may appear in free text."""
    words: set[str] = set()
    for keyword in ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber",
                    "PatientBirthName", "PatientMotherBirthName", "OtherPatientNames"):  # fmt: skip
        for value in _as_list(ds.get(keyword)):
            words.update(p for p in re.split(r"[\^=\s,]+", str(value)) if len(p) >= 2)
    birth = str(ds.get("PatientBirthDate", ""))
    if len(birth) == 8:
        words.update({birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"})
        words.add(f"{birth[6:]}.{birth[4:6]}.{birth[:4]}")
        words.add(f"{birth[4:6]}/{birth[6:]}/{birth[:4]}")
    if not words:
        return None
    ordered = sorted(words, key=len, reverse=True)  # longest first: no half-removed word
    return re.compile("|".join(re.escape(w) for w in ordered), re.IGNORECASE)


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (MultiValue, list, tuple, Sequence)) else [value]


def _declare(ds: Dataset, profile: Profile) -> None:
    """What PS3.15 E.1.1 asks a de-identified instance to say about itself."""
    chosen = [name for name in OPTIONS if name in profile.options]
    ds.PatientIdentityRemoved = "YES"
    method = ", ".join([BASIC[1], *(OPTIONS[n][1] for n in chosen)])
    ds.DeidentificationMethod = f"minipacs: {method}"[:64]
    codes = []
    for value, meaning in [BASIC, *(OPTIONS[n] for n in chosen)]:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
        codes.append(code)
    ds.DeidentificationMethodCodeSequence = codes
    if "fulldates" in profile.options:
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
    elif "modifdates" in profile.options:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"
