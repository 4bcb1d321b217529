"""Web users, roles and API tokens. Passwords are kept as werkzeug's salted scrypt hashes,
tokens as their SHA-256 (they are 256 random bits: no salt needed); neither is ever
stored or logged in the clear."""

import functools
import hashlib
import hmac
import operator
import secrets
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import cast

from werkzeug.security import check_password_hash
from werkzeug.security import generate_password_hash

from storage.errors import Refused
from storage.models import ApiToken
from storage.models import User
from storage.models import db

# Each may do what the ones before it may, except export (cohort export: /api/exports),
# which researcher and admin may and uploader may not (viewer.auth.EXPORT_ROLES).
ROLES = ("viewer", "researcher", "uploader", "admin")
MIN_PASSWORD = 10


@functools.cache
def _dummy_hash() -> str:
    """Compared against when the user does not exist, so that both cases cost the same
    time. Made on first use: scrypt takes 32 MiB for a moment, which at import time was
    the web process's peak memory even when nobody logs in."""
    return generate_password_hash("not a password of anyone")


class UserError(Refused, ValueError):
    """A user operation that cannot be done; the message says why. A Refused: the index
    writer leaves it to the caller, not logged as an index write that failed."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add(name: str, role: str, password: str) -> None:
    _check(role, password)
    if User.select().where(User.name == name).exists():
        raise UserError(f"user {name!r} exists")
    User.create(
        name=name, role=role, password_hash=generate_password_hash(password), created_at=_now()
    )


def set_password(name: str, password: str) -> None:
    _check(ROLES[0], password)
    if (
        not User.update(password_hash=generate_password_hash(password))
        .where(User.name == name)
        .execute()
    ):
        raise UserError(f"no user {name!r}")


def remove(name: str) -> None:
    user = User.get_or_none(User.name == name)
    if user is None:
        raise UserError(f"no user {name!r}")
    ApiToken.delete().where(ApiToken.user == user).execute()
    user.delete_instance()


def issue_token(name: str, days: int) -> tuple[str, int, str]:
    """A new bearer token for `name`: (token, shown once; its id; expiry, '' = never when
    `days` is 0)."""
    user = User.get_or_none(User.name == name)
    if user is None:
        raise UserError(f"no user {name!r}")
    token = secrets.token_urlsafe(32)
    expires = ""
    if days > 0:
        expires = (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")
    row = ApiToken.create(
        user=user, token_hash=_digest(token), expires_at=expires, created_at=_now()
    )
    return token, row.id, expires


def tokens(name: str) -> list[tuple[int, str, str]]:
    """(id, created, expires) of each token of `name`."""
    rows = (
        ApiToken.select(ApiToken.id, ApiToken.created_at, ApiToken.expires_at)
        .join(User)
        .where(User.name == name)
        .order_by(ApiToken.id)
        .tuples()
    )
    return cast(list[tuple[int, str, str]], list(rows))  # peewee types rows as models


def revoke_token(name: str, which: str) -> int:
    """Remove one token of `name`, given by its id (from `tokens`) or by the token itself;
    return its id. The user's other tokens stay."""
    wanted = [ApiToken.token_hash == _digest(which)]
    if which.isdigit():
        wanted.append(ApiToken.id == int(which))
    found = (
        ApiToken.select(ApiToken.id)
        .join(User)
        .where((User.name == name) & functools.reduce(operator.or_, wanted))
        .scalar()
    )
    if found is None:
        raise UserError(f"{name!r} has no such token")
    ApiToken.delete().where(ApiToken.id == found).execute()
    return found


def listing() -> list[tuple[str, str, int]]:
    """(name, role, tokens) of every user."""
    return [
        (u.name, u.role, ApiToken.select().where(ApiToken.user == u).count())
        for u in User.select().order_by(User.name)
    ]


# The checks every HTTP request makes (viewer.auth) are plain SQL: peewee took ~0.1 ms
# to build each, several times what the index took to answer.
def count() -> int:
    return int(db.execute_sql("SELECT COUNT(*) FROM webuser").fetchone()[0])


def by_password(name: str, password: str) -> tuple[str, str, str] | None:
    """(name, role, session stamp) when the password is right."""
    user = User.get_or_none(User.name == name)
    if not check_password_hash(user.password_hash if user else _dummy_hash(), password):
        return None
    return (user.name, user.role, _stamp(user.password_hash)) if user else None


def by_session(name: str, stamp: str) -> tuple[str, str] | None:
    """(name, role) of a login session's user, while the user exists with the password the
    session was opened with: removing a user, or setting a new password, ends sessions."""
    found = db.execute_sql(
        f"SELECT name, role, password_hash FROM webuser WHERE name = {db.param}", (name,)
    ).fetchone()
    if found is None or not hmac.compare_digest(_stamp(found[2]), stamp):
        return None
    return found[0], found[1]


def by_token(token: str) -> tuple[str, str] | None:
    """(name, role) of a valid, unexpired token's user."""
    row = db.execute_sql(
        "SELECT t.expires_at, u.name, u.role FROM apitoken t JOIN webuser u ON t.user_id = u.id"
        f" WHERE t.token_hash = {db.param}",
        (_digest(token),),
    ).fetchone()
    if row is None or (row[0] and row[0] <= _now()):
        return None
    return row[1], row[2]


def _stamp(password_hash: str) -> str:
    """What a session keeps of its user's password hash: enough to notice a change."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:32]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check(role: str, password: str) -> None:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"passwords need at least {MIN_PASSWORD} characters")
