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


def test_views_md_lists_every_contract_view_with_its_columns(tmp_path):
    """docs/views.md is the views' contract: each view's columns, names and types, in order."""
    import re

    from healthdelta import warehouse

    text = (ROOT / "docs" / "views.md").read_text(encoding="utf-8")
    documented: dict[str, list[tuple[str, str]]] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        name = re.match(r"`(\w+)`", section).group(1)
        documented[name] = re.findall(r"^\| (\w+) \| ([A-Z][A-Z ]*[A-Z]) \|", section, flags=re.M)
    con = warehouse.connect(tmp_path / "w.duckdb")
    try:
        con.execute("BEGIN TRANSACTION")
        warehouse._ensure_schema(con)
        con.execute("COMMIT")
        for name, columns in documented.items():
            assert name in warehouse.VIEWS, name
            actual = [(c[0], c[1]) for c in con.execute(f"DESCRIBE {name}").fetchall()]
            assert actual == columns, name
    finally:
        con.close()
    assert {"daily_steps", "sleep_per_night", "lab_results_latest", "quantity_samples"} <= set(documented)
