"""Workout-route GPX → one `routes` row per track, points written aside, bad input."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from healthdelta.errors import InputError
from healthdelta.parse.gpx import (
    _NUM,
    CHUNK_BYTES,
    EARTH_RADIUS_M,
    _iter_gpx,
    _read_fast,
    haversine_m,
    iter_gpx,
)
from healthdelta.parse.report import ParseReport

HEAD = """<?xml version="1.0" encoding="UTF-8"?>
<gpx version="1.1" creator="Apple Health Export" xmlns="http://www.topografix.com/GPX/1/1" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <metadata><time>2019-05-12T15:30:18Z</time></metadata>
"""


def _point(lat: float, lon: float, ele: float | None, time: str | None, ext: bool = True) -> str:
    children = ""
    if ele is not None:
        children += f"<ele>{ele}</ele>"
    if time is not None:
        children += f"<time>{time}</time>"
    if ext:
        children += "<extensions><speed>2.5</speed><course>90.0</course><hAcc>3.9</hAcc><vAcc>2.9</vAcc></extensions>"
    return f'   <trkpt lon="{lon}" lat="{lat}">{children}</trkpt>\n'


# An L-shaped walk at the equator: 0.001° east, then 0.001° north.
POINTS = [
    (0.0, 0.0, 10.0, "2019-05-12T15:02:11Z"),
    (0.0, 0.001, 12.5, "2019-05-12T15:02:51Z"),
    (0.001, 0.001, 11.0, "2019-05-12T15:03:31Z"),
]
TRACK = (
    " <trk><name>Route 2019-05-12 3:02pm</name><trkseg>\n"
    + "".join(_point(*p) for p in POINTS)
    + " </trkseg></trk>\n"
)
GOOD = HEAD + TRACK + "</gpx>\n"

# Hand computation: along the equator and along a meridian the great-circle distance is
# R * Δangle (radians), so each leg is R * 0.001 * π / 180.
LEG_M = EARTH_RADIUS_M * 0.001 * math.pi / 180  # ≈ 111.195 m


def _parse(tmp_path: Path, text: str, name: str = "route_2019-05-12.gpx", points_out=None):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    report = ParseReport()
    rows = list(
        iter_gpx(path, report, source_file=f"workout-routes/{path.name}", points_out=points_out)
    )
    return rows, report


def test_route_row(tmp_path):
    out = io.BytesIO()
    rows, report = _parse(tmp_path, GOOD, points_out=out)
    ((stream, row),) = rows
    assert stream == "routes"
    assert row["source"] == "gpx" and row["kind"] == "trk"
    assert row["source_file"] == row["points_file"] == "workout-routes/route_2019-05-12.gpx"
    assert row["name"] == "Route 2019-05-12 3:02pm"
    assert row["point_count"] == 3 and row["segment_count"] == 1
    assert row["distance_m"] == pytest.approx(2 * LEG_M, abs=1e-3)
    assert row["distance_m"] == pytest.approx(222.390, abs=1e-3)
    assert row["elevation_gain_m"] == 2.5 and row["elevation_loss_m"] == 1.5
    assert (row["min_elevation_m"], row["max_elevation_m"]) == (10.0, 12.5)
    assert row["event_time"] == row["start_time"] == "2019-05-12T15:02:11Z"
    assert row["end_time"] == "2019-05-12T15:03:31Z" and row["duration_s"] == 80.0
    assert row["bbox"] == {"min_lat": 0.0, "min_lon": 0.0, "max_lat": 0.001, "max_lon": 0.001}
    assert (
        row["creator"] == "Apple Health Export" and row["metadata_time"] == "2019-05-12T15:30:18Z"
    )
    assert report.elements == {"gpx:point": 3, "gpx:trk": 1}
    assert report.repairs == {} and report.unknown == {}

    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    first = orjson.loads(lines[0])
    assert first == {
        "lat": 0.0,
        "lon": 0.0,
        "ele": 10.0,
        "time": "2019-05-12T15:02:11Z",
        "speed": 2.5,
        "course": 90.0,
        "h_acc": 3.9,
        "v_acc": 2.9,
        "seg": 0,
        "trk": 0,
    }
    # Points are referenced, never inlined in the row.
    assert "0.001" not in json.dumps({k: v for k, v in row.items() if k != "bbox"})


def test_segments_are_not_bridged(tmp_path):
    two = (
        " <trk><name>r</name><trkseg>\n"
        + _point(0.0, 0.0, None, None)
        + _point(0.0, 0.001, None, None)
        + " </trkseg><trkseg>\n"
        + _point(1.0, 1.0, None, None)
        + _point(1.001, 1.0, None, None)
        + " </trkseg></trk>\n"
    )
    ((_, row),) = _parse(tmp_path, HEAD + two + "</gpx>")[0]
    assert row["segment_count"] == 2 and row["point_count"] == 4
    assert row["distance_m"] == pytest.approx(
        2 * LEG_M, abs=1e-3
    )  # no 157 km jump between segments
    assert (
        row["start_time"] is None and row["event_time"] == "2019-05-12T15:30:18Z"
    )  # metadata time


def test_one_row_per_track(tmp_path):
    out = io.BytesIO()
    rows, _ = _parse(
        tmp_path, HEAD + TRACK + TRACK.replace("Route", "Other") + "</gpx>", points_out=out
    )
    assert [row["track_index"] for _, row in rows] == [0, 1]
    assert [orjson.loads(line)["trk"] for line in out.getvalue().splitlines()] == [0, 0, 0, 1, 1, 1]


def test_record_key(tmp_path):
    ((_, a),) = _parse(tmp_path, GOOD, "a/route_1.gpx")[0]
    ((_, b),) = _parse(tmp_path, GOOD, "b/other_name.gpx")[0]
    ((_, c),) = _parse(tmp_path, GOOD.replace('lat="0.001"', 'lat="0.0011"'), "c.gpx")[0]
    assert a["record_key"] == b["record_key"]
    assert a["record_key"] != c["record_key"]


def test_bad_points_are_skipped_and_counted(tmp_path):
    bad = TRACK.replace("</trkseg>", '<trkpt lat="abc" lon="1"/><trkpt lat="95" lon="1"/></trkseg>')
    ((_, row),) = (rows := _parse(tmp_path, HEAD + bad + "</gpx>"))[0]
    assert row["point_count"] == 3 and row["bad_points"] == 2
    assert rows[1].repairs["gpx_bad_point_skipped"] == 2


def test_trailing_content_is_counted(tmp_path):
    ((_, row),) = (result := _parse(tmp_path, GOOD + "<junk/>"))[0]
    assert row["point_count"] == 3
    assert result[1].repairs == {"gpx_trailing_content": 1}


def test_truncated_file_is_recovered(tmp_path):
    cut = GOOD.index("<trkpt", GOOD.index("15:03:31") - 120)
    ((_, row),) = (result := _parse(tmp_path, GOOD[:cut]))[0]
    assert row["point_count"] == 2 and row["distance_m"] == pytest.approx(LEG_M, abs=1e-3)
    assert result[1].repairs["gpx_recovered"] >= 1


def test_entities_are_not_resolved(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    doctype = f'<!DOCTYPE gpx [<!ENTITY xxe SYSTEM "{secret.as_uri()}">]>\n'
    text = GOOD.replace("<gpx ", doctype + "<gpx ", 1).replace("Route 2019", "&xxe; 2019")
    ((_, row),) = _parse(tmp_path, text)[0]
    assert "TOP-SECRET" not in json.dumps(row)


SECRET = "Jane_Doe_home_route"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "not valid XML"),
        (b"Jane Doe was here", "not valid XML"),
        (b'{"lat": 1}', "not valid XML"),
        (b"<html><body>Jane Doe</body></html>", "not GPX"),
    ],
)
def test_bad_input_raises_path_free_input_error(tmp_path, data, expected):
    path = tmp_path / SECRET / f"{SECRET}.gpx"
    path.parent.mkdir()
    path.write_bytes(data)
    with pytest.raises(InputError, match=expected) as info:
        list(iter_gpx(path, ParseReport(), source_file=f"workout-routes/{SECRET}.gpx"))
    for token in ("Jane", "Doe", "home_route", str(tmp_path)):
        assert token not in str(info.value)


@given(
    st.floats(-89, 89),
    st.floats(-179, 179),
    st.floats(-89, 89),
    st.floats(-179, 179),
)
def test_haversine_is_symmetric_and_bounded(lat1, lon1, lat2, lon2):
    d = haversine_m(lat1, lon1, lat2, lon2)
    assert d == pytest.approx(haversine_m(lat2, lon2, lat1, lon1), abs=1e-6)
    assert 0 <= d <= math.pi * EARTH_RADIUS_M + 1e-6


# --------------------------------------------------------------------------- fast path == lxml path
#
# `iter_gpx` reads Apple-shaped files with a regex fast path and everything else with lxml
# (`_iter_lxml`). Both must give the same rows, the same points lines and the same report
# counters; `_read_fast` returns None when the fast path hands a file to lxml.

APPLE_HEAD = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<gpx version="1.1" creator="Apple Health Export" xmlns="http://www.topografix.com/GPX/1/1"'
    ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
    ' xsi:schemaLocation="http://www.topografix.com/GPX/1/1 http://www.topografix.com/GPX/1/1/gpx.xsd">\n'
    " <metadata>\n  <time>2020-03-02T15:30:23Z</time>\n </metadata>\n"
)


def _apple_point(i: int, **values: str) -> str:
    """Point `i` (< 1800) of a walk in Apple's one-line layout; `values` replace the texts."""
    v = {
        "lon": f"{-122.674895 + 0.000021 * i:.6f}",
        "lat": f"{45.525009 + 0.000017 * i:.6f}",
        "ele": f"{63.312263 - 0.19 * (i % 5):.6f}",
        "time": f"2020-03-02T15:{30 + i // 60:02d}:{i % 60:02d}Z",
        "speed": f"{2.432894 + 0.1 * (i % 3):.6f}",
        "course": f"{39.08 + i:.6f}",
        "hAcc": "3.718677",
        "vAcc": "2.737777",
    }
    v.update(values)
    return (
        f'   <trkpt lon="{v["lon"]}" lat="{v["lat"]}"><ele>{v["ele"]}</ele><time>{v["time"]}</time>'
        f'<extensions><speed>{v["speed"]}</speed><course>{v["course"]}</course>'
        f'<hAcc>{v["hAcc"]}</hAcc><vAcc>{v["vAcc"]}</vAcc></extensions></trkpt>\n'
    )


