"""Parse reuse across exports (reuse.py): the NDJSON of a run that reused chunks of its
delta base is byte for byte the NDJSON of a fresh parse, whatever changed between the
two exports, and reuse really happens where nothing changed."""

from __future__ import annotations

import filecmp
import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthdelta import export, parse, pipeline, reuse
from healthdelta.parse.healthkit import plan_chunks

RUN_A = "a" * 64
RUN_B = "b" * 64
PERSON = "patient-1"
TYPES = ("HKQuantityTypeIdentifierHeartRate", "HKQuantityTypeIdentifierStepCount",
         "HKCategoryTypeIdentifierSleepAnalysis")


def record(type_: str, n: int, pointer: int, value: int | None = None) -> str:
    """One Record as Apple writes it; every third with metadata (a multi-line element)."""
    day, minute = divmod(n, 1440)
    start = f"2024-{1 + day // 28:02d}-{1 + day % 28:02d} {minute // 60:02d}:{minute % 60:02d}:00 -0800"
    device = f"&lt;&lt;HKDevice: 0x{pointer:x}&gt;, name:Apple Watch, model:Watch&gt;"
    head = (f' <Record type="{type_}" sourceName="Watch" device="{device}" unit="count" '
            f'creationDate="{start}" startDate="{start}" endDate="{start}" value="{n if value is None else value}"')
    if n % 3:
        return head + "/>\n"
    return head + f'>\n  <MetadataEntry key="HKWasUserEntered" value="{n % 2}"/>\n </Record>\n'


def export_text(groups: dict[str, list[str]], export_date: str = "2024-03-01 09:15:02 -0800") -> str:
    body = "".join(line for type_ in TYPES for line in groups.get(type_, []))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE HealthData [\n<!ELEMENT HealthData ANY>\n]>\n'
            f'<HealthData locale="en_US">\n <ExportDate value="{export_date}"/>\n'
            ' <Me HKCharacteristicTypeIdentifierBiologicalSex="HKBiologicalSexFemale"/>\n'
            f'{body}</HealthData>\n')


def groups_of(counts: dict[str, int], rnd: random.Random) -> dict[str, list[str]]:
    return {t: [record(t, n, rnd.getrandbits(36)) for n in range(counts[t])] for t in TYPES}


def staged(root: Path, xml: str) -> Path:
    (root / "source").mkdir(parents=True)
    (root / "source" / "export.xml").write_text(xml, encoding="utf-8")
    (root / "layout.json").write_text(json.dumps({"export_xml": "source/export.xml"}))
    return root


def first_run(tmp: Path, xml: str, out: Path) -> Path:
    export.export_run(staged(tmp / "A", xml), out, run_id=RUN_A, parent_run_id=None, person_id=PERSON,
                      chunk_bytes=4096)
    return out / RUN_A


def two_exports(tmp: Path, first: str, second: str, chunk_bytes: int, workers: int = 1) -> tuple[Path, Path]:
    """NDJSON of `second` with `first` as delta base: once reusing `first`'s chunks and
    key index, once parsed fresh against a retired copy of the same base (no cache, no
    index: the delta reads the base's rows)."""
    reused, fresh = tmp / "reused", tmp / "fresh"
    a, b = staged(tmp / "A", first), staged(tmp / "B", second)
    export.export_run(a, reused, run_id=RUN_A, parent_run_id=None, person_id=PERSON,
                      chunk_bytes=chunk_bytes, workers=workers)
    shutil.copytree(reused / RUN_A, fresh / RUN_A)
    export.retire(fresh / RUN_A)
    assert not (fresh / RUN_A / "index").exists() and not (fresh / RUN_A / reuse.CACHE_DIR).exists()
    for out in (reused, fresh):
        export.export_run(b, out, run_id=RUN_B, parent_run_id=RUN_A, person_id=PERSON,
                          chunk_bytes=chunk_bytes, workers=workers)
    return reused / RUN_B, fresh / RUN_B


def canonical_files(run: Path) -> list[Path]:
    """Everything of a run's NDJSON but its cache and the reuse figures."""
    return sorted(p.relative_to(run) for p in run.rglob("*")
                  if p.is_file() and reuse.CACHE_DIR not in p.relative_to(run).parts and p.name != "reuse.json")


def assert_same_ndjson(a: Path, b: Path) -> None:
    files = canonical_files(a)
    assert files == canonical_files(b)
    assert any(f.name.startswith("observations.ndjson") for f in files)
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def reuse_figures(run: Path) -> dict:
    return json.loads((run / "reuse.json").read_text())


