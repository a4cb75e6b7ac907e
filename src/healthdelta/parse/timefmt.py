"""Timestamp conversion for the FHIR, CDA, ECG and GPX parsers (docs/ndjson.md "Times").

Every source time becomes a pair `(utc, local)`:

- `utc`: `YYYY-MM-DDTHH:MM:SSZ`, fractional seconds kept as the source wrote them (up
  to nanoseconds); a date without a time is midnight UTC of that date.
- `local`: the original local time as ISO 8601 with its offset (`2018-12-18T19:48:39-06:00`,
  `Z` kept as `Z`); a date-only value stays a date (`2018-04-02`).

Pure: no I/O, no clock. Unparseable input raises `ValueError` (without echoing the value,
so a caller may turn it into a user message). A time of day without any offset is read as
UTC (FHIR requires an offset whenever a time is given; such values are rare and the local
form keeps them offset-less, so nothing is invented).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

TimePair = tuple[str, str]

# FHIR date / dateTime / instant, GPX xsd:dateTime and Apple's ECG "Recorded Date"
# (`2024-02-03 08:14:22 -0800`): ISO 8601 extended form, `T` or space between date and
# time, optional space before the offset. FHIR allows partial dates (`2018`, `2018-04`).
_ISO = re.compile(
    r"(?P<y>\d{4})(?:-(?P<mo>\d{2})(?:-(?P<d>\d{2})"
    r"(?:[T ](?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?P<frac>[.,]\d+)?)?"
    r" ?(?P<tz>Z|z|UTC|GMT|[+-]\d{2}(?::?\d{2})?)?)?)?)?"
)

# Exactly the canonical form, UTC to the second (every GPX point has one): passed
# through without datetime arithmetic. Field ranges are checked; a day that does not
# exist in its month (02-30) passes unnoticed, as it would harm only its own row.
_UTC_SECONDS = re.compile(r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\dZ")

# HL7 v3 TS as Apple's export_cda.xml writes it: `20181218194839-0600`, any precision
# from a year down to fractional seconds, optional `+/-HHMM` offset.
_CDA = re.compile(
    r"(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?P<frac>\.\d+)?(?P<tz>[+-]\d{2}(?:\d{2})?|Z)?"
)


def _offset(tz: str | None) -> tuple[timezone | None, str]:
    """Offset object and its ISO spelling (`Z`, `-06:00`, `` when absent)."""
    if tz is None:
        return None, ""
    if tz in ("Z", "z", "UTC", "GMT"):
        return timezone.utc, "Z"
    sign = -1 if tz[0] == "-" else 1
    digits = tz[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
    if hours > 23 or minutes > 59:
        raise ValueError("time zone offset out of range")
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(sign * delta), f"{tz[0]}{hours:02d}:{minutes:02d}"


def _pair(parts: dict[str, str | None], date_only_local: str | None) -> TimePair:
    year = int(parts["y"])  # type: ignore[arg-type]
    month = int(parts["mo"] or 1)
    day = int(parts["d"] or 1)
    if parts["h"] is None:
        # A date (or year / year-month) without a time: midnight UTC, local kept as a date.
        datetime(year, month, day)  # validates
        utc = f"{year:04d}-{month:02d}-{day:02d}T00:00:00Z"
        return utc, date_only_local or f"{year:04d}-{month:02d}-{day:02d}"
    hour, minute, second = int(parts["h"]), int(parts["mi"] or 0), int(parts["s"] or 0)
    # Kept as written, but at most nanoseconds (the NDJSON validator's limit).
    frac = (parts["frac"] or "").replace(",", ".")[:10]
    tzinfo, tz_text = _offset(parts["tz"])
    local_dt = datetime(year, month, day, hour, minute, second)
    try:
        utc_dt = local_dt if tzinfo is None else (local_dt - tzinfo.utcoffset(None))  # type: ignore[operator]
    except OverflowError as exc:
        raise ValueError("time out of range") from exc
    utc = utc_dt.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"
    local = local_dt.strftime("%Y-%m-%dT%H:%M:%S") + frac + tz_text
    return utc, local


def from_iso(value: str) -> TimePair:
    """FHIR date/dateTime/instant, GPX time or ECG `Recorded Date` → (utc, local).

    >>> from_iso("2018-04-02")
    ('2018-04-02T00:00:00Z', '2018-04-02')
    >>> from_iso("2024-02-03 08:14:22 -0800")
    ('2024-02-03T16:14:22Z', '2024-02-03T08:14:22-08:00')
    """
    if _UTC_SECONDS.fullmatch(value):
        return value, value  # GPX points: already canonical UTC, the hot path
    match = _ISO.fullmatch(value.strip())
    if match is None:
        raise ValueError("not an ISO 8601 date or time")
    parts = match.groupdict()
    if parts["h"] is None:
        # CONTRACT §5 / brief: a date-only FHIR value keeps its local form as given.
        return _pair(parts, value.strip())
    return _pair(parts, None)


def from_cda(value: str) -> TimePair:
    """HL7 v3 TS (`20181218194839-0600`) → (utc, local).

    >>> from_cda("20181218194839-0600")
    ('2018-12-19T01:48:39Z', '2018-12-18T19:48:39-06:00')
    """
    match = _CDA.fullmatch(value.strip())
    if match is None:
        raise ValueError("not an HL7 timestamp")
    parts = match.groupdict()
    if parts["frac"] and parts["s"] is None:
        raise ValueError("fraction without seconds")
    if parts["h"] is None:
        year, month, day = parts["y"], parts["mo"], parts["d"]
        local = year + (f"-{month}" if month else "") + (f"-{day}" if day else "")
        return _pair(parts, local)
    return _pair(parts, None)


def utc_seconds(utc: str) -> float:
    """Seconds since the epoch of a `utc` string produced by this module."""
    return datetime.fromisoformat(utc[:-1] + "+00:00").timestamp()