def _apple_track(segments=((0, 5),), name="  <name>Route 2020-03-02 7:30am</name>\n", **values) -> str:
    body = "".join(
        "  <trkseg>\n" + "".join(_apple_point(i, **values) for i in range(a, b)) + "  </trkseg>\n"
        for a, b in segments
    )
    return " <trk>\n" + name + body + " </trk>\n"


APPLE = APPLE_HEAD + _apple_track() + "</gpx>\n"


def _run(path: Path, *, force_slow: bool, chunk_bytes: int, points: bool = True):
    """(rows, points lines, report counters) of one path, or the InputError it raised."""
    out = io.BytesIO() if points else None
    report = ParseReport()
    try:
        rows = list(
            _iter_gpx(
                path,
                report,
                source_file="workout-routes/route.gpx",
                points_out=out,
                force_slow=force_slow,
                chunk_bytes=chunk_bytes,
            )
        )
    except InputError as exc:
        return ("InputError", str(exc))
    return rows, out.getvalue() if out else None, report.as_dict()


def _cross_check(path: Path, chunk_sizes=(CHUNK_BYTES, 64)) -> bool:
    """Assert both paths agree (with and without points_out, any chunking); True if the
    fast path took the file."""
    slow = _run(path, force_slow=True, chunk_bytes=CHUNK_BYTES)
    for chunk_bytes in chunk_sizes:
        assert _run(path, force_slow=False, chunk_bytes=chunk_bytes) == slow
    assert _run(path, force_slow=False, chunk_bytes=chunk_sizes[-1], points=False) == _run(
        path, force_slow=True, chunk_bytes=CHUNK_BYTES, points=False
    )
    fast = _read_fast(path, ParseReport(), "workout-routes/route.gpx", io.BytesIO()) is not None
    return fast


