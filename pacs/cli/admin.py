"""What administrators do with patient data and accounts: anonymize (de-identified
copies out), user (web accounts and tokens) and audit (the trail)."""

import dataclasses
import getpass
import json
import shutil
import sys
import tempfile
from pathlib import Path

import click
import pydicom

from pacs.cli.common import UsageFailure
from pacs.cli.common import build_config
from pacs.cli.common import config_options
from pacs.cli.common import help_for
from pacs.cli.common import open_archive
from pacs.cli.common import print_report
from pacs.cli.common import selection_level
from pacs.cli.common import selection_options
from storage import audit
from storage import deidentify
from storage import files
from storage import users
from storage.errors import StorageError
from storage.query import Key
from storage.rows import InstanceLocation


@click.command()
@config_options
@selection_options
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Write the files here."
)
@click.option("--dest", help="Send them to this peer (an AE title of the `peer` setting).")
@click.option("--peer", "peer", multiple=True, metavar="AET=HOST:PORT", help=help_for("peer"))
@click.option("--options", "deid_options", help=help_for("deid_options"))
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The project key (made if missing): one key per project keeps its pseudonyms and "
    "UIDs stable across exports. Default: the archive's own key.",
)
def anonymize(config_file, level_uid, uids, out, dest, key_file, **flags) -> None:
    """De-identify patients, studies, series or instances (PS3.15 Annex E Basic Profile and
    options) into a folder or to a peer; the archive keeps the originals. Audited."""
    level = selection_level(level_uid, uids)
    if (out is None) == (dest is None):
        raise UsageFailure("say where to: --out FOLDER or --dest AET")
    config = build_config(config_file, **flags)
    peer = next((p for p in config.peer if p.aet == dest), None)
    if dest is not None and peer is None:
        raise UsageFailure(f"{dest} is not a configured peer (the `peer` setting)")
    archive = open_archive(config_file, **flags)
    from pacs import scu  # here: only this verb of the module talks DICOM (pynetdicom)

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
    print_report({"instances de-identified": len(written)}, problems, False)
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
    rows: list[InstanceLocation] = []
    problems: list[tuple[str, str]] = []
    for uid in uids:
        found = list(archive.catalog.locate(level, [Key(tag, vr, uid)], model))
        rows += found
        if not found:
            problems.append((uid, "nothing stored under it"))
    written: list[Path] = []
    with click.progressbar(rows, label="de-identifying", file=sys.stderr) as bar:
        for row in bar:
            try:
                path = archive.files.local(row.path)  # fetched if only in the object store
                ds = deidentify.deidentify(pydicom.dcmread(path), profile)
            except (deidentify.NotDeidentifiable, OSError, ValueError, StorageError) as exc:
                problems.append((row.sop_uid, str(exc)))
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


@click.group()
def user() -> None:
    """Web users: add, passwd, token, remove, list (roles: viewer, researcher, uploader,
    admin)."""


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)


def _accounts(config_file, flags, fn, *args, write: bool = True):
    archive = open_archive(config_file, **flags)
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


@click.command("audit")
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
    archive = open_archive(config_file, **flags)
    try:
        if verify:
            problems = archive.verify_audit()
            print_report(
                {"problems": len(problems)}, [("audit trail", p) for p in problems], as_json
            )
            sys.exit(1 if problems else 0)
        for row in archive.audit_events(**filters):
            if as_json:
                fields = dataclasses.asdict(row)
                click.echo(json.dumps({k: v for k, v in fields.items() if "hash" not in k}))
            else:
                values = [getattr(row, name) for name in audit.FIELDS]
                click.echo("  ".join(str(v) for v in values if v))
    finally:
        archive.close()
