"""Synthetic Apple Health exports with planted fake PII, for tests, `healthdelta demo`
and benchmarks.

Every byte is a function of the arguments: seeded `random.Random` streams keyed by
strings, a fixed base date, never the clock. The HealthKit Records form one endless
stream in time order, seeded once; an export of N records holds the first N of that
stream. "The next export" (`base=`) is simply the first N + new records again, with
every `device` pointer changed, so old records keep their exact text. Everything else
(workouts, activity summaries, ECGs, CDA entries) is derived per local day from
(seed, day) and included up to the export time, so it grows the same way; clinical
records are fixed per seed.

Apple lists Records grouped by type, while the stream is in time order, so record text
is spooled per type into temporary files and concatenated at the end: memory stays flat
for GB-sized exports and every file write is a large block.
"""

from __future__ import annotations

import base64
import bisect
import heapq
import json
import math
import os
import random
import shutil
import sys
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, NamedTuple

from healthdelta.errors import UsageError

EXPORT_FOLDER = "apple_health_export"
MAX_PEOPLE = 8

_NS = "healthdelta-synth-v1"  # part of every RNG key: changing it changes every export
_APOS = "\u2019"  # Apple names devices "Jane’s iPhone" with a typographic apostrophe

# t = 0 is 2020-03-02 00:00 -0800, six days before the US switch to daylight time, so
# even a small export crosses a -0800/-0700 change.
_BASE_DATE = date(2020, 3, 2)
_BASE_UTC = datetime(2020, 3, 2, 8, 0, tzinfo=UTC)
_TIME_ZONE = "America/Los_Angeles"

_CHUNK_CHARS = 4 << 20  # text collected before one write
_SPILL_CHARS = 16 << 20  # record text held in memory across all types before spilling

# --------------------------------------------------------------------------- people

_FEMALE = ("Margarethe", "Annelise", "Evangeline", "Ottoline", "Leocadia", "Florentyna",
           "Wilhelmina", "Seraphina", "Philippa", "Cordelia", "Henrietta", "Rosalind")
_MALE = ("Thaddeus", "Bartholomew", "Casimir", "Ignatius", "Leopold", "Ambrose",
         "Cornelius", "Lysander", "Percival", "Evander", "Octavian", "Benedikt")
_FAMILY = ("Quist", "Vandermeulen", "Oyelaran", "Abernathy", "Szczepanski", "Nakagawa",
           "Okonkwo", "Lindqvist", "Castellanos", "Thorvaldsen", "Achterberg", "Ravensworth")
_STREETS = ("Alder Creek Rd", "Juniper Hollow Ln", "Wexford Terrace", "Marlowe St",
            "Kingfisher Way", "Larkspur Ct", "Quillan Ave", "Fernbrook Dr")
_CITIES = ("Millbrook Falls", "Cedarhaven", "Port Alderney", "Wrenfield",
           "Ashgrove Springs", "Holloway Bay")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")


@dataclass(frozen=True)
class Person:
    """The planted fake PII of one person."""

    given: str
    family: str
    birth_date: str  # ISO, e.g. "1961-04-07"
    sex: str  # "HKBiologicalSexFemale" / "HKBiologicalSexMale"
    mrn: str
    address_line: str
    city: str
    postal_code: str
    phone: str
    email: str
    device_name: str  # "Margarethe’s Apple Watch"

    @property
    def full_name(self) -> str:
        return f"{self.given} {self.family}"

    def pii_strings(self) -> tuple[str, ...]:
        """Every planted value in every form it is written in, for leak tests.

        The postal code is left out on purpose: five digits also occur inside
        coordinates and sample values, so a substring search would report false leaks.
        """
        born = date.fromisoformat(self.birth_date)
        forms = (
            self.full_name, f"{self.family}, {self.given}", self.given, self.family,
            self.birth_date, born.strftime("%Y%m%d"), _us_long_date(born), _en_de_long_date(born),
            self.mrn, self.address_line, self.city, self.phone, self.email, self.device_name,
            f"{self.given}{_APOS}s", f"{self.given}'s",
        )
        return tuple(dict.fromkeys(forms))


def make_person(seed: int, index: int = 0) -> Person:
    """Person `index` of the family planted by `seed`; 0 is the export's owner, the
    others are the owner's children (same family name and address)."""
    if not 0 <= index < MAX_PEOPLE:
        raise UsageError(f"person index must be between 0 and {MAX_PEOPLE - 1}")
    family_rng = _rng(seed, "family")
    family = family_rng.choice(_FAMILY)
    address_line = f"{family_rng.randrange(100, 9900)} {family_rng.choice(_STREETS)}"
    city = family_rng.choice(_CITIES)
    postal_code = f"97{family_rng.randrange(1000):03d}"
    # Distinct per family member: 17 is coprime to the 100 numbers of the fictional range.
    phone_line = (family_rng.randrange(100) + 17 * index) % 100
    # Per-seed shuffles give every family member a distinct given name.
    female = list(_FEMALE)
    male = list(_MALE)
    family_rng.shuffle(female)
    family_rng.shuffle(male)

    rng = _rng(seed, "person", index)
    is_female = rng.random() < 0.5
    given = (female if is_female else male)[index]
    # Birth dates stay before 2010, the earliest date of any other kind written, so a
    # leak test never mistakes an ordinary date for a planted birth date.
    if index == 0:
        born = date(1950, 1, 1) + timedelta(days=rng.randrange(40 * 365))
    else:
        born = date(2004, 1, 1) + timedelta(days=rng.randrange(6 * 365))
    return Person(
        given=given,
        family=family,
        birth_date=born.isoformat(),
        sex="HKBiologicalSexFemale" if is_female else "HKBiologicalSexMale",
        mrn=_mrn(rng),
        address_line=address_line,
        city=city,
        postal_code=postal_code,
        phone=_phone(rng.choice((503, 541, 971)), phone_line),
        email=f"{given.lower()}.{family.lower()}{rng.randrange(10, 100)}@example.net",
        device_name=f"{given}{_APOS}s Apple Watch",
    )


def _namesake(seed: int, owner: Person) -> Person:
    """Someone else with exactly the owner's name (another birth date, MRN and home):
    the case identity matching must never merge."""
    rng = _rng(seed, "namesake")
    born = date.fromisoformat(owner.birth_date) + timedelta(days=rng.choice((-1, 1)) * rng.randrange(2000, 7000))
    mrn = _mrn(rng)
    while mrn == owner.mrn:
        mrn = _mrn(rng)
    phone = owner.phone
    while phone == owner.phone:
        phone = _phone(rng.choice((503, 541, 971)), rng.randrange(100))
    return Person(
        given=owner.given,
        family=owner.family,
        birth_date=born.isoformat(),
        sex=owner.sex,
        mrn=mrn,
        address_line=f"{rng.randrange(100, 9900)} {rng.choice(_STREETS)}",
        city=rng.choice([c for c in _CITIES if c != owner.city]),
        postal_code=f"98{rng.randrange(1000):03d}",
        phone=phone,
        email=f"{owner.given.lower()}{rng.randrange(100, 1000)}@example.com",
        device_name=owner.device_name,
    )


def _mrn(rng: random.Random) -> str:
    # A letter outside A-F keeps MRNs from ever matching inside hex UUIDs or pointers.
    return f"{rng.choice('KMPRTW')}{rng.randrange(10**7):07d}"


def _phone(area_code: int, line: int) -> str:
    # 555-0100..0199 is reserved for fiction.
    return f"+1-{area_code}-555-01{line:02d}"


def _us_long_date(d: date) -> str:
    return f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"


def _en_de_long_date(d: date) -> str:
    return f"{d.day} {_MONTHS[d.month - 1]} {d.year}"


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class SynthExport:
    """One generated export and what was planted in it."""

    root: Path  # the folder holding apple_health_export/, or the zip when zip=True
    export_dir: Path  # .../apple_health_export (absent when zip=True, keep_folder=False)
    zip_path: Path | None
    people: tuple[Person, ...]  # people[0] owns the export; a namesake, if any, is last
    counts: Mapping[str, int]
    export_xml_bytes: int
    seed: int
    generation: int  # 0 for a first export, base.generation + 1 for the next one


