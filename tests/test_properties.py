"""Property-based tests of pure rules not covered elsewhere (issue 6).

Already covered, not repeated here: fingerprint/run_id (test_fingerprint.py), NDJSON
encode round trip and merge/delta (test_ndjson.py), normalise_name idempotence, "Last,
First" and case/accents (test_identity.py), from_iso with fixed offsets (parse/test_fhir.py),
fast tiers == lxml (parse/test_healthkit.py).

Here: record_key stability (attribute order, device pointer, whitespace and line
wrapping, zip vs folder) and uniqueness; name normalisation (hyphens, apostrophes,
possessive-free forms, comma placement); dates with offsets and real DST transitions
(timefmt and the Apple converter `convert_date`, its cached hour path against the plain
one); sort_key order equals chronological order.
"""

from __future__ import annotations

import json
import random
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from healthdelta.identity import fold_accents, normalise_name
from healthdelta.keys import canonical_bytes, occurrence_key, record_key, strip_device_pointer
from healthdelta.ndjson import sort_key
from healthdelta.parse.healthkit import _convert_date, convert_date, element_key, iter_healthkit
from healthdelta.parse.report import ParseReport
from healthdelta.parse.timefmt import from_cda, from_iso, utc_seconds

ZONES = ["America/Los_Angeles", "America/New_York", "Europe/Berlin", "Europe/London", "Australia/Lord_Howe",
         "Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham", "America/St_Johns", "Pacific/Kiritimati", "UTC"]
_tmp_settings = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=30)

# --------------------------------------------------------------------------- record keys

_attr_name = st.from_regex(r"[a-zA-Z][a-zA-Z0-9]{0,11}", fullmatch=True)
_attr_value = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)
_attrs = st.dictionaries(_attr_name, _attr_value, min_size=1, max_size=8)
_device = st.builds(
    lambda ptr, name: f"<<HKDevice: 0x{ptr:x}>, name:{name}, manufacturer:Apple Inc., model:Watch>",
    st.integers(min_value=1, max_value=2**48), st.text(st.characters(whitelist_categories=("L", "N")), max_size=12))


@given(_attrs, st.randoms())
def test_record_key_ignores_attribute_order(attrs, rnd):
    items = list(attrs.items())
    rnd.shuffle(items)
    assert element_key("Record", dict(items), ()) == element_key("Record", attrs, ())
    assert record_key("fhir", "Observation", dict(items)) == record_key("fhir", "Observation", attrs)


@given(_attrs, _device, st.integers(min_value=1, max_value=2**64))
def test_record_key_ignores_the_device_pointer_at_every_level(attrs, device, other_ptr):
    moved = strip_device_pointer(device).replace("0x", f"0x{other_ptr:x}", 1)
    child = ("MetadataEntry", {"key": "k", "device": device}, ())
    a = element_key("Record", {**attrs, "device": device}, [child])
    b = element_key("Record", {**attrs, "device": moved}, [("MetadataEntry", {"key": "k", "device": moved}, ())])
    assert a == b


@given(_attrs, _attrs)
def test_different_records_never_share_a_key(a, b):
    strip = {k: strip_device_pointer(v) if k == "device" else v for k, v in a.items()}
    strip_b = {k: strip_device_pointer(v) if k == "device" else v for k, v in b.items()}
    assume(strip != strip_b)
    assert element_key("Record", a, ()) != element_key("Record", b, ())


@given(_attrs, _attr_name, _attr_value)
def test_any_kept_field_changes_the_key(attrs, name, value):
    assume(attrs.get(name) != value and name != "device")
    assert element_key("Record", {**attrs, name: value}, ()) != element_key("Record", attrs, ())


@given(_attrs, st.sampled_from(["Record", "Workout", "Correlation"]), st.sampled_from(["Workout", "ActivitySummary"]))
def test_kind_and_source_are_part_of_the_key(attrs, kind, other):
    assume(kind != other)
    assert element_key(kind, attrs, ()) != element_key(other, attrs, ())
    assert record_key("fhir", kind, attrs) != record_key("cda", kind, attrs)


