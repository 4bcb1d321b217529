"""The `minipacs` command (also `python -m pacs`): one click group, its verbs in a module
per kind of work."""

import click

from pacs.cli import admin
from pacs.cli import archive
from pacs.cli import changes
from pacs.cli import export
from pacs.cli import remote
from pacs.cli import tags
from pacs.cli import workflow


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """minipacs: a small DICOM PACS."""


for _command in (
    archive.serve,
    archive.import_,
    archive.reindex,
    archive.verify,
    archive.stats,
    archive.protect,
    archive.delete,
    archive.migrate_index,
    archive.migrate_storage,
    admin.anonymize,
    export.export,
    admin.user,
    admin.audit_trail,
    workflow.worklist_group,
    workflow.route_queue,
    changes.changes,
    workflow.subscribe_group,
    tags.tags_group,
    remote.echo,
    remote.find,
    remote.send,
    remote.move,
    remote.get,
):
    main.add_command(_command)
