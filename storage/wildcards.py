"""DICOM wildcard matching (PS3.4 C.2.2.2.4), the one matcher.

`*` matches any run of characters (none included), `?` exactly one; every other character
is literal: `[`, `]`, `%`, `_` and `\\` too, unlike fnmatch (a character class), GLOB and
LIKE. One pattern, two renderings that must agree: SQL for indexed columns (`condition`)
and Python for stored DICOM JSON and routing rules (`matches`); tests/test_wildcards.py
holds both to the same cases on SQLite and PostgreSQL. Which VRs take wildcards is the
caller's rule (query.WILDCARD_VRS).
"""

import functools
import re

from peewee import Expression
from peewee import Field
from peewee import SqliteDatabase

from storage.models import db


def has_wildcards(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def matches(pattern: str, value: str) -> bool:
    """Does all of `value` match `pattern`?"""
    return _regex(pattern).fullmatch(value) is not None


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def condition(field: Field, pattern: str) -> Expression:
    """`field` matches `pattern`: SQLite GLOB (case-sensitive, an index serves a literal
    prefix; `[` and `]` bracketed) or LIKE elsewhere (`%`, `_` and `\\` escaped with the
    default escape character)."""
    if isinstance(db.obj, SqliteDatabase):
        glob = "".join(f"[{c}]" if c in "[]" else c for c in pattern)
        return Expression(field, "GLOB", glob)
    like = "".join(
        "%" if c == "*" else "_" if c == "?" else ("\\" + c if c in "%_\\" else c) for c in pattern
    )
    return Expression(field, "LIKE", like)