@given(st.text("0123456789abcdef", min_size=64, max_size=64), st.integers(min_value=0, max_value=50),
       st.integers(min_value=0, max_value=50))
def test_occurrence_keys_are_distinct_and_stable(key, n, m):
    assert occurrence_key(key, 0) == key
    assert occurrence_key(key, n) == occurrence_key(key, n)
    assert (occurrence_key(key, n) == occurrence_key(key, m)) == (n == m)


@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                    max_leaves=20))
def test_canonical_bytes_are_sorted_compact_json(value):
    data = canonical_bytes(value)
    assert json.loads(data) == value
    assert data == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# The same records, written with different attribute order, spacing, line wrapping and
# device pointers, staged from a zip and from a folder, keep their keys.

_record = st.fixed_dictionaries({
    "type": st.sampled_from(["HKQuantityTypeIdentifierHeartRate", "HKQuantityTypeIdentifierStepCount",
                             "HKCategoryTypeIdentifierSleepAnalysis"]),
    "sourceName": st.text(st.characters(whitelist_categories=("L", "N", "Zs")), min_size=1, max_size=12),
    "value": st.integers(0, 10**6).map(str),
    "startDate": st.datetimes(datetime(2015, 1, 1), datetime(2030, 1, 1)).map(
        lambda d: d.strftime("%Y-%m-%d %H:%M:%S -0800")),
}, optional={"unit": st.sampled_from(["count", "count/min"]), "sourceVersion": st.just("10.2")})


def _xml_escape(v: str) -> str:
    return v.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")


def _export_xml(records: list[dict], rnd: random.Random, pointers: list[int]) -> str:
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', '<HealthData locale="en_US">']
    for rec, ptr in zip(records, pointers):
        attrs = {**rec, "endDate": rec["startDate"],
                 "device": f"<<HKDevice: 0x{ptr:x}>, name:Apple Watch, model:Watch>"}
        items = list(attrs.items())
        rnd.shuffle(items)
        sep = rnd.choice([" ", "\n   ", "  \t"])
        lines.append(" <Record " + sep.join(f'{k}="{_xml_escape(v)}"' for k, v in items) + "/>")
    lines.append("</HealthData>")
    return "\n".join(lines) + "\n"


def _keys(path: Path, source_file: str) -> list[str]:
    return sorted(row["record_key"] for _, row in iter_healthkit(path, ParseReport(), source_file=source_file))


@_tmp_settings
@given(st.lists(_record, min_size=1, max_size=6, unique_by=lambda r: tuple(sorted(r.items()))), st.randoms(),
       st.lists(st.integers(1, 2**40), min_size=12, max_size=12))
