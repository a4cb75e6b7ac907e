"""Workout-route GPX → one `routes` row per track, points written aside, bad input."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import orjson
import pytest
from hypothesis import given, strategies as st

from healthdelta.errors import InputError
from healthdelta.parse.gpx import EARTH_RADIUS_M, haversine_m, iter_gpx
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
