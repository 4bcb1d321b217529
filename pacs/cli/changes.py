"""`minipacs changes`: the change feed of a running server (pacs.changes) on a terminal or
into a pipe."""

import json
import os
import ssl
import sys

import click

from pacs import changes as feed
from pacs.boot import setup_logging
from pacs.cli.common import ExitStatus
from pacs.cli.common import build_config
from pacs.cli.common import help_for
from pacs.cli.common import reachable_host
from pacs.config import Config


@click.command()
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="TOML settings file."
)
@click.option(
    "--url", help="The server's web address [default: http(s)://host:http_port of the settings]."
)
@click.option("--token", help=help_for("token"))
@click.option(
    "--ca",
    type=click.Path(exists=True, dir_okay=False),
    help="CA certificates (PEM) the server's HTTPS certificate must chain to [default: the "
    "system's].",
)
@click.option(
    "--since",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="SEQ",
    help="Only entries numbered above SEQ (the last one you have).",
)
@click.option("--follow", is_flag=True, help="Keep waiting for new entries (Ctrl-C stops).")
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 3600),
    default=1.0,
    show_default=True,
    help="Seconds between looks for new entries with --follow.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def changes(config_file, url, ca, since, follow, interval, as_json, **flags) -> None:
    """Each instance created, updated (replaced) or deleted, in order: a line per change
    (sequence, time, action, state, study, series and SOP Instance UIDs, who), or JSON lines;
    read over HTTP from a running server."""
    config = build_config(config_file, **flags)
    setup_logging("WARNING")  # the feed's warnings (entries pruned unread) on stderr
    context = ssl.create_default_context(cafile=ca) if ca else None
    base = url or default_url(config)
    options = {"token": config.token, "context": context}
    entries = feed.follow(base, since, interval=interval, **options) if follow else None
    try:
        for entry in entries or feed.read(base, since, **options):
            click.echo(json.dumps(entry) if as_json else line(entry))
    except feed.FeedError as exc:
        click.echo(f"minipacs: {exc}", err=True)
        sys.exit(ExitStatus.FAILURE if exc.status else ExitStatus.CONNECTION)
    except KeyboardInterrupt:
        sys.exit(ExitStatus.INTERRUPTED)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(ExitStatus.SUCCESS)


def default_url(config: Config) -> str:
    """This server's web address, as its settings say."""
    host = reachable_host(config.host)
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if config.https_cert else 'http'}://{host}:{config.http_port}"


def line(entry: dict) -> str:
    fields = ("Sequence", "Timestamp", "Action", "State", "StudyInstanceUid",
              "SeriesInstanceUid", "SopInstanceUid")  # fmt: skip
    who = (entry.get("Minipacs") or {}).get("Who") or "-"
    return "  ".join([*(str(entry.get(name, "")) for name in fields), who])
