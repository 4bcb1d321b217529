"""Serving and keeping the archive: serve, import, reindex, verify, stats, protect,
delete, migrate-index, migrate-storage."""

import getpass
import sys
from collections import Counter
from pathlib import Path

import click

from pacs import boot
from pacs.cli.common import ExitStatus
from pacs.cli.common import UsageFailure
from pacs.cli.common import build_config
from pacs.cli.common import config_options
from pacs.cli.common import help_for
from pacs.cli.common import open_archive
from pacs.cli.common import print_report
from pacs.cli.common import selection_level
from pacs.cli.common import selection_options
from pacs.cli.common import walk
from storage import Outcome
from storage import migrate
from storage.errors import NotDicom
from storage.errors import StorageError
from storage.errors import StoreUnavailable
from storage.objectstore import ObjectStore


@click.command()
@config_options
@click.option("--aet", help=help_for("aet"))
@click.option("--host", help=help_for("host"))
@click.option("--port", type=int, help=help_for("port"))
@click.option("--http-port", type=int, help=help_for("http_port"))
@click.option("--peer", "peer", multiple=True, metavar="AET=HOST:PORT", help=help_for("peer"))
@click.option(
    "--duplicates", type=click.Choice(["keep", "replace", "reject"]), help=help_for("duplicates")
)
@click.option("--fsync/--no-fsync", default=None, help=help_for("fsync"))
@click.option("--workers", type=int, help=help_for("workers"))
def serve(config_file: Path | None, **flags) -> None:
    """Run the DICOM SCP and the web server until SIGINT/SIGTERM."""
    boot.exec_server(build_config(config_file, **flags))


@click.command("import")
@config_options
@click.option("--fsync/--no-fsync", default=None, help=help_for("fsync"))
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def import_(config_file: Path | None, paths: tuple[Path, ...], as_json: bool, **flags) -> None:
    """Import DICOM files and folders (recursively) through the same ingest as C-STORE."""
    archive = open_archive(config_file, **flags)
    files = list(walk(paths))
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
    waiting = _upload(archive)
    archive.close()
    summary = {key: counts[key] for key in [o.value for o in Outcome] + ["skipped", "rejected"]}
    if archive.files.remote:
        summary["not_uploaded"] = waiting  # the server uploads them
    print_report(summary, problems, as_json)
    sys.exit(1 if counts["rejected"] else 0)


def _upload(archive) -> int:
    """With an object store, what the import placed goes up now; how many did not."""
    if not archive.files.remote:
        return 0
    with click.progressbar(
        length=archive.files.backlog(), label="uploading", file=sys.stderr
    ) as bar:
        return archive.files.drain(lambda: bar.update(1))


@click.command()
@config_options
def reindex(config_file: Path | None, **flags) -> None:
    """Rebuild the index from the files alone, or with an object store from the bucket and
    the files still to upload (stop the server first); what no file tells (the audit trail,
    users, queues, the worklist…) is kept, and the reindex audited. Exit 3 when the store
    does not answer."""
    archive = open_archive(config_file, **flags)
    if not archive.lock(exclusive=True):
        raise UsageFailure(f"a minipacs server is running on {archive.root}: stop it first")
    maintenance = archive.maintenance
    try:
        with (
            maintenance.list_objects() as objects,  # listed once: counted, then read
            click.progressbar(
                length=maintenance.count_files(objects), label="reindexing", file=sys.stderr
            ) as bar,
        ):
            who = f"{getpass.getuser()} (minipacs reindex)"
            report = maintenance.reindex(lambda: bar.update(1), objects, who)
    except StoreUnavailable as exc:
        click.echo(f"{exc}: run reindex again once it answers", err=True)
        sys.exit(ExitStatus.CONNECTION)
    except StorageError as exc:
        raise UsageFailure(str(exc)) from None
    archive.close()
    problems = [(p.path, p.reason) for p in report.problems]
    print_report({"indexed": report.indexed, "problems": len(problems)}, problems, False)
    sys.exit(1 if problems else 0)


@click.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(config_file: Path | None, as_json: bool, **flags) -> None:
    """Check every file against its recorded size and SHA-256; exit 1 if any differ."""
    archive = open_archive(config_file, **flags)
    total = archive.catalog.stats()["instances"]
    problems = []
    with click.progressbar(length=total, label="verifying", file=sys.stderr) as bar:
        for problem in archive.maintenance.verify(progress=lambda: bar.update(1)):
            problems.append((problem.path, problem.reason))
    archive.close()
    print_report({"instances": total, "problems": len(problems)}, problems, as_json)
    sys.exit(1 if problems else 0)


@click.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats(config_file: Path | None, as_json: bool, **flags) -> None:
    """Counts of patients, studies, series, instances and stored bytes."""
    archive = open_archive(config_file, **flags)
    figures = archive.catalog.stats()
    archive.close()
    print_report(figures, [], as_json)


