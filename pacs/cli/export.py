"""`minipacs export`: a cohort out of the local archive into a folder (viewer.export does
the work; this verb reads the options, shows progress and sets the exit status)."""

import getpass
import sys
from pathlib import Path

import click

from pacs.cli.common import UsageFailure
from pacs.cli.common import build_config
from pacs.cli.common import config_options
from pacs.cli.common import help_for
from pacs.cli.common import open_archive
from pacs.cli.common import print_report
from storage import deidentify
from storage import files
from viewer import export as engine


@click.command()
@config_options
@click.option(
    "--to",
    "folder",
    required=True,
    type=click.Path(path_type=Path),
    help="The export folder: new or empty, or one this export began (it resumes).",
)
@click.option(
    "-L",
    "--level",
    default="IMAGE",
    show_default=True,
    type=click.Choice(engine.LEVELS, case_sensitive=False),
    help="Export the instances that match (IMAGE), or whole series or studies that match.",
)
@click.option(
    "--format",
    "formats",
    default="dicom",
    show_default=True,
    help="Comma list of dicom, nifti (a volume per series, by dcm2niix), png (previews).",
)
@click.option("--deidentify", "deidentified", is_flag=True, help="PS3.15 Basic Profile.")
@click.option("--options", "deid_options", help=help_for("deid_options"))
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The project key for --deidentify (made if missing): the same key gives the same "
    "pseudonyms and UIDs in every export. Default: the archive's own key.",
)
@click.option("--manifest", type=click.Choice(engine.MANIFESTS), default="csv", show_default=True)
@click.option("--tags", default="", help="Manifest columns, comma list of keywords.")
@click.option("--resume", is_flag=True, help="Continue the export in --to as it began.")
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@click.argument("keys", nargs=-1, metavar="Keyword=value...")
def export(
    config_file,
    folder: Path,
    level: str,
    formats: str,
    deidentified: bool,
    key_file: Path | None,
    manifest: str,
    tags: str,
    resume: bool,
    as_json: bool,
    keys: tuple[str, ...],
    **flags,
) -> None:
    """Export the instances `minipacs find` keys select from this archive: DICOM files in
    a predictable tree, NIfTI volumes, PNG previews and a manifest; de-identified on
    request. Re-run (or --resume) to continue an interrupted one. Audited."""
    pairs = dict(k.partition("=")[::2] for k in keys)
    config = build_config(config_file, **flags)
    archive = open_archive(config_file, **flags)
    try:
        if resume and not pairs:
            plan = engine.read_plan(folder)
            if plan is None:
                raise engine.ExportError(f"{folder} holds no export to resume")
        else:
            chosen = engine.options(
                formats,
                deidentified,
                config.deid_options if deidentified else flags.get("deid_options") or "",
                manifest,
                tags,
            )
            key = str(key_file.resolve()) if key_file else ""
            plan = engine.prepare(
                archive, folder, level.upper(), pairs, chosen, _profile(archive, chosen, key), key
            )
        run = engine.Export(
            archive,
            folder,
            plan,
            _profile(archive, plan.options, plan.key_file),
            f"{getpass.getuser()} (minipacs export)",
            config.pixel_budget_mb << 20,
            config.disk_reserve_mb << 20,
        )
        with click.progressbar(
            length=len(plan.instances), label="exporting", file=sys.stderr
        ) as bar:
            outcome = run.run(lambda done, total: bar.update(1))
    except engine.NothingSelected as exc:
        click.echo(f"minipacs: {exc}", err=True)
        sys.exit(1)
    except engine.ExportError as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("\ninterrupted: run the same command again to continue", err=True)
        sys.exit(130)
    finally:
        archive.close()
    for where, note in outcome.notes:
        click.echo(f"{where}: {note}", err=True)
    print_report(outcome.summary(), outcome.problems, as_json)
    sys.exit(1 if outcome.problems else 0)


def _profile(archive, chosen: engine.Options, key_file: str) -> deidentify.Profile | None:
    """The de-identification of an export: its project key (else the archive's own)."""
    if not chosen.deidentify:
        return None
    key = Path(key_file) if key_file else archive.root / ".deid-key"
    return deidentify.Profile(files.secret(key), frozenset(chosen.deid_options))
