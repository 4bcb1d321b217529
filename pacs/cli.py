"""The `minipacs` command: serve, and the archive maintenance verbs."""

import csv
import enum
import functools
import getpass
import json
import os
import shutil
import ssl
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import click
import pydicom

from pacs import auditlog
from pacs import boot
from pacs import config as settings
from pacs import scu
from pacs.boot import setup_logging
from pacs.config import Config
from pacs.config import ConfigError
from pacs.tls import client_context
from storage import Archive
from storage import Outcome
from storage import audit
from storage import deidentify
from storage import files
from storage import users
from storage.errors import NotDicom
from storage.errors import StorageError
from storage.query import Key
from storage.worklist import WorklistError


class UsageFailure(click.ClickException):
    """A user error: one line on stderr, exit status 2, no traceback."""

    exit_code = 2


def build_config(config_file: Path | None, **flags) -> Config:
    try:
        return settings.load(config_file, dict(os.environ), flags)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


def config_options(func):
    """--config, --data, --index and --log-level, shared by every archive verb."""
    func = click.option("--log-level", help=_help("log_level"))(func)
    func = click.option("--index", help=_help("index"))(func)
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
    boot.exec_server(build_config(config_file, **flags))


@main.command("import")
@config_options
@click.option("--fsync/--no-fsync", default=None, help=_help("fsync"))
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
    with click.progressbar(
        length=archive.count_files(), label="reindexing", file=sys.stderr
    ) as bar:
        report = archive.reindex(progress=lambda: bar.update(1))
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
        for problem in archive.verify(progress=lambda: bar.update(1)):
            problems.append((problem.path, problem.reason))
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


@main.command()
@config_options
@click.option("--release", is_flag=True, help="Let retention remove the studies again.")
@click.argument("study_uids", nargs=-1, required=True)
def protect(config_file: Path | None, release: bool, study_uids: tuple[str, ...], **flags) -> None:
    """Protect studies from retention (quota_mb / quota_instances); exit 1 if one is unknown."""
    archive = _open(config_file, **flags)
    who = f"{getpass.getuser()} (minipacs protect)"
    unknown = [uid for uid in study_uids if not archive.set_protected(uid, not release, who)]
    archive.close()
    _report({"protected" if not release else "released": len(study_uids) - len(unknown)},
            [(uid, "no such study") for uid in unknown], False)  # fmt: skip
    sys.exit(1 if unknown else 0)


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


def _level(level_uid: str | None, uids: tuple[str, ...]) -> str:
    """The level of the selection; each UID or Patient ID must name one thing: an empty
    one, or a wildcard, would match every patient."""
    if level_uid is None:
        raise UsageFailure("say what the UIDs are: --patient, --study, --series or --instance")
    for uid in uids:
        if not uid.strip() or "*" in uid or "?" in uid:
            raise UsageFailure(f"{uid!r} would match more than one: name each one exactly")
    return level_uid


@main.command()
@config_options
@selection_options
def delete(config_file: Path | None, level_uid: str | None, uids: tuple[str, ...], **flags):
    """Delete patients, studies, series or instances: files and index rows, audited."""
    _level(level_uid, uids)
    archive = _open(config_file, **flags)
    who = f"{getpass.getuser()} (minipacs delete)"
    try:
        removed = {uid: archive.delete(level_uid, uid, who) for uid in uids}
    finally:
        archive.close()
    missing = [(uid, "nothing stored under it") for uid, count in removed.items() if not count]
    _report({"instances deleted": sum(removed.values())}, missing, False)
    sys.exit(1 if missing else 0)


@main.command()
@config_options
@selection_options
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Write the files here."
)
@click.option("--dest", help="Send them to this peer (an AE title of the `peer` setting).")
@click.option("--peer", "peer", multiple=True, metavar="AET=HOST:PORT", help=_help("peer"))
@click.option("--options", "deid_options", help=_help("deid_options"))
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The project key (made if missing): one key per project keeps its pseudonyms and "
    "UIDs stable across exports. Default: the archive's own key.",
)
def anonymize(config_file, level_uid, uids, out, dest, key_file, **flags) -> None:
    """De-identify patients, studies, series or instances (PS3.15 Annex E Basic Profile and
    options) into a folder or to a peer; the archive keeps the originals. Audited."""
    level = _level(level_uid, uids)
    if (out is None) == (dest is None):
        raise UsageFailure("say where to: --out FOLDER or --dest AET")
    config = build_config(config_file, **flags)
    peer = next((p for p in config.peer if p.aet == dest), None)
    if dest is not None and peer is None:
        raise UsageFailure(f"{dest} is not a configured peer (the `peer` setting)")
    archive = _open(config_file, **flags)
    profile = deidentify.Profile(
        files.secret(key_file or archive.root / ".deid-key"),
        deidentify.parse_options(config.deid_options),
    )
    folder = out or Path(tempfile.mkdtemp(prefix="minipacs-anonymize-"))
    try:
        written, problems = _deidentify_into(archive, level, uids, profile, folder)
        if peer is not None and written:
            outcome = scu.send(scu.Remote.for_peer(config, peer), written)
            problems += [(Path(p).stem, "the peer did not store it") for p in outcome.failed_uids]
            problems += [(dest, problem) for problem in outcome.problems]
        _audit_export(archive, level, uids, dest or str(out), len(written), problems, profile)
    finally:
        archive.close()
        if out is None:
            shutil.rmtree(folder, ignore_errors=True)
    _report({"instances de-identified": len(written)}, problems, False)
    sys.exit(1 if problems or not written else 0)


