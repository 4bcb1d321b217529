"""The `minipacs` command: serve, and the archive maintenance verbs."""

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import click

from pacs import config as settings
from pacs.config import Config
from pacs.config import ConfigError
from pacs.server import StartupError
from pacs.server import serve as run_server
from storage import Archive
from storage import Outcome
from storage.errors import NotDicom
from storage.errors import StorageError


class UsageFailure(click.ClickException):
    """A user error: one line on stderr, exit status 2, no traceback."""

    exit_code = 2


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom's INFO is per-PDU chatter and its DEBUG dumps datasets (PHI): DEBUG only.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if level == "DEBUG" else "WARNING")


def build_config(config_file: Path | None, **flags) -> Config:
    try:
        return settings.load(config_file, dict(os.environ), flags)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


def config_options(func):
    """--config, --data and --log-level, shared by every archive verb."""
    func = click.option("--log-level", help=_help("log_level"))(func)
    func = click.option("--data", type=click.Path(path_type=Path), help=_help("data"))(func)
    func = click.option(
        "--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file."
    )(func)
    return func


def _help(name: str) -> str:
    field = Config.__dataclass_fields__[name]
    return f"{field.metadata['help']} [env MINIPACS_{name.upper()}]"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """minipacs: a small DICOM PACS."""


@main.command()
@config_options
@click.option("--aet", help=_help("aet"))
@click.option("--host", help=_help("host"))
@click.option("--port", type=int, help=_help("port"))
@click.option("--http-port", type=int, help=_help("http_port"))
@click.option("--peer", "peer", multiple=True, metavar="AET=HOST:PORT", help=_help("peer"))
@click.option(
    "--duplicates", type=click.Choice(["keep", "replace", "reject"]), help=_help("duplicates")
)
@click.option("--fsync/--no-fsync", default=None, help=_help("fsync"))
@click.option("--workers", type=int, help=_help("workers"))
def serve(config_file: Path | None, **flags) -> None:
    """Run the DICOM SCP and the web server until SIGINT/SIGTERM."""
    config = build_config(config_file, **flags)
    setup_logging(config.log_level)
    try:
        run_server(config)
    except StartupError as exc:
        raise UsageFailure(str(exc)) from None


@main.command("import")
@config_options
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def import_(config_file: Path | None, paths: tuple[Path, ...], as_json: bool, **flags) -> None:
    """Import DICOM files and folders (recursively) through the same ingest as C-STORE."""
    archive = _open(config_file, **flags)
    files = list(_walk(paths))
    counts: Counter[str] = Counter()
    problems: list[tuple[str, str]] = []
    with click.progressbar(files, label="importing", file=sys.stderr) as bar:
        for path in bar:
            try:
                counts[archive.import_file(path).outcome.value] += 1
            except NotDicom as exc:
                counts["skipped"] += 1
                problems.append((str(path), f"skipped: {exc}"))
            except StorageError as exc:
                counts["rejected"] += 1
                problems.append((str(path), f"rejected: {exc}"))
    archive.close()
    summary = {key: counts[key] for key in [o.value for o in Outcome] + ["skipped", "rejected"]}
    _report(summary, problems, as_json)
    sys.exit(1 if counts["rejected"] else 0)


@main.command()
@config_options
def reindex(config_file: Path | None, **flags) -> None:
    """Rebuild the index from the files alone (stop the server first)."""
    archive = _open(config_file, **flags)
    if not archive.lock(exclusive=True):
        raise UsageFailure(f"a minipacs server is running on {archive.root}: stop it first")
    report = archive.reindex()
    archive.close()
    problems = [(p.path, p.reason) for p in report.problems]
    _report({"indexed": report.indexed, "problems": len(problems)}, problems, False)
    sys.exit(1 if problems else 0)


@main.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(config_file: Path | None, as_json: bool, **flags) -> None:
    """Check every file against its recorded size and SHA-256; exit 1 if any differ."""
    archive = _open(config_file, **flags)
    total = archive.stats()["instances"]
    problems = []
    with click.progressbar(length=total, label="verifying", file=sys.stderr) as bar:
        for problem in archive.verify():
            problems.append((problem.path, problem.reason))
        bar.update(total)
    archive.close()
    _report({"instances": total, "problems": len(problems)}, problems, as_json)
    sys.exit(1 if problems else 0)


@main.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats(config_file: Path | None, as_json: bool, **flags) -> None:
    """Counts of patients, studies, series, instances and stored bytes."""
    archive = _open(config_file, **flags)
    figures = archive.stats()
    archive.close()
    _report(figures, [], as_json)


def _open(config_file: Path | None, **flags) -> Archive:
    config = build_config(config_file, **flags)
    setup_logging(config.log_level)
    archive = Archive(config.data, fsync=config.fsync, duplicates=config.duplicates)
    try:
        return archive.open()
    except StorageError as exc:
        raise UsageFailure(str(exc)) from None


def _walk(paths: tuple[Path, ...]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for folder, _, names in sorted(os.walk(path)):
                for name in sorted(names):
                    yield Path(folder, name)
        else:
            yield path


def _report(summary: dict, problems: list[tuple[str, str]], as_json: bool) -> None:
    """Data on stdout: one JSON object, or a line per problem then a `key: value` summary."""
    if as_json:
        details = [{"path": path, "reason": reason} for path, reason in problems]
        click.echo(json.dumps({**summary, "details": details}))
        return
    for path, reason in problems:
        click.echo(f"{path}: {reason}")
    click.echo("  ".join(f"{key}: {value}" for key, value in summary.items()))
