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

Two paths, one result. A fast path reads files in Apple's shape (above: `<trkpt>` after
`<trkpt>` of that layout, lon before lat, all six children, plain decimal numbers, UTC
times to the second; whitespace between elements is free) with a compiled regex over
128 KiB chunks, does the per-point arithmetic column-wise in C (map/reduce over the same
math calls in the same order, so every float is bit-identical) and writes the points
lines from the numbers' own text where that is what orjson would write (otherwise from
orjson). Anything else anywhere in the file (a DOCTYPE, comment, CDATA, PI, `&`, another
namespace, a prefix, attribute order or quoting, a missing or extra child, an exponent,
`+` or space in a number, a point out of range, another time form, `<wpt>`, `<rte>`,
a point outside a segment, a self-closing segment, damage, junk after `</gpx>`, ...)
sends the whole file to the lxml path: the fast path's counters are dropped and
`points_out` is cut back to where it was (a `points_out` that cannot seek gets the lxml
path from the start). Both paths give the same rows, points lines and counters;
tests/parse/test_gpx.py checks one against the other.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from functools import reduce
from itertools import repeat
from operator import add, mul, neg, sub, truediv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from lxml import etree

from healthdelta.errors import InputError
from healthdelta.keys import record_key
from healthdelta.parse.report import ParseReport
from healthdelta.parse.xmlnames import local_name
from healthdelta.parse.timefmt import from_iso, utc_seconds

# IUGG mean Earth radius; the haversine distance uses a sphere of this radius.
EARTH_RADIUS_M = 6_371_008.8
# The fast path reads the file in chunks of this size (memory stays flat).
CHUNK_BYTES = 1 << 17

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
_local = local_name


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
        return self.track_row(name, extra, creator, version)

    def track_row(
        self, name: str | None, extra: dict[str, str], creator: str | None, version: str | None
    ) -> tuple[str, dict[str, Any]]:
        track = self.track
        assert track is not None
        self.track = None
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
    return _iter_gpx(path, report, source_file=source_file, points_out=points_out)


