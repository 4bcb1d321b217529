"""DA, TM and DT matching values: which are valid, and where a range splits.

A query's date is YYYYMMDD, a time HHMMSS.FFFFFF (leading parts only), a datetime
YYYYMMDDHHMMSS.FFFFFF&ZZXX (leading parts only, an optional UTC offset) (PS3.5 6.2);
each alone or as a range "A-B", "-B", "A-" (PS3.4 C.2.2.2.5). A value of another form
("2003", "2003-2004" as a date, "notadate") is not a query: storage.query refuses it
(C-FIND 0xA900, QIDO-RS 400, PS3.18 8.3) rather than match it as text and find nothing.
Times may keep the colons of ACR-NEMA ("13:00"), as they were matched before.
"""

import calendar
import re
from typing import NamedTuple

DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?")
DT = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?"
)
FORMS = {
    "DA": "YYYYMMDD",
    "TM": "HHMMSS.FFFFFF (HH, HHMM, … allowed)",
    "DT": "YYYYMMDDHHMMSS.FFFFFF&ZZXX (YYYY, YYYYMM, … allowed)",
}


class Range(NamedTuple):
    """A matching value: its bounds ('' for an open end), equal for a single value."""

    low: str
    high: str
    single: bool


def split(vr: str, value: str) -> Range | None:
    """A valid matching value of `vr` (DA, TM or DT) as its Range, stripped; None when
    the value is not valid."""
    value = value.strip()
    if _valid(vr, value):
        return Range(value, value, True)
    # A DT's offset has a '-' of its own ("20030101-0500"): try each '-' as the range's
    # (at most three: an offset on each end and the range's; more is no DT, and trying
    # each of a hostile value's thousands would cost time squared in its length).
    dashes = value.count("-")
    if dashes != 1 and (vr != "DT" or dashes > 3):
        return None
    cuts = [n for n, c in enumerate(value) if c == "-"] if vr == "DT" else [value.find("-")]
    for cut in cuts:
        low, high = value[:cut].strip(), value[cut + 1 :].strip()
        if (low or high) and all(not part or _valid(vr, part) for part in (low, high)):
            return Range(low, high, False)
    return None


def problem(vr: str, value: str) -> str | None:
    """Why `value` is not a DA, TM or DT matching value, or None when it is one."""
    if split(vr, value) is not None:
        return None
    return f"not a {vr} ({FORMS[vr]}) nor a range A-B, -B or A-"  # no value: it is logged


def dt_upper(value: str) -> str:
    """The end of a DT range as text that sorts after every datetime it covers: "2004"
    is up to 20041231235959.999999 (its offset left out, as text comparison must)."""
    found = DT.fullmatch(value)
    if not found:
        return value
    digits = "".join(part or "" for part in found.groups()[:6])
    top = "99991231235959"  # days above a month's last sort the same as its last
    fraction = (found[7] or ".")[1:]
    return f"{digits}{top[len(digits) :]}.{fraction + '9' * (6 - len(fraction))}"


def dt_lower(value: str) -> str:
    """The start of a DT range as text, its offset left out."""
    found = DT.fullmatch(value)
    if not found:
        return value
    return "".join(part or "" for part in found.groups()[:7])


def _valid(vr: str, value: str) -> bool:
    if vr == "DA":
        found = DA.fullmatch(value)
        return found is not None and _date(found[1], found[2], found[3])
    if vr == "TM":
        found = TM.fullmatch(value)
        return found is not None and _time(found[1], found[2], found[3])
    found = DT.fullmatch(value)
    if not found:
        return False
    year, month, day, hour, minute, second, _, sign, zz, xx = found.groups()
    if month and not _date(year, month, day or "01"):
        return False
    if hour and not _time(hour, minute, second):
        return False
    offset = int(zz or 0) * 60 + int(xx or 0)
    return not sign or (int(xx) < 60 and -12 * 60 <= int(f"{sign}{offset}") <= 14 * 60)


def _date(year: str, month: str, day: str) -> bool:
    y, m, d = int(year), int(month), int(day)
    return 1 <= m <= 12 and 1 <= d <= calendar.monthrange(max(y, 1), m)[1]


def _time(hour: str, minute: str | None, second: str | None) -> bool:
    return int(hour) < 24 and int(minute or 0) < 60 and int(second or 0) <= 60
