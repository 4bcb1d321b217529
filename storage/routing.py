"""Auto-routing: rules that pick newly stored instances, and the durable queue of what is
still to be forwarded (the sending is pacs.router's).

A rule is one line: where to, then conditions, all of which must hold:
    "AI_NODE modality=CT+MR calling_aet=CT01 sop_class=1.2.840.10008.5.1.4.1.1.2
     match=SeriesDescription:*HEAD* stable=60"
`to` is a peer's AE title (C-STORE) or an http(s):// DICOMweb base URL (STOW-RS).
`match=Keyword:pattern` compares a top-level attribute with `*`/`?` wildcards. Without
`stable`, each instance is queued as it arrives; with `stable=N`, the whole study is
queued once no instance has arrived for it for N seconds.

The queue is a table of the index, written in the same transaction as the instance's
row: what was acknowledged to the modality is never lost for the route either. Event
notifications for HTTP subscribers (storage.events) share it and its sender's loop.
"""

import datetime
import json
import random
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import cast

from peewee import ModelSelect
from peewee import fn
from pydicom.datadict import tag_for_keyword

from storage import wildcards
from storage.dataset import ParsedInstance
from storage.models import RouteItem
from storage.models import db
from storage.rows import RouteEntry

MAX_ATTEMPTS = 12  # then the item is `failed`, kept for `minipacs queue --retry`
MAX_BACKOFF = 3600.0  # s
LEASE = 600.0  # s a claimed item may stay `sending` before another round takes it again
EVENT_RETRY = (1.0, 300.0)  # s: a notification's first wait after a failure, its longest


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    to: str
    modalities: frozenset[str] = frozenset()
    calling_aets: frozenset[str] = frozenset()
    sop_classes: frozenset[str] = frozenset()
    matches: tuple[tuple[str, str], ...] = ()  # (tag as 8 hex digits, pattern)
    stable: int = 0  # s without a new instance before the study goes; 0: each instance
    text: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.text or self.to

    def selects(self, parsed: ParsedInstance, calling_aet: str, attributes: dict) -> bool:
        if self.modalities and str(parsed.series.get("modality") or "") not in self.modalities:
            return False
        if self.calling_aets and calling_aet not in self.calling_aets:
            return False
        if self.sop_classes and parsed.sop_class_uid not in self.sop_classes:
            return False
        return all(
            wildcards.matches(pattern, _first_value(attributes.get(tag)))
            for tag, pattern in self.matches
        )


def parse_rule(text: str) -> Rule:
    to, *conditions = text.split()
    if not to:
        raise RuleError("a route needs a destination")
    options: dict = {"to": to, "text": " ".join(text.split())}
    for condition in conditions:
        name, _, value = condition.partition("=")
        if not value:
            raise RuleError(f"route {to}: {condition!r} is not name=value")
        if name in ("modality", "calling_aet", "sop_class"):
            key = {"modality": "modalities", "calling_aet": "calling_aets",
                   "sop_class": "sop_classes"}[name]  # fmt: skip
            options[key] = frozenset(v for v in value.split("+") if v)
        elif name == "match":
            keyword, _, pattern = value.partition(":")
            tag = tag_for_keyword(keyword)
            if tag is None or not pattern:
                raise RuleError(f"route {to}: match is Keyword:pattern, not {value!r}")
            options["matches"] = (*options.get("matches", ()), (f"{tag:08X}", pattern))
        elif name == "stable":
            if not value.isdigit():
                raise RuleError(f"route {to}: stable is a number of seconds")
            options["stable"] = int(value)
        else:
            raise RuleError(f"route {to}: unknown condition {name!r}")
    return Rule(**options)


def enqueue(rules: tuple[Rule, ...], parsed: ParsedInstance, calling_aet: str) -> None:
    """Queue what the rules select of a newly stored instance (inside its transaction)."""
    if not rules:
        return
    attributes = json.loads(parsed.json) if any(r.matches for r in rules) else {}
    now = _now()
    for rule in rules:
        if not rule.selects(parsed, calling_aet, attributes):
            continue
        if not rule.stable:
            RouteItem.create(destination=rule.to, study_uid=parsed.study_uid,
                             sop_uid=parsed.sop_uid, due_at=now, created_at=now)  # fmt: skip
            continue
        due = now + datetime.timedelta(seconds=rule.stable)
        hold_study(rule.to, parsed.study_uid, due, now)


def hold_study(
    destination: str, study_uid: str, due: datetime.datetime, now: datetime.datetime, event=""
) -> None:
    """The one stability detector, of `stable=N` routes and of study events
    (storage.events: destination '', `event` the type it will announce): a study's item
    waiting for `destination` is due later, or a new one is made."""
    waiting = RouteItem.update(due_at=due).where(
        (RouteItem.destination == destination)
        & (RouteItem.study_uid == study_uid)
        & (RouteItem.sop_uid.is_null())
        & (RouteItem.subscription.is_null())
        & (RouteItem.status == "pending")
    )
    if not waiting.execute():
        RouteItem.create(destination=destination, study_uid=study_uid, sop_uid=None,
                         event=event, due_at=due, created_at=now)  # fmt: skip


