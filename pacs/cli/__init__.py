"""The `minipacs` command (also `python -m pacs`): one click group, its verbs in a module
per kind of work. A verb's module is imported when that verb runs (click's lazily loaded
subcommands): `minipacs serve` or `minipacs user add` then does not import pynetdicom, Flask
or the export engine that other verbs use, and every command starts faster (scripts and
the tests run hundreds)."""

import importlib

import click

VERBS = {  # name: (module in pacs.cli, its click command)
    "serve": ("archive", "serve"),
    "import": ("archive", "import_"),
    "reindex": ("archive", "reindex"),
    "verify": ("archive", "verify"),
    "stats": ("archive", "stats"),
    "protect": ("archive", "protect"),
    "delete": ("archive", "delete"),
    "migrate-index": ("archive", "migrate_index"),
    "migrate-storage": ("archive", "migrate_storage"),
    "anonymize": ("admin", "anonymize"),
    "export": ("export", "export"),
    "user": ("admin", "user"),
    "audit": ("admin", "audit_trail"),
    "worklist": ("workflow", "worklist_group"),
    "queue": ("workflow", "route_queue"),
    "changes": ("changes", "changes"),
    "subscribe": ("workflow", "subscribe_group"),
    "tags": ("tags", "tags_group"),
    "echo": ("remote", "echo"),
    "find": ("remote", "find"),
    "send": ("remote", "send"),
    "move": ("remote", "move"),
    "get": ("remote", "get"),
}


class Verbs(click.Group):
    """A group whose commands are imported from their module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in VERBS:
            return None
        module, name = VERBS[cmd_name]
        return getattr(importlib.import_module(f"pacs.cli.{module}"), name)


@click.group(cls=Verbs, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """minipacs: a small DICOM PACS."""
