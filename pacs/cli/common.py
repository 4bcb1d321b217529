"""What every archive verb shares: settings into a Config, the archive opened from them,
the UID selection, and the report printed on stdout."""

import enum
import json
import os
from collections.abc import Iterator
from pathlib import Path

import click

from pacs import auditlog
from pacs import config as settings
from pacs.boot import setup_logging
from pacs.config import Config
from pacs.config import ConfigError
from storage import Archive
from storage.errors import StorageError


class ExitStatus(enum.IntEnum):
    """What a script can rely on (after httpie's ExitStatus)."""

    SUCCESS = 0
    FAILURE = 1  # a DIMSE failure, or some instances failed
    USAGE = 2
    CONNECTION = 3  # not reachable, association rejected or aborted
    INTERRUPTED = 130


class UsageFailure(click.ClickException):
    """A user error: one line on stderr, exit status 2, no traceback."""

    exit_code = 2


def build_config(config_file: Path | None, **flags) -> Config:
    try:
        return settings.load(config_file, dict(os.environ), flags)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


def reachable_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`: the wildcard
    addresses as loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return "::1" if host == "::" else host


def config_options(func):
    """--config, --data, --index and --log-level, shared by every archive verb."""
    func = click.option("--log-level", help=help_for("log_level"))(func)
    func = click.option("--index", help=help_for("index"))(func)
    func = click.option("--data", type=click.Path(path_type=Path), help=help_for("data"))(func)
    func = click.option(
        "--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file."
    )(func)
    return func


def help_for(name: str) -> str:
    field = Config.__dataclass_fields__[name]
    return f"{field.metadata['help']} [env MINIPACS_{name.upper()}]"


def selection_options(func):
    """What the UIDs are (--patient, --study, --series, --instance) and the UIDs."""
    func = click.argument("uids", nargs=-1, required=True)(func)
    for flag, level, meaning in (
        ("--instance", "IMAGE", "a SOP Instance UID"),
        ("--series", "SERIES", "a Series Instance UID"),
        ("--study", "STUDY", "a Study Instance UID"),
        ("--patient", "PATIENT", "a Patient ID"),
    ):
        func = click.option(flag, "level_uid", flag_value=level, help=f"UID is {meaning}.")(func)
    return func


def selection_level(level_uid: str | None, uids: tuple[str, ...]) -> str:
    """The level of the selection; each UID or Patient ID must name one thing: an empty
    one, or a wildcard, would match every patient."""
    if level_uid is None:
        raise UsageFailure("say what the UIDs are: --patient, --study, --series or --instance")
    for uid in uids:
        if not uid.strip() or "*" in uid or "?" in uid:
            raise UsageFailure(f"{uid!r} would match more than one: name each one exactly")
    return level_uid


def open_archive(config_file: Path | None, **flags) -> Archive:
    config = build_config(config_file, **flags)
    setup_logging(config.log_level)
    auditlog.install(config.audit_syslog)
    archive = Archive(
        config.data,
        fsync=config.fsync,
        duplicates=config.duplicates,
        index_url=config.index,
        routes=config.route,
        event_options=config.event_options(),
        pixel_budget=config.pixel_budget_mb << 20,
        object_store=config.object_store(),
    )
    try:
        return archive.open()
    except StorageError as exc:
        raise UsageFailure(str(exc)) from None


def walk(paths: tuple[Path, ...]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for folder, _, names in sorted(os.walk(path)):
                for name in sorted(names):
                    yield Path(folder, name)
        else:
            yield path


def print_report(summary: dict, problems: list[tuple[str, str]], as_json: bool) -> None:
    """Data on stdout: one JSON object, or a line per problem then a `key: value` summary."""
    if as_json:
        details = [{"path": path, "reason": reason} for path, reason in problems]
        click.echo(json.dumps({**summary, "details": details}))
        return
    for path, reason in problems:
        click.echo(f"{path}: {reason}")
    click.echo("  ".join(f"{key}: {value}" for key, value in summary.items()))


# -- SCU verbs: against any PACS ---------------------------------------------------
