"""The department's workflow: Modality Worklist items, the auto-routing queue and the
subscriptions to events it also carries."""

import csv
import dataclasses
import json
import sys
from pathlib import Path

import click

from pacs.cli.common import UsageFailure
from pacs.cli.common import config_options
from pacs.cli.common import open_archive
from pacs.cli.common import print_report
from storage import events
from storage.worklist import WorklistError


@click.group("worklist")
def worklist_group() -> None:
    """Modality Worklist items: add, import (CSV or JSON), list, remove."""


@worklist_group.command("add")
@config_options
@click.option("--field", "-f", "pairs", multiple=True, metavar="Keyword=value",
              help="An item field, e.g. -f PatientID=P1 -f Modality=CT (repeatable).")  # fmt: skip
def worklist_add(config_file, pairs, **flags) -> None:
    """Add one item; fields by DICOM keyword (storage.worklist.FIELDS)."""
    fields = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    archive = open_archive(config_file, **flags)
    try:
        click.echo(archive.worklist.add(fields))
    except WorklistError as exc:
        raise UsageFailure(str(exc)) from None
    finally:
        archive.close()


@worklist_group.command("import")
@config_options
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def worklist_import(config_file, source: Path, **flags) -> None:
    """Add the items of a CSV file (a header row of keywords) or a JSON list of objects."""
    text = source.read_text(encoding="utf-8-sig")
    if source.suffix.lower() == ".json":
        rows = json.loads(text)
    else:
        rows = list(csv.DictReader(text.splitlines()))
    archive = open_archive(config_file, **flags)
    added, problems = 0, []
    try:
        for number, row in enumerate(rows, start=1):
            try:
                archive.worklist.add({k: v for k, v in row.items() if v not in (None, "")})
                added += 1
            except WorklistError as exc:
                problems.append((f"item {number}", str(exc)))
    finally:
        archive.close()
    print_report({"items added": added}, problems, False)
    sys.exit(1 if problems else 0)


@worklist_group.command("list")
@config_options
def worklist_list(config_file, **flags) -> None:
    """Every item, one JSON object per line (its DICOM JSON under "item")."""
    archive = open_archive(config_file, **flags)
    try:
        for row in archive.worklist.items():
            click.echo(json.dumps(row))
    finally:
        archive.close()


@worklist_group.command("remove")
@config_options
@click.argument("ids", nargs=-1, type=int, required=True)
def worklist_remove(config_file, ids, **flags) -> None:
    """Remove items by id; exit 1 if one is unknown."""
    archive = open_archive(config_file, **flags)
    try:
        missing = [(str(i), "no such item") for i in ids if not archive.worklist.remove(i)]
    finally:
        archive.close()
    print_report({"items removed": len(ids) - len(missing)}, missing, False)
    sys.exit(1 if missing else 0)


@click.command("queue")
@config_options
@click.option("--status", type=click.Choice(["pending", "sending", "failed"]), help="Only these.")
@click.option("--retry", is_flag=True, help="Send failed items (or the IDs given) again now.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.argument("ids", nargs=-1, type=int)
def route_queue(config_file, status, retry, as_json, ids, **flags) -> None:
    """The auto-routing queue: what waits to be forwarded or notified, what failed and why;
    the event subscriptions first (not with --json: `minipacs subscribe list --json`)."""
    archive = open_archive(config_file, **flags)
    try:
        if retry:
            click.echo(
                f"{archive.route_queue.retry(list(ids) or None)} item(s) due again", err=True
            )
        rows = [r for r in archive.route_queue.items(status or "") if not ids or r.id in ids]
        subscribers = [] if as_json or ids else archive.events.subscribers()
    finally:
        archive.close()
    for subscriber in subscribers:
        click.echo(f"subscription {subscriber.id}  {subscriber.url}  "
                   f"{','.join(subscriber.types)}  ({subscriber.origin})")  # fmt: skip
    for row in rows:
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(row), default=str))
        else:
            what = row.sop_uid or f"study {row.study_uid}"
            where = (
                f"{row.event} to {row.destination or '(when stable)'}"
                if row.event
                else row.destination
            )
            tries = f"attempts {row.attempts}  due {row.due_at}"
            click.echo(f"{row.id}  {row.status:8} {where}  {what}  {tries}  "
                       f"{row.last_error}")  # fmt: skip
    click.echo(f"{len(rows)} item(s)", err=True)


@click.group("subscribe")
def subscribe_group() -> None:
    """Event subscriptions: HTTP receivers of signed CloudEvents (add, list, remove)."""


@subscribe_group.command("add")
@config_options
@click.argument("url")
@click.option("--events", "types", default="", metavar="TYPE,...",
              help=f"Event types (default: all): {', '.join(events.TYPES)}.")  # fmt: skip
@click.option("--secret", help="The signing key, at least 16 characters; default: a new one.")
def subscribe_add(config_file, url, types, secret, **flags) -> None:
    """Add a subscription: prints its id, then the secret when it made one (shown only
    now: the receiver needs it to check signatures)."""
    try:
        subscriber = events.make(url, types, secret or "")
    except events.SubscriptionError as exc:
        raise UsageFailure(str(exc)) from None
    archive = open_archive(config_file, **flags)
    try:
        click.echo(archive.events.add(subscriber))
    finally:
        archive.close()
    if not secret:
        click.echo(subscriber.secret)
        click.echo("the secret is shown only now", err=True)


@subscribe_group.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def subscribe_list(config_file, as_json, **flags) -> None:
    """Every subscription and how many notifications wait for it (secrets are not shown)."""
    archive = open_archive(config_file, **flags)
    try:
        subscribers = archive.events.subscribers()
        waiting = [r.subscription for r in archive.route_queue.items()]
    finally:
        archive.close()
    for s in subscribers:
        row = {"id": s.id, "url": s.url, "events": list(s.types), "origin": s.origin,
               "waiting": waiting.count(s.id)}  # fmt: skip
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(f"{s.id}  {s.url}  {','.join(s.types)}  ({s.origin})  "
                       f"{row['waiting']} waiting")  # fmt: skip


@subscribe_group.command("remove")
@config_options
@click.argument("ids", nargs=-1, type=int, required=True)
def subscribe_remove(config_file, ids, **flags) -> None:
    """Remove subscriptions by id, with what waits to be sent to them; exit 1 if one is
    unknown or comes from the config file (remove it there)."""
    archive = open_archive(config_file, **flags)
    try:
        origins = {s.id: s.origin for s in archive.events.subscribers()}
        problems = [(str(i), "no such subscription") for i in ids if i not in origins]
        problems += [(str(i), "in the config file") for i in ids if origins.get(i) == "config"]
        chosen = [i for i in ids if origins.get(i) == "cli"]
        removed = archive.events.remove(chosen) if chosen else 0
    finally:
        archive.close()
    print_report({"subscriptions removed": removed}, problems, False)
    sys.exit(1 if problems else 0)
