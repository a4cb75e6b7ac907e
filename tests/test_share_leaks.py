"""Share mode against a hostile reviewer (issue 10): identifiers planted where de-identifiers
tend to miss them (tests/leak_corpus.py) must not reach any share artifact, the warehouse,
the bundle or the command output; the bundle builds for ordinary exports and refuses a
planted name, naming the file and the kind, never the value."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import duckdb
import pytest

import leak_corpus as corpus
from conftest import SHARED_FIXTURE, Cli, assert_one_error_line, kv, stream_bytes, stream_path
from healthdelta import demo, share, streamfile, synth

pytestmark = pytest.mark.slow

SHARE_FOLDERS = ("deid", "ndjson", "reports")


def _texts(out: Path, procs) -> dict[str, str]:
    """Everything a share run left outside the local-only folders (staging, state), the
    warehouse's rows, and the commands' output."""
    texts = {f"output of {i}": p.stdout + p.stderr for i, p in enumerate(procs)}
    for folder in SHARE_FOLDERS:
        for path in sorted((out / folder).rglob("*")):
            if path.is_file():
                data = streamfile.read_bytes(path)  # compressed streams as their plain text
                if path.suffix == ".html":
                    data = share.without_vendor_code(data)
                texts[path.relative_to(out).as_posix()] = data.decode("utf-8", "replace")
                texts["name of " + path.relative_to(out).as_posix()] = path.relative_to(out).as_posix()
    con = duckdb.connect(str(out / "warehouse.duckdb"), read_only=True)
    try:
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            rows = con.execute(f'SELECT * FROM "{table}"').fetchall()
            texts[f"warehouse {table}"] = "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in rows)
    finally:
        con.close()
    return texts


def _share_run(root: Path, *flags: str, export_xml_only: bool = False):
    """(out, run_id, texts, bundle and verify outputs) of the corpus through `run all --mode share`."""
    corpus.write_export(root / "in", export_xml_only=export_xml_only)
    cli = Cli(root)
    out = root / "data"
    run = cli("run", "all", "--input", str(root / "in"), "--out", str(out), "--mode", "share", *flags, check=True)
    run_id = kv(run.stdout)["run_id"]
    # A refused bundle is the scan agreeing that something leaked: the class tests say what.
    bundle = cli("share", "bundle", "--run", run_id, "--out", str(root / "share.tar.gz"), "--out-dir", str(out))
    procs = [run, bundle]
    if bundle.returncode == 0:
        procs.append(cli("share", "verify", "--bundle", str(root / "share.tar.gz")))
    texts = _texts(out, procs)
    if bundle.returncode == 0:
        for name, data in share.iter_members(root / "share.tar.gz"):
            texts[f"bundle {name}"] = share.without_vendor_code(data).decode("utf-8", "replace")
    return out, run_id, texts, procs[1:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The corpus through `run all --mode share`: plain, and with --date-shift and coarse routes."""
    plain = _share_run(tmp_path_factory.mktemp("plain"))
    shifted = _share_run(tmp_path_factory.mktemp("shifted"), "--date-shift", "--keep-routes", "coarse")
    return {"plain": plain, "shifted": shifted}


def _leaks(texts: dict[str, str], classes) -> list[str]:
    return sorted({f"{cls} in {where}" for where, text in texts.items() for cls, _ in corpus.find_leaks(text, classes)})


@pytest.mark.parametrize("leak_class", sorted(c for c in corpus.PLANTED if c[:2] != "17"))
def test_planted_class_never_leaks(runs, leak_class):
    for mode, (_, _, texts, _) in runs.items():
        assert _leaks(texts, {leak_class: corpus.PLANTED[leak_class]}) == [], mode


@pytest.mark.parametrize("mode", ["plain", "shifted"])
def test_the_corpus_bundle_builds_and_verifies(runs, mode):
    bundle, *verify = runs[mode][3]
    assert bundle.returncode == 0, bundle.stderr
    assert verify and verify[0].returncode == 0 and verify[0].stdout.strip() == "ok"


