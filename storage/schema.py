"""Schema versions and the migrations between them, run at start-up on either engine.

An index made before versioning (no `schemaversion` table but an `instance` table) is
version 1. Each step moves one version up inside the same transaction as the version
bump, under a lock, so several processes starting at once migrate exactly once.
"""

import logging
from collections.abc import Callable

from peewee import Database

from storage.engine import is_sqlite
from storage.models import MODELS
from storage.models import AnyDatabase
from storage.models import ApiToken
from storage.models import AuditEvent
from storage.models import Change
from storage.models import Instance
from storage.models import PerformedStep
from storage.models import QueryTag
from storage.models import QueryValue
from storage.models import RouteItem
from storage.models import SchemaVersion
from storage.models import Study
from storage.models import Subscription
from storage.models import User
from storage.models import WorklistItem

log = logging.getLogger(__name__)


# Plain DDL both engines run as written (no table rebuilds: SQLite would have to copy
# tables that others reference); names match what peewee gives the models' own.
def _v2(database: AnyDatabase) -> None:
    """Retention: a per-study `protected` flag, and studies ordered by last activity."""
    database.execute_sql("ALTER TABLE study ADD COLUMN protected BOOLEAN NOT NULL DEFAULT FALSE")
    database.execute_sql("CREATE INDEX study_updated_at ON study (updated_at)")


def _v3(database: AnyDatabase) -> None:
    """The audit trail (storage.audit)."""
    database.create_tables([AuditEvent])


def _v4(database: AnyDatabase) -> None:
    """Web users and their API tokens (storage.users)."""
    database.create_tables([User, ApiToken])


def _v5(database: AnyDatabase) -> None:
    """The auto-routing queue (storage.routing)."""
    database.create_tables([RouteItem])


def _v6(database: AnyDatabase) -> None:
    """Modality Worklist items and performed procedure steps (storage.worklist)."""
    database.create_tables([WorklistItem, PerformedStep])


def _v7(database: AnyDatabase) -> None:
    """The change feed (storage.changefeed); it starts empty, at sequence 1."""
    database.create_tables([Change])


def _v8(database: AnyDatabase) -> None:
    """Event subscriptions (storage.events); their notifications and study timers are
    items of the routing queue. (From version 4 or older, `_v5` made the queue with
    today's columns already.)"""
    have = {column.name for column in database.get_columns("routeitem")}
    for column in ("event TEXT NOT NULL DEFAULT ''", "subscription INTEGER",
                   "body TEXT NOT NULL DEFAULT ''"):  # fmt: skip
        if column.split()[0] not in have:
            database.execute_sql(f"ALTER TABLE routeitem ADD COLUMN {column}")
    database.execute_sql(
        "CREATE INDEX IF NOT EXISTS routeitem_subscription_study_uid "
        "ON routeitem (subscription, study_uid)"
    )
    database.create_tables([Subscription])


def _v9(database: AnyDatabase) -> None:
    """Extended query tags (storage.querytags): their definitions and indexed values."""
    database.create_tables([QueryTag, QueryValue])


# MIGRATIONS[n] takes version n+1 to n+2
MIGRATIONS: list[Callable[[AnyDatabase], None]] = [_v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9]
SCHEMA_VERSION = len(MIGRATIONS) + 1


def upgrade(database: AnyDatabase) -> tuple[int, int]:
    """Create or migrate the index to SCHEMA_VERSION; return (version found, version now).
    Raise RuntimeError for an index newer than this code."""
    with _locked(database):
        found = _version(database)
        if found == 0:
            database.create_tables(MODELS)
            SchemaVersion.create(version=SCHEMA_VERSION)
            return 0, SCHEMA_VERSION
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"the index is at schema version {found}; this minipacs knows up to "
                f"{SCHEMA_VERSION}: upgrade minipacs"
            )
        for version in range(found, SCHEMA_VERSION):
            log.info("migrating the index from schema version %d to %d", version, version + 1)
            MIGRATIONS[version - 1](database)
        if found == 1:
            database.create_tables([SchemaVersion])
            SchemaVersion.create(version=SCHEMA_VERSION)
        elif found < SCHEMA_VERSION:
            SchemaVersion.update(version=SCHEMA_VERSION).execute()
        return found, SCHEMA_VERSION


def _version(database: AnyDatabase) -> int:
    if database.table_exists(SchemaVersion._meta.table_name):
        return SchemaVersion.select(SchemaVersion.version).scalar() or 0
    return 1 if database.table_exists(Study._meta.table_name) else 0


class _locked:
    """One transaction holding the engine's schema lock (SQLite's write lock, a PostgreSQL
    advisory lock), so concurrent start-ups wait for the first one's migration."""

    def __init__(self, database: AnyDatabase) -> None:
        self._db = database
        self._tx = database.atomic("IMMEDIATE") if is_sqlite(database) else database.atomic()

    def __enter__(self) -> None:
        self._tx.__enter__()
        if not is_sqlite(self._db):
            self._db.execute_sql("SELECT pg_advisory_xact_lock(7420110)")

    def __exit__(self, *exc) -> None:
        self._tx.__exit__(*exc)


# Every table but the version (the target has its own); MODELS lists parents first.
COPY_ORDER = tuple(model for model in MODELS if model is not SchemaVersion)
COPY_CHUNK = 2000


def copy_index(source: Database, target: Database, progress: Callable[[int], None]) -> dict:
    """Copy every row of `source` (at SCHEMA_VERSION) into the empty index `target`, keeping
    ids; `progress(n)` after each chunk of n rows. Returns rows copied per table."""
    with target.connection_context(), target.bind_ctx(MODELS):
        upgrade(target)
        if Instance.select().exists():
            raise RuntimeError("the target index is not empty")
    copied = {}
    for model in COPY_ORDER:
        table, fields = model._meta.table_name, list(model._meta.sorted_fields)
        columns = ", ".join(f.column_name for f in fields)
        marks = ", ".join([target.param] * len(fields))
        insert = f"INSERT INTO {table} ({columns}) VALUES ({marks})"
        last, copied[table] = 0, 0
        while True:
            with source.connection_context():
                rows = source.execute_sql(
                    f"SELECT {columns} FROM {table} WHERE id > {source.param} "
                    f"ORDER BY id LIMIT {COPY_CHUNK}",
                    (last,),
                ).fetchall()
            if not rows:
                break
            # Through each field's own conversions: SQLite's 0/1 and text timestamps become
            # PostgreSQL's booleans and timestamps.
            values = [
                tuple(f.db_value(f.python_value(v)) for f, v in zip(fields, row, strict=True))
                for row in rows
            ]
            with target.connection_context(), target.atomic():
                target.cursor().executemany(insert, values)
            last, copied[table] = rows[-1][0], copied[table] + len(rows)
            progress(len(rows))
        if not is_sqlite(target):  # new rows must not reuse the copied ids
            with target.connection_context():
                target.execute_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT COALESCE(MAX(id), 1) FROM {table}))"
                )
    return copied
