"""`identity review --json|--show-names` and `report show --json` through the CLI."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from healthdelta import identity, report

from conftest import assert_one_error_line
from test_identity import _assert_no_pii, family, run_cli  # noqa: F401  (family is a fixture)


def _built_state(family, tmp_path):  # noqa: F811
    export, runs = family
    state = tmp_path / "my state"  # a path the printed commands must quote
    args = [a for d, _ in runs for a in ("--run", str(d))]
    assert run_cli("identity", "build", *args, "--state", str(state), cwd=tmp_path).returncode == 0
    return export, state


def test_review_json_is_share_safe_and_its_confirm_commands_run_as_printed(family, tmp_path):  # noqa: F811
    export, state = _built_state(family, tmp_path)
    proc = run_cli("identity", "review", "--state", str(state), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _assert_no_pii(proc.stdout + proc.stderr, export.people)
    doc = json.loads(proc.stdout)
    assert sorted(doc) == ["links", "needs_review", "people", "provisional_runs"]
    assert len(doc["people"]) == 3 and all("names" not in p for p in doc["people"])
    by_state = {}
    for link in doc["links"]:
        by_state.setdefault(link["state"], []).append(link)
        assert "names" not in link and link["based_on"] and "unknown" not in link["based_on"]
        assert (link["confirm_command"] is not None) == (link["state"] == "unverified")
    assert {"unverified", "conflict"} <= set(by_state)
    assert all("name" in link["based_on"] for link in by_state["unverified"])
    assert all(set(link["based_on"]) & {"identifier", "healthkit_samples"} for link in by_state.get("verified", []))
    assert doc["needs_review"] == len(by_state["unverified"]) + len(by_state["conflict"])
    # The printed command, run as printed from the same directory, confirms the link.
    link = by_state["unverified"][0]
    argv = shlex.split(link["confirm_command"])
    assert argv[:3] == ["healthdelta", "identity", "confirm"]
    code = "import sys; from healthdelta.cli import main; main(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, *argv[1:]], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "state=user_confirmed" in done.stdout, done.stderr
    links = json.loads((state / "identity" / "links.json").read_text())["links"]
    assert links[link["link_id"]]["state"] == "user_confirmed"
    text = run_cli("identity", "review", "--state", str(state), cwd=tmp_path).stdout
    _assert_no_pii(text, export.people)
    assert "BASED_ON" in text and link["link_id"] not in text.split("TO CONFIRM")[-1]


def test_review_show_names_shows_what_each_link_rests_on(family, tmp_path):  # noqa: F811
    export, state = _built_state(family, tmp_path)
    proc = run_cli("identity", "review", "--state", str(state), "--json", "--show-names", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    owner = export.people[0]
    owner_row = next(p for p in doc["people"] if p["owns_runs"])
    assert owner.full_name in owner_row["names"] and owner_row["birth_dates"] == [owner.birth_date]
    planted = {p.full_name for p in export.people}
    for link in doc["links"]:
        assert set(link["names"]) & planted, link  # every link names who it is about
        if "birth_date" in link["based_on"] and link["state"] != "conflict":
            assert link["birth_dates"]
    text = run_cli("identity", "review", "--state", str(state), "--show-names", cwd=tmp_path).stdout
    assert owner.full_name in text and f"born {owner.birth_date}" in text


def test_show_names_is_refused_for_a_share_mode_state(family, tmp_path):  # noqa: F811
    export, state = _built_state(family, tmp_path)
    run_id = "a" * 64
    (state / "runs.json").write_text(json.dumps({"runs": {run_id: {"run_id": run_id, "mode": "share"}}}))
    for extra in ([], ["--json"]):
        proc = run_cli("identity", "review", "--state", str(state), "--show-names", *extra, cwd=tmp_path)
        line = assert_one_error_line(proc, code=2)
        assert "share-mode" in line
        _assert_no_pii(proc.stdout + proc.stderr, export.people)


def test_report_show_json(tmp_path):
    from test_warehouse import PHONE, _row, write_run

    from healthdelta import warehouse

    db = tmp_path / "w.duckdb"
    first = {"observations": [_row(f"k{i}", f"2024-05-0{i}T08:00:00", f"2024-05-0{i}T08:10:00", PHONE, i)
                              for i in range(1, 4)]}
    second = {"observations": [_row("k9", "2024-05-09T08:00:00", "2024-05-09T08:10:00", PHONE, 9)]}
    warehouse.load_run(db, write_run(tmp_path, "r1", None, first), {"run_id": "r1"})
    warehouse.load_run(db, write_run(tmp_path, "r2", "r1", second, removed={"observations": first["observations"][:1]}),
                       {"run_id": "r2", "parent_run_id": "r1"})
    code = "import sys; from healthdelta.cli import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, "report", "show", "--db", str(db), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc == report.show_data(db)
    assert (doc["runs"], doc["tables"]["observations"], doc["removed_total"]) == (2, 4, 1)
    assert (doc["first_date"], doc["last_date"]) == ("2024-05-02", "2024-05-09")  # the removed day left out
    since = doc["since"]
    assert (since["run_id"], since["parent_run_id"]) == ("r2", "r1")
    assert (since["added"]["observations"], since["removed"]["observations"]) == (1, 1)
    lines = report.show(db)
    assert lines[0].startswith("records: 4 ") and f"people: {len(doc['people'])}" in lines
    empty = tmp_path / "empty.duckdb"
    import duckdb
    duckdb.connect(str(empty)).close()
    proc = subprocess.run([sys.executable, "-c", code, "report", "show", "--db", str(empty), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["runs"] == 0


@pytest.mark.parametrize("reason,by_identifier,basis", [
    ("same_identifier", True, ("identifier",)),
    ("same_identifier", False, ("healthkit_samples",)),  # same phone store, no shared identifier
    ("same_name", True, ("name",)),
    ("same_name_birth_date", True, ("name", "birth_date")),
    ("identifier_birth_date_conflict", True, ("identifier", "birth_date")),
    ("ambiguous_name", True, ("name",)),
    ("something_new", True, ("unknown",)),
])
def test_link_basis(reason, by_identifier, basis):
    assert identity.link_basis(reason, by_identifier) == basis
