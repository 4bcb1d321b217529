"""Events with a meaning for HTTP subscribers: an instance created or deleted, a study
stable (no new instance for `stable` seconds), a stable study updated. Each is a
CloudEvents 1.0 JSON document queued, in the transaction of the change, for every
subscription that wants its type: in the routing queue (storage.routing), which
pacs.router already drains and which survives restarts. pacs.notify posts them, signed,
in order per study and subscriber.

A study's stability is the routing queue's own detector (`routing.hold_study`, as for
`stable=N` routes): one timer item per study whose due time moves with each new instance.
Once due, `fire_due` turns it into one notification per subscription: after every
instance.created of the study already queued. A study's first burst of instances ends in
study.stable, each later burst (new or replaced instances) in study.updated.
"""

import datetime
import json
import secrets
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import cast
from urllib.parse import quote
from urllib.parse import urlsplit

from storage import routing
from storage.index import Row
from storage.models import RouteItem
from storage.models import Study
from storage.models import Subscription
from storage.models import db

TYPES = ("instance.created", "instance.deleted", "study.stable", "study.updated")
TYPE_PREFIX = "org.minipacs."  # the CloudEvents `type`: org.minipacs.study.stable
STUDY_TYPES = ("study.stable", "study.updated")


class SubscriptionError(ValueError):
    """A subscription that cannot be: the message says what is wrong."""


@dataclass(frozen=True)
class Subscriber:
    """A subscription: where to POST, which event types, and the HMAC key (never shown)."""

    url: str
    types: tuple[str, ...]
    secret: str = field(repr=False)
    id: int = 0
    origin: str = "cli"  # or "config": kept as the config file says (`sync`)


@dataclass(frozen=True)
class Options:
    """`source`: the CloudEvents source of this node's events; `stable`: seconds without a
    new instance before a study is stable."""

    source: str = "/minipacs"
    stable: int = 60


def source_for(aet: str) -> str:
    return "/minipacs/" + quote(aet.strip(), safe="")


def parse_types(types: str | Iterable[str]) -> tuple[str, ...]:
    """Event types from a list or a comma/plus-separated text; all of them when empty."""
    if isinstance(types, str):
        types = types.replace("+", ",").split(",")
    chosen = tuple(dict.fromkeys(t.strip().removeprefix(TYPE_PREFIX) for t in types if t.strip()))
    unknown = [t for t in chosen if t not in TYPES]
    if unknown:
        raise SubscriptionError(f"unknown event type {unknown[0]!r} (known: {', '.join(TYPES)})")
    return chosen or TYPES


def make(url: str, types: str | Iterable[str] = (), secret: str = "", origin: str = "cli"):
    """A checked Subscriber (id 0 until added); a secret is generated when none is given."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubscriptionError(f"a subscription URL is http:// or https://, not {url!r}")
    if secret and len(secret) < 16:
        raise SubscriptionError("a subscription secret has at least 16 characters")
    return Subscriber(url, parse_types(types), secret or secrets.token_hex(32), 0, origin)


def parse_setting(value: Any) -> Subscriber:
    """A `subscription` setting: a TOML table {url, events, secret} or the text
    'URL events=a+b secret=S'."""
    if isinstance(value, dict):
        unknown = set(value) - {"url", "events", "secret"}
        if unknown:
            raise SubscriptionError(f"subscription: unknown key(s) {', '.join(sorted(unknown))}")
        options = value
    else:
        url, *pairs = str(value).split()
        options = {"url": url, **dict(p.partition("=")[::2] for p in pairs)}
    if not options.get("secret"):
        raise SubscriptionError(f"subscription {options.get('url')}: a secret is required")
    return make(str(options.get("url", "")), options.get("events", ()), options["secret"], "config")


# -- in the index writer's transaction ------------------------------------------------


def add(subscriber: Subscriber) -> int:
    return Subscription.create(
        url=subscriber.url,
        events=",".join(subscriber.types),
        secret=subscriber.secret,
        origin=subscriber.origin,
        created_at=_now(),
    ).id


def remove(ids: list[int]) -> int:
    """Remove subscriptions and what waits to be sent to them; how many were removed."""
    RouteItem.delete().where(RouteItem.subscription.in_(ids)).execute()
    return Subscription.delete().where(Subscription.id.in_(ids)).execute()


def sync(configured: tuple[Subscriber, ...]) -> None:
    """Make the config file's subscriptions those of the index (by URL: a changed secret or
    event list keeps what waits to be sent)."""
    wanted = {s.url: s for s in configured}
    for row in Subscription.select().where(Subscription.origin == "config"):
        subscriber = wanted.pop(row.url, None)
        if subscriber is None:
            remove([row.id])
        elif (row.events, row.secret) != (",".join(subscriber.types), subscriber.secret):
            row.events, row.secret = ",".join(subscriber.types), subscriber.secret
            row.save()
    for subscriber in wanted.values():
        add(subscriber)


def subscribers() -> list[Subscriber]:
    rows = cast(Iterable[dict[str, Any]], Subscription.select().order_by(Subscription.id).dicts())
    return [
        Subscriber(r["url"], tuple(r["events"].split(",")), r["secret"], r["id"], r["origin"])
        for r in rows
    ]


def indexed(wanting: list[Subscriber], action: str, row: Row, options: Options) -> None:
    """Queue what an instance just indexed means (inside its transaction; `action` as
    index.apply_row says: create, or update for a replace): instance.created for the
    subscriptions that want it, and the study's stability timer held."""
    parsed, now = row.parsed, _now()
    if action == "create":
        data = {
            "StudyInstanceUID": parsed.study_uid,
            "SeriesInstanceUID": parsed.series_uid,
            "SOPInstanceUID": parsed.sop_uid,
            "SOPClassUID": parsed.sop_class_uid,
            "callingAET": row.calling_aet,
        }
        _queue("instance.created", parsed.study_uid, data, now, wanting, options)
    if options.stable and any(t in s.types for s in wanting for t in STUDY_TYPES):
        count = Study.select(Study.num_instances).where(Study.study_uid == parsed.study_uid)
        first = action == "create" and (count.scalar() or 0) <= 1
        kind = "study.stable" if first else "study.updated"
        due = now + datetime.timedelta(seconds=options.stable)
        routing.hold_study("", parsed.study_uid, due, now, event=kind)