def test_owner_named_only_by_a_device_is_scrubbed(tmp_path):
    """Class 17: an export.xml without clinical records; the store learns the owner's name from
    `iPhone d’Rosalind` and scrubs it from a note too."""
    _, _, texts, (bundle, *_) = _share_run(tmp_path, export_xml_only=True)
    assert bundle.returncode == 0, bundle.stderr
    assert _leaks(texts, {"17": corpus.PLANTED["17_device_only_name"]}) == []
    assert any("Patient 1" in t for t in texts.values())


def test_the_corpus_is_planted_in_the_raw_export(tmp_path):
    """The hostile reader finds every planted value in the export itself (a test that cannot fail is no test)."""
    corpus.write_export(tmp_path / "in")
    raw = "\n".join(p.read_text(encoding="utf-8") + p.name for p in (tmp_path / "in").rglob("*") if p.is_file())
    missing = [(c, v) for c, values in corpus.PLANTED.items() if c[:2] != "17" for v in values
               if (c, v) not in corpus.find_leaks(raw, {c: (v,)})]
    assert missing == []
    corpus.write_export(tmp_path / "xml", export_xml_only=True)
    xml = (tmp_path / "xml" / "apple_health_export" / "export.xml").read_text(encoding="utf-8")
    assert corpus.find_leaks(xml, {"17": corpus.PLANTED["17_device_only_name"]})


def test_ages_over_89_are_aggregated(runs):
    """Class 13 in numbers: no age above 90 and no birth year of someone over 89."""
    for _, _, texts, _ in runs.values():
        for where, text in texts.items():
            ages = re.findall(r'"(?:valueAge|ageAge)":\s*\{[^}]*"value":\s*(\d+)', text)
            assert all(int(a) <= 90 for a in ages), where


_PRECISE_COORDINATE = re.compile(r"(?<![\d.])-?(?:45\.5|122\.6)\d{2,}")


def test_routes_drop_or_stay_coarse(runs):
    """Classes 5 and 19: no coordinate finer than 0.01 degree; with drop no coordinate at all."""
    for mode, (_, _, texts, _) in runs.items():
        for where, text in texts.items():
            assert not _PRECISE_COORDINATE.search(text), (mode, where)
    assert not any("45.53" in t for w, t in runs["plain"][2].items() if not w.startswith("output"))
    assert any("45.53" in t for t in runs["shifted"][2].values())


def test_date_shift_leaves_no_real_date_or_zone(runs):
    _, _, texts, _ = runs["shifted"]
    assert _leaks(texts, {"real": corpus.REAL_DATES}) == []
    for where, text in texts.items():
        assert not re.search(r"[+-]0[78]:?00\b", text), where  # the Pacific offsets would date the shift


def test_share_summaries_hold_no_wall_clock_time(runs):
    for _, (out, run_id, _, _) in runs.items():
        summary = json.loads((out / "reports" / run_id / "summary.json").read_text())
        assert summary["since_last_run"]["created_at"] is None


def test_mixing_shifted_and_unshifted_runs_is_refused(runs, tmp_path):
    out = runs["shifted"][0]
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    synth.generate_export(tmp_path / "next", seed=3, records=50)
    proc = Cli(tmp_path)("run", "all", "--input", str(tmp_path / "next"), "--out", str(copy), "--mode", "share")
    line = assert_one_error_line(proc, 2)
    assert "--date-shift" in line


# --------------------------------------------------------------------------- the bundle