SELECTION_KEYS = {  # level → the key its UIDs match
    "PATIENT": (0x00100020, "LO"),
    "STUDY": (0x0020000D, "UI"),
    "SERIES": (0x0020000E, "UI"),
    "IMAGE": (0x00080018, "UI"),
}


def _deidentify_into(archive, level, uids, profile, folder: Path):
    """Each selected instance, de-identified, as <study>/<series>/<instance>.dcm (new UIDs)."""
    model = "PATIENT" if level == "PATIENT" else "STUDY"
    tag, vr = SELECTION_KEYS[level]
    rows: list[dict] = []
    problems: list[tuple[str, str]] = []
    for uid in uids:
        found = list(archive.locate(level, [Key(tag, vr, uid)], model))
        rows += found
        if not found:
            problems.append((uid, "nothing stored under it"))
    written: list[Path] = []
    with click.progressbar(rows, label="de-identifying", file=sys.stderr) as bar:
        for row in bar:
            try:
                ds = deidentify.deidentify(pydicom.dcmread(row["instance_path"]), profile)
            except (deidentify.NotDeidentifiable, OSError, ValueError) as exc:
                problems.append((row["instance_sop_uid"], str(exc)))
                continue
            target = folder / ds.StudyInstanceUID / ds.SeriesInstanceUID
            target.mkdir(parents=True, exist_ok=True)
            path = target / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    return written, problems


def _audit_export(archive, level, uids, where, count, problems, profile) -> None:
    who = f"{getpass.getuser()} (minipacs anonymize)"
    for uid in uids:
        archive.audit(
            audit.Event(
                "export",
                "success" if not problems else f"failure: {len(problems)} problem(s)",
                who=who,
                patient_id=uid if level == "PATIENT" else "",
                study_uid=uid if level == "STUDY" else "",
                detail={
                    "level": level,
                    "uid": uid,
                    "to": where,
                    "instances": count,
                    "deidentified": ",".join(["basic", *sorted(profile.options)]),
                },
            )
        )


@main.group("worklist")
def worklist_group() -> None:
    """Modality Worklist items: add, import (CSV or JSON), list, remove."""


@worklist_group.command("add")
@config_options
@click.option("--field", "-f", "pairs", multiple=True, metavar="Keyword=value",
              help="An item field, e.g. -f PatientID=P1 -f Modality=CT (repeatable).")  # fmt: skip
def worklist_add(config_file, pairs, **flags) -> None:
    """Add one item; fields by DICOM keyword (storage.worklist.FIELDS)."""
    fields = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    archive = _open(config_file, **flags)
    try:
        click.echo(archive.worklist_add(fields))
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
    archive = _open(config_file, **flags)
    added, problems = 0, []
    try:
        for number, row in enumerate(rows, start=1):
            try:
                archive.worklist_add({k: v for k, v in row.items() if v not in (None, "")})
                added += 1
            except WorklistError as exc:
                problems.append((f"item {number}", str(exc)))
    finally:
        archive.close()
    _report({"items added": added}, problems, False)
    sys.exit(1 if problems else 0)


@worklist_group.command("list")
@config_options
def worklist_list(config_file, **flags) -> None:
    """Every item, one JSON object per line (its DICOM JSON under "item")."""
    archive = _open(config_file, **flags)
    try:
        for row in archive.worklist_items():
            click.echo(json.dumps(row))
    finally:
        archive.close()


@worklist_group.command("remove")
@config_options
@click.argument("ids", nargs=-1, type=int, required=True)
def worklist_remove(config_file, ids, **flags) -> None:
    """Remove items by id; exit 1 if one is unknown."""
    archive = _open(config_file, **flags)
    try:
        missing = [(str(i), "no such item") for i in ids if not archive.worklist_remove(i)]
    finally:
        archive.close()
    _report({"items removed": len(ids) - len(missing)}, missing, False)
    sys.exit(1 if missing else 0)