@pytest.fixture(scope="module")
def generated_routes(tmp_path_factory) -> list[Path]:
    from healthdelta.synth import generate_export

    root = tmp_path_factory.mktemp("routes")
    paths: list[Path] = []
    for seed in (1, 3):
        generate_export(root / str(seed), seed=seed)
        paths += sorted((root / str(seed)).rglob("workout-routes/*.gpx"))[:2]
    assert paths
    return paths


def test_fast_path_equals_lxml_on_generated_routes(generated_routes):
    for path in generated_routes:
        assert _cross_check(path, chunk_sizes=(CHUNK_BYTES, 4096, 777)), path.name


_TAIL = "</gpx>\n"
_POINT_2_TIME = "<time>2020-03-02T15:30:02Z</time>"
_META = " <metadata>\n  <time>2020-03-02T15:30:23Z</time>\n </metadata>\n"

# (name, document, whether the fast path takes it; if not, lxml reads it all)
APPLE_VARIANTS = [
    # Apple's shape and what may vary within it.
    ("apple", APPLE, True),
    ("multi_segment", APPLE_HEAD + _apple_track(((0, 3), (3, 4), (10, 14))) + _TAIL, True),
    ("two_tracks", APPLE_HEAD + _apple_track() + _apple_track(((20, 23),), name="") + _TAIL, True),
    ("empty_segment_and_track", APPLE_HEAD + _apple_track(((0, 0), (0, 2))) + " <trk></trk>\n" + _TAIL, True),
    ("no_metadata_no_xml_decl", APPLE.replace(APPLE_HEAD[:39], "").replace(_META, ""), True),
    ("metadata_without_time", APPLE.replace("  <time>2020-03-02T15:30:23Z</time>\n", ""), True),
    ("metadata_time_offset", APPLE.replace(">2020-03-02T15:30:23Z", "> 2020-03-02T08:30:23.5-07:00 "), True),
    ("metadata_time_unparsed", APPLE.replace(">2020-03-02T15:30:23Z", ">yesterday"), True),
    ("metadata_after_track", APPLE_HEAD + _apple_track() + " <metadata><time>2021-01-01</time></metadata>\n" + _TAIL, True),
    (
        "names_after_segment",
        APPLE_HEAD
        + _apple_track(name="").replace(" </trk>", "<name>a</name><name>  Läuft 🏃 </name></trk>")
        + _TAIL,
        True,
    ),
    ("blank_name", APPLE.replace("Route 2020-03-02 7:30am", " "), True),
    ("bom_crlf_tabs", "\ufeff" + APPLE.replace("\n", "\r\n").replace("   <trkpt", "\t<trkpt"), True),
    (
        "no_namespace_other_creator",
        APPLE.replace(' xmlns="http://www.topografix.com/GPX/1/1"', "").replace("Apple Health Export", "Äpple"),
        True,
    ),
    ("no_creator", APPLE.replace(' creator="Apple Health Export"', ""), True),
    ("pretty_points", APPLE.replace("<extensions>", "\n    <extensions>").replace("</trkpt>", "\n   </trkpt>"), True),
    ("spaced_children", APPLE.replace("</ele><time>", "</ele> <time>").replace("</speed><course>", "</speed>\n<course>"), True),
    ("trailing_whitespace", APPLE + "\n  \n", True),
    # Numbers: their own text in the points lines, or orjson's.
    (
        "trailing_zeros_and_zero",
        APPLE_HEAD + _apple_track(speed="0.000000", course="-0.000000", hAcc="10.500", vAcc="5.0") + _TAIL,
        True,
    ),
    (
        "small_numbers",
        APPLE_HEAD + _apple_track(((0, 2),), ele="0.000042") + _apple_track(((2, 4),), speed="-0.0001") + _TAIL,
        True,
    ),
    (
        "integers_and_long_numbers",
        APPLE_HEAD + _apple_track(ele="35", hAcc="007.25", lat="45.52500912345678912345") + _TAIL,
        True,
    ),
    ("exponent", APPLE_HEAD + _apple_track(speed="1e-5") + _TAIL, False),
    ("plus_sign", APPLE_HEAD + _apple_track(vAcc="+1.5") + _TAIL, False),
    ("space_in_number", APPLE_HEAD + _apple_track(ele=" 12.5 ") + _TAIL, False),
    ("huge_number", APPLE_HEAD + _apple_track(ele="1" * 400) + _TAIL, False),
    ("lat_out_of_range", APPLE_HEAD + _apple_track(lat="95.000000") + _TAIL, False),
    # Points of another shape.
    ("time_fraction", APPLE_HEAD + _apple_track(time="2020-03-02T15:30:23.5Z") + _TAIL, False),
    ("time_unparsed", APPLE_HEAD + _apple_track(time="2020-13-02T15:30:23Z") + _TAIL, False),
    ("missing_ele", APPLE.replace("<ele>63.122263</ele>", ""), False),
    ("missing_time", APPLE.replace(_POINT_2_TIME, ""), False),
    ("no_extensions", re.sub("<extensions>.*?</extensions>", "", APPLE), False),
    ("extra_extension", APPLE.replace("</vAcc>", "</vAcc><cadence>80</cadence>", 1), False),
    ("unknown_child", APPLE.replace("<ele>", "<sat>7</sat><ele>", 1), False),
    ("lat_before_lon", re.sub(r'lon="([^"]*)" lat="([^"]*)"', r'lat="\2" lon="\1"', APPLE, count=1), False),
    ("single_quotes", APPLE.replace('lon="-122.674895"', "lon='-122.674895'"), False),
    # XML the fast path leaves to lxml.
    ("entity_in_name", APPLE.replace("Route", "Run &amp; walk"), False),
    (
        "doctype_entity",
        APPLE.replace("<gpx ", '<!DOCTYPE gpx [<!ENTITY r "Ride">]>\n<gpx ').replace("Route", "&r;"),
        False,
    ),
    ("comment_in_segment", APPLE.replace("  </trkseg>", "   <!-- paused -->\n  </trkseg>"), False),
    ("cdata_name", APPLE.replace("Route 2020-03-02 7:30am", "<![CDATA[Route <1>]]>"), False),
    ("other_namespace", APPLE.replace('http://www.topografix.com/GPX/1/1"', 'urn:example"'), False),
    (
        "prefixed_elements",
        APPLE.replace("<trk>", '<g:trk xmlns:g="http://www.topografix.com/GPX/1/1">').replace("</trk>", "</g:trk>"),
        False,
    ),
    ("undeclared_prefix", APPLE.replace(' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"', ""), False),
    ("duplicate_attribute", APPLE.replace('version="1.1"', 'version="1.1" version="1.0"'), False),
    ("waypoint", APPLE.replace("</gpx>", ' <wpt lat="1" lon="2"/>\n</gpx>'), False),
    ("route", APPLE.replace("</gpx>", ' <rte><rtept lat="1" lon="2"/></rte>\n</gpx>'), False),
    ("point_outside_track", APPLE.replace(" <trk>", _apple_point(9) + " <trk>"), False),
    ("point_outside_segment", APPLE.replace("  <trkseg>", _apple_point(9) + "  <trkseg>"), False),
    ("self_closing_segment", APPLE.replace("  <trkseg>", "  <trkseg/>\n  <trkseg>"), False),
    # Damage, and what is not GPX at all.
    ("truncated", APPLE[: APPLE.index("</trkpt>", APPLE.index("15:30:03")) + 3], False),
    ("trailing_junk", APPLE + "<junk/>", False),
    ("invalid_utf8", APPLE.replace("Route", "Route \udcff"), False),
    ("control_char", APPLE.replace("Route", "Route \x0b"), False),
    ("not_gpx", "<html><body>x</body></html>", False),
    ("empty", "", False),
]