@pytest.mark.parametrize("source", ["demo", "apple-sample"])
def test_bundle_builds_and_verifies_for_ordinary_exports(source, tmp_path):
    """The demo's two generated exports (its seed and sizes) and Apple's sample, in share mode."""
    if source == "demo":
        first = synth.generate_export(tmp_path / "in-1", seed=demo.DEMO_SEED, records=demo.DEMO_RECORDS, people=2)
        second = synth.generate_export(tmp_path / "in-2", base=first, new_records=demo.DEMO_NEW_RECORDS)
        exports = [first.root, second.root]
    else:
        exports = [SHARED_FIXTURE / "export.zip"]
    cli = Cli(tmp_path)
    for export_root in exports:
        run = cli("run", "all", "--input", str(export_root), "--out", str(tmp_path / "data"), "--mode", "share",
                  check=True)
    run_id = kv(run.stdout)["run_id"]
    bundle = cli("share", "bundle", "--run", run_id, "--out", str(tmp_path / "b.tar.gz"), "--out-dir",
                 str(tmp_path / "data"))
    assert bundle.returncode == 0, bundle.stderr
    names = [n for n, _ in share.iter_members(tmp_path / "b.tar.gz")]
    assert any(n.endswith("reports/report.html") for n in names)
    assert cli("share", "verify", "--bundle", str(tmp_path / "b.tar.gz"), check=True).stdout.strip() == "ok"


def _planted_bundle(runs, tmp_path, rel: str, change) -> tuple[Path, str]:
    out, run_id = runs["plain"][:2]
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    path = copy / rel.format(run_id=run_id)
    if streamfile.stream_name(path):  # planted in the stored stream, whichever form it has
        with streamfile.StreamWriter(stream_path(path)) as out_file:
            out_file.write(change(stream_bytes(path)))
    else:
        path.write_bytes(change(path.read_bytes()))
    return copy, run_id


@pytest.mark.parametrize("rel, change, kind", [
    ("ndjson/{run_id}/observations.ndjson",
     lambda b: b.replace(b'"Patient 1"', b'"Patient 1 (Ingrid D\\u2019Angelo)"', 1), "name"),
    ("reports/{run_id}/report.html", lambda b: b.replace(b"</body>", b"<p>&#73;ngrid</p></body>", 1), "name"),
    ("reports/{run_id}/report.html", lambda b: b.replace(b"</body>", b"<p>I.E.D.</p></body>", 1), "name"),
    ("reports/{run_id}/summary.json", lambda b: b.replace(b"{", b'{"dob": "05 May 1994", ', 1), "birth_date"),
    ("ndjson/{run_id}/documents.ndjson",
     lambda b: re.sub(rb'"data":"[^"]*"', b'"data":"' + base64.b64encode(b"<p>seen: Ingrid</p>") + b'"', b, 1),
     "name"),
    # A changed copy of the vendor script is no longer the pinned one: it is scanned like any data.
    ("reports/{run_id}/report.html", lambda b: b.replace(b"</script>", b"/*Ingrid*/</script>", 1), "name"),
])
def test_bundle_refuses_a_planted_identifier_naming_file_and_kind_only(runs, tmp_path, rel, change, kind):
    out, run_id = _planted_bundle(runs, tmp_path, rel, change)
    proc = Cli(tmp_path)("share", "bundle", "--run", run_id, "--out", str(tmp_path / "b.tar.gz"), "--out-dir",
                         str(out))
    line = assert_one_error_line(proc, 1)
    assert f"({kind})" in line and rel.split("/", 2)[2] in line
    assert not corpus.find_leaks(line) and str(tmp_path) not in line
    assert not (tmp_path / "b.tar.gz").exists()


def test_report_vendor_code_is_checked_by_hash_not_scanned(runs):
    out, run_id = runs["plain"][:2]
    html_bytes = (out / "reports" / run_id / "report.html").read_bytes()
    stripped = share.without_vendor_code(html_bytes)
    assert len(stripped) < len(html_bytes) // 10  # the plotly.js copy is most of the file
    assert b"Plotly.newPlot" in stripped or b"newPlot" in stripped  # the figures' data stays and is scanned