def deleted(gone: list[tuple[str, str, str]], who: str, options: Options) -> None:
    """instance.deleted for each (study, series, SOP Instance UID) removed, inside the
    deletion's transaction."""
    wanting = [s for s in subscribers() if "instance.deleted" in s.types]
    now = _now()
    for study_uid, series_uid, sop_uid in gone if wanting else ():
        data = {
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": sop_uid,
            "deletedBy": who,
        }
        _queue("instance.deleted", study_uid, data, now, wanting, options)


def fire_due(options: Options) -> int:
    """Turn the stability timers that are due into notifications; how many fired."""
    now = _now()
    fired = 0
    for timer in RouteItem.select().where(_timers_due(now)).order_by(RouteItem.id):
        # Deleted only as it was read: a timer a new instance pushed meanwhile stays.
        if (
            not RouteItem.delete()
            .where((RouteItem.id == timer.id) & (RouteItem.due_at == timer.due_at))
            .execute()
        ):
            continue
        fired += 1
        study = Study.get_or_none(Study.study_uid == timer.study_uid)
        if study is None:  # deleted meanwhile: nothing stable to announce
            continue
        data = {
            "StudyInstanceUID": study.study_uid,
            "NumberOfStudyRelatedSeries": study.num_series,
            "NumberOfStudyRelatedInstances": study.num_instances,
            "ModalitiesInStudy": [m for m in study.modalities.split("\\") if m],
        }
        _queue(timer.event, study.study_uid, data, timer.due_at, subscribers(), options)
    return fired


def any_timer_due() -> bool:
    return RouteItem.select().where(_timers_due(_now())).exists()


def _timers_due(now: datetime.datetime):
    return (
        RouteItem.subscription.is_null()
        & (RouteItem.event != "")
        & (RouteItem.status == "pending")
        & (RouteItem.due_at <= now)
    )


def _queue(
    kind: str,
    study_uid: str,
    data: dict,
    at: datetime.datetime,
    wanting: list[Subscriber],
    options: Options,
) -> None:
    """One notification per subscription that wants `kind`; one event, one id for all."""
    chosen = [s for s in wanting if kind in s.types]
    if not chosen:
        return
    body = json.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": options.source,
            "type": TYPE_PREFIX + kind,
            "time": at.isoformat(timespec="microseconds") + "Z",
            "subject": study_uid,
            "datacontenttype": "application/json",
            "data": data,
        },
        separators=(",", ":"),
    )
    now = _now()
    RouteItem.insert_many(
        [
            {
                "destination": s.url,
                "study_uid": study_uid,
                "sop_uid": data.get("SOPInstanceUID"),
                "event": kind,
                "subscription": s.id,
                "body": body,
                "due_at": now,
                "created_at": now,
            }
            for s in chosen
        ]
    ).execute()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


class Events:
    """One archive's subscriptions and stability timers: reads on this thread's
    connection, writes through the archive's index writer (`write`)."""

    def __init__(self, write: Callable, options: Options) -> None:
        self._write = write
        self.options = options

    def add(self, subscriber: Subscriber) -> int:
        return self._write(add, subscriber)

    def remove(self, ids: list[int]) -> int:
        return self._write(remove, ids)

    def sync(self, configured: tuple[Subscriber, ...]) -> None:
        self._write(sync, configured)

    def subscribers(self) -> list[Subscriber]:
        with db.connection_context():
            return subscribers()

    def fire_due(self) -> int:
        with db.connection_context():
            if not any_timer_due():
                return 0
        return self._write(fire_due, self.options)
