"""The index database: embedded SQLite in the data folder, or a shared PostgreSQL.

Only this module knows which engine is in use; SQL elsewhere is portable, or asks
`is_sqlite()` where the engines truly differ (locks, plans).
"""

import contextlib
import os
from pathlib import Path
from urllib.parse import parse_qsl
from urllib.parse import unquote
from urllib.parse import urlsplit

from peewee import Database
from peewee import DatabaseProxy
from peewee import SqliteDatabase
from playhouse.pool import PooledPostgresqlDatabase
from playhouse.pool import PooledSqliteDatabase

POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_postgres_url(url: str) -> bool:
    """Whether `url` names a PostgreSQL index (anything else non-empty is refused)."""
    return urlsplit(url).scheme in POSTGRES_SCHEMES


def open_database(url: str, root: Path, fsync: bool) -> Database:
    """`url` empty: SQLite at `<root>/index.sqlite`; else postgresql://user:pw@host:port/db
    (query parameters go to libpq as they are, e.g. ?host=/run/postgresql&sslmode=require)."""
    if not url:
        private_sqlite(root / "index.sqlite")
        # Pooled: every request and association thread opened its own connection and set
        # its pragmas, ~0.5 ms a C-FIND; a pooled one is taken and given back.
        return PooledSqliteDatabase(
            root / "index.sqlite",
            max_connections=64,
            stale_timeout=300,
            check_same_thread=False,
            timeout=30,  # for a free pooled connection
            pragmas={
                "busy_timeout": 60000,  # ms another process may hold the write lock
                "journal_mode": "wal",
                # FULL: a commit is on disk when it returns (Success follows it).
                "synchronous": "full" if fsync else "normal",
                "foreign_keys": 1,
                "cache_size": -4000,  # KiB a connection: up to ~10 of them in the web process
                # Bytes of SQLite memory in the whole process (all connections): past it
                # a page cache recycles its own pages instead of growing, and a sort
                # spills to a temporary file. Without it 8 request threads reading a
                # 94 MB index took 24 MiB (page caches and sorts of DICOM JSON).
                "soft_heap_limit": 8 << 20,
            },
        )
    parts = urlsplit(url)
    if not is_postgres_url(url):  # the scheme alone: the URL may hold a password
        raise ValueError(f"index must be empty (SQLite) or postgresql://…, not {parts.scheme}://")
    params: dict = dict(parse_qsl(parts.query))
    if parts.hostname:
        params["host"] = parts.hostname
    if parts.port:
        params["port"] = parts.port
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password:
        params["password"] = unquote(parts.password)
    return PooledPostgresqlDatabase(
        unquote(parts.path.lstrip("/")),
        max_connections=64,
        stale_timeout=300,
        timeout=30,  # wait this long for a free pooled connection
        **params,
    )


def private_sqlite(path: Path) -> None:
    """Make the index file 0600 before SQLite opens it, whatever the umask: it holds every
    patient's data, password and token hashes and the audit trail. SQLite gives its -wal
    and -shm files the database file's mode; those left by an older version are fixed too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


def describe(url: str) -> str:
    """The index for log lines: never the password."""
    if not url:
        return "SQLite"
    parts = urlsplit(url)
    host = parts.hostname or dict(parse_qsl(parts.query)).get("host", "local socket")
    return f"PostgreSQL {parts.path.lstrip('/')} on {host}"


def is_sqlite(database: Database | DatabaseProxy) -> bool:
    return isinstance(getattr(database, "obj", database), SqliteDatabase)