def _iter_gpx(
    path: Path,
    report: ParseReport,
    *,
    source_file: str,
    points_out: BinaryIO | None = None,
    force_slow: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """`iter_gpx`; `force_slow` skips the fast path (tests, benchmark)."""
    if not force_slow:
        rows = _read_fast(path, report, source_file, points_out, chunk_bytes)
        if rows is not None:
            yield from rows
            return
    yield from _iter_lxml(path, report, source_file=source_file, points_out=points_out)


def _iter_lxml(
    path: Path,
    report: ParseReport,
    *,
    source_file: str,
    points_out: BinaryIO | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The general path: lxml's iterparse in recover mode, any GPX shape, any damage."""
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


# --------------------------------------------------------------------------- fast path


class _Irregular(Exception):
    """The file is not in the shape the fast path reads: the lxml path takes it."""


_LOOKAHEAD = 1 << 16  # a structure token (gpx start tag, metadata, name) must fit in this
_MAX_PENDING = 1 << 20  # this much of a segment without a `</trkpt>`: not Apple's shape
_WS = rb"[ \t\r\n]*+"
# A number written to the points line as its own text (group 1: trailing zeros dropped).
# At most 15 significant digits, so the text is the shortest repr of its float, and zero
# or 0.0001 <= |x| < 1e6, where orjson (like repr) writes plain decimals: then
# orjson.dumps(float(text)) is the text (`_TEXT_LINES_OK` checks this at import, the
# tests more widely). A region of points with any other number gets its lines from orjson.
_NUM = rb"(-?(?:[1-9][0-9]{0,5}\.(?:[0-9]{0,8}[1-9]|0)|0\.(?:(?!0000)[0-9]{0,8}[1-9]|0)))0*+"
# Any other plain decimal float() reads as a finite number (no exponent, `+` or `_`).
_ANY_NUM = rb"(-?[0-9]{1,20}(?:\.[0-9]+)?)"
# UTC to the second, the form `from_iso` passes through unchanged as (utc, local).
_TIME = rb"([0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z)"


def _point_pattern(num: bytes) -> re.Pattern[bytes]:
    """One Apple point; `split` by it, a run of points leaves only whitespace between."""
    return re.compile(
        b'<trkpt lon="' + num + b'" lat="' + num + b'">' + _WS
        + b"<ele>" + num + b"</ele>" + _WS + b"<time>" + _TIME + b"</time>" + _WS
        + b"<extensions>" + _WS + b"<speed>" + num + b"</speed>" + _WS
        + b"<course>" + num + b"</course>" + _WS + b"<hAcc>" + num + b"</hAcc>" + _WS
        + b"<vAcc>" + num + b"</vAcc>" + _WS + b"</extensions>" + _WS + b"</trkpt>"
    )


_TRKPT = _point_pattern(_NUM)
_TRKPT_ANY = _point_pattern(_ANY_NUM)
_WS_RUN = re.compile(_WS)
_XML_DECL = re.compile(
    rb'<\?xml[ \t\r\n]+version[ \t\r\n]*=[ \t\r\n]*"1\.0"'
    rb'(?:[ \t\r\n]+encoding[ \t\r\n]*=[ \t\r\n]*"(?i:utf-8)")?'
    rb'(?:[ \t\r\n]+standalone[ \t\r\n]*=[ \t\r\n]*"(?:yes|no)")?[ \t\r\n]*\?>'
)
_ATTR = rb'[ \t\r\n]+([^ \t\r\n=<>/"\']+)[ \t\r\n]*=[ \t\r\n]*"([^"<&]*)"'
_GPX_START = re.compile(rb"<gpx((?:" + _ATTR + rb")*+)[ \t\r\n]*>")
_ATTRS = re.compile(_ATTR)
_ATTR_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9._-]*(?::[A-Za-z_][A-Za-z0-9._-]*)?")
_METADATA = re.compile(rb"<metadata>" + _WS + rb"(?:<time>([^<>&]*)</time>" + _WS + rb")?</metadata>")
_NAME = re.compile(rb"<name>([^<>&]*)</name>")
# Characters XML forbids (or, for \r, rewrites) in text; in attribute values also \t \n.
_BAD_TEXT = re.compile("[\x00-\x08\x0b-\x1f\ufffe\uffff]")
_BAD_ATTR = re.compile("[\x00-\x1f\ufffe\uffff]")
_GPX_NS = frozenset({"http://www.topografix.com/GPX/1/1", "http://www.topografix.com/GPX/1/0"})
_RESERVED_NS = frozenset({"http://www.w3.org/XML/1998/namespace", "http://www.w3.org/2000/xmlns/"})
_TWO_R = 2 * EARTH_RADIUS_M  # haversine_m's `2 * EARTH_RADIUS_M * asin(...)`, same product
_ABOVE_ZERO = (0.0).__lt__
_BELOW_ZERO = (0.0).__gt__
# orjson writes these floats as the text they were parsed from (see _NUM); if an orjson
# release ever formats differently, the fast path gets every line from orjson instead.
_TEXT_LINES_OK = all(
    orjson.dumps(float(text)) == text.encode()
    for text in ("0.0", "-0.0", "5.0", "0.0001", "-0.000421", "0.0012345", "0.1", "35.02",
                 "123.456789", "-122.674895", "999999.999999999", "100000.0", "0.000100001")
)


def _text(raw: bytes) -> str:
    text = raw.decode("utf-8")  # strict: invalid UTF-8 is a ValueError, so lxml path
    if _BAD_TEXT.search(text):
        raise _Irregular
    return text


def _root_attributes(raw: bytes) -> tuple[str | None, str | None]:
    """(creator, version) of the `<gpx>` start tag, if lxml would read it without error."""
    attrs: dict[str, str] = {}
    for name_bytes, value_bytes in _ATTRS.findall(raw):
        if not _ATTR_NAME.fullmatch(name_bytes):
            raise _Irregular
        name, value = name_bytes.decode("ascii"), value_bytes.decode("utf-8")
        if name in attrs or _BAD_ATTR.search(value):
            raise _Irregular
        attrs[name] = value
    declared = {name[6:]: uri for name, uri in attrs.items() if name.startswith("xmlns:")}
    for prefix, uri in declared.items():
        if prefix in ("xml", "xmlns") or not uri or uri in _RESERVED_NS:
            raise _Irregular
    if "xmlns" in attrs and attrs["xmlns"] not in _GPX_NS:
        raise _Irregular
    expanded: set[tuple[str, str]] = set()
    for name in attrs:
        prefix, colon, local = name.partition(":")
        if colon and prefix != "xmlns":
            if prefix not in declared or (declared[prefix], local) in expanded:
                raise _Irregular
            expanded.add((declared[prefix], local))
    return attrs.get("creator"), attrs.get("version")


class _Fast:
    """Reads one GPX file in Apple's shape into `reader`; raises _Irregular otherwise."""

    def __init__(self, f: BinaryIO, reader: _Reader, chunk_bytes: int) -> None:
        self.f = f
        self.reader = reader
        self.chunk_bytes = max(64, chunk_bytes)
        self.buf = b""
        self.pos = 0
        self.eof = False

    def read(self) -> None:
        data = self.f.read(self.chunk_bytes)
        if not data:
            self.eof = True
            return
        self.buf = self.buf[self.pos :] + data
        self.pos = 0

    def fill(self, need: int) -> None:
        while len(self.buf) - self.pos < need and not self.eof:
            self.read()

    def skip_ws(self) -> None:
        while True:
            self.pos = _WS_RUN.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf) or self.eof:
                return
            self.read()

    def token(self, pattern: re.Pattern[bytes]) -> re.Match[bytes]:
        self.fill(_LOOKAHEAD)
        match = pattern.match(self.buf, self.pos)
        if match is None:
            raise _Irregular
        self.pos = match.end()
        return match

    def next_tag(self) -> tuple[bytes, int]:
        self.skip_ws()
        self.fill(_LOOKAHEAD)
        return self.buf, self.pos

    def run(self) -> list[tuple[str, dict[str, Any]]]:
        reader = self.reader
        self.fill(_LOOKAHEAD)
        if self.buf.startswith(b"\xef\xbb\xbf"):
            self.pos = 3
        if decl := _XML_DECL.match(self.buf, self.pos):
            self.pos = decl.end()
        self.skip_ws()
        creator, version = _root_attributes(self.token(_GPX_START).group(1))
        rows = []
        while True:
            buf, pos = self.next_tag()
            if buf.startswith(b"<trk>", pos):
                self.pos = pos + 5
                rows.append(self.track(creator, version))
            elif buf.startswith(b"<metadata>", pos):
                time_text = self.token(_METADATA).group(1)
                pair = reader.time_pair(None if time_text is None else _text(time_text))
                reader.metadata_time = pair if pair else (None, None)
            elif buf.startswith(b"</gpx>", pos):
                self.pos = pos + 6
                break
            else:
                raise _Irregular
        while True:  # after the root element: whitespace only
            if self.buf[self.pos :].strip(b" \t\r\n"):
                raise _Irregular
            if self.eof:
                return rows
            self.pos = len(self.buf)
            self.read()

    def track(self, creator: str | None, version: str | None) -> tuple[str, dict[str, Any]]:
        reader = self.reader
        track = reader.start_track("trk")
        name = None
        while True:
            buf, pos = self.next_tag()
            if buf.startswith(b"<trkseg>", pos):
                self.pos = pos + 8
                track.new_segment()
                self.segment()
            elif buf.startswith(b"<name>", pos):
                name = _text(self.token(_NAME).group(1)).strip() or None
            elif buf.startswith(b"</trk>", pos):
                self.pos = pos + 6
                return reader.track_row(name, {}, creator, version)
            else:
                raise _Irregular

    def segment(self) -> None:
        """The points of one `<trkseg>`, up to and including its end tag."""
        while True:
            buf, pos = self.buf, self.pos
            close = buf.find(b"</trkseg>", pos)
            end = buf.rfind(b"</trkpt>", pos, close if close >= 0 else len(buf))
            if end >= 0:
                self.points(buf, pos, end + 8)
                self.pos = pos = end + 8
            if close >= 0:
                if buf[pos:close].strip(b" \t\r\n"):
                    raise _Irregular
                self.pos = close + 9
                return
            if self.eof or len(buf) - pos > _MAX_PENDING:
                raise _Irregular
            self.read()

    def points(self, buf: bytes, start: int, end: int) -> None:
        """Points in buf[start:end], which must be nothing but Apple points."""
        reader = self.reader
        track = reader.track
        assert track is not None
        region = buf[start:end]
        # split: [gap, lon, lat, ele, time, speed, course, hAcc, vAcc, gap, lon, ..., gap];
        # anything but whitespace in a gap is a point of another shape or no point at all.
        canonical = _TEXT_LINES_OK
        if canonical:  # numbers in the form whose text is orjson's (see _NUM)
            parts = _TRKPT.split(region)
            canonical = not b"".join(parts[::9]).strip(b" \t\r\n")
        if not canonical:  # other numbers: the lines come from orjson
            parts = _TRKPT_ANY.split(region)
            if b"".join(parts[::9]).strip(b" \t\r\n"):
                raise _Irregular
        lon_t, lat_t, ele_t, time_t = parts[1::9], parts[2::9], parts[3::9], parts[4::9]
        speed_t, course_t, hacc_t, vacc_t = parts[5::9], parts[6::9], parts[7::9], parts[8::9]
        count = len(lat_t)
        lats = list(map(float, lat_t))
        lons = list(map(float, lon_t))
        eles = list(map(float, ele_t))
        low_lat, high_lat, low_lon, high_lon = min(lats), max(lats), min(lons), max(lons)
        if low_lat < -90 or high_lat > 90 or low_lon < -180 or high_lon > 180:
            raise _Irregular  # a bad point: the lxml path skips and counts it

        # _Track.add for each point, column-wise: the same float operations in the same
        # order (haversine_m's expression, sequential sums), so bit-identical results.
        previous = track.previous
        if previous is None:
            lat_s, lon_s, ele_s = lats, lons, eles
        else:
            lat_s, lon_s, ele_s = [previous[0], *lats], [previous[1], *lons], [previous[2], *eles]
        if len(lat_s) > 1:
            phi = list(map(math.radians, lat_s))
            cos_phi = list(map(math.cos, phi))
            dphi = map(sub, phi[1:], phi)
            dlmb = map(math.radians, map(sub, lon_s[1:], lon_s))
            # x ** 2 is float_pow(x, 2.0) whether the 2 is an int or a float.
            sin_dphi = map(pow, map(math.sin, map(truediv, dphi, repeat(2.0))), repeat(2.0))
            sin_dlmb = map(pow, map(math.sin, map(truediv, dlmb, repeat(2.0))), repeat(2.0))
            a = map(add, sin_dphi, map(mul, map(mul, cos_phi, cos_phi[1:]), sin_dlmb))
            roots = list(map(math.sqrt, a))
            if max(roots) > 1.0:  # min(1.0, x) is x itself for every x <= 1.0
                roots = list(map(min, repeat(1.0), roots))
            legs = map(mul, repeat(_TWO_R), map(math.asin, roots))
            track.distance_m = reduce(add, legs, track.distance_m)
            rises = list(map(sub, ele_s[1:], ele_s))
            track.gain_m = reduce(add, filter(_ABOVE_ZERO, rises), track.gain_m)
            track.loss_m = reduce(add, map(neg, filter(_BELOW_ZERO, rises)), track.loss_m)
        track.previous = (lats[-1], lons[-1], eles[-1])
        low_ele, high_ele = min(eles), max(eles)
        track.min_ele = low_ele if track.min_ele is None else min(track.min_ele, low_ele)
        track.max_ele = high_ele if track.max_ele is None else max(track.max_ele, high_ele)
        box = track.bbox
        if box is None:
            track.bbox = [low_lat, low_lon, high_lat, high_lon]
        else:
            box[0], box[1] = min(box[0], low_lat), min(box[1], low_lon)
            box[2], box[3] = max(box[2], high_lat), max(box[3], high_lon)
        if track.start is None:
            first = time_t[0].decode("ascii")
            track.start = (first, first)
        last = time_t[-1].decode("ascii")
        track.end = (last, last)
        track.points += count
        reader.report.elements["gpx:point"] += count

        seg, points_out = track.segments - 1, reader.points_out
        if canonical:  # the lines orjson would write (sorted keys), from the numbers' text
            line = [b""] * (17 * count)
            for i, item in enumerate((
                b'{"course":', course_t, b',"ele":', ele_t, b',"h_acc":', hacc_t,
                b',"lat":', lat_t, b',"lon":', lon_t, b',"seg":%d,"speed":' % seg, speed_t,
                b',"time":"', time_t, b'","trk":%d,"v_acc":' % track.index, vacc_t, b"}\n",
            )):
                line[i::17] = [item] * count if isinstance(item, bytes) else item
            if points_out is not None:
                points_out.write(b"".join(line))
            line[14::17] = [b'","v_acc":'] * count
            lines = b"".join(line)
        else:  # exactly the records _Reader.point dumps
            columns = zip(
                map(float, course_t), eles, map(float, hacc_t), lats, lons,
                map(float, speed_t), map(bytes.decode, time_t), map(float, vacc_t),
            )
            keys = ("course", "ele", "h_acc", "lat", "lon", "speed", "time", "v_acc")
            extra = {"seg": seg} if points_out is None else {"seg": seg, "trk": track.index}
            records = [dict(zip(keys, values), **extra) for values in columns]
            lines = orjson.dumps(records, option=orjson.OPT_SORT_KEYS)[1:-1].replace(b"},{", b"}\n{") + b"\n"
            if points_out is not None:
                points_out.write(lines)
                lines = lines.replace(b'"trk":%d,' % track.index, b"")
        track.digest.update(lines)


def _read_fast(
    path: Path,
    report: ParseReport,
    source_file: str,
    points_out: BinaryIO | None,
    chunk_bytes: int = CHUNK_BYTES,
) -> list[tuple[str, dict[str, Any]]] | None:
    """All rows of an Apple-shaped file, or None (nothing counted or kept in `points_out`)."""
    start = 0
    if points_out is not None:
        try:
            if not points_out.seekable():
                return None
            start = points_out.tell()
        except (AttributeError, OSError, ValueError):
            return None
    local = ParseReport()
    try:
        with open(path, "rb") as f:
            rows = _Fast(f, _Reader(local, source_file, points_out), chunk_bytes).run()
    except (_Irregular, ValueError, OSError):
        if points_out is not None:
            points_out.seek(start)
            points_out.truncate()
        return None
    report.merge(local)
    return rows