@main.command("queue")
@config_options
@click.option("--status", type=click.Choice(["pending", "sending", "failed"]), help="Only these.")
@click.option("--retry", is_flag=True, help="Send failed items (or the IDs given) again now.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.argument("ids", nargs=-1, type=int)
def route_queue(config_file, status, retry, as_json, ids, **flags) -> None:
    """The auto-routing queue: what waits to be forwarded, what failed and why."""
    archive = _open(config_file, **flags)
    try:
        if retry:
            click.echo(f"{archive.routes_retry(list(ids) or None)} item(s) due again", err=True)
        rows = [r for r in archive.route_items(status or "") if not ids or r["id"] in ids]
    finally:
        archive.close()
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, default=str))
        else:
            what = row["sop_uid"] or f"study {row['study_uid']}"
            tries = f"attempts {row['attempts']}  due {row['due_at']}"
            click.echo(f"{row['id']}  {row['status']:8} {row['destination']}  {what}  {tries}  "
                       f"{row['last_error']}")  # fmt: skip
    click.echo(f"{len(rows)} item(s)", err=True)


@main.group()
def user() -> None:
    """Web users: add, passwd, token, remove, list (roles: viewer, uploader, admin)."""


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)


def _accounts(config_file, flags, fn, *args, write: bool = True):
    archive = _open(config_file, **flags)
    try:
        return archive.accounts(fn, *args, write=write)
    except users.UserError as exc:
        raise UsageFailure(str(exc)) from None
    finally:
        archive.close()