def test_record_keys_survive_reformatting_and_zip_vs_folder(tmp_path_factory, records, rnd, pointers):
    from healthdelta.ingest import stage_export
    from healthdelta.inputs import detect_input

    tmp = tmp_path_factory.mktemp("keys")
    folder = tmp / "f" / "apple_health_export"
    folder.mkdir(parents=True)
    (folder / "export.xml").write_text(_export_xml(records, rnd, pointers[:6]))
    other = tmp / "other.xml"
    other.write_text(_export_xml(records, rnd, pointers[6:]))
    with zipfile.ZipFile(tmp / "export.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(other, "apple_health_export/export.xml")
    staged = []
    for name, inp in (("a", folder), ("b", tmp / "export.zip")):
        dest = tmp / name
        dest.mkdir()
        stage_export(detect_input(inp), dest)
        staged.append(_keys(dest / "source" / "export.xml", "export.xml"))
    assert staged[0] == staged[1]
    assert len(set(staged[0])) == len(records)  # distinct records, distinct keys
    assert _keys(other, "elsewhere/export.xml") == staged[0]  # where it was read from is not in the key


# --------------------------------------------------------------------------- names

_part = st.text(alphabet="abcdefghijklmnopqrstuvwxyzéèüöñçøå", min_size=1, max_size=10)


@given(_part, _part, _part)
def test_hyphens_and_apostrophes_do_not_matter(first, last1, last2):
    assert normalise_name(f"{first} {last1}-{last2}") == normalise_name(f"{first} {last1} {last2}")
    assert normalise_name(f"{first} O’{last1}") == normalise_name(f"{first} O'{last1}") == \
        normalise_name(f"{first} o{last1}")


@given(_part, _part, _part)
def test_comma_placement_and_surrounding_space(first, middle, last):
    expected = normalise_name(f"{first} {middle} {last}")
    assert normalise_name(f"{last},{first} {middle}") == expected
    assert normalise_name(f"  {last} ,  {first}   {middle} ") == expected
    assert normalise_name(f"{last.upper()}, {first.title()} {middle}") == expected


@given(st.text(max_size=40))
def test_normal_form_is_plain_lowercase_words(text):
    n = normalise_name(text)
    assert n == n.strip() and "  " not in n and "," not in n and "-" not in n and "'" not in n
    assert n == n.casefold()
    assert fold_accents(n) == n


@given(_part, _part)
def test_different_names_stay_different(a, b):
    assume(fold_accents(a).casefold() != fold_accents(b).casefold())
    assert normalise_name(f"Jane {a}") != normalise_name(f"Jane {b}")


# --------------------------------------------------------------------------- dates

_moment = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2037, 12, 30))
_fraction = st.one_of(st.just(""), st.integers(1, 9).flatmap(
    lambda n: st.text("0123456789", min_size=n, max_size=n).map(lambda d: "." + d)))


def _apple(local: datetime, offset: timedelta, frac: str = "") -> str:
    """Apple's `2024-02-03 08:14:22 -0800` form (fractions are not Apple's, but read too)."""
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{local.strftime('%Y-%m-%d %H:%M:%S')}{frac} {sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


@given(_moment, st.sampled_from(ZONES))
@example(datetime(2024, 3, 10, 1, 59, 59), "America/Los_Angeles")  # last second before spring forward
@example(datetime(2024, 3, 10, 3, 0, 0), "America/Los_Angeles")  # first second after it
@example(datetime(2024, 11, 3, 1, 30, 0), "America/Los_Angeles")  # the repeated hour (fold=0)
@example(datetime(2024, 10, 27, 2, 30, 0), "Europe/Berlin")
@example(datetime(2024, 4, 7, 1, 45, 0), "Australia/Lord_Howe")  # a 30-minute DST shift
def test_apple_dates_across_dst_equal_datetime_arithmetic(moment, zone):
    local = moment.replace(microsecond=0, tzinfo=ZoneInfo(zone))
    offset = local.utcoffset()
    raw = _apple(local, offset)
    utc, local_text = convert_date(raw)
    assert utc == local.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert local_text == local.isoformat() if offset else local_text.endswith("+00:00")
    assert utc_seconds(utc) == local.timestamp()
    assert convert_date(raw) == _convert_date(raw)  # the cached hour path agrees with the plain one


@given(st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2100, 12, 30)),
       st.integers(-14 * 4, 14 * 4), _fraction, st.sampled_from([" ", "T"]), st.sampled_from(["", " "]),
       st.booleans())
def test_apple_converter_any_offset_and_fraction(moment, quarters, frac, sep, space, colon):
    offset = timedelta(minutes=15 * quarters)
    hh, mm = divmod(abs(quarters) * 15, 60)
    off = f"{'-' if quarters < 0 else '+'}{hh:02d}{':' if colon else ''}{mm:02d}"
    raw = f"{moment.strftime('%Y-%m-%d')}{sep}{moment.strftime('%H:%M:%S')}{frac}{space}{off}"
    utc, local = convert_date(raw)
    expected = (moment.replace(microsecond=0) - offset).strftime("%Y-%m-%dT%H:%M:%S")
    assert utc == f"{expected}{frac}Z"
    assert local == f"{moment.strftime('%Y-%m-%dT%H:%M:%S')}{frac}{off[:3]}:{off[-2:]}"
    assert convert_date(raw) == _convert_date(raw)