def _ready(now: datetime.datetime):
    """Items to send now. A notification (storage.events) goes only once every earlier one
    of its study and subscription has gone or goes in the same round before it: a failed
    one holds the study's later ones back (not other studies'). Stability timers are not
    sent: storage.events fires them."""
    earlier = RouteItem.alias()
    holding = earlier.select(earlier.id).where(
        (earlier.subscription == RouteItem.subscription)
        & (earlier.study_uid == RouteItem.study_uid)
        & (earlier.id < RouteItem.id)
        & ((earlier.due_at > now) | (earlier.status == "failed"))
    )
    return (
        (RouteItem.due_at <= now)
        & ((RouteItem.status == "pending") | (RouteItem.status == "sending"))
        & (RouteItem.subscription.is_null(False) | (RouteItem.event == ""))
        & (RouteItem.subscription.is_null() | ~fn.EXISTS(holding))
    )


def any_due() -> bool:
    """A read first, so that an idle queue costs no write (and no fsync) per look."""
    return RouteItem.select().where(_ready(_now())).exists()


def claim(limit: int = 256) -> list[RouteEntry]:
    """Due items, marked `sending` for LEASE seconds (each claimed by one process only:
    servers sharing an index do not send the same item twice in one round)."""
    now = _now()
    due = RouteItem.select(RouteItem.id).where(_ready(now)).order_by(RouteItem.id).limit(limit)
    ids = [item.id for item in due]
    if not ids:
        return []
    # One UPDATE for the lot; an item another server leased meanwhile is no longer due,
    # and this lease's own timestamp tells ours apart.
    lease = now + datetime.timedelta(seconds=LEASE, microseconds=random.randrange(1000))
    RouteItem.update(status="sending", due_at=lease).where(
        RouteItem.id.in_(ids) & (RouteItem.due_at <= now)
        & ((RouteItem.status == "pending") | (RouteItem.status == "sending"))
    ).execute()  # fmt: skip
    taken = RouteItem.select().where(RouteItem.id.in_(ids) & (RouteItem.due_at == lease))
    return _entries(taken.order_by(RouteItem.id))


def sent(ids: list[int]) -> None:
    RouteItem.delete().where(RouteItem.id.in_(ids)).execute()


def not_sent(ids: list[int], error: str, base_delay: float) -> None:
    """Back off (base_delay × 2^attempts, at most an hour); `failed` after MAX_ATTEMPTS.
    A notification backs off from EVENT_RETRY[0] up to EVENT_RETRY[1] and never fails:
    it waits for its subscriber (or the subscription's removal)."""
    now = _now()
    for item in RouteItem.select().where(RouteItem.id.in_(ids)):
        attempts = item.attempts + 1
        doubling = 2 ** min(attempts - 1, 32)
        if item.subscription is None:
            delay = min(base_delay * doubling, MAX_BACKOFF)
            item.status = "failed" if attempts >= MAX_ATTEMPTS else "pending"
        else:
            delay = min(EVENT_RETRY[0] * doubling, EVENT_RETRY[1])
            item.status = "pending"
        item.attempts = attempts
        item.last_error = error[:500]
        item.due_at = now + datetime.timedelta(seconds=delay)
        item.save()


def release(ids: list[int]) -> None:
    """Claimed items not tried (an earlier one of their study failed): pending again."""
    RouteItem.update(status="pending", due_at=_now()).where(RouteItem.id.in_(ids)).execute()


def retry(ids: list[int] | None = None) -> int:
    """Failed items (or the given ones) back to pending, due now; how many."""
    chosen = RouteItem.id.in_(ids) if ids else RouteItem.status == "failed"
    return RouteItem.update(status="pending", due_at=_now(), attempts=0).where(chosen).execute()


def items(status: str = "") -> list[RouteEntry]:
    query = RouteItem.select().order_by(RouteItem.id)
    if status:
        query = query.where(RouteItem.status == status)
    return _entries(query)


def _entries(query: "ModelSelect[RouteItem]") -> list[RouteEntry]:
    rows = cast(Iterable[dict[str, Any]], query.dicts())  # peewee types rows as models
    return [RouteEntry(**row) for row in rows]


def depth() -> dict[str, int]:
    counts = {"pending": 0, "sending": 0, "failed": 0}
    rows = RouteItem.select(RouteItem.status, fn.COUNT(RouteItem.id)).group_by(RouteItem.status)
    for status, count in cast(Iterable[tuple[str, int]], rows.tuples()):
        counts[status] = count
    return counts


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _first_value(element: dict | None) -> str:
    if not element or not element.get("Value"):
        return ""
    value = element["Value"][0]
    if isinstance(value, dict):  # PN
        return str(value.get("Alphabetic", ""))
    return str(value)


class RouteQueue:
    """One archive's routing queue (pacs.router sends what it holds): reads on this
    thread's connection, writes through the archive's index writer (`write`)."""

    def __init__(self, write: Callable) -> None:
        self._write = write

    def due(self) -> list[RouteEntry]:
        with db.connection_context():
            if not any_due():
                return []
        return self._write(claim)

    def sent(self, ids: list[int]) -> None:
        self._write(sent, ids)

    def not_sent(self, ids: list[int], error: str, base_delay: float) -> None:
        self._write(not_sent, ids, error, base_delay)

    def release(self, ids: list[int]) -> None:
        self._write(release, ids)

    def retry(self, ids: list[int] | None = None) -> int:
        return self._write(retry, ids)

    def items(self, status: str = "") -> list[RouteEntry]:
        with db.connection_context():
            return items(status)

    def depth(self) -> dict[str, int]:
        with db.connection_context():
            return depth()
