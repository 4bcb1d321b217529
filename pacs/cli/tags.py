"""`minipacs tags`: extended query tags (storage.querytags), on the local archive; a running
server sees a change at its next query and back-fills a new tag within seconds."""

import dataclasses
import json

import click

from pacs.cli.common import UsageFailure
from pacs.cli.common import config_options
from pacs.cli.common import open_archive
from storage.querytags import LEVELS
from storage.querytags import TagError
from storage.rows import QueryTagRow


@click.group("tags")
def tags_group() -> None:
    """Extended query tags: any attribute as a C-FIND and QIDO-RS matching key, indexed."""


@tags_group.command("add")
@config_options
@click.argument("names", nargs=-1, required=True, metavar="KEYWORD|GGGGEEEE|ggggxxee...")
@click.option("--level", type=click.Choice(list(LEVELS)), default="study", show_default=True,
              help="The level the attribute belongs to: a series or study takes its first "
              "instance's value.")  # fmt: skip
@click.option("--creator", default="", help="The Private Creator of a private attribute.")
@click.option("--vr", default="", help="A private attribute's VR, when the data cannot say.")
def tags_add(config_file, names, level, creator, vr, **flags) -> None:
    """Make attributes matching keys; a running server back-fills what is stored. Each
    name is checked before any is added."""
    archive = open_archive(config_file, **flags)
    try:
        for tag in archive.query_tags.add(names, level, creator, vr):
            click.echo(line(tag))
    except TagError as exc:
        raise UsageFailure(str(exc)) from None
    finally:
        archive.close()


@tags_group.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tags_list(config_file, as_json, **flags) -> None:
    """Each tag: name, keyword or creator, level, VR, state and back-fill progress."""
    archive = open_archive(config_file, **flags)
    try:
        rows = archive.query_tags.listing()
    finally:
        archive.close()
    for tag in rows:
        click.echo(
            json.dumps({**dataclasses.asdict(tag), "name": tag.name}) if as_json else line(tag)
        )


@tags_group.command("remove")
@config_options
@click.argument("name", metavar="KEYWORD|GGGGEEEE|ggggxxee")
@click.option("--creator", default="", help="The Private Creator of a private attribute.")
def tags_remove(config_file, name, creator, **flags) -> None:
    """Stop matching on a tag and delete its values."""
    archive = open_archive(config_file, **flags)
    try:
        archive.query_tags.remove(name, creator)
    except TagError as exc:
        raise UsageFailure(str(exc)) from None
    finally:
        archive.close()


def line(tag: QueryTagRow) -> str:
    progress = f"{tag.done} of {tag.total}" if tag.state == "adding" else ""
    label = tag.keyword or repr(tag.creator)
    return "  ".join(
        part for part in (tag.name, label, tag.level, tag.vr, tag.state, progress) if part
    )
