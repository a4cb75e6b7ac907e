"""Write docs/cli.md from the commands' own --help (run by `make docs`; a test checks it is current)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from healthdelta.cli import cli

HEADER = "# Command reference\n\nGenerated from `--help` by `make docs`; do not edit by hand.\n"


def iter_commands(group: click.Group, prefix: list[str]):
    ctx = click.Context(group, info_name=" ".join(prefix))
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)
        path = prefix + [name]
        if isinstance(cmd, click.Group):
            yield from iter_commands(cmd, path)
        else:
            yield path, cmd


def render() -> str:
    parts = [HEADER]
    for path, cmd in iter_commands(cli, ["healthdelta"]):
        ctx = click.Context(cmd, info_name=" ".join(path), terminal_width=80, max_content_width=80)
        parts.append(f"\n## `{' '.join(path)}`\n\n```\n{cmd.get_help(ctx)}\n```\n")
    return "".join(parts)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/cli.md")
    target.write_text(render(), encoding="utf-8")
