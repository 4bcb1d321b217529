"""The SCU verbs, against any PACS (this one included): echo, find, send, move, get."""

import csv
import functools
import json
import ssl
import sys
from pathlib import Path

import click

from pacs import scu
from pacs.boot import setup_logging
from pacs.cli.common import ExitStatus
from pacs.cli.common import UsageFailure
from pacs.cli.common import build_config
from pacs.cli.common import reachable_host
from pacs.cli.common import walk
from pacs.config import Config
from pacs.tls import client_context


def remote_options(func):
    """--host, --port, --aet, --calling-aet and --tls* of the PACS to talk to; the command
    gets them as one `remote` (scu.Remote). Host, port and AE title not given are this
    PACS's, as its settings say (--config, MINIPACS_*): a script on the server's machine
    reaches it without flags."""

    command = func

    @functools.wraps(command)
    def wrapper(
        config_file, host, port, aet, calling_aet, tls, tls_ca, tls_cert, tls_key, **kwargs
    ):
        use_tls = bool(tls or tls_ca or tls_cert)
        if None in (host, port, aet):
            config = _settings_pacs(config_file)
            host = host or reachable_host(config.host)
            if port is None:
                port = config.tls_port if use_tls else config.port
            aet = aet or config.aet
        context = None
        if use_tls:
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
        "--aet", help="The peer's AE title [default: aet of the settings, MINIPACS_AET]."
    )(func)
    func = click.option(
        "--port",
        type=int,
        help="The peer's DICOM port [default: port of the settings, MINIPACS_PORT; with "
        "--tls, --tls-ca or --tls-cert, tls_port].",
    )(func)
    func = click.option(
        "--host",
        help="The peer's address [default: host of the settings, MINIPACS_HOST; 0.0.0.0 and "
        ":: as loopback].",
    )(func)
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="TOML settings file of the PACS to talk to (its host, port and aet).",
    )(func)
    func = click.option("--log-level", default="WARNING", show_default=True)(func)
    return func


def _settings_pacs(config_file: Path | None) -> Config:
    """The PACS's settings, for the --host/--port/--aet not given; a bad one says where it
    came from, since the command itself never named it."""
    try:
        return build_config(config_file)
    except UsageFailure as exc:
        raise UsageFailure(
            f"{exc.message} (the PACS's settings, read for the default --host/--port/--aet; "
            "pass them to skip)"
        ) from None


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


@click.command()
@remote_options
def echo(remote, log_level) -> None:
    """C-ECHO a PACS; exit 0 when it answers Success."""
    setup_logging(log_level)
    status = _scu_call(scu.echo, remote)
    click.echo(f"C-ECHO {remote.aet}@{remote.host}:{remote.port}: 0x{status:04X}")
    sys.exit(ExitStatus.SUCCESS if status == 0 else ExitStatus.FAILURE)


@click.command()
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


@click.command()
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
    files = list(walk(paths))
    with click.progressbar(length=len(files), label="sending", file=sys.stderr) as bar:
        outcome = _scu_call(
            scu.send,
            remote,
            files,
            parallel,
            lambda path, status: bar.update(1),
        )
    _finish(outcome)


@click.command()
@remote_options
@level_options
@click.option("--dest", required=True, help="AE title to move to (known to the peer).")
@click.argument("uids", nargs=-1, required=True)
def move(remote, log_level, level, model, dest, uids) -> None:
    """C-MOVE studies (or --level entities) by unique key to another AE."""
    setup_logging(log_level)
    outcome = _scu_call(scu.move, remote, level, list(uids), dest, model, _progress)
    _finish(outcome)


@click.command()
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
        reason = outcome.reasons.get(uid)
        click.echo(f"failed: {uid}: {reason}" if reason else f"failed: {uid}")
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
