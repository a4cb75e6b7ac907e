"""The docs are part of the product: every command has help and docs/cli.md is current."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gen_cli_docs  # noqa: E402


def test_every_command_has_help_with_an_example():
    for path, cmd in gen_cli_docs.iter_commands(gen_cli_docs.cli, ["healthdelta"]):
        assert cmd.help and "Example:" in cmd.help, " ".join(path)


def test_cli_md_is_current():
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == gen_cli_docs.render(), \
        "docs/cli.md is stale: run `make docs`"