def test_pointer_rewrites_and_appended_samples_reuse_all_other_chunks(tmp_path: Path) -> None:
    rnd = random.Random(1)
    counts = {t: 400 for t in TYPES}
    first = groups_of(counts, rnd)
    # The next export: every device pointer new, samples added at the end of each type.
    second = {t: [record(t, n, rnd.getrandbits(36)) for n in range(counts[t] + 25)] for t in TYPES}
    reused, fresh = two_exports(tmp_path, export_text(first), export_text(second, "2024-04-01 09:00:00 -0700"),
                                chunk_bytes=4096)
    assert_same_ndjson(reused, fresh)
    figures = reuse_figures(reused)
    # Parsed again: the head (new ExportDate), and per type group its last chunk and the
    # new samples' (25 x ~250 bytes: two chunks of 4 KB); every other chunk is reused.
    assert figures["chunks"] > 80
    assert figures["chunks"] - figures["reused_chunks"] <= 1 + 3 * len(TYPES)
    assert reuse_figures(fresh)["reused_chunks"] == 0
    delta = json.loads((reused / "delta.json").read_text())
    assert delta["added"] == 25 * len(TYPES) and delta["removed"] == 0


def test_edits_at_and_around_chunk_boundaries(tmp_path: Path) -> None:
    """The record a cut falls before deleted, a record inserted right at a cut, the last
    record before a cut changed, one record duplicated: each costs the chunks around it,
    never a wrong row."""
    rnd = random.Random(2)
    first = groups_of({t: 300 for t in TYPES}, rnd)
    xml_a = export_text(first)
    where: dict[int, tuple[str, int]] = {}  # byte offset of each record -> (type, index)
    for t in TYPES:
        for i, line in enumerate(first[t]):
            where[len(xml_a[:xml_a.index(line)].encode())] = (t, i)
    staged(tmp_path / "probe", xml_a)
    cuts = [start for start, _ in plan_chunks(tmp_path / "probe" / "source" / "export.xml", 4096, 256)]
    at = [where[c] for c in cuts if c in where]
    assert len(at) > 20  # cuts fall before records
    second = {t: list(v) for t, v in first.items()}
    (t1, i1), (t2, i2), (t3, i3), (t4, i4) = at[3], at[8], at[13], at[18]
    del second[t1][i1]
    second[t2].insert(i2, record(t2, 99_999, 7))
    second[t3][i3 - 1] = record(t3, i3 - 1, 5, value=7)
    second[t4].insert(i4, second[t4][i4])  # an exact duplicate (occurrence keys)
    assert sum(map(len, second.values())) == sum(map(len, first.values())) + 1
    reused, fresh = two_exports(tmp_path, xml_a, export_text(second), chunk_bytes=4096)
    assert_same_ndjson(reused, fresh)
    figures = reuse_figures(reused)
    assert figures["chunks"] - 12 <= figures["reused_chunks"] < figures["chunks"]


def test_several_tasks_and_any_chunking_give_the_same_streams(tmp_path: Path, monkeypatch) -> None:
    """Chunks grouped into several parse tasks, or one chunk for everything: the streams
    do not depend on where the file was cut."""
    rnd = random.Random(3)
    xml = export_text(groups_of({t: 250 for t in TYPES}, rnd))
    monkeypatch.setattr(parse, "RANGE_BYTES", 20_000)
    outs = []
    for i, (chunk_bytes, workers) in enumerate(((2048, 2), (1 << 30, 1), (700, 1))):
        run = staged(tmp_path / f"in{i}", xml)
        out = tmp_path / f"out{i}"
        export.export_run(run, out, run_id=RUN_A, parent_run_id=None, person_id=PERSON,
                          chunk_bytes=chunk_bytes, workers=workers)
        outs.append(out / RUN_A)
    assert reuse_figures(outs[0])["chunks"] > 10 and reuse_figures(outs[1])["chunks"] == 1
    for other in outs[1:]:
        for rel in canonical_files(outs[0]):
            if rel.name != "export_report.json":
                assert filecmp.cmp(outs[0] / rel, other / rel, shallow=False), rel