@click.command()
@config_options
@click.option("--release", is_flag=True, help="Let retention remove the studies again.")
@click.argument("study_uids", nargs=-1, required=True)
def protect(config_file: Path | None, release: bool, study_uids: tuple[str, ...], **flags) -> None:
    """Protect studies from retention (quota_mb / quota_instances); exit 1 if one is unknown."""
    archive = open_archive(config_file, **flags)
    who = f"{getpass.getuser()} (minipacs protect)"
    unknown = [
        uid for uid in study_uids if not archive.retention.set_protected(uid, not release, who)
    ]
    archive.close()
    print_report({"protected" if not release else "released": len(study_uids) - len(unknown)},
            [(uid, "no such study") for uid in unknown], False)  # fmt: skip
    sys.exit(1 if unknown else 0)


@click.command()
@config_options
@selection_options
def delete(config_file: Path | None, level_uid: str | None, uids: tuple[str, ...], **flags):
    """Delete patients, studies, series or instances: files and index rows, audited."""
    selection_level(level_uid, uids)
    archive = open_archive(config_file, **flags)
    who = f"{getpass.getuser()} (minipacs delete)"
    try:
        removed = {uid: archive.retention.delete(level_uid, uid, who) for uid in uids}
    finally:
        archive.close()
    missing = [(uid, "nothing stored under it") for uid, count in removed.items() if not count]
    print_report({"instances deleted": sum(removed.values())}, missing, False)
    sys.exit(1 if missing else 0)


@click.command("migrate-index")
@config_options
@click.option("--to", "target", required=True, help="The new index: postgresql://user@host/db.")
def migrate_index(config_file: Path | None, target: str, **flags) -> None:
    """Copy the index (SQLite by default) into an empty PostgreSQL database (stop the server
    first); then set `index` to the new URL."""
    archive = open_archive(config_file, **flags)
    if not archive.lock(exclusive=True):
        raise UsageFailure(f"a minipacs server is running on {archive.root}: stop it first")
    total = sum(archive.catalog.stats()[k] for k in ("patients", "studies", "series", "instances"))
    try:
        with click.progressbar(length=total, label="copying the index", file=sys.stderr) as bar:
            copied = archive.maintenance.copy_index_to(
                build_config(None, index=target).index, bar.update
            )
    except StorageError as exc:
        raise UsageFailure(str(exc)) from None
    finally:
        archive.close()
    print_report(copied, [], False)
    click.echo(f"done: set index = {target!r} (or --index) to use it", err=True)


@click.command("migrate-storage")
@config_options
@click.option("--to", "target", required=True, help="s3://bucket/prefix, or file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def migrate_storage(config_file: Path | None, target: str, as_json: bool, **flags) -> None:
    """Copy every instance from the data folder into a bucket (--to s3://bucket/prefix,
    with the storage_endpoint/region/path_style settings), or from the configured bucket
    back into the data folder (--to file); resumable, verified at the end. Exit 0 when
    every instance is at the target and verified, 1 when some are not (listed), 3 when
    the store does not answer (run it again to resume)."""
    config = build_config(config_file, **flags)
    going_up = target != "file"
    if going_up == (config.storage != "file"):
        raise UsageFailure(
            f"the archive is on {config.storage} already: migrate-storage copies between "
            "the data folder (storage = file) and one bucket"
        )
    bucket = build_config(config_file, **{**flags, "storage": target}).object_store()
    archive = open_archive(config_file, **flags)
    alone = archive.lock(exclusive=True)
    if not alone and not going_up:  # its cache trim would remove what is being placed
        raise UsageFailure(f"a minipacs server is running on {archive.root}: stop it first")
    if bucket is not None:
        store, copy, where = ObjectStore(bucket), migrate.to_bucket, target
    else:  # the archive is opened on its bucket
        store, copy, where = archive.files.store, migrate.to_folder, str(archive.root)
    bars = _Steps(migrate.count(), {"copy": f"copying to {where}", "verify": "verifying"})
    try:
        done = copy(archive, store, bars.step)
    except StoreUnavailable as exc:
        bars.finish()
        click.echo(f"{exc}: run migrate-storage again to resume", err=True)
        sys.exit(ExitStatus.CONNECTION)
    finally:
        archive.close()
    bars.finish()
    print_report(done.summary(), done.problems, as_json)
    if done.problems:
        sys.exit(ExitStatus.FAILURE)
    if not alone:
        click.echo("a server is running: what it receives meanwhile is not copied; run "
                   "again once it is stopped, then switch", err=True)  # fmt: skip
    elif going_up:
        click.echo(f"done: set storage = {target!r} (with the same storage_endpoint, "
                   "storage_region and storage_path_style) to use it; the data folder's "
                   "files become its cache", err=True)  # fmt: skip
    else:
        click.echo("done: set storage = 'file' to use the data folder alone", err=True)
    sys.exit(ExitStatus.SUCCESS)


class _Steps:
    """One progress bar on stderr per step of a long run, each over `total` items."""

    def __init__(self, total: int, labels: dict[str, str]) -> None:
        self.total, self.labels = total, labels
        self.name = ""
        self.bar = None

    def step(self, name: str) -> None:
        if name != self.name:
            self.finish()
            self.name = name
            self.bar = click.progressbar(
                length=self.total, label=self.labels[name], file=sys.stderr
            )
        self.bar.update(1)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.render_finish()
            self.bar = None
