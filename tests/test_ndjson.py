import hashlib
from pathlib import Path

from hypothesis import given, strategies as st

from healthdelta.delta import write_stream
from healthdelta.keys import occurrence_key
from healthdelta.ndjson import JSON_START, SpillWriter, decode_line, encode_row, merge_stream, sort_key

RUN = "r" * 64


def key(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def row(n: int, t: str | None, **extra):
    return {"record_key": key(n), "event_time": t, "source": "healthkit", "source_file": "export.xml", **extra}


def test_sort_key_orders_by_time_not_characters():
    times = ["2024-01-01T00:00:00.5Z", "2024-01-01T00:00:00Z", "2023-12-31T23:59:59.999Z", None]
    assert sorted(times, key=lambda t: sort_key(t)) == [None, "2023-12-31T23:59:59.999Z",
                                                        "2024-01-01T00:00:00Z", "2024-01-01T00:00:00.5Z"]


@given(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(-2**53, 2**53), st.text(), st.none(),
                                                       st.booleans()), max_size=6))
def test_encode_round_trip(obj):
    line = encode_row(obj)
    assert b"\n" not in line and decode_line(line) == obj and encode_row(decode_line(line)) == line


def _merged(tmp_path: Path, rows, spill_rows=2):
    import healthdelta.ndjson as nd

    old = nd.SPILL_ROWS
    nd.SPILL_ROWS = spill_rows
    try:
        w = SpillWriter(tmp_path, RUN, "person", prefix="t")
        for stream, r in rows:
            w.add(stream, dict(r))
        spills = w.close()
    finally:
        nd.SPILL_ROWS = old
    return list(merge_stream(spills.get("observations", [])))


def test_merge_sorts_and_completes_rows(tmp_path):
    rows = [("observations", row(i, f"2024-01-0{1 + i % 3}T00:00:00Z")) for i in range(7)]
    merged = _merged(tmp_path, rows)
    decoded = [decode_line(m[JSON_START:]) for m in merged]
    assert [(d["event_time"], d["record_key"]) for d in decoded] == sorted(
        (d["event_time"], d["record_key"]) for d in decoded)
    assert all(d["run_id"] == RUN and d["schema_version"] == 1 and d["canonical_person_id"] == "person"
               for d in decoded)
    assert len(decoded) == 7


def test_nested_twin_dropped_exact_duplicates_get_occurrence_keys(tmp_path):
    t = "2024-01-01T00:00:00Z"
    rows = [
        ("observations", row(1, t, _nested=True)),   # correlation child ...
        ("observations", row(1, t)),                 # ... and its top-level twin: counted once
        ("observations", row(2, t, _nested=True)),   # child without a twin: kept
        ("observations", row(3, t)),
        ("observations", row(3, t)),                 # a real duplicate sample: both kept
    ]
    decoded = [decode_line(m[JSON_START:]) for m in _merged(tmp_path, rows)]
    keys = [d["record_key"] for d in decoded]
    assert sorted(keys) == keys and len(set(keys)) == 4
    assert set(keys) == {key(1), key(2), key(3), occurrence_key(key(3), 1)}
    assert all("_nested" not in d for d in decoded)


def test_stream_delta_merge_join(tmp_path):
    def run(name, numbers, parent=None):
        folder = tmp_path / name
        folder.mkdir()
        merged = _merged(folder, [("observations", row(i, f"2024-01-0{1 + i % 5}T00:00:00Z")) for i in numbers])
        files = {k: open(folder / k, "wb") for k in ("rows", "index", "added", "removed")}
        with files["rows"], files["index"], files["added"], files["removed"]:
            counts = write_stream(merged, files["rows"], files["index"], files["added"], files["removed"],
                                  parent / "rows" if parent else None, parent / "index" if parent else None)
        return folder, counts

    first, counts = run("a", range(10))
    assert counts == (10, 10, 0)
    assert len((first / "index").read_bytes().splitlines()) == 10
    # next export: rows 0..9 minus 4 and 7, plus 10..12
    second, counts = run("b", [i for i in range(13) if i not in (4, 7)], parent=first)
    added = {decode_line(x)["record_key"] for x in (second / "added").read_bytes().splitlines()}
    removed = {decode_line(x)["record_key"] for x in (second / "removed").read_bytes().splitlines()}
    assert added == {key(10), key(11), key(12)} and removed == {key(4), key(7)}
    assert counts == (11, 3, 2)
