"""The README's command table against the CLI itself (as test_every_setting_is_documented
does for settings): every command has a row, every row names a command, and every option a
row shows exists on that command."""

import re
from pathlib import Path

import click

from pacs.cli import main

ROOT = Path(__file__).resolve().parent.parent


def command_rows() -> dict[str, str]:
    """The `| `minipacs NAME …` | … |` rows of README's "Commands" table, by NAME."""
    section = (ROOT / "README.md").read_text().split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        found = re.match(r"\| `minipacs ([a-z-]+)", line)
        if found:
            rows[found.group(1)] = rows.get(found.group(1), "") + line
    return rows


def commands() -> dict[str, click.Command]:
    """The CLI's commands by name, as `minipacs --help` lists them (each imported from its
    module on first use, pacs.cli.Verbs)."""
    context = click.Context(main)
    return {name: main.get_command(context, name) for name in main.list_commands(context)}


def options_of(command: click.Command) -> set[str]:
    """Every option spelling of a command and, for a group, of its subcommands."""
    spelled = {name for param in command.params for name in param.opts + param.secondary_opts}
    for sub in getattr(command, "commands", {}).values():
        spelled |= options_of(sub)
    return spelled


def test_every_command_has_a_row_and_every_row_a_command():
    rows = command_rows()
    assert sorted(rows) == sorted(commands())
    assert [name for name, command in commands().items() if command.name != name] == []


def test_subcommands_are_named_in_their_row():
    rows = command_rows()
    for name, command in commands().items():
        for sub in getattr(command, "commands", {}):
            assert re.search(rf"\b{sub}\b", rows[name]), f"{name} {sub} missing from README"


def test_options_shown_in_a_row_exist():
    rows = command_rows()
    for name, row in rows.items():
        code = " ".join(re.findall(r"`([^`]*)`", row))
        shown = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", code))
        unknown = shown - options_of(commands()[name])
        assert not unknown, f"README shows {sorted(unknown)} for minipacs {name}"