@pytest.mark.parametrize("damage", ["index", "frame", "version", "missing"])
def test_a_damaged_cache_means_parsing_again(tmp_path: Path, damage: str) -> None:
    rnd = random.Random(4)
    first = export_text(groups_of({t: 200 for t in TYPES}, rnd))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    first_run(tmp_path, first, out)
    b = staged(tmp_path / "B", first.replace("0x", "0x1"))
    shutil.copytree(out / RUN_A, fresh / RUN_A)
    export.retire(fresh / RUN_A)
    cache = out / RUN_A / reuse.CACHE_DIR
    frames = next(p for p in cache.iterdir() if p.suffix == ".zst")
    if damage == "index":
        (cache / reuse.INDEX).write_text("{not json")
    elif damage == "frame":
        frames.write_bytes(frames.read_bytes()[: frames.stat().st_size // 2])
    elif damage == "version":
        # An index of another format (an older release) is not read.
        doc = json.loads((cache / reuse.INDEX).read_text())
        doc["version"] = reuse.INDEX_VERSION - 1
        (cache / reuse.INDEX).write_text(json.dumps(doc))
    else:
        frames.unlink()
    for o in (out, fresh):
        export.export_run(b, o, run_id=RUN_B, parent_run_id=RUN_A, person_id=PERSON, chunk_bytes=4096)
    assert_same_ndjson(out / RUN_B, fresh / RUN_B)
    figures = reuse_figures(out / RUN_B)
    if damage == "frame":
        assert 0 < figures["reused_chunks"] < figures["chunks"]
    else:
        assert figures["reused_chunks"] == 0


def test_frames_hold_no_run_id_and_a_doubtful_line_count_is_a_miss(tmp_path: Path) -> None:
    """A frame is the same bytes whichever run parsed its chunk; a frame whose lines do
    not hold the run id field exactly once each is never reused (nor stored)."""
    from healthdelta.parse.report import ParseReport

    def line(run_id: str, extra: str = "") -> bytes:
        return b'0000\tk\t-\t{"extra":{%s},"record_key":"k","run_id":"%s"}\n' % (extra.encode(), run_id.encode())

    frames = {}
    for run in (RUN_A, RUN_B):
        cache_dir = tmp_path / run / reuse.CACHE_DIR
        cache_dir.parent.mkdir()
        writer = reuse.ChunkWriter(cache_dir, "t.zst")
        writer.add("ok", ParseReport(), {"observations": [line(run), line(run)]}, run)
        writer.add("twice", ParseReport(), {"observations": [line(run, f'"run_id":"{run}"')]}, run)
        reuse.write_index(cache_dir, writer.close())
        frames[run] = (cache_dir / "t.zst").read_bytes()
    assert frames[RUN_A] == frames[RUN_B]
    cache = reuse.ChunkCache.open(tmp_path / RUN_A)
    assert set(cache.entries) == {"ok"}
    hit = cache.get("ok", "c" * 64)
    assert hit is not None and hit.lines == {"observations": [line("c" * 64)] * 2}


def test_another_person_or_file_name_never_reuses(tmp_path: Path) -> None:
    rnd = random.Random(5)
    xml = export_text(groups_of({t: 100 for t in TYPES}, rnd))
    out = tmp_path / "out"
    first_run(tmp_path, xml, out)
    export.export_run(staged(tmp_path / "B", xml), out, run_id=RUN_B, parent_run_id=RUN_A, person_id="patient-2",
                      chunk_bytes=4096)
    assert reuse_figures(out / RUN_B)["reused_chunks"] == 0
    export.export_run(staged(tmp_path / "C", xml.replace("<HealthData", "<!-- x -->\n<HealthData")), out,
                      run_id="c" * 64, parent_run_id=RUN_B, person_id="patient-2", chunk_bytes=4096)
    assert reuse_figures(out / ("c" * 64))["reused_chunks"] == reuse_figures(out / RUN_B)["chunks"]


def test_a_retired_run_still_exports_its_index_byte_for_byte(tmp_path: Path) -> None:
    rnd = random.Random(6)
    xml = export_text(groups_of({t: 150 for t in TYPES}, rnd))
    out = tmp_path / "out"
    first_run(tmp_path, xml, out)
    export.plain_copy(out / RUN_A, tmp_path / "before")
    export.retire(out / RUN_A)
    assert sorted(p.name for p in out.iterdir()) == [RUN_A]  # nothing left behind
    export.plain_copy(out / RUN_A, tmp_path / "after")
    before, after = tmp_path / "before" / RUN_A, tmp_path / "after" / RUN_A
    assert any((before / "index").iterdir())
    assert_same_ndjson(before, after)


def test_every_file_of_a_real_export_reuses_and_equals_a_fresh_parse(tmp_path: Path) -> None:
    """A generated export and its next one, staged as `run all` stages them: the unchanged
    GPX, ECG and FHIR files are reused whole (route points linked, not copied), and the
    NDJSON, route points included, is byte for byte a fresh parse's."""
    from healthdelta import synth

    first = synth.generate_export(tmp_path / "e1", seed=43, records=2000)
    second = synth.generate_export(tmp_path / "e2", base=first, new_records=30)
    (_, a), (_, b) = (pipeline.ingest_only(e.root, tmp_path / "staging") for e in (first, second))
    reused, fresh = tmp_path / "reused", tmp_path / "fresh"
    export.export_run(a, reused, run_id=RUN_A, parent_run_id=None, person_id=PERSON)
    shutil.copytree(reused / RUN_A, fresh / RUN_A)
    export.retire(fresh / RUN_A)
    for out in (reused, fresh):
        export.export_run(b, out, run_id=RUN_B, parent_run_id=RUN_A, person_id=PERSON)
    assert_same_ndjson(reused / RUN_B, fresh / RUN_B)
    layout = json.loads((b / "layout.json").read_text())
    files = sum(len(layout.get(k, [])) for k in ("clinical_json", "ecg_csv", "workout_route_gpx"))
    assert files >= 20
    # export.xml and export_cda.xml grow with the new records; every other file is reused.
    figures = reuse_figures(reused / RUN_B)
    assert figures["reused_chunks"] >= files and reuse_figures(fresh / RUN_B)["reused_chunks"] == 0
    points = sorted((reused / RUN_B / "local" / "route_points").iterdir())
    assert points and all(p.samefile(reused / RUN_A / "local" / "route_points" / p.name) for p in points)


# One edit of a random export: where, what, and how the file is cut.
_edit = st.tuples(st.sampled_from(["insert", "delete", "change", "duplicate", "pointer"]),
                  st.sampled_from(TYPES), st.floats(0, 1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(counts=st.fixed_dictionaries({t: st.integers(0, 60) for t in TYPES}),
       edits=st.lists(_edit, max_size=6), chunk_bytes=st.integers(300, 3000), seed=st.integers(0, 2**32))
def test_reuse_equals_a_fresh_parse_after_random_edits(tmp_path_factory, counts, edits, chunk_bytes, seed) -> None:
    rnd = random.Random(seed)
    first = groups_of(counts, rnd)
    second = {t: list(v) for t, v in first.items()}
    for kind, type_, where in edits:
        lines = second[type_]
        i = int(where * len(lines))
        if kind == "insert":
            lines.insert(i, record(type_, 5000 + i, rnd.getrandbits(36)))
        elif lines and kind == "delete":
            del lines[min(i, len(lines) - 1)]
        elif lines and kind == "change":
            lines[min(i, len(lines) - 1)] = record(type_, min(i, len(lines) - 1), 3, value=rnd.randrange(10**6))
        elif lines and kind == "duplicate":
            lines.insert(i, lines[min(i, len(lines) - 1)])
        elif kind == "pointer":
            second = {t: [line.replace("HKDevice: 0x", "HKDevice: 0xf") for line in v] for t, v in second.items()}
    tmp = tmp_path_factory.mktemp("reuse")
    reused, fresh = two_exports(tmp, export_text(first), export_text(second), chunk_bytes)
    assert_same_ndjson(reused, fresh)
    if first == second:
        assert reuse_figures(reused)["reused_chunks"] == reuse_figures(reused)["chunks"]


@pytest.mark.slow
def test_run_all_reuses_the_previous_run_and_retires_it(cli, tmp_path: Path) -> None:
    """Through the real CLI: the next export reuses the first run's chunks; once it is
    registered the first run's cache and key index are gone, and doctor is content."""
    from healthdelta import synth

    first = synth.generate_export(tmp_path / "e1", seed=41, records=12_000)
    second = synth.generate_export(tmp_path / "e2", base=first, new_records=40)
    out = tmp_path / "out"
    for export_ in (first, second):
        cli("run", "all", "--input", str(export_.export_dir), "--out", str(out), "--progress", "never", check=True)
    runs = pipeline.list_runs(out / "state")
    a, b = (out / r["artifacts"]["ndjson_dir"] for r in runs)
    assert not (a / reuse.CACHE_DIR).exists() and (b / reuse.CACHE_DIR / reuse.INDEX).is_file()
    assert not (a / "index").exists() and (b / "index").is_dir()  # the key index too (delta.py)
    figures = reuse_figures(b)
    assert figures["reused_chunks"] >= 1 and figures["reused_bytes"] > 0
    cli("doctor", "--out", str(out), check=True)
    # Killed while retiring the base (after registration): what was moved away is an
    # orphan doctor names and removes; the runs themselves are complete.
    shutil.copytree(b / reuse.CACHE_DIR, out / "ndjson" / f".tmp-retired-{a.name}-999999999" / reuse.CACHE_DIR)
    assert "orphan_tmp" in cli("doctor", "--out", str(out), "--json").stdout
    cli("doctor", "--out", str(out), "--repair", check=True)
    assert not list((out / "ndjson").glob(".tmp-*"))
    cli("doctor", "--out", str(out), check=True)
