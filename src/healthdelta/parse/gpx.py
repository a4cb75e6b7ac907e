"""Apple workout routes (`workout-routes/*.gpx`) → one `routes` row per track.

What Apple writes (one track, one segment, a point per second or so):

    <gpx version="1.1" creator="Apple Health Export" xmlns="http://www.topografix.com/GPX/1/1">
     <metadata><time>2019-05-12T15:30:18Z</time></metadata>
     <trk><name>Route 2019-05-12 3:02pm</name><trkseg>
      <trkpt lon="-122.030799" lat="37.331527"><ele>35.02</ele><time>2019-05-12T15:02:11Z</time>
       <extensions><speed>2.58</speed><course>93.1</course><hAcc>3.9</hAcc><vAcc>2.9</vAcc></extensions>
      </trkpt>
      ...

The row summarises the track (points, times, distance, elevation, bounding box) and
references the points by `points_file`; with `points_out` each point is also written as
one compact JSON line (the caller keeps that file local-only: it is a GPS trace).
Streaming iterparse, finished points cleared; no entities, no DTD, no network. Damage
libxml2's recover mode can get past (a truncated file, junk after `</gpx>`) is counted in
`report.repairs`; a file that is not GPX at all raises InputError.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from lxml import etree

from healthdelta.errors import InputError
from healthdelta.keys import record_key
from healthdelta.parse.report import ParseReport
from healthdelta.parse.timefmt import from_iso, utc_seconds

# IUGG mean Earth radius; the haversine distance uses a sphere of this radius.
EARTH_RADIUS_M = 6_371_008.8

_XML_OPTIONS: dict[str, Any] = {
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "dtd_validation": False,
    "huge_tree": False,
}
_TRACKS = {"trk": "trkseg", "rte": None}
_POINTS = frozenset({"trkpt", "rtept"})
# Point children with a typed field; Apple puts speed/course/accuracy under <extensions>.
_POINT_FIELDS = {
    "ele": "ele",
    "time": "time",
    "speed": "speed",
    "course": "course",
    "hAcc": "h_acc",
    "vAcc": "v_acc",
}
_LOCALS: dict[Any, str] = {}


def _local(element: Any) -> str:
    tag = element.tag
    local = _LOCALS.get(tag)
    if local is None:
        local = tag.rpartition("}")[2] if isinstance(tag, str) else ""
        if len(_LOCALS) < 1024:
            _LOCALS[tag] = local
    return local


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two WGS84 points (spherical Earth)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi, dlmb = phi2 - phi1, math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass
class _Track:
    kind: str
    index: int
    points: int = 0
    segments: int = 0
    bad_points: int = 0
    distance_m: float = 0.0
    gain_m: float = 0.0
    loss_m: float = 0.0
    min_ele: float | None = None
    max_ele: float | None = None
    bbox: list[float] | None = None  # min_lat, min_lon, max_lat, max_lon
    start: tuple[str, str] | None = None
    end: tuple[str, str] | None = None
    previous: tuple[float, float, float | None] | None = None
    digest: Any = field(default_factory=hashlib.sha256)

    def new_segment(self) -> None:
        self.segments += 1
        self.previous = None

    def add(self, lat: float, lon: float, ele: float | None, times: tuple[str, str] | None) -> None:
        self.points += 1
        if self.previous is not None:
            prev_lat, prev_lon, prev_ele = self.previous
            self.distance_m += haversine_m(prev_lat, prev_lon, lat, lon)
            if ele is not None and prev_ele is not None:
                if ele > prev_ele:
                    self.gain_m += ele - prev_ele
                else:
                    self.loss_m += prev_ele - ele
        self.previous = (lat, lon, ele)
        if ele is not None:
            self.min_ele = ele if self.min_ele is None else min(self.min_ele, ele)
            self.max_ele = ele if self.max_ele is None else max(self.max_ele, ele)
        if self.bbox is None:
            self.bbox = [lat, lon, lat, lon]
        else:
            box = self.bbox
            box[0], box[1] = min(box[0], lat), min(box[1], lon)
            box[2], box[3] = max(box[2], lat), max(box[3], lon)
        if times is not None:
            self.start = self.start or times
            self.end = times


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class _Reader:
    """Holds the parse state of one GPX file."""

    def __init__(self, report: ParseReport, source_file: str, points_out: BinaryIO | None) -> None:
        self.report = report
        self.source_file = source_file
        self.points_out = points_out
        self.track: _Track | None = None
        self.track_count = 0
        self.metadata_time: tuple[str | None, str | None] = (None, None)

    def time_pair(self, text: str | None) -> tuple[str, str] | None:
        if not text or not text.strip():
            return None
        try:
            return from_iso(text)
        except ValueError:
            self.report.unknown["gpx:unparsed_time"] += 1
            return None

    def point(self, element: Any) -> None:
        track = self.track
        if track is None:  # a point outside any track: keep it in an implicit one
            self.report.repairs["gpx_point_outside_track"] += 1
            track = self.start_track("trk")
            track.new_segment()
        if track.segments == 0:
            track.new_segment()
        values: dict[str, Any] = {}
        extra: dict[str, str] = {}
        for child in element:
            name = _local(child)
            if name == "extensions":
                children = [(x, _local(x)) for x in child]
            elif name:
                children = [(child, name)]
            else:
                continue
            for node, local in children:
                text = (node.text or "").strip()
                if local in _POINT_FIELDS:
                    values[_POINT_FIELDS[local]] = text
                else:
                    self.report.unknown[f"gpx:{local[:40]}"] += 1
                    extra[local] = text
        lat, lon = _float(element.get("lat")), _float(element.get("lon"))
        if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
            track.bad_points += 1
            self.report.repairs["gpx_bad_point_skipped"] += 1
            return
        ele = _float(values.get("ele"))
        times = self.time_pair(values.get("time"))
        track.add(lat, lon, ele, times)
        self.report.elements["gpx:point"] += 1
        record: dict[str, Any] = {
            "lat": lat,
            "lon": lon,
            "ele": ele,
            "time": times[0] if times else None,
            "speed": _float(values.get("speed")),
            "course": _float(values.get("course")),
            "h_acc": _float(values.get("h_acc")),
            "v_acc": _float(values.get("v_acc")),
            "seg": track.segments - 1,
        }
        if extra:
            record["extra"] = extra
        line = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        track.digest.update(line + b"\n")
        if self.points_out is not None:
            record["trk"] = track.index
            self.points_out.write(orjson.dumps(record, option=orjson.OPT_SORT_KEYS) + b"\n")

    def start_track(self, kind: str) -> _Track:
        self.track = _Track(kind=kind, index=self.track_count)
        self.track_count += 1
        return self.track

    def finish_track(
        self, element: Any | None, creator: str | None, version: str | None
    ) -> tuple[str, dict[str, Any]]:
        track = self.track
        assert track is not None
        self.track = None
        name = None
        extra: dict[str, str] = {}
        if element is not None:
            for child in element:
                local = _local(child)
                if not local or local in ("trkseg", "rtept"):
                    continue
                text = "".join(child.itertext()).strip()
                if local == "name":
                    name = text or None
                else:
                    extra[local] = text
        self.report.elements[f"gpx:{track.kind}"] += 1
        duration = None
        if track.start and track.end:
            duration = _round(utc_seconds(track.end[0]) - utc_seconds(track.start[0]))
        box = track.bbox
        points_sha256 = track.digest.hexdigest()
        row: dict[str, Any] = {
            "record_key": record_key(
                "gpx",
                track.kind,
                {
                    "name": name,
                    "extra": extra,
                    "point_count": track.points,
                    "points_sha256": points_sha256,
                },
            ),
            "source": "gpx",
            "source_file": self.source_file,
            "kind": track.kind,
            "event_time": track.start[0] if track.start else self.metadata_time[0],
            "name": name,
            "track_index": track.index,
            "point_count": track.points,
            "segment_count": track.segments,
            "bad_points": track.bad_points,
            "start_time": track.start[0] if track.start else None,
            "start_time_local": track.start[1] if track.start else None,
            "end_time": track.end[0] if track.end else None,
            "end_time_local": track.end[1] if track.end else None,
            "duration_s": duration,
            "distance_m": _round(track.distance_m),
            "elevation_gain_m": _round(track.gain_m),
            "elevation_loss_m": _round(track.loss_m),
            "min_elevation_m": track.min_ele,
            "max_elevation_m": track.max_ele,
            "bbox": (
                {"min_lat": box[0], "min_lon": box[1], "max_lat": box[2], "max_lon": box[3]}
                if box
                else None
            ),
            "points_file": self.source_file,
            "points_sha256": points_sha256,
            "creator": creator,
            "gpx_version": version,
            "metadata_time": self.metadata_time[0],
            "metadata_time_local": self.metadata_time[1],
            "extra": extra,
        }
        return "routes", row


def iter_gpx(
    path: Path,
    report: ParseReport,
    *,
    source_file: str,
    points_out: BinaryIO | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield one `("routes", row)` per track (or route) of a GPX file, streaming."""
    reader = _Reader(report, source_file, points_out)
    tags = [
        "{*}gpx",
        "{*}metadata",
        "{*}trk",
        "{*}rte",
        "{*}trkseg",
        "{*}trkpt",
        "{*}rtept",
        "{*}wpt",
    ]
    try:
        events = etree.iterparse(
            str(path),
            events=("start", "end"),
            tag=tags,
            recover=True,
            remove_comments=True,
            remove_pis=True,
            **_XML_OPTIONS,
        )
    except OSError as exc:
        raise InputError("a workout route file cannot be read") from exc
    creator = version = None
    root_checked = False
    try:
        for event, element in events:
            local = _local(element)
            if not root_checked:
                root_checked = True
                root = element.getroottree().getroot()
                if _local(root) != "gpx":
                    raise InputError("a workout route file is not GPX")
                creator, version = root.get("creator"), root.get("version")
            if event == "start":
                if local in _TRACKS:
                    reader.start_track(local)
                elif local == "trkseg" and reader.track is not None:
                    reader.track.new_segment()
                continue
            if local in _POINTS:
                reader.point(element)
            elif local in _TRACKS:
                if reader.track is not None:
                    yield reader.finish_track(element, creator, version)
            elif local == "metadata":
                time_element = element.find("{*}time")
                pair = reader.time_pair(time_element.text if time_element is not None else None)
                reader.metadata_time = pair if pair else (None, None)
                continue
            elif local == "wpt":
                report.unknown["gpx:wpt"] += 1
            elif local in ("trkseg", "gpx"):
                continue
            element.clear()
            parent = element.getparent()
            if parent is not None and local in _POINTS:
                while (
                    previous := element.getprevious()
                ) is not None and previous.tag == element.tag:
                    parent.remove(previous)
    except etree.XMLSyntaxError:
        raise InputError("a workout route file is not valid XML") from None
    except OSError as exc:
        raise InputError("a workout route file cannot be read") from exc
    if events.root is None:
        raise InputError("a workout route file is not valid XML")
    if _local(events.root) != "gpx":
        raise InputError("a workout route file is not GPX")
    if reader.track is not None:  # points outside any track
        yield reader.finish_track(None, creator, version)
    for entry in events.error_log:
        if entry.level < etree.ErrorLevels.ERROR:
            continue
        report.repairs[
            "gpx_trailing_content" if entry.type_name == "ERR_DOCUMENT_END" else "gpx_recovered"
        ] += 1