@pytest.mark.parametrize(("name", "text", "fast"), APPLE_VARIANTS, ids=[v[0] for v in APPLE_VARIANTS])
def test_fast_path_equals_lxml_on_variants(tmp_path, name, text, fast):
    assert name == "apple" or text != APPLE  # each variant changes something
    path = tmp_path / "route.gpx"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert _cross_check(path) is fast


def test_fast_path_is_taken_for_apple_shape_and_counts_like_lxml(tmp_path):
    path = tmp_path / "route.gpx"
    path.write_text(APPLE_VARIANTS[1][1])  # two segments
    report = ParseReport()
    assert _read_fast(path, report, "workout-routes/route.gpx", None) is not None
    assert report.elements == {"gpx:point": 8, "gpx:trk": 1}
    assert report.repairs == {} and report.unknown == {}


def test_fallback_cuts_points_out_back(tmp_path):
    """A file that turns out irregular near its end: what the fast path had written is
    cut away, what the caller wrote before is kept."""
    path = tmp_path / "route.gpx"
    points = "".join(_apple_point(i) for i in range(300))
    path.write_text(APPLE_HEAD + " <trk><trkseg>\n" + points + " </trkseg></trk>\n</gpx>\n<junk/>")
    out = io.BytesIO()
    out.write(b"earlier file\n")
    report = ParseReport()
    rows = list(_iter_gpx(path, report, source_file="r.gpx", points_out=out, chunk_bytes=4096))
    slow_out = io.BytesIO()
    slow_report = ParseReport()
    slow_rows = list(_iter_gpx(path, slow_report, source_file="r.gpx", points_out=slow_out, force_slow=True))
    assert rows == slow_rows and report.as_dict() == slow_report.as_dict()
    assert report.repairs == {"gpx_trailing_content": 1}
    assert out.getvalue() == b"earlier file\n" + slow_out.getvalue()