@user.command("add")
@config_options
@click.argument("name")
@click.option("--role", type=click.Choice(users.ROLES), default="viewer", show_default=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
def user_add(config_file, name: str, role: str, password_stdin: bool, **flags) -> None:
    """Add a user (asks for the password)."""
    _accounts(config_file, flags, users.add, name, role, _password(password_stdin))
    click.echo(f"user {name} added ({role})", err=True)


@user.command("passwd")
@config_options
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
def user_passwd(config_file, name: str, password_stdin: bool, **flags) -> None:
    """Set a user's password."""
    _accounts(config_file, flags, users.set_password, name, _password(password_stdin))


@user.command("token")
@config_options
@click.argument("name")
@click.option(
    "--days", type=int, help="Expire after this many days (0: never) [default: token_days]."
)
@click.option("--list", "listing", is_flag=True, help="List NAME's tokens: id, created, expires.")
@click.option("--revoke", metavar="ID|TOKEN", help="Remove this one token of NAME's.")
def user_token(
    config_file, name: str, days: int | None, listing: bool, revoke: str | None, **flags
) -> None:
    """Issue a bearer token for scripts (printed once, kept only as its hash), list a
    user's tokens, or revoke one."""
    if revoke:
        number = _accounts(config_file, flags, users.revoke_token, name, revoke)
        click.echo(f"token {number} of {name} revoked", err=True)
        return
    if listing:
        for number, created, expires in _accounts(
            config_file, flags, users.tokens, name, write=False
        ):
            click.echo(f"{number}  created {created}  expires {expires or 'never'}")
        return
    if days is None:
        days = build_config(config_file, **flags).token_days
    token, number, expires = _accounts(config_file, flags, users.issue_token, name, days)
    click.echo(token)
    click.echo(f"token {number} of {name}, expires {expires or 'never'}", err=True)


@user.command("remove")
@config_options
@click.argument("name")
def user_remove(config_file, name: str, **flags) -> None:
    """Remove a user and every token of theirs."""
    _accounts(config_file, flags, users.remove, name)


@user.command("list")
@config_options
def user_list(config_file, **flags) -> None:
    """Users, roles and how many tokens each has."""
    for name, role, tokens in _accounts(config_file, flags, users.listing, write=False):
        click.echo(f"{name}  {role}  {tokens} token(s)")


@main.command("audit")
@config_options
@click.option("--patient", "patient_id", help="Only events about this Patient ID.")
@click.option("--study", "study_uid", help="Only events about this Study Instance UID.")
@click.option("--who", help="Only events by this user or calling AE title.")
@click.option("--event", type=click.Choice(audit.EVENTS), help="Only this kind of event.")
@click.option("--since", help="From this time on (ISO 8601, UTC, e.g. 2026-11-26T08).")
@click.option("--until", help="Up to this time (ISO 8601 prefix, inclusive).")
@click.option("--verify", is_flag=True, help="Check the hash chain; exit 1 if it is broken.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_trail(config_file, verify: bool, as_json: bool, **flags) -> None:
    """The audit trail: who stored, queried, retrieved, viewed or deleted what, and when."""
    filters = {
        k: flags.pop(k) for k in ("patient_id", "study_uid", "who", "event", "since", "until")
    }
    archive = _open(config_file, **flags)
    try:
        if verify:
            problems = archive.verify_audit()
            _report({"problems": len(problems)}, [("audit trail", p) for p in problems], as_json)
            sys.exit(1 if problems else 0)
        for row in archive.audit_events(**filters):
            if as_json:
                click.echo(json.dumps({k: v for k, v in row.items() if "hash" not in k}))
            else:
                click.echo("  ".join(str(row[k]) for k in audit.FIELDS if row[k]))
    finally:
        archive.close()


@main.command("migrate-index")
@config_options
@click.option("--to", "target", required=True, help="The new index: postgresql://user@host/db.")
def migrate_index(config_file: Path | None, target: str, **flags) -> None:
    """Copy the index (SQLite by default) into an empty PostgreSQL database (stop the server
    first); then set `index` to the new URL."""
    archive = _open(config_file, **flags)
    if not archive.lock(exclusive=True):
        raise UsageFailure(f"a minipacs server is running on {archive.root}: stop it first")
    total = sum(archive.stats()[k] for k in ("patients", "studies", "series", "instances"))
    try:
        with click.progressbar(length=total, label="copying the index", file=sys.stderr) as bar:
            copied = archive.copy_index_to(build_config(None, index=target).index, bar.update)
    except StorageError as exc:
        raise UsageFailure(str(exc)) from None
    finally:
        archive.close()
    _report(copied, [], False)
    click.echo(f"done: set index = {target!r} (or --index) to use it", err=True)


def _open(config_file: Path | None, **flags) -> Archive:
    config = build_config(config_file, **flags)
    setup_logging(config.log_level)
    auditlog.install(config.audit_syslog)
    archive = Archive(
        config.data,
        fsync=config.fsync,
        duplicates=config.duplicates,
        index_url=config.index,
        routes=config.route,
        pixel_budget=config.pixel_budget_mb << 20,
    )
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


# -- SCU verbs: against any PACS ---------------------------------------------------


class ExitStatus(enum.IntEnum):
    """What a script can rely on (after httpie's ExitStatus)."""

    SUCCESS = 0
    FAILURE = 1  # a DIMSE failure, or some instances failed
    USAGE = 2
    CONNECTION = 3  # not reachable, association rejected or aborted
    INTERRUPTED = 130


def remote_options(func):
    """--host, --port, --aet, --calling-aet and --tls* of the PACS to talk to; the command
    gets them as one `remote` (scu.Remote)."""

    command = func

    @functools.wraps(command)
    def wrapper(host, port, aet, calling_aet, tls, tls_ca, tls_cert, tls_key, **kwargs):
        context = None
        if tls or tls_ca or tls_cert:
            try:
                context = client_context(tls_ca or "", tls_cert or "", tls_key or "")
            except (OSError, ssl.SSLError) as exc:
                raise UsageFailure(f"TLS: {exc}") from None
        remote = scu.Remote(host=host, port=port, aet=aet, calling_aet=calling_aet, tls=context)
        return command(remote=remote, **kwargs)

    func = wrapper
    func = click.option("--tls-key", help="Our private key (PEM) for --tls-cert.")(func)
    func = click.option("--tls-cert", help="Our certificate (PEM), for mutual TLS.")(func)
    func = click.option("--tls-ca", help="CA certificates (PEM) the peer's must chain to.")(func)
    func = click.option("--tls", is_flag=True, help="DICOM over TLS (system CAs unless --tls-ca).")(
        func
    )
    func = click.option(
        "--calling-aet", default="MINIPACS-SCU", show_default=True, help="Our AE title."
    )(func)
    func = click.option(
        "--aet", default="MINIPACS", show_default=True, help="The peer's AE title."
    )(func)
    func = click.option(
        "--port", default=11112, show_default=True, type=int, help="The peer's DICOM port."
    )(func)
    func = click.option(
        "--host", default="127.0.0.1", show_default=True, help="The peer's address."
    )(func)
    func = click.option("--log-level", default="WARNING", show_default=True)(func)
    return func


def level_options(func):
    """-L/--level and --model (Patient Root or Study Root), shared by find, move and get."""
    func = click.option(
        "--model",
        default="STUDY",
        show_default=True,
        type=click.Choice(["PATIENT", "STUDY"], case_sensitive=False),
        help="Information model: Patient Root or Study Root.",
    )(func)
    return click.option(
        "-L",
        "--level",
        default="STUDY",
        show_default=True,
        type=click.Choice(["PATIENT", "STUDY", "SERIES", "IMAGE"], case_sensitive=False),
    )(func)


def _scu_call(func, *args, **kwargs):
    """Run an SCU call; connection trouble and failures become exit statuses."""
    try:
        return func(*args, **kwargs)
    except scu.AssociationError as exc:
        click.echo(f"minipacs: {exc}", err=True)
        sys.exit(ExitStatus.CONNECTION)
    except scu.ScuError as exc:
        click.echo(f"minipacs: {exc}", err=True)
        sys.exit(ExitStatus.FAILURE)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(ExitStatus.INTERRUPTED)


@main.command()
@remote_options
def echo(remote, log_level) -> None:
    """C-ECHO a PACS; exit 0 when it answers Success."""
    setup_logging(log_level)
    status = _scu_call(scu.echo, remote)
    click.echo(f"C-ECHO {remote.aet}@{remote.host}:{remote.port}: 0x{status:04X}")
    sys.exit(ExitStatus.SUCCESS if status == 0 else ExitStatus.FAILURE)


@main.command()
@remote_options
@level_options
@click.option("--json", "as_json", is_flag=True, help="Answers as DICOM JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Answers as CSV.")
@click.argument("keys", nargs=-1, metavar="Keyword=value|Keyword...")
def find(remote, log_level, level, model, as_json, as_csv, keys) -> None:
    """C-FIND: match keys as Keyword=value (wildcards, ranges, UID lists), return keys as
    Keyword. Prints a table, --json or --csv."""
    setup_logging(log_level)
    pairs = dict(k.partition("=")[::2] for k in keys)
    if not pairs:
        pairs = {scu.UNIQUE_KEY[level.upper()]: ""}
    query = _scu_call(scu.identifier, level, pairs)
    answers = _scu_call(lambda: list(scu.find(remote, query, model)))
    columns = list(pairs)
    if as_json:
        click.echo(json.dumps([a.to_json_dict() for a in answers], ensure_ascii=False))
    elif as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        for answer in answers:
            writer.writerow([_text(answer, c) for c in columns])
    else:
        rows = [[_text(a, c) for c in columns] for a in answers]
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
        click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for row in rows:
            click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    click.echo(f"{len(answers)} answer(s)", err=True)


@main.command()
@remote_options
@click.option(
    "--parallel",
    default=1,
    show_default=True,
    type=click.IntRange(1, 32),
    help="Associations used at once.",
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def send(remote, log_level, parallel, paths) -> None:
    """C-STORE files and folders (recursively), bytes as they are on disk."""
    setup_logging(log_level)
    files = list(_walk(paths))
    with click.progressbar(length=len(files), label="sending", file=sys.stderr) as bar:
        outcome = _scu_call(
            scu.send,
            remote,
            files,
            parallel,
            lambda path, status: bar.update(1),
        )
    _finish(outcome)


@main.command()
@remote_options
@level_options
@click.option("--dest", required=True, help="AE title to move to (known to the peer).")
@click.argument("uids", nargs=-1, required=True)
def move(remote, log_level, level, model, dest, uids) -> None:
    """C-MOVE studies (or --level entities) by unique key to another AE."""
    setup_logging(log_level)
    outcome = _scu_call(scu.move, remote, level, list(uids), dest, model, _progress)
    _finish(outcome)


@main.command()
@remote_options
@level_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for files.")
@click.argument("uids", nargs=-1, required=True)
def get(remote, log_level, level, model, out, uids) -> None:
    """C-GET studies (or --level entities) by unique key into a folder."""
    setup_logging(log_level)
    outcome = _scu_call(scu.get, remote, level, list(uids), out, model, _progress)
    _finish(outcome)


def _progress(status) -> None:
    remaining = status.get("NumberOfRemainingSuboperations", "?")
    done = status.get("NumberOfCompletedSuboperations", 0)
    click.echo(f"\r{done} done, {remaining} remaining", err=True, nl=False)


def _finish(outcome: scu.Outcome) -> None:
    click.echo("", err=True)
    for uid in outcome.failed_uids:
        click.echo(f"failed: {uid}")
    for problem in outcome.problems:
        click.echo(f"problem: {problem}")
    click.echo(
        f"completed: {outcome.completed}  failed: {outcome.failed}  "
        f"warning: {outcome.warning}  status: 0x{outcome.status:04X}"
    )
    sys.exit(ExitStatus.SUCCESS if outcome.ok else ExitStatus.FAILURE)


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)