@given(_moment, _fraction)
def test_apple_converter_without_offset_keeps_local_only(moment, frac):
    raw = moment.strftime("%Y-%m-%d %H:%M:%S") + frac
    assert convert_date(raw) == (None, moment.strftime("%Y-%m-%dT%H:%M:%S") + frac)


@given(st.text(max_size=30))
def test_apple_converter_never_raises_and_keeps_what_it_cannot_read(raw):
    utc, local = convert_date(raw)
    assert utc is None or (utc.endswith("Z") and sort_key(utc))
    if utc is None and local is not None and local != raw:
        assert "T" in local  # a readable local time without an offset


@given(_moment, st.sampled_from(ZONES), _fraction)
def test_iso_and_cda_times_across_dst(moment, zone, frac):
    local = moment.replace(microsecond=0, tzinfo=ZoneInfo(zone))
    expected_utc = local.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + frac[:10] + "Z"
    iso = local.strftime("%Y-%m-%dT%H:%M:%S") + frac + local.strftime("%z")[:3] + ":" + local.strftime("%z")[3:]
    assert from_iso(iso)[0] == expected_utc
    cda = local.strftime("%Y%m%d%H%M%S") + frac + local.strftime("%z")
    utc, local_text = from_cda(cda)
    assert utc == expected_utc
    assert local_text.startswith(local.strftime("%Y-%m-%dT%H:%M:%S"))


# --------------------------------------------------------------------------- sort order

_utc_text = st.builds(
    lambda d, frac: d.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z",
    st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31)), _fraction)


def _instant(text: str | None) -> tuple:
    """Chronological order at microsecond resolution (what sort_key keeps); None first."""
    if text is None:
        return (0,)
    base = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
    frac = text[20:-1] if text[19] == "." else ""
    return (1, base, int(frac[:6].ljust(6, "0")))


@given(st.lists(st.one_of(st.none(), _utc_text), min_size=2, max_size=30))
def test_sort_key_order_is_chronological_order(times):
    by_key = sorted(times, key=lambda t: (sort_key(t), _instant(t)))
    by_time = sorted(times, key=_instant)
    assert [_instant(t) for t in by_key] == [_instant(t) for t in by_time]


@given(st.one_of(st.none(), _utc_text), st.one_of(st.none(), _utc_text))
def test_sort_key_compares_like_instants(a, b):
    ka, kb = sort_key(a), sort_key(b)
    assert (ka < kb) == (_instant(a) < _instant(b))
    assert (ka == kb) == (_instant(a) == _instant(b))
    assert len(ka) == 26  # fixed width: the spill line layout depends on it


@given(_moment, st.sampled_from(ZONES), st.sampled_from(ZONES))
def test_converted_times_sort_chronologically_across_zones(moment, zone_a, zone_b):
    """Two samples written in different zones (a trip) sort by their real instants."""
    a = moment.replace(tzinfo=ZoneInfo(zone_a), microsecond=0)
    b = (moment + timedelta(minutes=90)).replace(tzinfo=ZoneInfo(zone_b), microsecond=0)
    ua, ub = convert_date(_apple(a, a.utcoffset()))[0], convert_date(_apple(b, b.utcoffset()))[0]
    assert (sort_key(ua) < sort_key(ub)) == (a.timestamp() < b.timestamp())


@pytest.mark.parametrize("raw", ["2024-02-30 08:00:00 -0800", "2024-02-03 24:00:00 -0800", "2024-02-03 08:00:00 -2400"])
def test_apple_converter_impossible_values_are_kept_as_written(raw):
    assert convert_date(raw) == (None, raw)