def generate_export(
    out_dir: Path,
    *,
    seed: int = 0,
    records: int = 2000,
    target_bytes: int | None = None,
    people: int = 1,
    ambiguous_person: bool = False,
    base: SynthExport | None = None,
    new_records: int = 0,
    zip: bool = False,
    keep_folder: bool = True,
) -> SynthExport:
    """Write `out_dir/apple_health_export/` (and/or `out_dir/export.zip`).

    `records` top-level HealthKit Records are written, unless `target_bytes` is given:
    then records are added until export.xml is about that size (never below the ~20 KB
    of header and clinical records every export has). With `base`, the export
    is the one that follows `base`: the seed, people and records of `base` plus
    `new_records` later ones (`seed`, `records`, `target_bytes`, `people` and
    `ambiguous_person` are then taken from `base`).
    """
    out_dir = Path(out_dir)
    if base is not None:
        seed = base.seed
        generation = base.generation + 1
        people = base.counts["people"]
        ambiguous_person = bool(base.counts["ambiguous_people"])
        record_limit: int | None = base.counts["records"] + new_records
        target_bytes = None
    else:
        generation = 0
        record_limit = None if target_bytes is not None else records
    if record_limit is not None and record_limit < 0 or new_records < 0:
        raise UsageError("record counts must not be negative")
    if target_bytes is not None and target_bytes <= 0:
        raise UsageError("target_bytes must be positive")
    if not 1 <= people < MAX_PEOPLE:
        raise UsageError(f"people must be between 1 and {MAX_PEOPLE - 1}")
    if not zip and not keep_folder:
        raise UsageError("keep_folder=False needs zip=True")

    export_dir = out_dir / EXPORT_FOLDER
    zip_path = out_dir / "export.zip" if zip else None
    if (keep_folder and export_dir.exists()) or (zip_path is not None and zip_path.exists()):
        raise UsageError("the output directory already holds an export")

    owner = make_person(seed, 0)
    children = [make_person(seed, i) for i in range(1, people)]
    namesake = _namesake(seed, owner) if ambiguous_person else None
    persons = (owner, *children, *([namesake] if namesake else []))

    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f".tmp-synth-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        built = work / EXPORT_FOLDER
        built.mkdir(parents=True)
        ctx = _Context(seed, generation, owner)
        counts, export_time = _build(ctx, built, work / "spool", children, namesake, record_limit, target_bytes)
        counts["people"] = people
        counts["ambiguous_people"] = int(ambiguous_person)
        export_xml_bytes = (built / "export.xml").stat().st_size
        if zip_path is not None:
            _write_zip(built, work / "export.zip", ctx.clock.local_datetime(export_time))
            os.replace(work / "export.zip", zip_path)
        if keep_folder:
            os.replace(built, export_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return SynthExport(
        root=zip_path if zip_path is not None else out_dir,
        export_dir=export_dir,
        zip_path=zip_path,
        people=persons,
        counts=MappingProxyType(dict(sorted(counts.items()))),
        export_xml_bytes=export_xml_bytes,
        seed=seed,
        generation=generation,
    )


def _rng(seed: int, *key: object) -> random.Random:
    # String seeds are hashed with SHA-512, so streams do not depend on PYTHONHASHSEED.
    return random.Random(":".join((_NS, str(seed), *map(str, key))))


# --------------------------------------------------------------------------- time


def _us_daylight_time(utc: datetime) -> bool:
    """US rule since 2007: 2nd Sunday of March 02:00 PST to 1st Sunday of November
    02:00 PDT. Computed here instead of via zoneinfo so output never depends on the
    machine's tz database."""
    march = date(utc.year, 3, 1)
    november = date(utc.year, 11, 1)
    start = datetime(utc.year, 3, 8 + (6 - march.weekday()) % 7, 10, tzinfo=UTC)
    end = datetime(utc.year, 11, 1 + (6 - november.weekday()) % 7, 9, tzinfo=UTC)
    return start <= utc < end


_MMSS = tuple(f"{m:02d}:{s:02d}" for m in range(60) for s in range(60))


class _Clock:
    """Times are int seconds since `_BASE_UTC`, written as US Pacific local time.

    Pacific offsets are whole hours, so one table entry per UTC hour formats every
    second of it: a timestamp costs a list lookup and two concatenations, which is
    what makes writing ~10^7 of them affordable. `table[t // 3600 + HOUR_SHIFT]` is
    (local "YYYY-MM-DD HH:", " -0800", seconds local time is ahead of -0800).
    """

    HOUR_SHIFT = 24 * 14  # the table starts two weeks before t = 0 (clinical records are older)

    def __init__(self) -> None:
        self.table: list[tuple[str, str, int]] = []
        self._utc_hours: dict[int, str] = {}
        self.extend(0)

    def extend(self, t: int) -> None:
        """Cover every hour up to two days after `t` (the record stream relies on it)."""
        for index in range(len(self.table), t // 3600 + 48 + self.HOUR_SHIFT + 1):
            utc = _BASE_UTC + timedelta(hours=index - self.HOUR_SHIFT)
            offset = -7 if _us_daylight_time(utc) else -8
            local = utc + timedelta(hours=offset)
            self.table.append((local.strftime("%Y-%m-%d %H:"), f" {offset:+03d}00", (offset + 8) * 3600))

    def _entry(self, t: int) -> tuple[str, str, int]:
        index = t // 3600 + self.HOUR_SHIFT
        if index >= len(self.table):
            self.extend(t)
        return self.table[index]

    def apple(self, t: int) -> str:
        """`2020-03-02 07:41:09 -0800`, Apple's export.xml format."""
        prefix, suffix, _ = self._entry(t)
        return prefix + _MMSS[t % 3600] + suffix

    def local(self, t: int) -> int:
        """Seconds since local midnight of `_BASE_DATE`, so `local(t) // 86400` is the local day."""
        return t + self._entry(t)[2]

    def at(self, day: int, second_of_day: int) -> int:
        """t of local wall time `second_of_day` on local day `day`."""
        wall = day * 86400 + second_of_day
        return wall - self._entry(wall - self._entry(wall)[2])[2]

    def local_datetime(self, t: int) -> datetime:
        tz = timezone(timedelta(seconds=self._entry(t)[2] - 8 * 3600))
        return (_BASE_UTC + timedelta(seconds=t)).astimezone(tz)

    def cda(self, t: int) -> str:
        """`20200302074109-0800`, the CDA TS format Apple uses."""
        return self.local_datetime(t).strftime("%Y%m%d%H%M%S%z")

    def utc_iso(self, t: int) -> str:
        """`2020-03-02T15:41:09Z`, as in GPX files."""
        hour = t // 3600
        prefix = self._utc_hours.get(hour)
        if prefix is None:
            prefix = self._utc_hours[hour] = (_BASE_UTC + timedelta(hours=hour)).strftime("%Y-%m-%dT%H:")
        return prefix + _MMSS[t % 3600] + "Z"


def _day_date(day: int) -> date:
    return _BASE_DATE + timedelta(days=day)


# --------------------------------------------------------------------------- devices

# (first day, Watch hardware, watchOS, iPhone hardware, iOS): software versions move on
# as they did in reality, and with them `sourceVersion` and the device strings.
_ERAS = (
    (date(2019, 9, 1), "Watch5,4", "6.1.3", "iPhone12,1", "13.3.1"),
    (date(2020, 9, 20), "Watch6,2", "7.0.1", "iPhone12,1", "14.0.1"),
    (date(2021, 9, 25), "Watch6,2", "8.0", "iPhone13,2", "15.0"),
    (date(2022, 9, 20), "Watch6,2", "9.0", "iPhone14,5", "16.0.2"),
    (date(2022, 11, 1), "Watch6,2", "9.1", "iPhone14,5", "16.1"),
    (date(2023, 9, 25), "Watch6,2", "10.0.1", "iPhone14,5", "17.0.2"),
)
_ERA_STARTS = tuple(e[0] for e in _ERAS)
_POINTER_SLOTS = 16  # distinct HKDevice pointers per device in one export


@dataclass(frozen=True)
class _Devices:
    """Device strings of one era, escaped for an XML attribute as Apple writes them."""

    watch_hardware: str
    watch_version: str
    phone_version: str
    watch: tuple[str, ...]  # one per pointer slot
    phone: tuple[str, ...]
    cuff: tuple[str, ...]


class _Context:
    """What every part of one export derives from."""

    def __init__(self, seed: int, generation: int, owner: Person) -> None:
        self.seed = seed
        self.generation = generation
        self.owner = owner
        self.clock = _Clock()
        self.watch_name = _xml_attr(owner.device_name)
        self.phone_name = _xml_attr(f"{owner.given}{_APOS}s iPhone")
        self.weight_lb = _rng(seed, "weight").uniform(135, 195)
        # Real exports print a different object address for the same sample every time
        # (CONTRACT §5 keeps it out of record keys). The generation is baked into the
        # third hex digit, so consecutive exports never share a pointer.
        prng = _rng(seed, "pointers", generation)
        self._pointers = [
            tuple(f"0x28{generation % 16:x}{prng.getrandbits(20):05x}{prng.choice('02468ace')}"
                  for _ in range(_POINTER_SLOTS))
            for _ in range(3)
        ]
        self._eras: dict[int, _Devices] = {}

    def devices(self, day: int) -> _Devices:
        era = bisect.bisect_right(_ERA_STARTS, _day_date(day)) - 1
        found = self._eras.get(era)
        if found is None:
            _, watch_hw, watch_sw, phone_hw, phone_sw = _ERAS[era]
            watch_ptr, phone_ptr, cuff_ptr = self._pointers
            found = _Devices(
                watch_hardware=watch_hw,
                watch_version=watch_sw,
                phone_version=phone_sw,
                watch=tuple(_device(p, "Apple Watch", "Apple Inc.", "Watch",
                                    f", hardware:{watch_hw}, software:{watch_sw}") for p in watch_ptr),
                phone=tuple(_device(p, "iPhone", "Apple Inc.", "iPhone",
                                    f", hardware:{phone_hw}, software:{phone_sw}") for p in phone_ptr),
                cuff=tuple(_device(p, "BP7450", "OMRON HEALTHCARE Co., Ltd.", "BP7450", "") for p in cuff_ptr),
            )
            self._eras[era] = found
        return found


def _device(pointer: str, name: str, manufacturer: str, model: str, rest: str) -> str:
    return f"&lt;&lt;HKDevice: {pointer}&gt;, name:{name}, manufacturer:{manufacturer}, model:{model}{rest}&gt;"


def _xml_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _xml_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --------------------------------------------------------------------------- records

_Q = "HKQuantityTypeIdentifier"
_C = "HKCategoryTypeIdentifier"
# Apple writes Records grouped by type. The groups follow HealthKit's internal type codes
# (BodyMass 3, HeartRate 5, ..., RestingHeartRate 118, HRV 139), our reading of real
# exports; parsers must not rely on any order.
_RECORD_TYPES = (
    _Q + "BodyMass", _Q + "HeartRate", _Q + "StepCount", _Q + "DistanceWalkingRunning",
    _Q + "BasalEnergyBurned", _Q + "ActiveEnergyBurned", _Q + "OxygenSaturation",
    _Q + "BloodPressureSystolic", _Q + "BloodPressureDiastolic", _C + "SleepAnalysis",
    _C + "AppleStandHour", _C + "MindfulSession", _Q + "RestingHeartRate",
    _Q + "HeartRateVariabilitySDNN",
)
(_BODY_MASS, _HEART_RATE, _STEPS, _DISTANCE, _BASAL, _ACTIVE, _SPO2, _SYSTOLIC, _DIASTOLIC,
 _SLEEP, _STAND, _MINDFUL, _RESTING_HR, _HRV) = range(len(_RECORD_TYPES))
_CORRELATION = len(_RECORD_TYPES)  # spool slot of the Correlation elements
_BP_PAIR = -1  # schedule kind: systolic + diastolic + their Correlation

# Background sampling gets denser over the first weeks, as when someone starts wearing
# a watch: small exports span about two weeks (a DST change, several workouts), big ones
# a few years at ~2,500 samples a day. (records in segment, seconds between records)
_SEGMENTS = ((1500, 864), (3000, 432), (7500, 172), (30000, 86), (sys.maxsize, 34))

_TZ_META = f'  <MetadataEntry key="HKTimeZone" value="{_TIME_ZONE}"/>\n'
_SLEEP_STAGES = ("HKCategoryValueSleepAnalysisAsleepCore", "HKCategoryValueSleepAnalysisAsleepDeep",
                 "HKCategoryValueSleepAnalysisAsleepREM", "HKCategoryValueSleepAnalysisAwake")
_SLEEP_WEIGHTS = (0.5, 0.17, 0.23, 0.1)


def _attrs(type_: str, source: str, version: str | None, device: str | None, unit: str | None,
           created: str, start: str, end: str, value: str | None) -> str:
    """Record attributes in Apple's order (the background loop inlines the same layout)."""
    out = f'type="{type_}" sourceName="{source}"'
    if version is not None:
        out += f' sourceVersion="{version}"'
    if device is not None:
        out += f' device="{device}"'
    if unit is not None:
        out += f' unit="{unit}"'
    out += f' creationDate="{created}" startDate="{start}" endDate="{end}"'
    if value is not None:
        out += f' value="{value}"'
    return out


def _element(attrs: str, children: str = "", tag: str = "Record") -> str:
    if not children:
        return f" <{tag} {attrs}/>\n"
    return f" <{tag} {attrs}>\n{children} </{tag}>\n"


def _meta(key: str, value: str) -> str:
    return f'  <MetadataEntry key="{key}" value="{value}"/>\n'


class _Spool:
    """Record text per type, spilled to one temporary file per type when large."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self.parts: list[list[str]] = [[] for _ in range(len(_RECORD_TYPES) + 1)]
        self._files: dict[int, BinaryIO] = {}

    def spill(self) -> None:
        for kind, parts in enumerate(self.parts):
            if parts:
                fh = self._files.get(kind)
                if fh is None:
                    self._dir.mkdir(parents=True, exist_ok=True)
                    fh = self._files[kind] = open(self._dir / f"{kind}.xml", "w+b")
                fh.write("".join(parts).encode())
                parts.clear()

    def drain_into(self, kind: int, out: _Output) -> None:
        fh = self._files.pop(kind, None)
        if fh is not None:
            with fh:
                fh.seek(0)
                out.copy_from(fh)
        out.write("".join(self.parts[kind]))
        self.parts[kind].clear()

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()


@dataclass(frozen=True)
class _Tally:
    """What the record stream wrote."""

    count: int
    by_type: list[int]
    metadata_entries: int
    with_metadata: int
    hrv_beats: int
    correlations: int
    step_pairs: int
    last_created: int  # creation time of the newest record


class _Heads(NamedTuple):
    """The fixed start of each kind of background Record, up to the creationDate value,
    one per pointer slot: `f"{head}{created}..."` is much cheaper than the full f-string."""

    heart_rate: tuple[str, ...]
    active_watch: tuple[str, ...]
    active_phone: tuple[str, ...]
    basal: tuple[str, ...]
    steps_watch: tuple[str, ...]
    steps_phone: tuple[str, ...]
    distance_watch: tuple[str, ...]
    distance_phone: tuple[str, ...]


def _heads(ctx: _Context, devices: _Devices) -> _Heads:
    def make(kind: int, on_watch: bool, unit: str) -> tuple[str, ...]:
        source, version, pool = ((ctx.watch_name, devices.watch_version, devices.watch) if on_watch
                                 else (ctx.phone_name, devices.phone_version, devices.phone))
        return tuple(f' <Record type="{_RECORD_TYPES[kind]}" sourceName="{source}" sourceVersion="{version}" '
                     f'device="{device}" unit="{unit}" creationDate="' for device in pool)

    return _Heads(make(_HEART_RATE, True, "count/min"), make(_ACTIVE, True, "Cal"), make(_ACTIVE, False, "Cal"),
                  make(_BASAL, True, "Cal"), make(_STEPS, True, "count"), make(_STEPS, False, "count"),
                  make(_DISTANCE, True, "mi"), make(_DISTANCE, False, "mi"))


# Export.xml bytes that grow with each day besides Records (activity summary,
# workouts, correlations): lets `target_bytes` stop the record stream at the right time.
_DAY_OVERHEAD_BYTES = 2000


def _stream_records(ctx: _Context, spool: _Spool, record_limit: int | None, byte_limit: int | None) -> _Tally:
    """Spool the first records of the endless record stream of `ctx.seed`, until
    `record_limit` records or about `byte_limit` bytes.

    Nothing but the point of stopping may depend on the limits, or the next export
    would not start with the records of this one. This loop writes most of a big
    export, hence the inlined formatting and counters.
    """
    rng = _rng(ctx.seed, "records")
    rand = rng.random
    clock = ctx.clock
    table = clock.table
    shift = clock.HOUR_SHIFT
    mmss = _MMSS

    def fmt(t: int) -> str:
        entry = table[t // 3600 + shift]
        return entry[0] + mmss[t % 3600] + entry[1]

    parts = spool.parts
    by_type = [0] * len(_RECORD_TYPES)
    limit = sys.maxsize if record_limit is None else record_limit
    budget = sys.maxsize
    count = chars = metadata_entries = with_metadata = hrv_beats = correlations = step_pairs = last_created = 0
    next_spill = _SPILL_CHARS
    schedule: list[tuple[int, int, int, Any]] = []
    sequence = 0
    next_day = 0
    devices = ctx.devices(0)
    (heart_rate, active_watch, active_phone, basal, steps_watch, steps_phone, distance_watch,
     distance_phone) = _heads(ctx, devices)
    segment = 0
    segment_left, spacing = _SEGMENTS[0]
    segment_t0 = segment_j0 = j = 0
    while count < limit and chars < budget:
        if segment_left == 0:
            segment_t0 += (j - segment_j0) * spacing
            segment_j0 = j
            segment += 1
            segment_left, spacing = _SEGMENTS[segment]
        segment_left -= 1
        t = segment_t0 + (j - segment_j0) * spacing + int(rand() * spacing)
        j += 1
        entry = table[t // 3600 + shift]
        local = t + entry[2]
        day = local // 86400
        while next_day <= day:
            clock.extend(t)
            for created, kind, payload in _schedule_day(ctx, next_day):
                heapq.heappush(schedule, (created, sequence, kind, payload))
                sequence += 1
            next_day += 1
            if ctx.devices(day) is not devices:
                devices = ctx.devices(day)
                (heart_rate, active_watch, active_phone, basal, steps_watch, steps_phone, distance_watch,
                 distance_phone) = _heads(ctx, devices)
            if byte_limit is not None:
                budget = byte_limit - next_day * _DAY_OVERHEAD_BYTES

        while schedule and schedule[0][0] <= t and count < limit and chars < budget:
            created, _, kind, payload = heapq.heappop(schedule)
            if created > last_created:
                last_created = created
            if kind != _BP_PAIR:
                text, metadata, beats = payload
                parts[kind].append(text)
                by_type[kind] += 1
                count += 1
                chars += len(text) + 2
                if metadata:
                    metadata_entries += metadata
                    with_metadata += 1
                hrv_beats += beats
                continue
            systolic, diastolic, correlation_head = payload
            text = _element(systolic)
            parts[_SYSTOLIC].append(text)
            by_type[_SYSTOLIC] += 1
            count += 1
            chars += len(text)
            if count < limit and chars < budget:
                text = _element(diastolic)
                parts[_DIASTOLIC].append(text)
                by_type[_DIASTOLIC] += 1
                count += 1
                # Apple repeats the component samples inside the Correlation with identical attributes.
                correlation = (f" <Correlation {correlation_head}>\n" + _meta("HKWasUserEntered", "0")
                               + f"  <Record {diastolic}/>\n  <Record {systolic}/>\n </Correlation>\n")
                parts[_CORRELATION].append(correlation)
                correlations += 1
                chars += len(text) + len(correlation)
        if count >= limit or chars >= budget:
            break

        slot = j & 15
        hour = (local % 86400) // 3600
        night = hour < 7 or hour == 23
        start = entry[0] + mmss[t % 3600] + entry[1]
        metadata = 0
        r = rand()
        if r < (0.48 if night else 0.36):
            kind = _HEART_RATE
            motion = rand()
            created = t + 60 + int(motion * 420)
            text = (f'{heart_rate[slot]}{fmt(created)}" startDate="{start}" endDate="{start}" '
                    f'value="{int((52 if night else 64) + rand() * (18 if night else 50))}"')
            if motion < 0.8:
                metadata = 1
                text += (f'>\n  <MetadataEntry key="HKMetadataKeyHeartRateMotionContext" '
                         f'value="{"0" if motion < 0.45 else "1" if motion < 0.7 else "2"}"/>\n </Record>\n')
            else:
                text += "/>\n"
        elif r < (0.66 if night else 0.62):
            kind = _ACTIVE
            end = t + 60 + int(rand() * min(spacing, 900))
            created = end + 20
            text = (f'{(active_phone if rand() < 0.05 else active_watch)[slot]}{fmt(created)}" startDate="{start}" '
                    f'endDate="{fmt(end)}" value="{(end - t) * (0.004 if night else 0.012 + 0.09 * rand()):.3f}"/>\n')
        elif r < (0.96 if night else 0.74):
            kind = _BASAL
            end = t + 300 + int(rand() * 1500)
            created = end + 30
            text = (f'{basal[slot]}{fmt(created)}" startDate="{start}" endDate="{fmt(end)}" '
                    f'value="{(end - t) * (0.0175 + 0.002 * rand()):.3f}"/>\n')
        elif r < (0.98 if night else 0.88):
            # Steps: usually both devices count the same walk over overlapping intervals
            # (the double count a naive sum gets wrong); sometimes only one was carried.
            kind = _STEPS
            end = t + 30 + int(rand() * min(spacing, 570))
            steps = max(1, int(spacing * (0.2 + 1.6 * rand()) * (0.1 if night else 1.0)))
            who = rand()  # < 0.7 both devices, < 0.85 the watch only, else the phone only
            if who < 0.85:
                created = end + 45
                text = (f'{steps_watch[slot]}{fmt(created)}" startDate="{start}" endDate="{fmt(end)}" '
                        f'value="{steps}"/>\n')
            if who < 0.7:
                parts[_STEPS].append(text)
                by_type[_STEPS] += 1
                count += 1
                chars += len(text) + 2
                last_created = max(last_created, created)
                if count >= limit or chars >= budget:
                    break
                step_pairs += 1
            if who < 0.7 or who >= 0.85:
                phone_start = t - int(rand() * 120)
                phone_end = end + int(rand() * 180)
                created = phone_end + 300
                text = (f'{steps_phone[slot]}{fmt(created)}" startDate="{fmt(phone_start)}" '
                        f'endDate="{fmt(phone_end)}" value="{int(steps * (0.85 + 0.25 * rand()))}"/>\n')
        else:
            kind = _DISTANCE
            end = t + 30 + int(rand() * min(spacing, 570))
            created = end + 45
            heads = distance_phone if rand() < 0.4 else distance_watch
            miles = spacing * (0.2 + 1.6 * rand()) * 0.000435 * (0.1 if night else 1.0)
            text = f'{heads[slot]}{fmt(created)}" startDate="{start}" endDate="{fmt(end)}" value="{miles:.5f}"/>\n'

        parts[kind].append(text)
        by_type[kind] += 1
        count += 1
        chars += len(text) + 2  # +2: the UTF-8 apostrophe in the sourceName
        if metadata:
            metadata_entries += metadata
            with_metadata += 1
        if created > last_created:
            last_created = created
        if chars >= next_spill:
            spool.spill()
            next_spill = chars + _SPILL_CHARS

    return _Tally(count=count, by_type=by_type, metadata_entries=metadata_entries, with_metadata=with_metadata,
                  hrv_beats=hrv_beats, correlations=correlations, step_pairs=step_pairs, last_created=last_created)


def _schedule_day(ctx: _Context, day: int) -> list[tuple[int, int, Any]]:
    """The once-or-few-times-a-day samples of local day `day`, as
    (creation time, kind, payload); they enter the stream when it reaches their
    creation time, as a sample enters HealthKit when it is saved."""
    rng = _rng(ctx.seed, "day", day)
    clock = ctx.clock
    fmt = clock.apple
    dev = ctx.devices(day)
    watch, phone = ctx.watch_name, ctx.phone_name
    events: list[tuple[int, int, Any]] = []

    def add(kind: int, text: str, created: int, metadata: int = 0, beats: int = 0) -> None:
        events.append((created, kind, (text, metadata, beats)))

    def slot() -> int:
        return len(events) % _POINTER_SLOTS

    # Stand hours, written when each hour is over.
    for hour in range(7, 23):
        start = clock.at(day, hour * 3600)
        end = clock.at(day, (hour + 1) * 3600)
        stood = "Stood" if rng.random() < 0.75 else "Idle"
        add(_STAND, _element(_attrs(_RECORD_TYPES[_STAND], watch, dev.watch_version, dev.watch[slot()], None,
                                    fmt(end + 95), fmt(start), fmt(end), f"HKCategoryValueAppleStandHour{stood}")),
            end + 95)

    # Night-time blood oxygen.
    for _ in range(rng.randrange(3, 8)):
        t = clock.at(day, rng.randrange(3600, 6 * 3600))
        add(_SPO2, _element(_attrs(_RECORD_TYPES[_SPO2], watch, dev.watch_version, dev.watch[slot()], "%",
                                   fmt(t + 40), fmt(t), fmt(t), f"{rng.randrange(93, 100) / 100:.2f}")), t + 40)

    # HRV measurements with their beat-to-beat list.
    for _ in range(rng.randrange(2, 5)):
        t = clock.at(day, rng.randrange(0, 86400 - 120))
        beats, beat_lines = _hrv_beats(rng, clock.local(t) % 86400)
        beat_list = f"  <HeartRateVariabilityMetadataList>\n{beat_lines}  </HeartRateVariabilityMetadataList>\n"
        add(_HRV, _element(_attrs(_RECORD_TYPES[_HRV], watch, dev.watch_version, dev.watch[slot()], "ms",
                                  fmt(t + 75), fmt(t), fmt(t + 60), f"{rng.uniform(18, 95):.4f}"), beat_list),
            t + 75, beats=beats)

    # Resting heart rate, computed once the day is over.
    start = clock.at(day, rng.randrange(0, 900))
    end = clock.at(day, 86400 - rng.randrange(60, 900))
    add(_RESTING_HR, _element(_attrs(_RECORD_TYPES[_RESTING_HR], watch, dev.watch_version, dev.watch[slot()],
                                     "count/min", fmt(end + 600), fmt(start), fmt(end), str(rng.randrange(52, 68)))),
        end + 600)

    # Morning weight: a Withings scale app (no version, no device, its own metadata keys) or typed in.
    if rng.random() < 0.55:
        t = clock.at(day, rng.randrange(6 * 3600 + 1800, 8 * 3600))
        pounds = f"{ctx.weight_lb + 4 * math.sin(day / 45) + rng.uniform(-1.2, 1.2):.1f}"
        if rng.random() < 0.8:
            modified = (_BASE_UTC + timedelta(seconds=t + 5)).strftime("%Y-%m-%d %H:%M:%S +0000")
            children = _meta("HKWasUserEntered", "0") + _meta("Modified Date", modified) + _meta("Meastype", "1")
            add(_BODY_MASS, _element(_attrs(_RECORD_TYPES[_BODY_MASS], "Health Mate", None, None, "lb",
                                            fmt(t + 5), fmt(t), fmt(t), pounds), children), t + 5, 3)
        else:
            add(_BODY_MASS, _element(_attrs(_RECORD_TYPES[_BODY_MASS], "Health", dev.phone_version, None, "lb",
                                            fmt(t + 30), fmt(t), fmt(t), pounds), _meta("HKWasUserEntered", "1")),
                t + 30, 1)

    # Blood pressure from a cuff app: two samples plus the Correlation that joins them.
    if rng.random() < 0.4:
        t = clock.at(day, rng.randrange(7 * 3600, 9 * 3600))
        device = dev.cuff[day % _POINTER_SLOTS]
        stamp = (fmt(t + 8), fmt(t), fmt(t))
        systolic = _attrs(_RECORD_TYPES[_SYSTOLIC], "OMRON connect", "7.9.1", device, "mmHg", *stamp,
                          str(rng.randrange(108, 146)))
        diastolic = _attrs(_RECORD_TYPES[_DIASTOLIC], "OMRON connect", "7.9.1", device, "mmHg", *stamp,
                           str(rng.randrange(66, 94)))
        head = (f'type="HKCorrelationTypeIdentifierBloodPressure" sourceName="OMRON connect" sourceVersion="7.9.1" '
                f'device="{device}" creationDate="{stamp[0]}" startDate="{stamp[1]}" endDate="{stamp[2]}"')
        events.append((t + 8, _BP_PAIR, (systolic, diastolic, head)))

    # An evening session: the watch's Breathe app, or a meditation app syncing its own samples.
    if rng.random() < 0.3:
        t = clock.at(day, rng.randrange(20 * 3600, 22 * 3600))
        end = t + 60 * rng.randrange(1, 16)
        if rng.random() < 0.5:
            add(_MINDFUL, _element(_attrs(_RECORD_TYPES[_MINDFUL], watch, dev.watch_version, dev.watch[slot()], None,
                                          fmt(end + 2), fmt(t), fmt(end), "HKCategoryValueNotApplicable"), _TZ_META),
                end + 2, 1)
        else:
            sync = _meta("HKMetadataKeySyncIdentifier", _uuid(rng)) + _meta("HKMetadataKeySyncVersion", "1")
            add(_MINDFUL, _element(_attrs(_RECORD_TYPES[_MINDFUL], "Stillwater", "4.12.0", None, None,
                                          fmt(end + 40), fmt(t), fmt(end), "HKCategoryValueNotApplicable"), sync),
                end + 40, 2)

    # The night starting this evening: in bed (phone) and sleep stages (watch), all
    # saved when the watch syncs after waking up.
    bed = clock.at(day, rng.randrange(22 * 3600 + 1800, 24 * 3600))
    wake = bed + rng.randrange(6 * 3600, 8 * 3600 + 1800)
    saved = wake + rng.randrange(300, 1800)
    add(_SLEEP, _element(_attrs(_RECORD_TYPES[_SLEEP], phone, dev.phone_version, dev.phone[slot()], None,
                                fmt(saved), fmt(bed), fmt(wake), "HKCategoryValueSleepAnalysisInBed"), _TZ_META),
        saved, 1)
    t = bed + rng.randrange(300, 1500)
    while t < wake - 300:
        end = min(wake, t + rng.randrange(300, 2700))
        stage = rng.choices(_SLEEP_STAGES, _SLEEP_WEIGHTS)[0]
        add(_SLEEP, _element(_attrs(_RECORD_TYPES[_SLEEP], watch, dev.watch_version, dev.watch[slot()], None,
                                    fmt(saved), fmt(t), fmt(end), stage), _TZ_META), saved, 1)
        t = end
    return events


def _hrv_beats(rng: random.Random, second_of_day: int) -> tuple[int, str]:
    """`<InstantaneousBeatsPerMinute bpm="71" time="7:42:19.34 PM"/>` lines: local
    12-hour clock with centiseconds, as Apple writes them."""
    lines = []
    at = second_of_day + rng.uniform(0, 1.5)
    for _ in range(rng.randrange(40, 71)):
        bpm = rng.randrange(58, 84)
        whole = int(at) % 86400
        hour = whole // 3600
        lines.append(f'   <InstantaneousBeatsPerMinute bpm="{bpm}" time="{hour % 12 or 12}:{whole // 60 % 60:02d}:'
                     f'{whole % 60:02d}.{int(at % 1 * 100):02d} {"AM" if hour < 12 else "PM"}"/>\n')
        at += 60 / bpm
    return len(lines), "".join(lines)


# --------------------------------------------------------------------------- export.xml

# The DOCTYPE of an iOS 16+ export (the fixture's, export version 8, plus the elements
# iOS 16 added: WorkoutStatistics, FileReference, Me's CardioFitnessMedicationsUse,
# ActivitySummary move time), limited to the elements written here.
_DTD = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE HealthData [
<!-- HealthKit Export Version: 13 -->
<!ELEMENT HealthData (ExportDate,Me,(Record|Correlation|Workout|ActivitySummary|ClinicalRecord)*)>
<!ATTLIST HealthData
  locale CDATA #REQUIRED
>
<!ELEMENT ExportDate EMPTY>
<!ATTLIST ExportDate
  value CDATA #REQUIRED
>
<!ELEMENT Me EMPTY>
<!ATTLIST Me
  HKCharacteristicTypeIdentifierDateOfBirth                 CDATA #REQUIRED
  HKCharacteristicTypeIdentifierBiologicalSex               CDATA #REQUIRED
  HKCharacteristicTypeIdentifierBloodType                   CDATA #REQUIRED
  HKCharacteristicTypeIdentifierFitzpatrickSkinType         CDATA #REQUIRED
  HKCharacteristicTypeIdentifierCardioFitnessMedicationsUse CDATA #REQUIRED
>
<!ELEMENT Record ((MetadataEntry|HeartRateVariabilityMetadataList)*)>
<!ATTLIST Record
  type          CDATA #REQUIRED
  unit          CDATA #IMPLIED
  value         CDATA #IMPLIED
  sourceName    CDATA #REQUIRED
  sourceVersion CDATA #IMPLIED
  device        CDATA #IMPLIED
  creationDate  CDATA #IMPLIED
  startDate     CDATA #REQUIRED
  endDate       CDATA #REQUIRED
>
<!-- Note: Any Records that appear as children of a correlation also appear as top-level records in this document. -->
<!ELEMENT Correlation ((MetadataEntry|Record)*)>
<!ATTLIST Correlation
  type          CDATA #REQUIRED
  sourceName    CDATA #REQUIRED
  sourceVersion CDATA #IMPLIED
  device        CDATA #IMPLIED
  creationDate  CDATA #IMPLIED
  startDate     CDATA #REQUIRED
  endDate       CDATA #REQUIRED
>
<!ELEMENT Workout ((MetadataEntry|WorkoutEvent|WorkoutRoute|WorkoutStatistics)*)>
<!ATTLIST Workout
  workoutActivityType   CDATA #REQUIRED
  duration              CDATA #IMPLIED
  durationUnit          CDATA #IMPLIED
  totalDistance         CDATA #IMPLIED
  totalDistanceUnit     CDATA #IMPLIED
  totalEnergyBurned     CDATA #IMPLIED
  totalEnergyBurnedUnit CDATA #IMPLIED
  sourceName            CDATA #REQUIRED
  sourceVersion         CDATA #IMPLIED
  device                CDATA #IMPLIED
  creationDate          CDATA #IMPLIED
  startDate             CDATA #REQUIRED
  endDate               CDATA #REQUIRED
>
<!ELEMENT WorkoutEvent (MetadataEntry?)>
<!ATTLIST WorkoutEvent
  type         CDATA #REQUIRED
  date         CDATA #REQUIRED
  duration     CDATA #IMPLIED
  durationUnit CDATA #IMPLIED
>
<!ELEMENT WorkoutStatistics EMPTY>
<!ATTLIST WorkoutStatistics
  type      CDATA #REQUIRED
  startDate CDATA #REQUIRED
  endDate   CDATA #REQUIRED
  average   CDATA #IMPLIED
  minimum   CDATA #IMPLIED
  maximum   CDATA #IMPLIED
  sum       CDATA #IMPLIED
  unit      CDATA #IMPLIED
>
<!ELEMENT WorkoutRoute ((MetadataEntry|FileReference)*)>
<!ATTLIST WorkoutRoute
  sourceName    CDATA #REQUIRED
  sourceVersion CDATA #IMPLIED
  device        CDATA #IMPLIED
  creationDate  CDATA #IMPLIED
  startDate     CDATA #REQUIRED
  endDate       CDATA #REQUIRED
>
<!ELEMENT FileReference EMPTY>
<!ATTLIST FileReference
  path CDATA #REQUIRED
>
<!ELEMENT ActivitySummary EMPTY>
<!ATTLIST ActivitySummary
  dateComponents           CDATA #IMPLIED
  activeEnergyBurned       CDATA #IMPLIED
  activeEnergyBurnedGoal   CDATA #IMPLIED
  activeEnergyBurnedUnit   CDATA #IMPLIED
  appleMoveTime            CDATA #IMPLIED
  appleMoveTimeGoal        CDATA #IMPLIED
  appleExerciseTime        CDATA #IMPLIED
  appleExerciseTimeGoal    CDATA #IMPLIED
  appleStandHours          CDATA #IMPLIED
  appleStandHoursGoal      CDATA #IMPLIED
>
<!ELEMENT MetadataEntry EMPTY>
<!ATTLIST MetadataEntry
  key   CDATA #REQUIRED
  value CDATA #REQUIRED
>
<!-- Note: Heart Rate Variability records captured by Apple Watch may include an associated list of instantaneous beats-per-minute readings. -->
<!ELEMENT HeartRateVariabilityMetadataList (InstantaneousBeatsPerMinute*)>
<!ELEMENT InstantaneousBeatsPerMinute EMPTY>
<!ATTLIST InstantaneousBeatsPerMinute
  bpm  CDATA #REQUIRED
  time CDATA #REQUIRED
>
<!ELEMENT ClinicalRecord EMPTY>
<!ATTLIST ClinicalRecord
  type              CDATA #REQUIRED
  identifier        CDATA #REQUIRED
  sourceName        CDATA #REQUIRED
  sourceURL         CDATA #REQUIRED
  fhirVersion       CDATA #REQUIRED
  receivedDate      CDATA #REQUIRED
  resourceFilePath  CDATA #REQUIRED
>
]>
"""


class _Output:
    """Buffered UTF-8 text writer: pieces are joined and written in large blocks.
    `fh` is unbuffered (this class buffers), so the kernel-side copy in `copy_from`
    and our own writes share one file position."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._parts: list[str] = []
        self._chars = 0

    def write(self, text: str) -> None:
        self._parts.append(text)
        self._chars += len(text)
        if self._chars >= _CHUNK_CHARS:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._fh.write("".join(self._parts).encode())
            self._parts.clear()
            self._chars = 0

    def copy_from(self, fh: BinaryIO) -> None:
        """Append all of `fh` (a spooled record group): in the kernel where it can, as
        that is most of the bytes of a big export."""
        self.flush()
        fh.flush()
        size = os.fstat(fh.fileno()).st_size
        copy_range = getattr(os, "copy_file_range", None)  # Linux only
        copied = 0
        try:
            while copy_range is not None and copied < size:
                step = copy_range(fh.fileno(), self._fh.fileno(), size - copied, copied)
                if step == 0:
                    break
                copied += step
        except OSError:  # not supported between these file systems: copy the rest here
            pass
        fh.seek(copied)
        shutil.copyfileobj(fh, self._fh, 16 << 20)


def _build(ctx: _Context, export_dir: Path, spool_dir: Path, children: list[Person], namesake: Person | None,
           record_limit: int | None, target_bytes: int | None) -> tuple[dict[str, int], int]:
    """Write every file of one export; returns the counts and the export time."""
    counts: dict[str, int] = {}
    clinical = _clinical_files(ctx, children, namesake)
    clinical_lines = "".join(f.record_line for f in clinical if f.record_line)
    owner = ctx.owner
    me = (f' <Me HKCharacteristicTypeIdentifierDateOfBirth="{owner.birth_date}" '
          f'HKCharacteristicTypeIdentifierBiologicalSex="{owner.sex}" '
          'HKCharacteristicTypeIdentifierBloodType="HKBloodTypeNotSet" '
          'HKCharacteristicTypeIdentifierFitzpatrickSkinType="HKFitzpatrickSkinTypeNotSet" '
          'HKCharacteristicTypeIdentifierCardioFitnessMedicationsUse="None"/>\n')

    spool = _Spool(spool_dir)
    try:
        byte_limit = None
        if target_bytes is not None:
            byte_limit = target_bytes - len(_DTD) - len(me) - len(clinical_lines.encode()) - 200
        tally = _stream_records(ctx, spool, record_limit, byte_limit)
        export_time = tally.last_created + 127
        last_day = ctx.clock.local(export_time) // 86400

        with open(export_dir / "export.xml", "wb", buffering=0) as fh:
            out = _Output(fh)
            out.write(_DTD)
            out.write('<HealthData locale="en_US">\n')
            out.write(f' <ExportDate value="{ctx.clock.apple(export_time)}"/>\n')
            out.write(me)
            for kind in range(len(_RECORD_TYPES) + 1):
                spool.drain_into(kind, out)
            counts.update(_write_workouts(ctx, out, export_dir / "workout-routes", last_day, export_time))
            counts["activity_summaries"] = _write_activity_summaries(ctx, out, last_day)
            out.write(clinical_lines)
            out.write("</HealthData>\n")
            out.flush()
    finally:
        spool.close()

    counts.update(_write_clinical_files(export_dir / "clinical-records", clinical))
    counts["cda_observations"] = _write_cda(ctx, export_dir / "export_cda.xml", last_day, export_time)
    counts.update(_write_ecgs(ctx, export_dir / "electrocardiograms", last_day, export_time))

    counts["records"] = tally.count
    for kind, type_ in enumerate(_RECORD_TYPES):
        counts[f"records_by_type:{type_}"] = tally.by_type[kind]
    counts["correlations"] = tally.correlations
    counts["correlation_children"] = 2 * tally.correlations
    counts["hrv_records"] = tally.by_type[_HRV]
    counts["hrv_beats"] = tally.hrv_beats
    counts["metadata_entries"] = tally.metadata_entries
    counts["records_with_metadata"] = tally.with_metadata
    counts["step_overlap_pairs"] = tally.step_pairs
    counts["days"] = last_day + 1
    return counts, export_time


# --------------------------------------------------------------------------- workouts

# (activity, weight, outdoor with a route, metres per second, distance statistic)
_WORKOUT_KINDS = (
    ("Running", 0.3, True, 2.9, _Q + "DistanceWalkingRunning"),
    ("Walking", 0.3, True, 1.4, _Q + "DistanceWalkingRunning"),
    ("Cycling", 0.15, True, 6.5, _Q + "DistanceCycling"),
    ("TraditionalStrengthTraining", 0.15, False, 0.0, None),
    ("Yoga", 0.1, False, 0.0, None),
)
# Every route starts near here (Portland, OR): tracks around one home are location PII
# that share mode must drop or coarsen (CONTRACT §9).
_HOME_LAT, _HOME_LON = 45.5231, -122.6765


def _write_workouts(ctx: _Context, out: _Output, routes_dir: Path, last_day: int,
                    export_time: int) -> dict[str, int]:
    """The Workout elements saved before `export_time`, as iOS 16+ writes them (statistics
    instead of total attributes), and the GPX file of each route."""
    counts = dict.fromkeys(("workouts", "workout_events", "workout_statistics", "workout_routes",
                            "workout_metadata_entries", "gpx_files", "gpx_points"), 0)
    clock = ctx.clock
    fmt = clock.apple
    for day in range(last_day + 1):
        rng = _rng(ctx.seed, "workout", day)
        if rng.random() >= 0.55:
            continue
        activity, _, outdoor, speed, distance_type = rng.choices(_WORKOUT_KINDS, [k[1] for k in _WORKOUT_KINDS])[0]
        morning = rng.random() < 0.5
        start = clock.at(day, rng.randrange(6 * 3600, 8 * 3600) if morning else rng.randrange(17 * 3600, 19 * 3600))
        seconds = rng.randrange(20 * 60, 70 * 60)
        end = start + seconds
        created = end + rng.randrange(5, 60)
        if created > export_time:
            break
        dev = ctx.devices(day)
        watch_device = dev.watch[day % _POINTER_SLOTS]
        minutes = seconds / 60
        kcal_per_minute = 11.5 if activity == "Running" else 4.2 if activity == "Walking" else 8.0
        energy = minutes * kcal_per_minute * rng.uniform(0.85, 1.15)
        miles = seconds * speed * rng.uniform(0.9, 1.1) / 1609.344

        children = [_meta("HKIndoorWorkout", "0" if outdoor else "1"), _meta("HKTimeZone", _TIME_ZONE)]
        if outdoor:
            children += [_meta("HKWeatherTemperature", f"{rng.uniform(38, 82):.1f} degF"),
                         _meta("HKWeatherHumidity", f"{rng.randrange(30, 95) * 100} %"),
                         _meta("HKElevationAscended", f"{rng.randrange(200, 9000)} cm")]
        children.append(_meta("HKAverageMETs", f"{rng.uniform(3, 11):.4f} kcal/hr·kg"))
        counts["workout_metadata_entries"] += len(children)

        events = []
        if distance_type is not None and activity != "Cycling":
            per_mile = seconds / max(miles, 0.1)
            for mile in range(int(seconds // per_mile)):
                at = start + int(mile * per_mile)
                events.append(f'  <WorkoutEvent type="HKWorkoutEventTypeSegment" date="{fmt(at)}" '
                              f'duration="{per_mile / 60:.4f}" durationUnit="min"/>\n')
        if rng.random() < 0.4:
            paused = start + rng.randrange(seconds // 4, seconds // 2)
            resumed = paused + rng.randrange(20, 240)
            events.append(f'  <WorkoutEvent type="HKWorkoutEventTypePause" date="{fmt(paused)}"/>\n')
            events.append(f'  <WorkoutEvent type="HKWorkoutEventTypeResume" date="{fmt(resumed)}"/>\n')
        children += events
        counts["workout_events"] += len(events)

        span = f'startDate="{fmt(start)}" endDate="{fmt(end)}"'
        statistics = [
            f'  <WorkoutStatistics type="{_Q}ActiveEnergyBurned" {span} sum="{energy:.4f}" unit="Cal"/>\n',
            f'  <WorkoutStatistics type="{_Q}BasalEnergyBurned" {span} sum="{minutes * 1.1:.4f}" unit="Cal"/>\n',
            f'  <WorkoutStatistics type="{_Q}HeartRate" {span} average="{rng.uniform(95, 150):.4f}" '
            f'minimum="{rng.randrange(70, 95)}" maximum="{rng.randrange(150, 178)}" unit="count/min"/>\n',
        ]
        if distance_type is not None:
            statistics.append(f'  <WorkoutStatistics type="{distance_type}" {span} sum="{miles:.5f}" unit="mi"/>\n')
        children += statistics
        counts["workout_statistics"] += len(statistics)

        if outdoor and rng.random() < 0.85:
            local_start = clock.local_datetime(start)
            noon = "am" if local_start.hour < 12 else "pm"
            label = f"{local_start:%Y-%m-%d} {local_start.hour % 12 or 12}:{local_start:%M}{noon}"
            file_name = f"route_{label.replace(' ', '_').replace(':', '.')}.gpx"
            points = _write_gpx(_rng(ctx.seed, "route", day), clock, routes_dir / file_name, f"Route {label}",
                                start, seconds, speed)
            counts["gpx_files"] += 1
            counts["gpx_points"] += points
            counts["workout_routes"] += 1
            children.append(
                f'  <WorkoutRoute sourceName="{ctx.watch_name}" sourceVersion="{dev.watch_version}" '
                f'creationDate="{fmt(created)}" {span}>\n'
                f'   <MetadataEntry key="HKMetadataKeySyncVersion" value="2"/>\n'
                f'   <MetadataEntry key="HKMetadataKeySyncIdentifier" value="{_uuid(rng)}"/>\n'
                f'   <FileReference path="/workout-routes/{file_name}"/>\n'
                f'  </WorkoutRoute>\n')

        out.write(_element(
            f'workoutActivityType="HKWorkoutActivityType{activity}" duration="{minutes:.4f}" durationUnit="min" '
            f'sourceName="{ctx.watch_name}" sourceVersion="{dev.watch_version}" device="{watch_device}" '
            f'creationDate="{fmt(created)}" {span}', "".join(children), tag="Workout"))
        counts["workouts"] += 1
    return counts


def _write_gpx(rng: random.Random, clock: _Clock, path: Path, name: str, start: int, seconds: int,
               speed: float) -> int:
    """One GPX 1.1 track, one point per second, in the layout of Apple's route files:

        <trkpt lon="-122.676512" lat="45.523100"><ele>12.345678</ele><time>2020-03-02T16:12:05Z</time>
        <extensions><speed>2.901234</speed><course>87.123456</course><hAcc>3.456789</hAcc><vAcc>2.345678</vAcc></extensions></trkpt>
    """
    rand = rng.random
    lat = _HOME_LAT + 0.04 * (rand() - 0.5)
    lon = _HOME_LON + 0.04 * (rand() - 0.5)
    ele = 10 + 70 * rand()
    heading = math.tau * rand()
    metres_per_degree_lat = 111_320
    metres_per_degree_lon = metres_per_degree_lat * math.cos(math.radians(_HOME_LAT))
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<gpx version="1.1" creator="Apple Health Export" xmlns="http://www.topografix.com/GPX/1/1" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.topografix.com/GPX/1/1 http://www.topografix.com/GPX/1/1/gpx.xsd">\n'
        f' <metadata>\n  <time>{clock.utc_iso(start)}</time>\n </metadata>\n'
        f' <trk>\n  <name>{name}</name>\n  <trkseg>\n'
    ]
    for second in range(start, start + seconds):
        heading += 0.42 * (rand() - 0.5)
        step = speed * (0.8 + 0.4 * rand())
        lat += step * math.cos(heading) / metres_per_degree_lat
        lon += step * math.sin(heading) / metres_per_degree_lon
        ele += 0.8 * (rand() - 0.5)
        lines.append(
            f'   <trkpt lon="{lon:.6f}" lat="{lat:.6f}"><ele>{ele:.6f}</ele><time>{clock.utc_iso(second)}</time>'
            f'<extensions><speed>{step:.6f}</speed><course>{math.degrees(heading) % 360:.6f}</course>'
            f'<hAcc>{1.5 + 4.5 * rand():.6f}</hAcc><vAcc>{1 + 3 * rand():.6f}</vAcc></extensions></trkpt>\n')
    lines.append("  </trkseg>\n </trk>\n</gpx>\n")
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return seconds


def _write_activity_summaries(ctx: _Context, out: _Output, last_day: int) -> int:
    for day in range(last_day + 1):
        rng = _rng(ctx.seed, "activity", day)
        out.write(
            f' <ActivitySummary dateComponents="{_day_date(day).isoformat()}" '
            f'activeEnergyBurned="{rng.uniform(150, 900):.4f}" activeEnergyBurnedGoal="520" '
            f'activeEnergyBurnedUnit="Cal" appleMoveTime="0" appleMoveTimeGoal="0" '
            f'appleExerciseTime="{rng.randrange(0, 95)}" appleExerciseTimeGoal="30" '
            f'appleStandHours="{rng.randrange(4, 16)}" appleStandHoursGoal="12"/>\n')
    return last_day + 1


# --------------------------------------------------------------------------- FHIR


@dataclass(frozen=True)
class _Provider:
    name: str
    base_url: str
    fhir_version: str


_NORTHWIND = _Provider("Northwind Medical Center", "https://fhir.northwind-medical.example/api/FHIR/R4", "4.0.1")
_CEDAR = _Provider("Cedar Valley Clinic", "https://ehr.cedarvalley-clinic.example/fhir/DSTU2", "1.0.2")
_LAKESIDE = _Provider("Lakeside Family Clinic", "https://fhir.lakeside-family.example/r4", "4.0.1")

_LOINC = "http://loinc.org"
_SNOMED = "http://snomed.info/sct"
_UCUM = "http://unitsofmeasure.org"
_MRN_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR",
                         "display": "Medical record number"}], "text": "MRN"}


@dataclass(frozen=True)
class _FhirFile:
    name: str  # inside clinical-records/
    kind: str  # its resourceType
    fhir_version: str
    text: str
    resource_types: tuple[str, ...]  # what it holds; a Bundle counts its entries
    record_line: str | None  # its ClinicalRecord element, None if export.xml does not list it


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)).upper()


def _fhir_json(resource: dict[str, Any]) -> str:
    # NSJSONSerialization's pretty print, as in Apple's files: 2-space indent, " : ", no final newline.
    return json.dumps(resource, indent=2, ensure_ascii=False, separators=(",", " : "))


class _Fhir:
    """Collects the clinical-records files of one export."""

    def __init__(self, ctx: _Context) -> None:
        self.rng = _rng(ctx.seed, "fhir")
        self.clock = ctx.clock
        self.files: list[_FhirFile] = []

    def resource_id(self, provider: _Provider) -> str:
        if provider.fhir_version == "1.0.2":
            return str(self.rng.randrange(1, 300000))
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return "e" + "".join(self.rng.choice(alphabet) for _ in range(22))

    def when(self, first_year: int = 2015) -> str:
        """A date in the years of history before the HealthKit data starts."""
        first = date(first_year, 1, 1)
        return (first + timedelta(days=self.rng.randrange((date(2020, 2, 1) - first).days))).isoformat()

    def moment(self) -> str:
        return f"{self.when()}T{self.rng.randrange(14, 24):02d}:{self.rng.randrange(60):02d}:00Z"

    def add(self, provider: _Provider, resource: dict[str, Any], listed: bool = True) -> dict[str, Any]:
        kind = resource["resourceType"]
        name = f"{kind}-{_uuid(self.rng)}.json"
        entries = [e["resource"]["resourceType"] for e in resource.get("entry", ())]
        line = None
        if listed:
            # Received in one sync a few days before the first HealthKit sample.
            received = self.clock.apple(-3 * 86400 + 10 * 3600 + 7 * len(self.files))
            line = (f' <ClinicalRecord type="{kind}" identifier="{resource["id"]}" sourceName="{provider.name}" '
                    f'sourceURL="{provider.base_url}/{kind}/{resource["id"]}" fhirVersion="{provider.fhir_version}" '
                    f'receivedDate="{received}" resourceFilePath="/clinical-records/{name}"/>\n')
        self.files.append(_FhirFile(name, kind, provider.fhir_version, _fhir_json(resource),
                                    tuple(entries) or (kind,), line))
        return resource


def _coding(system: str, code: str, display: str, text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": [{"system": system, "code": code, "display": display}]}
    if text is not None:
        concept["text"] = text
    return concept


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": _UCUM, "code": unit}


def _category(code: str, display: str) -> list[dict[str, Any]]:
    return [_coding("http://terminology.hl7.org/CodeSystem/observation-category", code, display, display)]


def _r4_patient(fhir: _Fhir, provider: _Provider, person: Person) -> dict[str, Any]:
    return fhir.add(provider, {
        "resourceType": "Patient",
        "id": fhir.resource_id(provider),
        "identifier": [{"use": "usual", "type": _MRN_TYPE, "system": "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14",
                        "value": person.mrn}],
        "active": True,
        "name": [{"use": "official", "text": person.full_name, "family": person.family, "given": [person.given]}],
        "telecom": [{"system": "phone", "value": person.phone, "use": "home"},
                    {"system": "email", "value": person.email, "use": "home"}],
        "gender": "female" if person.sex.endswith("Female") else "male",
        "birthDate": person.birth_date,
        "address": [{"use": "home", "line": [person.address_line], "city": person.city, "state": "OR",
                     "postalCode": person.postal_code, "country": "US"}],
    })


def _r4_observation(fhir: _Fhir, provider: _Provider, subject: dict[str, str], code: dict[str, Any],
                    category: str, **value: Any) -> dict[str, Any]:
    moment = fhir.moment()
    return fhir.add(provider, {
        "resourceType": "Observation",
        "id": fhir.resource_id(provider),
        "status": "final",
        "category": _category(category, "Vital Signs" if category == "vital-signs" else "Laboratory"),
        "code": code,
        "subject": subject,
        "effectiveDateTime": moment,
        "issued": moment,
        **value,
    })


def _clinical_files(ctx: _Context, children: list[Person], namesake: Person | None) -> list[_FhirFile]:
    """The clinical-records/ files: R4 from the family's hospital, DSTU2 (1.0.2) from an
    older clinic, the namesake's R4 records from another practice, and one lab Bundle
    that export.xml does not list (readers must walk the folder, CONTRACT §2)."""
    fhir = _Fhir(ctx)
    owner = ctx.owner
    patient = _r4_patient(fhir, _NORTHWIND, owner)
    me = {"reference": f"Patient/{patient['id']}", "display": owner.full_name}
    doctor = {"reference": "Practitioner/eP3kq0vXl2", "display": "Imogen Ballantyne, MD"}

    _r4_observation(fhir, _NORTHWIND, me, _coding(_LOINC, "85354-9", "Blood pressure panel with all children optional",
                                                   "Blood Pressure"), "vital-signs",
                    component=[{"code": _coding(_LOINC, "8480-6", "Systolic blood pressure"),
                                "valueQuantity": _quantity(fhir.rng.randrange(112, 142), "mm[Hg]")},
                               {"code": _coding(_LOINC, "8462-4", "Diastolic blood pressure"),
                                "valueQuantity": _quantity(fhir.rng.randrange(68, 92), "mm[Hg]")}])
    ldl = _r4_observation(fhir, _NORTHWIND, me, _coding(_LOINC, "2089-1", "LDL Cholesterol", "LDL-cholesterol"),
                          "laboratory", valueQuantity=_quantity(round(fhir.rng.uniform(70, 160), 1), "mg/dL"),
                          referenceRange=[{"low": _quantity(50, "mg/dL"), "high": _quantity(130, "mg/dL"),
                                           "text": "50 to 130 mg/dL"}])
    _r4_observation(fhir, _NORTHWIND, me, _coding(_LOINC, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood",
                                                   "Hemoglobin A1c"), "laboratory",
                    valueQuantity=_quantity(round(fhir.rng.uniform(4.9, 6.4), 1), "%"))
    _r4_observation(fhir, _NORTHWIND, me, _coding(_LOINC, "882-1", "ABO and Rh group [Type] in Blood", "ABO/Rh"),
                    "laboratory", valueCodeableConcept=_coding(_SNOMED, "278149003", "Blood group A Rh(D) positive",
                                                               "A POS"))
    _r4_observation(fhir, _NORTHWIND, me, _coding(_LOINC, "5802-4", "Nitrite [Presence] in Urine by Test strip",
                                                   "Nitrite, urine"), "laboratory", valueString="Negative")
    _r4_observation(fhir, _NORTHWIND, me, _coding(_LOINC, "29463-7", "Body weight", "Weight"), "vital-signs",
                    valueQuantity=_quantity(round(fhir.rng.uniform(140, 190), 1), "[lb_av]"),
                    note=[{"text": f"{owner.family}, {owner.given} weighed in clinic; home scale reads 2 lb lower. "
                                   f"Call back at {owner.phone} with results."}])
    for code, display in (("59621000", "Essential hypertension"), ("40930008", "Hypothyroidism")):
        fhir.add(_NORTHWIND, {
            "resourceType": "Condition", "id": fhir.resource_id(_NORTHWIND),
            "clinicalStatus": _coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
            "verificationStatus": _coding("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed",
                                          "Confirmed"),
            "category": [_coding("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item",
                                 "Problem List Item")],
            "code": _coding(_SNOMED, code, display, display), "subject": me,
            "onsetDateTime": fhir.when(), "recordedDate": fhir.when(),
        })
    for code, display, instruction in (("314076", "lisinopril 10 MG Oral Tablet", "Take 1 tablet by mouth daily"),
                                       ("966221", "levothyroxine 50 MCG Oral Tablet",
                                        "Take 1 tablet by mouth every morning before breakfast")):
        fhir.add(_NORTHWIND, {
            "resourceType": "MedicationRequest", "id": fhir.resource_id(_NORTHWIND), "status": "active",
            "intent": "order",
            "medicationCodeableConcept": _coding("http://www.nlm.nih.gov/research/umls/rxnorm", code, display, display),
            "subject": me, "authoredOn": fhir.when(), "requester": doctor,
            "dosageInstruction": [{"text": instruction}],
        })
    for code, display in (("158", "influenza, injectable, quadrivalent"), ("115", "Tdap")):
        fhir.add(_NORTHWIND, {
            "resourceType": "Immunization", "id": fhir.resource_id(_NORTHWIND), "status": "completed",
            "vaccineCode": _coding("http://hl7.org/fhir/sid/cvx", code, display, display),
            "patient": me, "occurrenceDateTime": fhir.moment(), "primarySource": True,
        })
    fhir.add(_NORTHWIND, {
        "resourceType": "AllergyIntolerance", "id": fhir.resource_id(_NORTHWIND),
        "clinicalStatus": _coding("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active",
                                  "Active"),
        "code": _coding(_SNOMED, "373270004", "Penicillin -class of antibiotic- (substance)", "Penicillin"),
        "patient": me, "recordedDate": fhir.when(),
        "reaction": [{"manifestation": [{"text": "Rash"}], "severity": "mild"}],
    })
    fhir.add(_NORTHWIND, {
        "resourceType": "Procedure", "id": fhir.resource_id(_NORTHWIND), "status": "completed",
        "code": _coding(_SNOMED, "73761001", "Colonoscopy (procedure)", "Colonoscopy"),
        "subject": me, "performedDateTime": fhir.moment(), "performer": [{"actor": doctor}],
    })
    encounter = fhir.add(_NORTHWIND, {
        "resourceType": "Encounter", "id": fhir.resource_id(_NORTHWIND), "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
        "type": [{"text": "Office Visit"}], "subject": me,
        "participant": [{"individual": doctor}],
        "period": {"start": "2019-11-14T17:20:00Z", "end": "2019-11-14T17:55:00Z"},
        "serviceProvider": {"display": _NORTHWIND.name},
    })
    fhir.add(_NORTHWIND, {
        "resourceType": "DiagnosticReport", "id": fhir.resource_id(_NORTHWIND), "status": "final",
        "category": [_coding("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB", "Laboratory")],
        "code": _coding(_LOINC, "57698-3", "Lipid panel with direct LDL - Serum or Plasma", "Lipid Panel"),
        "subject": me, "effectiveDateTime": ldl["effectiveDateTime"], "issued": ldl["issued"],
        "result": [{"reference": f"Observation/{ldl['id']}", "display": "LDL-cholesterol"}],
        "conclusion": "LDL above goal; repeat in 6 months.",
    })
    family_note = f" Accompanied by {children[0].given}, who has an appointment next week." if children else ""
    note = (f"Progress note for {owner.full_name} (DOB {owner.birth_date}, MRN {owner.mrn}).\n"
            f"{owner.given} reports good adherence to lisinopril and walks most mornings near "
            f"{owner.address_line}.{family_note}\nPlan: recheck BP in 3 months.\n")
    fhir.add(_NORTHWIND, {
        "resourceType": "DocumentReference", "id": fhir.resource_id(_NORTHWIND), "status": "current",
        "type": _coding(_LOINC, "11506-3", "Progress note", "Progress Notes"),
        "subject": me, "date": "2019-11-14T18:02:00Z", "author": [doctor],
        "content": [{"attachment": {"contentType": "text/plain", "title": "Progress note",
                                    "data": base64.b64encode(note.encode()).decode()}}],
        "context": {"encounter": [{"reference": f"Encounter/{encounter['id']}"}]},
    })
    fhir.add(_NORTHWIND, {
        "resourceType": "Bundle", "id": fhir.resource_id(_NORTHWIND), "type": "collection",
        "entry": [{"fullUrl": f"{_NORTHWIND.base_url}/Observation/{obs['id']}", "resource": obs} for obs in (
            {"resourceType": "Observation", "id": fhir.resource_id(_NORTHWIND), "status": "final",
             "category": _category("laboratory", "Laboratory"), "code": _coding(_LOINC, code, display, display),
             "subject": me, "effectiveDateTime": ldl["effectiveDateTime"],
             "valueQuantity": _quantity(round(fhir.rng.uniform(low, high), 1), "mg/dL")}
            for code, display, low, high in (("2093-3", "Cholesterol, total", 150, 240),
                                             ("2085-9", "HDL Cholesterol", 35, 80),
                                             ("2571-8", "Triglycerides", 70, 220)))],
    }, listed=False)

    # DSTU2 (1.0.2) from an older clinic, shaped like the fixture's sample account: the
    # Patient's name only as text, MedicationOrder instead of MedicationRequest.
    old_me = fhir.add(_CEDAR, {"gender": "female" if owner.sex.endswith("Female") else "male",
                               "id": fhir.resource_id(_CEDAR), "resourceType": "Patient",
                               "name": [{"use": "usual", "text": owner.full_name}], "birthDate": owner.birth_date})
    fhir.add(_CEDAR, {"category": {"text": "Laboratory", "coding": [{"system": "http://hl7.org/fhir/observation-category",
                                                                    "code": "laboratory"}]},
                      "issued": "2016-05-18T00:00:00Z", "status": "final", "id": fhir.resource_id(_CEDAR),
                      "code": {"text": "Glucose", "coding": [{"system": _LOINC, "code": "2345-7"}]},
                      "valueQuantity": {"code": "mg/dL", "system": _UCUM, "value": fhir.rng.randrange(80, 115),
                                        "unit": "mg/dL"},
                      "resourceType": "Observation"})
    fhir.add(_CEDAR, {"status": "active", "id": fhir.resource_id(_CEDAR),
                      "medicationCodeableConcept": {"text": "Albuterol HFA 90 mcg",
                                                    "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm/",
                                                                "code": "329498"}]},
                      "patient": {"display": owner.full_name, "reference": f"Patient/{old_me['id']}"},
                      "prescriber": {"display": "Rupert Galloway", "reference": "Practitioner/20"},
                      "dateWritten": fhir.when(2010), "resourceType": "MedicationOrder",
                      "dosageInstruction": [{"text": "2 puffs every 4-6 hours as needed"}]})
    fhir.add(_CEDAR, {"patient": {"reference": f"Patient/{old_me['id']}"}, "clinicalStatus": "resolved",
                      "dateRecorded": fhir.when(2010),
                      "code": {"text": "Acute bronchitis", "coding": [{"system": _SNOMED, "code": "10509002"}]},
                      "id": fhir.resource_id(_CEDAR), "verificationStatus": "confirmed", "resourceType": "Condition"})

    # The owner's children, whose hospital records the owner manages.
    for index, child in enumerate(children):
        kid = _r4_patient(fhir, _NORTHWIND, child)
        ref = {"reference": f"Patient/{kid['id']}", "display": child.full_name}
        _r4_observation(fhir, _NORTHWIND, ref, _coding(_LOINC, "29463-7", "Body weight", "Weight"), "vital-signs",
                        valueQuantity=_quantity(round(fhir.rng.uniform(60, 130), 1), "[lb_av]"))
        fhir.add(_NORTHWIND, {
            "resourceType": "Immunization", "id": fhir.resource_id(_NORTHWIND), "status": "completed",
            "vaccineCode": _coding("http://hl7.org/fhir/sid/cvx", "03", "MMR", "MMR"),
            "patient": ref, "occurrenceDateTime": fhir.moment(), "primarySource": True,
        })
        fhir.add(_NORTHWIND, {
            "resourceType": "Condition", "id": fhir.resource_id(_NORTHWIND),
            "clinicalStatus": _coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
            "code": _coding(_SNOMED, "195967001", "Asthma", "Asthma"), "subject": ref, "recordedDate": fhir.when(),
        })
        if index == 0:
            fhir.add(_CEDAR, {"status": "completed", "id": fhir.resource_id(_CEDAR),
                              "medicationCodeableConcept": {"text": "Amoxicillin 250 mg/5 mL suspension",
                                                            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm/",
                                                                        "code": "308182"}]},
                              "patient": {"display": child.full_name,
                                          "reference": f"Patient/{fhir.resource_id(_CEDAR)}"},
                              "dateWritten": fhir.when(2016), "resourceType": "MedicationOrder"})

    if namesake is not None:
        other = _r4_patient(fhir, _LAKESIDE, namesake)
        ref = {"reference": f"Patient/{other['id']}", "display": namesake.full_name}
        _r4_observation(fhir, _LAKESIDE, ref, _coding(_LOINC, "2345-7", "Glucose [Mass/volume] in Serum or Plasma",
                                                       "Glucose"), "laboratory",
                        valueQuantity=_quantity(fhir.rng.randrange(90, 160), "mg/dL"))
        fhir.add(_LAKESIDE, {
            "resourceType": "Condition", "id": fhir.resource_id(_LAKESIDE),
            "clinicalStatus": _coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
            "code": _coding(_SNOMED, "44054006", "Diabetes mellitus type 2", "Type 2 diabetes"),
            "subject": ref, "recordedDate": fhir.when(),
        })
    return fhir.files


def _write_clinical_files(directory: Path, files: list[_FhirFile]) -> dict[str, int]:
    """Write clinical-records/; `fhir_resources` and `fhir:<type>` count Bundle entries,
    `fhir:Bundle` the Bundle files themselves."""
    directory.mkdir()
    counts = {"fhir_files": len(files), "clinical_records": sum(1 for f in files if f.record_line),
              "fhir_resources": 0, "fhir_files_dstu2": 0, "fhir:Bundle": 0}
    for f in files:
        (directory / f.name).write_text(f.text, encoding="utf-8")
        counts["fhir_resources"] += len(f.resource_types)
        counts["fhir_files_dstu2"] += f.fhir_version == "1.0.2"
        counts["fhir:Bundle"] += f.kind == "Bundle"
        for kind in f.resource_types:
            counts[f"fhir:{kind}"] = counts.get(f"fhir:{kind}", 0) + 1
    return counts


# --------------------------------------------------------------------------- CDA

_CDA_HEAD = """<?xml version="1.0"?>
<?xml-stylesheet type="text/xsl" href="CDA.xsl"?>
<ClinicalDocument xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="urn:hl7-org:v3 ../../../CDA%20R2/cda-schemas-and-samples/infrastructure/cda/CDA.xsd" xmlns="urn:hl7-org:v3" xmlns:cda="urn:hl7-org:v3" xmlns:sdtc="urn:l7-org:sdtc" xmlns:fhir="http://hl7.org/fhir/v3">
 <realmCode code="US"/>
 <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
 <templateId root="2.16.840.1.113883.10.20.22.1.2"/>
 <id extension="Health Export CDA" root="1.1.1.1.1.1.1.1.1"/>
 <code codeSystem="2.16.840.1.113883.6.1" codeSystemName="LOINC" code="34109-9" displayName="Note"/>
 <title>Health Data Export</title>
"""
# (LOINC, display, HealthKit type, unit, low, high)
_CDA_VITALS = (
    ("8867-4", "Heart rate", _Q + "HeartRate", "count/min", 55, 95),
    ("9279-1", "Respiratory rate", _Q + "RespiratoryRate", "count/min", 12, 19),
)


def _write_cda(ctx: _Context, path: Path, last_day: int, export_time: int) -> int:
    """export_cda.xml as the fixture's, with the recordTarget filled in (Apple leaves it
    almost empty; other CDA producers do not) and a vital-signs organizer every third day."""
    owner = ctx.owner
    clock = ctx.clock
    gender = "Female" if owner.sex.endswith("Female") else "Male"
    parts = [_CDA_HEAD, f' <effectiveTime value="{clock.cda(export_time)}"/>\n',
             ' <confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/>\n',
             f""" <recordTarget>
  <patientRole>
   <id root="2.16.840.1.113883.19.5" extension="{owner.mrn}"/>
   <addr use="HP">
    <streetAddressLine>{_xml_text(owner.address_line)}</streetAddressLine>
    <city>{_xml_text(owner.city)}</city>
    <state>OR</state>
    <postalCode>{owner.postal_code}</postalCode>
    <country>US</country>
   </addr>
   <telecom use="HP" value="tel:{owner.phone}"/>
   <telecom use="HP" value="mailto:{owner.email}"/>
   <patient>
    <name use="L">
     <given>{_xml_text(owner.given)}</given>
     <family>{_xml_text(owner.family)}</family>
    </name>
    <administrativeGenderCode code="{gender[0]}" codeSystem="2.16.840.1.113883.5.1" displayName="{gender}"/>
    <birthTime value="{owner.birth_date.replace('-', '')}"/>
   </patient>
  </patientRole>
 </recordTarget>
 <component>
  <structuredBody>
   <component>
    <section>
     <templateId root="2.16.840.1.113883.10.20.22.2.4.1"/>
     <code code="8716-3" codeSystem="2.16.840.1.113883.6.1" codeSystemName="LOINC" displayName="Vital Signs"/>
     <title>Vital Signs</title>
     <text/>
"""]
    observations = 0
    for day in range(0, last_day + 1, 3):
        rng = _rng(ctx.seed, "cda", day)
        t = clock.at(day, rng.randrange(9 * 3600, 11 * 3600))
        if t > export_time:
            break
        dev = ctx.devices(day)
        stamp = clock.cda(t)
        parts.append(f"""     <entry typeCode="DRIV">
      <organizer classCode="CLUSTER" moodCode="EVN">
       <templateId root="2.16.840.1.113883.10.20.22.4.26"/>
       <id nullFlavor="NA" root="2.16.840.1.113883.10.20.22.4.26"/>
       <code code="46680005" codeSystem="2.16.840.1.113883.6.96" codeSystemName="SNOMED CT" displayName="Vital signs"/>
       <statusCode code="completed"/>
       <effectiveTime>
        <low value="{stamp}"/>
        <high value="{stamp}"/>
       </effectiveTime>
""")
        for loinc, display, hk_type, unit, low, high in _CDA_VITALS:
            value = rng.randrange(low, high)
            parts.append(f"""       <component>
        <observation classCode="OBS" moodCode="EVN">
         <templateId root="2.16.840.1.113883.10.20.22.4.27"/>
         <id nullFlavor="NA" root="2.16.840.1.113883.10.20.22.4.27"/>
         <code code="{loinc}" codeSystem="2.16.840.1.113883.6.1" codeSystemName="LOINC" displayName="{display}"/>
         <text>
          <sourceName>{ctx.watch_name}</sourceName>
          <sourceVersion>{dev.watch_version}</sourceVersion>
          <device>{dev.watch[day % _POINTER_SLOTS]}</device>
          <value>{value}</value>
          <type>{hk_type}</type>
          <unit>{unit}</unit>
         </text>
         <statusCode code="completed"/>
         <effectiveTime>
          <low value="{stamp}"/>
          <high value="{stamp}"/>
         </effectiveTime>
         <value xsi:type="PQ" value="{value}" unit="{unit}"/>
         <interpretationCode code="N" codeSystem="2.16.840.1.113883.5.83"/>
        </observation>
       </component>
""")
            observations += 1
        parts.append("      </organizer>\n     </entry>\n")
    parts.append("    </section>\n   </component>\n  </structuredBody>\n </component>\n</ClinicalDocument>\n")
    path.write_text("".join(parts), encoding="utf-8")
    return observations


# --------------------------------------------------------------------------- ECG

_ECG_RATE = 512  # Hz; a recording is 30 s


def _ecg_days(last_day: int) -> list[int]:
    return [d for d in range(last_day + 1) if d in (0, 1) or d % 10 == 5]


def _write_ecgs(ctx: _Context, directory: Path, last_day: int, export_time: int) -> dict[str, int]:
    """electrocardiograms/ecg_<local date>.csv, Apple's layout:

        Name,Margarethe Quist
        Date of Birth,"April 7, 1961"
        Recorded Date,2020-03-02 08:14:22 -0800
        Classification,Sinus Rhythm
        Symptoms,
        Software Version,1.70
        Device,"Watch5,4"
        Sample Rate,512 hertz
        <blank>
        Lead,Lead I
        Unit,µV
        <blank>
        -12.345
        ...

    Apple formats the numbers (and the birth date) for the phone's region when the
    export is made, so every file of a real export shares one convention. The file of
    day 1 instead follows an English-language phone set to region Germany: decimal
    commas, hence every sample and the software version quoted ("-12,345"), the birth
    date as "7 April 1961" and "Hertz" capitalised. Mixing both in one export is not
    realistic, but lets every synthetic export exercise both readers.
    """
    owner = ctx.owner
    born = date.fromisoformat(owner.birth_date)
    files = samples = comma_files = 0
    for day in _ecg_days(last_day):
        rng = _rng(ctx.seed, "ecg", day)
        recorded = ctx.clock.at(day, rng.randrange(8 * 3600, 10 * 3600))
        if recorded + 30 > export_time:
            break
        comma = day == 1
        classification = rng.choice(("Sinus Rhythm", "Sinus Rhythm", "Atrial Fibrillation", "Inconclusive"))
        hardware = ctx.devices(day).watch_hardware
        values = _ecg_samples(rng)
        if comma:
            birth, version, rate = _en_de_long_date(born), '"1,70"', "512 Hertz"
            body = "\n".join(f'"{v:.3f}"'.replace(".", ",") for v in values)
        else:
            birth, version, rate = f'"{_us_long_date(born)}"', "1.70", "512 hertz"
            body = "\n".join(f"{v:.3f}" for v in values)
        lines = [f"Name,{owner.full_name}", f"Date of Birth,{birth}", f"Recorded Date,{ctx.clock.apple(recorded)}",
                 f"Classification,{classification}", "Symptoms,", f"Software Version,{version}",
                 f'Device,"{hardware}"', f"Sample Rate,{rate}", "", "Lead,Lead I", "Unit,µV", "", body, ""]
        directory.mkdir(exist_ok=True)
        (directory / f"ecg_{_day_date(day).isoformat()}.csv").write_text("\n".join(lines), encoding="utf-8")
        files += 1
        comma_files += comma
        samples += len(values)
    return {"ecg_files": files, "ecg_samples": samples, "ecg_files_decimal_comma": comma_files}


def _ecg_samples(rng: random.Random) -> list[float]:
    """30 s of a plausible lead-I trace in µV: one P-QRS-T beat template repeated, plus
    baseline wander and noise."""
    beat = int(_ECG_RATE * 60 / rng.randrange(58, 90))
    waves = ((0.16, 0.025, 110.0), (0.24, 0.008, -90.0), (0.26, 0.010, 950.0), (0.28, 0.008, -220.0),
             (0.50, 0.045, 260.0))  # (centre, width) in s, amplitude in µV
    template = [sum(a * math.exp(-(((i / _ECG_RATE) - c) / w) ** 2) for c, w, a in waves) for i in range(beat)]
    wander = rng.uniform(0, math.tau)
    rand = rng.random
    return [template[i % beat] + 40 * math.sin(wander + i / _ECG_RATE * 1.7) + 24 * (rand() - 0.5)
            for i in range(30 * _ECG_RATE)]


# --------------------------------------------------------------------------- zip


def _write_zip(export_dir: Path, zip_path: Path, when: datetime) -> None:
    """export.zip as the phone writes it: every file under `apple_health_export/`, no
    directory entries. Fixed timestamps and sorted members make it byte-reproducible."""
    stamp = (when.year, when.month, when.day, when.hour, when.minute, when.second)
    members = sorted((p.relative_to(export_dir.parent).as_posix(), p) for p in export_dir.rglob("*") if p.is_file())
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, path in members:
            info = zipfile.ZipInfo(name, stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            size = path.stat().st_size
            with open(path, "rb") as src, zf.open(info, "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