def test_unseekable_points_out_gets_the_lxml_path(tmp_path):
    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return False

    path = tmp_path / "route.gpx"
    path.write_text(APPLE)
    pipe, plain = Pipe(), io.BytesIO()
    assert list(iter_gpx(path, ParseReport(), source_file="r.gpx", points_out=pipe)) == list(
        iter_gpx(path, ParseReport(), source_file="r.gpx", points_out=plain)
    )
    assert pipe.getvalue() == plain.getvalue()
    assert _read_fast(path, ParseReport(), "r.gpx", Pipe()) is None


@given(
    st.one_of(st.integers(0, 999_999), st.integers(0, 10**17)),
    st.text("0123456789", min_size=1, max_size=14) | st.text("0", max_size=6).map(lambda z: z + "1"),
    st.booleans(),
)
def test_number_text_is_what_orjson_writes(integer, fraction, negative):
    """The fast path writes a number's own text (trailing zeros dropped) in place of
    orjson.dumps(float(text)); _NUM only admits texts where the two agree."""
    text = ("-" if negative else "") + str(integer) + "." + fraction
    match = re.fullmatch(_NUM, text.encode())
    if match is not None:
        assert orjson.dumps(float(text)) == match.group(1)
        assert float(match.group(1)) == float(text)


_NUMBER_TEXTS = st.one_of(
    st.floats(-179.9, 179.9).map(lambda x: f"{x:.6f}"),
    st.floats(-1, 1).map(lambda x: f"{x:.9f}"),
    st.sampled_from(["0.000000", "-0.000000", "5.000000", "0.000042", "1e-5", "35", "007.5", "+1", " 2.5", ""]),
)
_POINT_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "lon": _NUMBER_TEXTS,
        "lat": _NUMBER_TEXTS,
        "ele": _NUMBER_TEXTS,
        "speed": _NUMBER_TEXTS,
        "course": _NUMBER_TEXTS,
        "hAcc": _NUMBER_TEXTS,
        "vAcc": _NUMBER_TEXTS,
        "time": st.sampled_from(["2020-03-02T15:30:23Z", "2020-03-02T15:30:23.25Z", "bad", ""]),
    },
)


@given(
    st.lists(  # tracks
        st.lists(  # segments
            st.lists(_POINT_VALUES, max_size=6),
            max_size=3,
        ),
        max_size=3,
    ),
    st.sampled_from(["\n", "\r\n", "", "\n\t "]),
    st.integers(64, 600),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fast_path_equals_lxml_on_generated_documents(tmp_path, tracks, newline, chunk_bytes):
    i = 0
    body = ""
    for t, segments in enumerate(tracks):
        body += f" <trk><name>T{t}</name>"
        for segment in segments:
            body += "<trkseg>" + newline
            for values in segment:
                body += _apple_point(i, **values)
                i += 1
            body += "</trkseg>"
        body += "</trk>" + newline
    path = tmp_path / "generated.gpx"
    path.write_text(APPLE_HEAD + body + "</gpx>" + newline)
    _cross_check(path, chunk_sizes=(chunk_bytes,))
