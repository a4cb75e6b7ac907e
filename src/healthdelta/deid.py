"""De-identification for share mode (CONTRACT §9): a de-identified copy of a staged run.

`deidentify_run(run_dir, dest, identity_dir)` writes `dest/` with the same shape as a
staged run (`layout.json`, `manifest.json`, `source/...`), so the unchanged NDJSON
export (`export.export_run`) reads it and produces share-mode NDJSON.

What is removed or replaced (HIPAA Safe Harbor identifiers), and where (each class is
planted by tests/leak_corpus.py and checked end to end by tests/test_share_leaks.py):

* names, in any order and form (initials, possessives such as "Jane’s Apple Watch",
  "Janes iPhone", "iPhone d’Élodie", "Jane_iPhone", any apostrophe or none, decomposed
  accents): people of the identity store become their share label `Patient N`; other
  people in person fields (relatives, subscribers, note authors) become `[NAME]`;
* birth dates keep their year only wherever they stand (`Me`, FHIR/CDA birth dates, values
  equal to a known birth date, CDA `TS` values); ECG header birth dates are emptied; known
  birth dates in free text, in any written form, become `[DATE]`; ages over 89 and the birth
  years that make them are aggregated (Safe Harbor's 90+);
* MRNs and every identifier (FHIR/CDA identifiers, UDIs, serial, lot, subscriber, accession,
  requisition numbers) become `[REDACTED]`, known ones also with other separators or as bare
  digits; FHIR resource ids, references and CDA anchors become keyed pseudonyms (consistent
  across files and runs); file names other than Apple's own shapes become pseudonyms;
* addresses keep state and country only; phone, fax, e-mail, URLs (other than code-system
  canonicals) and other telecom are removed; device serials, UDIs, signatures and Bluetooth
  `localIdentifier`s are dropped from device strings and metadata (the key strings exports
  write, `HKDeviceSerialNumber`, and HealthKit's constant names); time zone names are dropped;
* free text (FHIR notes, narratives read as a browser shows them, text attachments and
  `Binary` content, CDA text and B64 content, metadata values even when numeric or holding a
  newline, unknown attributes) is scrubbed for every known identifier of every person in the
  store, plus patterns (e-mail, URL, phone of any country, SSN, IP and MAC, labelled MRN / DOB
  / account / policy / licence / serial numbers, record numbers, street address, PO box);
  binary content that cannot be read is dropped;
* GPS tracks (GPX files and the inline `<Location>` points of old exports) are dropped, or with
  `keep_routes="coarse"` reduced to one point per 0.01° cell (~1 km) and hour, without speed,
  course, elevation or accuracy;
* with `date_shift=True` every date and time of one person, in every written form, moves by
  one whole number of weeks (intervals and weekdays stay exact), derived from the per-state
  secret and the person; timestamps are written in UTC; birth years are kept, not shifted;
  one identity store never mixes shifted and unshifted share runs.

Everything is streamed: `export.xml` line by line in large blocks with a cached
rewrite per line shape (Apple writes one element per line), the CDA and GPX with
lxml `iterparse` and an incremental writer, ECG CSVs line by line. FHIR JSON files are
one resource or Bundle each and are read whole (bounded by the parser's size limit).
"""

from __future__ import annotations

import base64
import binascii
import csv
import html
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from healthdelta import stagestore
from healthdelta.errors import InputError, UsageError
from healthdelta.identity import PersonPII, fold_accents, mac
from healthdelta.progress import ProgressFn, no_progress

SCHEMA_VERSION = 1
KEEP_ROUTES = ("drop", "coarse")
BLOCK = 8 << 20
MAX_FHIR_BYTES = 256 * 1024 * 1024
COARSE_DIGITS = 2  # 0.01 degree: about 1.1 km of latitude
_CACHE_MAX = 1 << 16

# --------------------------------------------------------------------------- pure: dates

_ISO_DATE = re.compile(r"(?<![\d-])(\d{4})-(\d{2})-(\d{2})(?!\d)")
_ISO_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


def person_offset_days(secret: bytes, person_id: str) -> int:
    """The person's date shift: 1 to 104 whole weeks into the past (weekday and time
    of day stay as they were), derived from the per-state secret and the person."""
    return -7 * (1 + int(mac(secret, "date-shift", person_id)[:8], 16) % 104)


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_MONTHS_DE = ("Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August",
              "September", "Oktober", "November", "Dezember")
_MONTHS_FR = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août",
              "septembre", "octobre", "novembre", "décembre")
_TIMESTAMP = (r"(?<![\d-])(?P<tday>\d{4}-\d{2}-\d{2})(?P<tsep>[ T])(?P<thh>\d{2}):(?P<tmm>\d{2})"
              r"(?::(?P<tss>\d{2})(?P<tfrac>\.\d+)?)?(?P<tspace>\s?)(?P<tzone>Z|[+-]\d{2}:?\d{2})(?![\d:])")
_MONTH_NUMBER = {name.casefold(): i + 1 for names in (_MONTHS, _MONTHS_DE, _MONTHS_FR)
                 for i, name in enumerate(names)}
_MONTH_NUMBER.update({name[:3]: n for name, n in list(_MONTH_NUMBER.items())})
_MONTH_RE = "|".join(sorted((re.escape(m) for m in _MONTH_NUMBER), key=lambda m: (-len(m), m)))
# Dates as people write them, for --date-shift: month names (English, German, French),
# d.m.yyyy, m/d/yyyy or d/m/yyyy, and compact yyyymmdd.
_TEXT_DATE = re.compile(
    rf"(?<!\w)(?P<mname>{_MONTH_RE})\.?\s+(?P<md>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<my>\d{{4}})(?!\d)"
    rf"|(?<![\w.])(?P<dd>\d{{1,2}})(?:st|nd|rd|th|er)?\.?[\s-]+(?P<dname>{_MONTH_RE})\.?[\s-]+(?P<dy>\d{{4}})(?!\d)"
    r"|(?<![\w.])(?P<ed>\d{1,2})\.(?P<em>\d{1,2})\.(?P<ey>\d{4})(?![\d.])"
    r"|(?<![\w/])(?P<sa>\d{1,2})/(?P<sb>\d{1,2})/(?P<sy>\d{4})(?![\d/])"
    r"|(?<![\w.+-])(?P<cy>(?:19|20)\d{2})(?P<cm>0[1-9]|1[0-2])(?P<cd>[0-3]\d)(?![\w.])",
    re.IGNORECASE)
_ANY_DATE = re.compile(f"(?P<ts>{_TIMESTAMP})|(?P<iso>{_ISO_DATE.pattern})|{_TEXT_DATE.pattern}", re.IGNORECASE)


class DateShift:
    """Moves dates by a fixed number of days; cached, because a few thousand distinct
    days make up every timestamp of an export.

    Timestamps with a UTC offset are written in UTC once shifted: an offset that
    changes on the real daylight-saving day, next to shifted dates, would give the
    shift away."""

    def __init__(self, days: int) -> None:
        self.days = days
        self._cache: dict[str, str] = {}
        self._apple_days: dict[tuple[bytes, int], bytes] = {}

    def day(self, iso: str) -> str:
        """`YYYY-MM-DD` shifted; anything that is not a real date is returned unchanged."""
        found = self._cache.get(iso)
        if found is None:
            try:
                found = (date.fromisoformat(iso) + timedelta(days=self.days)).isoformat()
            except (ValueError, OverflowError):  # OverflowError: shifted out of years 1-9999
                found = iso
            if len(self._cache) < _CACHE_MAX:
                self._cache[iso] = found
        return found

    def utc_day(self, iso: str, minutes: int) -> tuple[str, int]:
        """(shifted day, minutes after midnight) of a local time `minutes` after `iso`'s
        midnight, which may fall on the day before or after in UTC."""
        carry, minutes = divmod(minutes, 1440)
        day = self.day(iso)
        if carry and day != iso:
            try:
                day = (date.fromisoformat(day) + timedelta(days=carry)).isoformat()
            except OverflowError:
                pass  # the edge of year 9999: no real date to protect
        return day, minutes

    def _timestamp(self, m: re.Match[str]) -> str:
        day, sep, hh, mm, ss, frac, space, zone = m.group("tday", "tsep", "thh", "tmm", "tss", "tfrac", "tspace",
                                                           "tzone")
        offset = 0
        if zone != "Z":
            digits = zone[1:].replace(":", "")
            offset = (int(digits[:2]) * 60 + int(digits[2:])) * (1 if zone[0] == "+" else -1)
        if self.day(day) == day:  # not a real date: a real one always moves (days != 0)
            return m.group(0)
        shifted, minutes = self.utc_day(day, int(hh) * 60 + int(mm) - offset)
        clock = f"{minutes // 60:02d}:{minutes % 60:02d}" + (f":{ss}{frac or ''}" if ss else "")
        return f"{shifted}{sep}{clock}{space}{'Z' if zone == 'Z' or ':' in zone else '+0000'}"

    def _any_date(self, m: re.Match[str]) -> str:
        g = m.groupdict()
        if g["ts"]:
            return self._timestamp(m)
        if g["iso"]:
            return self.day(g["iso"])
        if g["mname"]:
            month, day, year = _MONTH_NUMBER.get(g["mname"].casefold()), g["md"], g["my"]
        elif g["dname"]:
            month, day, year = _MONTH_NUMBER.get(g["dname"].casefold()), g["dd"], g["dy"]
        elif g["ed"]:
            month, day, year = int(g["em"]), g["ed"], g["ey"]
        elif g["sa"]:
            a, b = int(g["sa"]), int(g["sb"])
            if a <= 12 and b <= 12 and a != b:
                return "[DATE]"  # 03/02/2024: March or February, no way to shift it right
            month, day, year = (a, b, g["sy"]) if a <= 12 else (b, a, g["sy"])
        else:
            month, day, year = int(g["cm"]), g["cd"], g["cy"]
        try:
            iso = date(int(year), int(month or 0), int(day)).isoformat()
        except ValueError:
            return m.group(0)
        return self.day(iso)

    def text(self, text: str) -> str:
        """Every date inside a string, in every form: ISO dates and timestamps (in UTC),
        month names, d.m.yyyy, m/d/yyyy and yyyymmdd (written back as ISO dates)."""
        if self.days == 0 or not any(c.isdigit() for c in text):
            return text
        return _ANY_DATE.sub(self._any_date, text)

    def apple(self, value: bytes) -> bytes:
        """export.xml's `2020-03-02 07:41:09 -0800`, shifted and in UTC, by slicing (every
        sample has three of them); anything else through `text`."""
        if self.days and len(value) == 25 and value[10] == 32 and value[19] == 32 and value[20] in b"+-":
            try:
                clock = int(value[11:13]) * 60 + int(value[14:16])
                offset = int(value[21:23]) * 60 + int(value[23:25])
            except ValueError:
                clock = offset = -1
            if clock >= 0:
                carry, minutes = divmod(clock - offset if value[20] == 43 else clock + offset, 1440)
                key = (value[:10], carry)
                day = self._apple_days.get(key)
                if day is None:
                    day = self.utc_day(value[:10].decode("ascii", "replace"), carry * 1440)[0].encode("ascii")
                    if len(self._apple_days) < _CACHE_MAX:
                        self._apple_days[key] = day
                return b"%s %02d:%02d:%s +0000" % (day, minutes // 60, minutes % 60, value[17:19])
        if not self.days:
            return value
        return self.text(value.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")

    def fhir(self, value: str) -> str:
        """A FHIR date/dateTime/instant; `YYYY-MM` keeps month precision, a bare year stays."""
        if self.days == 0:
            return value
        m = _ISO_MONTH.match(value)
        if m:
            return self.day(f"{value}-15")[:7]
        return self.text(value)

    def cda(self, value: str) -> str:
        """CDA TS `YYYYMMDD[HHMM[SS]][+ZZZZ]` (in UTC when it has an offset); year or month
        precision is kept as is."""
        if self.days == 0 or len(value) < 8 or not value[:8].isdigit():
            return value
        iso = f"{value[:4]}-{value[4:6]}-{value[6:8]}"
        m = re.fullmatch(r"(\d{2})(\d{2})(\d{2})?(\.\d+)?([+-])(\d{2})(\d{2})", value[8:])
        if m:
            hh, mm, ss, frac, sign, oh, om = m.groups()
            offset = (int(oh) * 60 + int(om)) * (1 if sign == "+" else -1)
            day, minutes = self.utc_day(iso, int(hh) * 60 + int(mm) - offset)
            return f"{day.replace('-', '')}{minutes // 60:02d}{minutes % 60:02d}{ss or ''}{frac or ''}+0000"
        shifted = self.day(iso)
        return shifted.replace("-", "") + value[8:] if shifted[:4].isdigit() else value


NO_SHIFT = DateShift(0)


def birth_year(value: str | None, reference_year: int | None = None) -> str | None:
    """Safe Harbor keeps the year of a birth date only, and not even that when it makes
    someone older than 89 by `reference_year` (the export's year)."""
    if not value:
        return value
    m = re.match(r"\s*(\d{4})", value)
    if m is None or (reference_year is not None and reference_year - int(m.group(1)) > 89):
        return None
    return m.group(1)


# --------------------------------------------------------------------------- pure: scrubbing

_DAY_SUFFIX = r"(?:st|nd|rd|th|er)?"
_DATE_WORDS = r"(?:\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|\d{8}|" \
              rf"(?:[^\W\d_]+\.?\s+\d{{1,2}}{_DAY_SUFFIX},?\s+\d{{4}})|" \
              rf"(?:\d{{1,2}}{_DAY_SUFFIX}\.?[\s-]+[^\W\d_]+\.?[\s-]+\d{{2,4}}))"
_PATTERNS = {
    "dob": rf"(?i:\b(?:DOB|D\.O\.B\.?|date\s+of\s+birth|birth\s*date|born(?:\s+on)?|geb\.?|geboren(?:\s+am)?)"
           rf"\s*[:#]?\s*){_DATE_WORDS}",
    "mrn": r"(?i:\b(?:MRN|medical\s+record\s+(?:number|no\.?|#)|patient\s+id|account\s+(?:number|no\.?))"
           r"\s*[:#]?\s*)[A-Z0-9][A-Z0-9-]{3,}",
    "email": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    "url": r"(?i:\b(?:https?|ftp)://[^\s<>\"']+|\bwww\.[^\s<>\"']+)",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\w)"
             r"|(?<![\w+])\+\d{7,15}(?!\w)",
    "ssn": r"(?<!\w)\d{3}[\s-]\d{2}[\s-]\d{4}(?!\w)",
    "street": r"(?<!\w)\d{1,5}\s+(?:[A-Z][a-z]+\s+){1,3}(?:St|Street|Rd|Road|Ave|Avenue|Ln|Lane|Dr|Drive|Ct|"
              r"Court|Way|Blvd|Boulevard|Terrace|Pl|Place|Hwy|Highway)\b\.?"
              r"|(?i:\bP\.?\s?O\.?\s+Box\s+\d+|\b(?:Apt|Apartment|Suite|Ste|Unit)\.?\s*#?\s*\d+[A-Z]?\b)"
              r"|(?<!\w)[^\W\d_]{2,}(?:stra(?:ss|ß)e|str\.|weg|gasse|platz|allee|laan|straat|vej|gatan)\s+\d+[a-z]?\b"
              r"|(?i:(?<!\w)\d{1,4},?\s+(?:rue|avenue|boulevard|chemin|calle|via|viale|piazza)\s+[^\W\d_]+)",
    "email_spelled": r"(?i:(?<!\w)[\w.+-]+\s*[\[(]?\s*at\s*[\])]?\s*[\w-]+\s*[\[(]?\s*dot\s*[\])]?\s*[a-z]{2,6}\b)",
    "ip": r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])",
    "mac": r"(?<![\w:-])(?:[0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}(?![\w:-])",
    "acct": r"(?i:\b(?:acct|account|policy|member|subscriber|group|insurance|licen[cs]e|DL|passport|certificate)"
            r"\.?\s*(?:no\.?|number|num|#|id)?\s*[:#]?\s*)(?-i:(?=[A-Z-]*\d)[A-Z0-9][A-Z0-9-]{3,})",
    "age": r"(?i:\b(?:age[d:]?\s*:?\s*)(?:9\d|1[0-4]\d)(?:\s*(?:years?|yrs?|y/?o)(?:\s+old)?)?"
           r"|\b(?:9\d|1[0-4]\d)[\s-]*(?:years?|yrs?)[\s-]*(?:old|of\s+age)\b)",
    "serial": r"(?i:\b(?:serial(?:\s*(?:no\.?|number|#))?|S/N|SN)\s*[:#]?\s*)(?=[A-Za-z-]*\d)[A-Za-z0-9][\w-]{4,}",
    # Unlabelled record numbers: upper-case letters and digits, 8 or more, at least 3 digits
    # (account, policy, licence, lot, accession numbers); codes of the standard
    # terminologies are shorter or lower-case.
    "idtoken": r"(?-i:(?<![\w-])(?=[A-Z0-9-]{8,}(?![\w-]))(?=(?:[A-Z-]*\d){3})(?=[\d-]*[A-Z])"
               r"[A-Z0-9]+(?:-[A-Z0-9]+)*(?![\w-]))",
}
_REPLACE = {"dob": "[DATE]", "mrn": "[ID]", "email": "[EMAIL]", "url": "[URL]", "phone": "[PHONE]",
            "ssn": "[ID]", "street": "[ADDRESS]", "kphone": "[PHONE]", "email_spelled": "[EMAIL]", "ip": "[IP]",
            "mac": "[ID]", "acct": "[ID]", "age": "90+", "serial": "[SERIAL]", "idtoken": "[ID]", "kid": "[ID]",
            "iphone": "[PHONE]"}
_LABELLED = {"dob", "mrn", "acct", "serial"}
_LABEL_PREFIX = re.compile(r"^(?i:.*?(?:DOB|D\.O\.B\.?|date\s+of\s+birth|birth\s*date|born(?:\s+on)?|geb\.?|"
                           r"geboren(?:\s+am)?|MRN|medical\s+record\s+(?:number|no\.?|#)|patient\s+id|"
                           r"account\s+(?:number|no\.?))\s*[:#]?\s*)")
_OID = re.compile(r"^\d+(?:\.\d+){3,}$")
_NAME_TOKEN = re.compile(r"[^\W\d_][\w'\u2019-]*")


def name_forms(names: Iterable[dict[str, Any]], extra: Iterable[str] = ()) -> set[str]:
    """Every way a person's name may be written: full, "Last, First", each part,
    initials ("J. Doe", "Jane D.", "J.D."), German possessive ("Janes"), without accents."""
    forms: set[str] = set()

    def add_name(given: list[str], family: list[str]) -> None:
        g, f = " ".join(given), " ".join(family)
        if g and f:
            forms.update({f"{g} {f}", f"{f}, {g}", f"{f},{g}", f"{f} {g}",
                          f"{g[0]}. {f}", f"{g[0]}.{f}", f"{g[0]} {f}", f"{g} {f[0]}.",
                          f"{g[0]}.{f[0]}.", f"{g[0]}. {f[0]}.", f"{f}, {g[0]}."})
            if len(given) > 1:  # every initial: "I.E.D.", "I. E. D."; the first given name alone
                forms.update({f"{given[0]} {f}", f"{f}, {given[0]}"})
                initials = [t[0] for t in (*given, *family)]
                forms.update({"".join(f"{i}." for i in initials), " ".join(f"{i}." for i in initials)})
        for token in (*given, *family, *(t for part in (*given, *family) for t in part.split("-"))):
            if len(token) >= 2:
                forms.update({token, token + "s"})

    for name in names:
        given = [g for g in name.get("given") or [] if isinstance(g, str) and g.strip()]
        family = name.get("family")
        family_tokens = family.split() if isinstance(family, str) else []
        if given or family_tokens:
            add_name([t for g in given for t in g.split()], family_tokens)
        text = name.get("text")
        if isinstance(text, str) and text.strip():
            forms.add(text.strip())
            if "," in text:
                last, _, first = text.partition(",")
                add_name(_NAME_TOKEN.findall(first), _NAME_TOKEN.findall(last))
            else:
                tokens = _NAME_TOKEN.findall(text)
                add_name(tokens[:-1], tokens[-1:]) if len(tokens) > 1 else add_name(tokens, [])
    for hint in extra:
        tokens = _NAME_TOKEN.findall(hint)
        forms.update(t for t in tokens if len(t) >= 2)
        if hint.strip():
            forms.add(hint.strip())
    forms |= {fold_accents(f) for f in forms}
    return {f for f in forms if len(f) >= 2}


def birth_date_forms(iso: str) -> set[str]:
    """A birth date as people and systems write it."""
    try:
        d = date.fromisoformat(iso)
    except ValueError:
        return {iso}
    y, m, dd = d.year, d.month, d.day
    yy = f"{y % 100:02d}"
    forms = {
        d.isoformat(), f"{y}{m:02d}{dd:02d}", f"{y}/{m:02d}/{dd:02d}",
        f"{m:02d}/{dd:02d}/{y}", f"{m}/{dd}/{y}", f"{dd:02d}/{m:02d}/{y}", f"{dd}/{m}/{y}",
        f"{dd:02d}.{m:02d}.{y}", f"{dd}.{m}.{y}", f"{m:02d}-{dd:02d}-{y}", f"{dd:02d}-{m:02d}-{y}",
        f"{m}/{dd}/{yy}", f"{m:02d}/{dd:02d}/{yy}", f"{dd}/{m}/{yy}", f"{dd:02d}/{m:02d}/{yy}", f"{dd}.{m}.{yy}",
        f"{dd:02d}.{m:02d}.{yy}",
    }
    for names in (_MONTHS, _MONTHS_DE, _MONTHS_FR):
        month = names[m - 1]
        for mon in {month, month[:3], month[:3] + "."}:
            for day in {str(dd), f"{dd:02d}", f"{dd}{_ordinal(dd)}"}:
                forms.update({f"{mon} {day}, {y}", f"{mon} {day} {y}", f"{day} {mon} {y}", f"{day}. {mon} {y}",
                              f"{day}-{mon}-{y}", f"{day}-{mon}-{yy}", f"{day} {mon} {yy}"})
    return forms


def _ordinal(day: int) -> str:
    return "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def phone_pattern(value: str) -> str | None:
    """A regex for one known phone number whatever its separators, with or without country code."""
    digits = re.sub(r"\D", "", value)
    if len(digits) < 7:
        return None
    national = digits[-10:] if len(digits) > 10 else digits
    sep = r"[\s.()-]*"
    return r"(?<!\d)(?:\+?\d{1,3}" + sep + ")?" + sep.join(national) + r"(?!\d)"


@dataclass(frozen=True)
class Literal:
    text: str
    replacement: str
    kind: str  # name | date | id | email | address | url


def known_literals(people: Sequence[PersonPII]) -> tuple[list[Literal], list[str]]:
    """Every known identifier as literal text, and the known phones as patterns."""
    out: dict[str, Literal] = {}
    phones: set[str] = set()

    def add(text: str, replacement: str, kind: str) -> None:
        text = text.strip()
        if len(text) < 2:
            return
        key = text.casefold()
        found = out.get(key)
        if found is not None and found.replacement != replacement:
            # One form, two people (a shared family name, a namesake): no label is right.
            replacement = "[NAME]" if kind == "name" and found.kind == "name" else "[REDACTED]"
        out[key] = Literal(text, replacement, kind)

    for p in people:
        for form in name_forms(p.names, p.extra_names):
            add(form, p.label, "name")
        for dob in p.birth_dates:
            for form in birth_date_forms(dob):
                add(form, "[DATE]", "date")
        for text in p.birth_texts:
            add(text, "[DATE]", "date")
        for value in p.identifiers:
            if len(value.strip()) >= 3 and not _OID.match(value.strip()):
                add(value, "[ID]", "id")
        for t in p.telecom:
            value = str(t.get("value") or "")
            system = (t.get("system") or "").lower()
            if system in ("phone", "fax", "sms", "pager") or (not system and re.search(r"\d{3}", value)):
                pattern = phone_pattern(value)
                if pattern:
                    phones.add(pattern)
                add(value, "[PHONE]", "id")
            elif system == "email" or "@" in value:
                add(value, "[EMAIL]", "email")
            elif system == "url":
                add(value, "[URL]", "url")
            else:
                add(value, "[REDACTED]", "id")
        for a in p.addresses:
            for line in a.get("lines") or []:
                add(str(line), "[ADDRESS]", "address")
            for key in ("text", "city", "postal_code"):
                if a.get(key):
                    add(str(a[key]), "[ADDRESS]", "address")
    return sorted(out.values(), key=lambda lit: (-len(lit.text), lit.text)), sorted(phones)


_APOSTROPHE_RE = "(?:['\u2019\u2018\u02bc`\u00b4]\\s?|\\s)?"
_LETTER_BEFORE = r"(?<![^\W_])"  # `_` separates words here: "Jane_iPhone"
_LETTER_AFTER = r"(?![^\W_])"
_LIT_KEY = re.compile(r"['\u2019\u2018\u02bc`\u00b4\s]+")


def _lit_key(text: str) -> str:
    """One key for every spelling a literal regex accepts (case, accents, apostrophes, spaces)."""
    return _LIT_KEY.sub("", fold_accents(text).casefold())


def literal_regex(text: str) -> str:
    """A known literal as a regex: any apostrophe, none or a space where it has one
    ("D’Angelo", "DAngelo", "D Angelo"), any run of spaces where it has a space."""
    out = re.escape(text)
    out = re.sub("['\u2019]", lambda _: _APOSTROPHE_RE, out)
    return re.sub(r"(?:\\ )+", lambda _: r"\s+", out)


def identifier_regex(value: str) -> str | None:
    """A known identifier whatever separators are written between its characters
    ("QX7731942" as "QX-773-1942", "123-45-6789" as "123 45 6789" or "123456789")."""
    chars = re.sub(r"[\W_]", "", value)
    if len(chars) < 6:
        return None
    return _LETTER_BEFORE + r"[\s./-]?".join(re.escape(c) for c in chars) + _LETTER_AFTER


_INTERNATIONAL = re.compile(r"\+\d[\d\s().-]{6,}\d")


def international_phones(text: str) -> list[tuple[int, int]]:
    """Spans of phone numbers written with a country code (`+44 20 7946 0958`), by the
    `phonenumbers` library's rules for every country; national forms are the patterns' job."""
    if "+" not in text or not _INTERNATIONAL.search(text):
        return []
    import phonenumbers

    return [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, None, leniency=phonenumbers.Leniency.VALID)]


class Scrubber:
    """Replaces known identifiers (the identity store's) and identifier patterns in text.

    `text()` is for free text (notes, narratives, metadata values): patterns, known
    phones, every known literal including birth dates. `value()` is for structured
    strings (device and source names, codes, dates): known names, ids, contact details
    and addresses only, so an ordinary date is never mistaken for a birth date.
    """

    def __init__(self, people: Sequence[PersonPII], owner_label: str, owner_person_id: str | None = None) -> None:
        self.owner_label = owner_label
        self.labels = {p.label for p in people} | {owner_label}
        self._owner_forms = {f.casefold() for p in people if p.person_id == owner_person_id
                             for f in name_forms(p.names, p.extra_names)}
        literals, phones = known_literals(people)
        self._map: dict[str, str] = {}
        for lit in literals:
            self._map.setdefault(_lit_key(lit.text), lit.replacement)
        self.birth_dates = frozenset(d for p in people for d in p.birth_dates)
        text_lits = [literal_regex(lit.text) for lit in literals]
        value_lits = [literal_regex(lit.text) for lit in literals if lit.kind != "date"]
        ids = sorted({r for lit in literals if lit.kind == "id" and (r := identifier_regex(lit.text))},
                     key=lambda r: (-len(r), r))
        known = []
        if phones:
            known.append("(?P<kphone>" + "|".join(phones) + ")")
        if text_lits:
            known.append(f"(?P<lit>{_LETTER_BEFORE}(?:" + "|".join(text_lits) + f"){_LETTER_AFTER})")
        if ids:
            known.append("(?P<kid>" + "|".join(ids) + ")")
        # Known literals first: a name inside an address or a known date inside a labelled one
        # gets its own replacement.
        parts = known + [f"(?P<{k}>{v})" for k, v in _PATTERNS.items()]
        self._text_re = re.compile("|".join(parts), re.IGNORECASE)
        vparts = []
        if phones:
            vparts.append("(?P<kphone>" + "|".join(phones) + ")")
        vparts.append(f"(?P<email>{_PATTERNS['email']})")
        if value_lits:
            vparts.append(f"(?P<lit>{_LETTER_BEFORE}(?:" + "|".join(value_lits) + f"){_LETTER_AFTER})")
        if ids:
            vparts.append("(?P<kid>" + "|".join(ids) + ")")
        vparts.append(f"(?P<serial>{_PATTERNS['serial']})")
        self._value_re = re.compile("|".join(vparts), re.IGNORECASE)
        self._device_re = re.compile(f"(?P<idtoken>{_DEVICE_SERIAL})")
        self._text_cache: dict[str, str] = {}
        self._value_cache: dict[str, str] = {}
        self.counts: Counter[str] = Counter()

    def _sub(self, m: re.Match[str]) -> str:
        kind = m.lastgroup or "lit"
        self.counts[kind] += 1
        if kind == "lit":
            return self._map.get(_lit_key(m.group(0)), "[REDACTED]")
        if kind in _LABELLED:
            prefix = _LABEL_PREFIX.match(m.group(0))
            return (prefix.group(0) if prefix else "") + _REPLACE[kind]
        return _REPLACE[kind]

    def text(self, text: str) -> str:
        return self._scrub(self._text_cache, self._text_re, text, phones=True)

    def value(self, text: str) -> str:
        return self._scrub(self._value_cache, self._value_re, text)

    def device_value(self, text: str) -> str:
        """A device's model or firmware: a structured value that may carry an unlabelled serial."""
        return self._device_re.sub(self._sub, self.value(text))

    def _scrub(self, cache: dict[str, str], pattern: "re.Pattern[str]", text: str, phones: bool = False) -> str:
        found = cache.get(text)
        if found is None:
            # Decomposed accents ("E\u0301lodie") compose first, so the literals see one form.
            found = text if text.isascii() else unicodedata.normalize("NFC", text)
            found = pattern.sub(self._sub, found) if text.strip() else text
            if phones:
                for start, end in reversed(international_phones(found)):
                    self.counts["iphone"] += 1
                    found = found[:start] + "[PHONE]" + found[end:]
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[text] = found
        return found

    # -- device and source names
    def device_name(self, text: str) -> str:
        """A source or device name. The possessor ("Jane’s iPhone", "Janes iPhone",
        "iPhone de Jean") is the export's owner unless the name belongs to someone else
        in the store only; the rest is scrubbed like any structured value."""
        m = _POSSESSIVE.match(text)
        if m:
            self.counts["possessive"] += 1
            return f"{self._possessor(m.group('who'))}\u2019s {self.value(m.group('rest'))}"
        m = _POSSESSIVE_AFTER.match(text)
        if m:
            self.counts["possessive"] += 1
            return f"{self.value(m.group('thing'))} {m.group('prep')} {self._possessor(m.group('who'))}"
        return self.value(text)

    def _possessor(self, who: str) -> str:
        key = who.strip().casefold()
        if key in self._owner_forms or fold_accents(key) in self._owner_forms:
            return self.owner_label
        label = self._map.get(_lit_key(key))
        return label if label in self.labels else self.owner_label

    def device(self, text: str) -> str:
        """Apple's `<<HKDevice: 0x...>, name:..., manufacturer:..., ...>`: the name goes through
        `device_name`, serials / UDIs / Bluetooth identifiers are dropped."""
        m = _HKDEVICE.match(text)
        if m is None:
            return self._device_re.sub(self._sub, self.device_name(text))
        head, body = m.group(1), m.group(2)
        starts = [f for f in _DEVICE_FIELD.finditer(body)]
        out = [head]
        for i, f in enumerate(starts):
            key = f.group(1)
            value = body[f.end():starts[i + 1].start() if i + 1 < len(starts) else len(body)]
            if key == "name":
                out.append(f", name:{self._device_re.sub(self._sub, self.device_name(value))}")
            elif key in _DEVICE_KEEP:
                out.append(f", {key}:{self.device_value(value)}")
            else:
                self.counts["device_field"] += 1
        return "".join(out) + ">"


# In a device's name, model or firmware any run of 8+ capitals and digits (3+ digits) is a serial.
_DEVICE_SERIAL = r"(?<![A-Za-z0-9])(?=[A-Z0-9]{8,}(?![A-Za-z0-9]))(?=(?:[A-Z]*\d){3})(?=\d*[A-Z])[A-Z0-9]+"
_DEVICE_WORDS = r"(?:Apple\s*Watch|iPhone|iPad|iPod|iMac|MacBook|Mac|AirPods|Watch|Galaxy|Pixel|Phone)"
_POSSESSIVE = re.compile(r"^\s*(?P<who>(?:[^\W\d_][\w.-]*\s+){0,2}[^\W\d_][\w.-]*?)(?:['\u2019]s|s(?=\s+"
                         + _DEVICE_WORDS + r"))\s+(?P<rest>.+)$", re.IGNORECASE)
_POSSESSIVE_AFTER = re.compile(r"^\s*(?P<thing>" + _DEVICE_WORDS + r"[\w\s-]*?)\s+(?P<prep>de|di|da|van|von|of"
                               r"|d['\u2019])\s*(?P<who>[^\W\d_][\w.-]*(?:\s+[^\W\d_][\w.-]*){0,2})\s*$", re.IGNORECASE)
_HKDEVICE = re.compile(r"^(<<HKDevice: [^>]*>)(.*)>\s*$", re.DOTALL)
_DEVICE_FIELD = re.compile(r", (\w+):")
_DEVICE_KEEP = frozenset({"manufacturer", "model", "hardware", "software", "firmware"})


def pseudonym(secret: bytes, kind: str, value: str, length: int = 20) -> str:
    """Keyed, consistent replacement for a record identifier (FHIR ids, references)."""
    return mac(secret, "pseudonym", kind, value)[:length]


def coarse_coordinate(value: str) -> str:
    try:
        return f"{round(float(value), COARSE_DIGITS):.{COARSE_DIGITS}f}"
    except ValueError:
        return "0"


# --------------------------------------------------------------------------- context

_APPLE_FILE_NAME = re.compile(r"^(?:[A-Za-z]+-[0-9A-Fa-f-]{8,}\.json|ecg_\d{4}-\d{2}-\d{2}(?:_\d+)?\.csv|"
                              r"route_\d{4}-\d{2}-\d{2}_\d{1,2}\.\d{2}[ap]m(?:_\d+)?\.gpx|export(?:_cda)?\.xml)$")


@dataclass
class Context:
    """Everything a file transform needs: scrubber, pseudonym key, people and their shifts."""

    scrubber: Scrubber
    secret: bytes
    owner_person_id: str
    owner_label: str
    labels: dict[str, str]
    fhir_subjects: dict[str, str]
    date_shift: bool
    reference_year: int = date.today().year  # the export's year (ages over 89 are aggregated)
    counts: Counter[str] = field(default_factory=Counter)
    _shifts: dict[str, DateShift] = field(default_factory=dict)

    def shift_for(self, person_id: str | None) -> DateShift:
        if not self.date_shift:
            return NO_SHIFT
        pid = person_id or self.owner_person_id
        found = self._shifts.get(pid)
        if found is None:
            found = self._shifts[pid] = DateShift(person_offset_days(self.secret, pid))
        return found

    @property
    def owner_shift(self) -> DateShift:
        return self.shift_for(self.owner_person_id)

    def member_path(self, path: str) -> str:
        """A file's path in the de-identified copy: Apple's own file names keep their
        shape (dates shifted); any other name ("<Name> <DOB> labs.json") becomes a keyed
        pseudonym with its extension, so names never reach layouts, manifests or rows."""
        head, sep, name = path.rpartition("/")
        if _APPLE_FILE_NAME.match(name):
            return head + sep + self.owner_shift.text(name)
        ext = name.rpartition(".")[2] if "." in name else ""
        suffix = f".{ext.lower()}" if ext.isalnum() and len(ext) <= 5 else ""
        return head + sep + "record-" + pseudonym(self.secret, "file-name", name) + suffix


# --------------------------------------------------------------------------- export.xml

_XML_ENTITY = re.compile(r"&(?:#x([0-9a-fA-F]+)|#([0-9]+)|(lt|gt|amp|quot|apos));")
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


def xml_unescape(text: str) -> str:
    if "&" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        hexa, dec, name = m.groups()
        if name:
            return _NAMED[name]
        try:
            return chr(int(hexa, 16) if hexa else int(dec))
        except (ValueError, OverflowError):
            return ""

    return _XML_ENTITY.sub(one, text)


def xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


_NAME_RE = rb"[A-Za-z_][\w.:-]*"
_FIRST = re.compile(rb"[ \t\r]*<(" + _NAME_RE + rb")[ \t\r]+(" + _NAME_RE + rb")[ \t\r]*=[ \t\r]*\Z").match
_NEXT = re.compile(rb"[ \t\r]+(" + _NAME_RE + rb")[ \t\r]*=[ \t\r]*\Z").match
_LAST = re.compile(rb"[ \t\r]*/?>[ \t\r]*\Z").match
_BARE = re.compile(rb"[ \t\r]*(?:</?" + _NAME_RE + rb"[ \t\r]*/?>)?[ \t\r]*\Z").match
_NUMERIC = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z").match

# Attributes whose values are codes, numbers or units in Apple's schema.
_XML_KEEP = frozenset(
    b"""type unit key sourceVersion workoutActivityType duration durationUnit totalDistance
    totalDistanceUnit totalEnergyBurned totalEnergyBurnedUnit totalSwimmingStrokeCount
    totalSwimmingStrokeCountUnit totalFlightsClimbed totalFlightsClimbedUnit bpm time
    activeEnergyBurned activeEnergyBurnedGoal activeEnergyBurnedUnit appleMoveTime appleMoveTimeGoal
    appleExerciseTime appleExerciseTimeGoal appleStandHours appleStandHoursGoal average minimum maximum
    sum locale fhirVersion resourceFilePath HKCharacteristicTypeIdentifierBiologicalSex
    HKCharacteristicTypeIdentifierBloodType HKCharacteristicTypeIdentifierFitzpatrickSkinType
    HKCharacteristicTypeIdentifierCardioFitnessMedicationsUse HKCharacteristicTypeIdentifierWheelchairUse
    frequencyValue leftEarValue rightEarValue leftEarMasked rightEarMasked leftEarClampingRangeLowerBound
    leftEarClampingRangeUpperBound rightEarClampingRangeLowerBound rightEarClampingRangeUpperBound""".split()
)
# A point of an inline route (normally a `<Location>` line of its own, see `_location`).
_LOCATION_ATTRS = frozenset(b"latitude longitude altitude horizontalAccuracy verticalAccuracy course speed".split())


def _EMPTY(pieces: list[bytes], i: int) -> bytes:
    return b""


_XML_DATES = frozenset(b"creationDate startDate endDate date receivedDate dateComponents".split())
# Device and record identifiers: exports write the key strings (`HKDeviceSerialNumber`),
# HealthKit's headers name the constants (`HKMetadataKeyDeviceSerialNumber`); both are dropped.
_META_DROP = frozenset(
    prefix + name
    for prefix in ("HK", "HKMetadataKey")
    for name in ("DeviceSerialNumber", "UDIDeviceIdentifier", "UDIProductionIdentifier", "DigitalSignature",
                 "ExternalUUID", "DeviceName", "DeviceManufacturerName")
)
# Time zone names tell where a person lives and, next to shifted dates, the shift itself.
_META_ZONE = frozenset({"HKTimeZone", "HKMetadataKeyTimeZone"})
_MAX_LOGICAL_LINE = 1 << 20


class _Bytes:
    """Caching bytes -> bytes wrappers around str transforms of XML attribute values."""

    def __init__(self, fn: Callable[[str], str]) -> None:
        self.fn = fn
        self.cache: dict[bytes, bytes] = {}

    def __call__(self, raw: bytes) -> bytes:
        found = self.cache.get(raw)
        if found is None:
            text = raw.decode("utf-8", "surrogateescape")
            plain = xml_unescape(text)
            new = self.fn(plain)
            found = raw if new == plain else xml_escape(new).encode("utf-8", "surrogateescape")
            if len(self.cache) >= _CACHE_MAX:
                self.cache.clear()
            self.cache[raw] = found
        return found


_ATTR_PAIR = re.compile(rb'([A-Za-z_][\w.:-]*)="([^"]*)"')


class ExportXmlRewriter:
    """Rewrites `export.xml` line by line. Each line is split at `"`: the markup between
    the values is its shape, validated once against XML's grammar and cached together
    with the transform of each attribute, so a known line costs a split, a dict lookup
    and a join. Lines of other shapes (text content, tags over several lines, comments)
    take a slower tokenizing path that still treats every value and text as suspect."""

    def __init__(self, ctx: Context, keep_routes: str = "drop") -> None:
        self.ctx = ctx
        sc = ctx.scrubber
        shift = ctx.owner_shift
        self.counts = ctx.counts
        self.source_name = _Bytes(sc.device_name)
        self.key = _Bytes(sc.value)
        self.device = _Bytes(sc.device)
        self.text = _Bytes(lambda s: shift.text(sc.text(s)))
        self.date = self._shift_date if shift.days else None
        self._shift = shift
        self.birth = _Bytes(lambda s: birth_year(s, ctx.reference_year) or "")
        self.record_id = _Bytes(lambda s: pseudonym(ctx.secret, "fhir-id", s))
        self.url = _Bytes(lambda s: "[URL]" if s else s)
        self.path = _Bytes(ctx.member_path)
        self._shapes: dict[tuple[bytes, ...], tuple[tuple[int, Callable[[list[bytes], int], bytes]], ...] | None] = {}
        self._bare: set[bytes] = set()
        self._in_tag = False
        self._pending: bytes | None = None
        self.keep_routes = keep_routes
        self._last_location: bytes | None = None

    # -- per-attribute policy
    def _op(self, tag: bytes, attr: bytes, names: list[bytes]) -> Callable[[list[bytes], int], bytes] | None:
        if attr == b"sourceName":
            return lambda p, i: self.source_name(p[i])
        if attr == b"device":
            return lambda p, i: self.device(p[i])
        if tag == b"Location" and attr == b"date":
            return lambda p, i: self._hour(p[i])
        if attr in _XML_DATES or (tag == b"ExportDate" and attr == b"value"):
            return (lambda p, i: self.date(p[i])) if self.date else None
        if attr == b"HKCharacteristicTypeIdentifierDateOfBirth":
            return lambda p, i: self.birth(p[i])
        if tag == b"ClinicalRecord" and attr == b"identifier":
            return lambda p, i: self.record_id(p[i])
        if attr in (b"sourceURL", b"url"):
            return lambda p, i: self.url(p[i])
        if (tag == b"FileReference" and attr == b"path") or attr == b"resourceFilePath":
            return lambda p, i: self.path(p[i])
        if tag == b"MetadataEntry" and attr == b"key":  # apps name their own keys ("Jane's goal")
            return lambda p, i: self.key(p[i])
        if tag == b"MetadataEntry" and attr == b"value" and b"key" in names:
            key_at = 2 * names.index(b"key") + 1
            return lambda p, i: self._metadata(p[key_at], p[i])
        if attr == b"value" and tag in (b"Record", b"InstantaneousBeatsPerMinute"):
            return self._record_value
        if attr in _LOCATION_ATTRS:
            return self._coordinate if attr in (b"latitude", b"longitude") else _EMPTY
        if attr in _XML_KEEP:
            return None
        return lambda p, i: self.text(p[i])

    def _shift_date(self, v: bytes) -> bytes:
        """Apple's `2020-03-02 07:41:09 -0800`: shifted, in UTC; a bare date: shifted."""
        return self._shift.apple(v)

    def _record_value(self, pieces: list[bytes], i: int) -> bytes:
        v = pieces[i]
        if _NUMERIC(v) or v.startswith(b"HK"):
            return v
        return self.text(v)

    def _metadata(self, key: bytes, value: bytes) -> bytes:
        name = key.decode("utf-8", "replace")
        if name in _META_DROP or name in _META_ZONE:
            self.counts["metadata_dropped"] += 1
            return b"[REDACTED]"
        # Numbers too: a known MRN, phone or birth date may be written as one.
        return self.text(value)

    def _location(self, line: bytes) -> bytes:
        """Old exports' inline route points: gone with `drop`; with `coarse` the position
        rounded to 0.01 degrees and the time to the hour, speed, course, altitude and
        accuracies dropped, and repeats of the previous point dropped (one point per
        cell visit: per-second points would trace the route between the cells)."""
        self.counts["route_points_dropped"] += 1
        if self.keep_routes != "coarse":
            return b""
        attrs = dict(_ATTR_PAIR.findall(line))
        lat, lon = attrs.get(b"latitude"), attrs.get(b"longitude")
        if lat is None or lon is None:
            return b""
        when = self._hour(attrs.get(b"date", b""))
        point = (b'  <Location date="' + when + b'" latitude="' + coarse_coordinate(lat.decode()).encode()
                 + b'" longitude="' + coarse_coordinate(lon.decode()).encode() + b'"/>')
        if point == self._last_location:
            return b""
        self._last_location = point
        return point

    def _coordinate(self, pieces: list[bytes], i: int) -> bytes:
        if self.keep_routes != "coarse":
            return b""
        return coarse_coordinate(pieces[i].decode("ascii", "replace")).encode("ascii")

    def _hour(self, value: bytes) -> bytes:
        shifted = self.date(value) if self.date else value
        return shifted[:13] + b":00:00" + shifted[19:] if len(shifted) >= 19 else shifted

    def _shape(self, markup: tuple[bytes, ...]):
        m = _FIRST(markup[0])
        if m is None or _LAST(markup[-1]) is None:
            return None
        tag, names = m.group(1), [m.group(2)]
        for piece in markup[1:-1]:
            n = _NEXT(piece)
            if n is None:
                return None
            names.append(n.group(1))
        ops = []
        for k, name in enumerate(names):
            op = self._op(tag, name, names)
            if op is not None:
                ops.append((2 * k + 1, op))
        return tuple(ops)

    def logical_lines(self, lines: list[bytes]) -> Iterable[bytes]:
        """Physical lines joined while a tag's quoted value is open: a value holding a
        newline is rewritten whole, not half as text outside any attribute."""
        for raw in lines:
            if self._pending is not None:
                raw = self._pending + b"\n" + raw
                self._pending = None
            if raw.count(b'"') % 2 and b"<" in raw and len(raw) < _MAX_LOGICAL_LINE:
                self._pending = raw
                continue
            yield raw

    def line(self, line: bytes) -> bytes:
        if self._in_tag:
            return self._slow(line)
        if line.lstrip().startswith(b"<Location ") and line.count(b"<") == 1 and line.rstrip().endswith(b"/>"):
            return self._location(line)
        pieces = line.split(b'"')
        if len(pieces) == 1:
            if line in self._bare:
                return line
            if _BARE(line):
                if len(self._bare) < 4096:
                    self._bare.add(line)
                return line
            return self._slow(line)
        if len(pieces) % 2 == 0:
            return self._slow(line)
        markup = tuple(pieces[0::2])
        try:
            ops = self._shapes[markup]
        except KeyError:
            ops = self._shape(markup)
            if len(self._shapes) < 8192:
                self._shapes[markup] = ops
        if ops is None:
            return self._slow(line)
        if not ops:
            return line
        for i, op in ops:
            pieces[i] = op(pieces, i)
        return b'"'.join(pieces)

    # -- anything else: tokenize the line, every value and text is suspect
    _TOKENS = re.compile(rb"(<!--.*?-->|<!\[CDATA\[.*?\]\]>|<[^<>]*>|<[^<>]*\Z|\A[^<>]*>)", re.DOTALL)
    _ATTR = re.compile(rb"(" + _NAME_RE + rb")(\s*=\s*)(\"[^\"]*\"|'[^']*')")
    _TAG_NAME = re.compile(rb"<\s*(" + _NAME_RE + rb")")

    def _slow(self, line: bytes) -> bytes:
        self.counts["xml_slow_lines"] += 1
        out = []
        starts_in_tag = self._in_tag
        for k, part in enumerate(self._TOKENS.split(line)):
            if not part:
                continue
            is_tag = k % 2 == 1 or (k == 0 and starts_in_tag)
            if part.startswith(b"<!--") or part.startswith(b"<![CDATA["):
                out.append(self.text(part))
            elif is_tag:
                tag_m = self._TAG_NAME.match(part)
                tag = tag_m.group(1) if tag_m else b""
                out.append(self._ATTR.sub(lambda m, tag=tag: self._slow_attr(tag, m), part))
                self._in_tag = not part.rstrip().endswith(b">")
            else:
                out.append(self.text(part))
        if not line.strip():
            return line
        return b"".join(out)

    def _slow_attr(self, tag: bytes, m: re.Match[bytes]) -> bytes:
        name, eq, quoted = m.group(1), m.group(2), m.group(3)
        op = self._op(tag, name, [name])
        if tag == b"MetadataEntry" and name == b"value":
            op = lambda p, i: self.text(p[i])
        if op is None:
            return m.group(0)
        value = op([quoted[1:-1]], 0)
        q = quoted[:1]
        if q == b"'":
            value = value.replace(b"'", b"&apos;")
        return name + eq + q + value + q

    def rewrite(self, src: BinaryIO, dst: BinaryIO, progress: ProgressFn, total: int) -> None:
        from healthdelta.parse.xmlrepair import find_body_start

        size = os.fstat(src.fileno()).st_size
        body = find_body_start(src, size)
        src.seek(0)
        dst.write(src.read(body))  # XML declaration and Apple's DTD: fixed text, no PII
        progress("deid", body, total)
        rest = b""
        line = self.line
        while True:
            block = src.read(BLOCK)
            if not block:
                if rest:
                    for x in self.logical_lines([rest]):
                        dst.write(line(x))
                break
            buf = rest + block if rest else block
            cut = buf.rfind(b"\n") + 1
            rest = buf[cut:]
            lines = buf[:cut].split(b"\n")
            lines.pop()  # after the last newline
            dst.write(b"".join([line(x) + b"\n" for x in self.logical_lines(lines)]))
            progress("deid", len(block), total)
        if self._pending is not None:  # a value never closed: the slow path treats it as text
            dst.write(self._slow(self._pending) + b"\n")


# --------------------------------------------------------------------------- streaming XML (CDA, GPX)

_XML_OPTIONS: dict[str, Any] = {
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "huge_tree": False,
    "remove_comments": True,
    "remove_pis": True,
    "recover": True,
}


def _local(tag: Any) -> str:
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def stream_xml(src: Path, dst: BinaryIO, *, containers: Callable[[str, str | None], bool],
               unit: Callable[[Any], bool | None], root_attrs: Callable[[dict[str, str]], dict[str, str]]) -> None:
    """Copy an XML document through `unit` one subtree at a time.

    Elements for which `containers(local, parent_local)` holds are written as open/close
    tags around their children; every other child of a container is a unit: transformed
    in place by `unit` (dropped when it returns False), serialised whole and freed.
    Memory is bounded by the largest unit. Comments and processing instructions are
    dropped, text directly inside a container
    (whitespace in practice) is not copied. Namespace declarations already in scope are
    not repeated on every unit.
    """
    from lxml import etree

    dst.write(b"<?xml version='1.0' encoding='UTF-8'?>\n")
    open_stack: list[tuple[Any, bytes, dict[str | None, str]]] = []  # (element, end tag, in-scope decls)
    try:
        for event, el in etree.iterparse(str(src), events=("start", "end"), **_XML_OPTIONS):
            parent = el.getparent()
            if event == "start":
                parent_is_open = (parent is None and not open_stack) or (
                    bool(open_stack) and parent is open_stack[-1][0])
                if parent_is_open and containers(_local(el.tag), _local(parent.tag) if parent is not None else None):
                    declared = open_stack[-1][2] if open_stack else {}
                    start_tag, end_tag, scope = _start_tag(el, root_attrs(dict(el.attrib)), declared)
                    dst.write(start_tag + b"\n")
                    open_stack.append((el, end_tag, scope))
                continue
            if open_stack and el is open_stack[-1][0]:
                dst.write(open_stack.pop()[1] + b"\n")
                el.clear()
                continue
            if open_stack and parent is open_stack[-1][0]:
                if unit(el) is not False:
                    el.tail = None
                    dst.write(_strip_inherited(etree.tostring(el, encoding="utf-8"), open_stack[-1][2]) + b"\n")
                parent.remove(el)
    except etree.XMLSyntaxError:
        raise InputError("an XML file of the export cannot be read") from None
    while open_stack:
        dst.write(open_stack.pop()[1] + b"\n")


_XML_NS = "http://www.w3.org/XML/1998/namespace"
_NS_DECL = re.compile(rb'\s+xmlns(?::([\w.-]+))?="([^"]*)"')


def _qname(tag: str, nsmap: dict[str | None, str], *, attribute: bool = False) -> str:
    if not tag.startswith("{"):
        return tag
    ns, local = tag[1:].split("}", 1)
    if ns == _XML_NS:
        return f"xml:{local}"
    prefixes = [p for p, u in nsmap.items() if u == ns and (p is not None or not attribute)]
    if not attribute and None in prefixes:
        return local
    return f"{sorted(p for p in prefixes if p)[0]}:{local}" if any(prefixes) else local


def _start_tag(el: Any, attrs: dict[str, str], declared: dict[str | None, str]) -> tuple[bytes, bytes, dict]:
    nsmap = dict(el.nsmap)
    new = {p: u for p, u in nsmap.items() if declared.get(p) != u}
    name = _qname(el.tag, nsmap)
    parts = [name]
    parts += [f'xmlns="{xml_escape(u)}"' if p is None else f'xmlns:{p}="{xml_escape(u)}"'
              for p, u in sorted(new.items(), key=lambda kv: kv[0] or "")]
    parts += [f'{_qname(k, nsmap, attribute=True)}="{xml_escape(v)}"' for k, v in attrs.items()]
    return (f"<{' '.join(parts)}>".encode(), f"</{name}>".encode(), {**declared, **new})


def _strip_inherited(serialized: bytes, declared: dict[str | None, str]) -> bytes:
    end = serialized.find(b">")
    head = serialized[:end]

    def keep(m: re.Match[bytes]) -> bytes:
        prefix = m.group(1).decode() if m.group(1) else None
        return b"" if declared.get(prefix) == m.group(2).decode("utf-8", "replace") else m.group(0)

    return _NS_DECL.sub(keep, head) + serialized[end:]


_CDA_TIME_ELEMENTS = frozenset({"effectiveTime", "low", "high", "center", "time", "expectedUseTime"})
_CDA_PERSON_PARENTS = frozenset({"patient", "assignedPerson", "relatedPerson", "guardianPerson", "associatedPerson",
                                 "informationRecipient", "intendedRecipient", "person", "subject", "relatedSubject",
                                 "maintainingPerson", "assignedEntity"})
_CDA_DROP = frozenset({"birthplace", "guardian"})
_CDA_SAFE_ATTRS = frozenset({"code", "codeSystem", "codeSystemName", "codeSystemVersion", "classCode", "moodCode",
                             "typeCode", "{http://www.w3.org/2001/XMLSchema-instance}type", "unit", "nullFlavor",
                             "use", "mediaType", "representation", "inversionInd", "negationInd", "contextControlCode",
                             "determinerCode", "contextConductionInd", "operator", "inclusive", "institutionSpecified",
                             "xmlns", "ID", "IDREF"})


class _FileRewriter:
    """What every per-format rewriter holds: the run context, its scrubber and the
    owner's date shift."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.sc = ctx.scrubber
        self.shift = ctx.owner_shift


_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"


class CdaRewriter(_FileRewriter):
    def cda_time(self, value: str) -> str:
        """A TS value: a known birth date keeps its year, any other is shifted."""
        if len(value) >= 8 and f"{value[:4]}-{value[4:6]}-{value[6:8]}" in self.sc.birth_dates:
            self.ctx.counts["cda_birth_date_values"] += 1
            return value[:4]
        return self.shift.cda(value)

    def _base64(self, el: Any) -> None:
        """Base64 content: text types are decoded, scrubbed and encoded again; anything
        else (PDFs, images) cannot be checked and is dropped."""
        text = "".join(el.itertext()).strip()
        for child in list(el):
            el.remove(child)
        decoded = None
        if _TEXT_MIME.match(el.get("mediaType") or "text/plain"):
            try:
                decoded = base64.b64decode(text, validate=False).decode("utf-8")
            except (binascii.Error, ValueError, UnicodeDecodeError):
                decoded = None
        if decoded is None:
            el.text = None
            el.set("nullFlavor", "MSK")
            self.ctx.counts["cda_binary_dropped"] += 1
            return
        el.text = base64.b64encode(self.shift.text(self.sc.text(decoded)).encode("utf-8")).decode("ascii")
        self.ctx.counts["cda_text_attachments"] += 1

    @staticmethod
    def containers(local: str, parent: str | None) -> bool:
        if parent is None or local in ("structuredBody", "section"):
            return True
        return local == "component" and parent in ("ClinicalDocument", "structuredBody", "section")

    def root_attrs(self, attrs: dict[str, str]) -> dict[str, str]:
        return {k: (v if k.endswith("schemaLocation") or _local(k) in _CDA_SAFE_ATTRS else self.sc.value(v))
                for k, v in attrs.items()}

    def text_for(self, local: str, text: str) -> str:
        if not text.strip():
            return text
        if local == "sourceName":
            return self.sc.device_name(text)
        if local == "device":
            return self.sc.device(text)
        return self.shift.text(self.sc.text(text))

    def unit(self, root: Any) -> None:
        drop = []
        for el in list(root.iter()):
            if not isinstance(el.tag, str):
                drop.append(el)
                continue
            local = _local(el.tag)
            parent = el.getparent()
            parent_local = _local(parent.tag) if parent is not None else ""
            if local in _CDA_DROP:
                drop.append(el)
                continue
            if local == "id":
                if "extension" in el.attrib:
                    el.set("extension", "[REDACTED]")
                elif re.fullmatch(r"[0-9a-fA-F-]{32,36}", el.get("root", "")):
                    el.set("root", pseudonym(self.ctx.secret, "cda-id", el.get("root", ""), 32))
                for k in list(el.attrib):  # assigningAuthorityName names the hospital of the MRN
                    if k not in ("root", "extension", "nullFlavor"):
                        del el.attrib[k]
                self.ctx.counts["cda_ids"] += 1
                continue
            if el.get("representation") == "B64":
                self._base64(el)
                continue
            if local == "telecom":
                for k in list(el.attrib):
                    if k != "use":
                        del el.attrib[k]
                el.set("nullFlavor", "MSK")
                self.ctx.counts["cda_telecom"] += 1
                continue
            if local == "addr":
                for child in list(el):
                    if _local(child.tag) not in ("state", "country"):
                        el.remove(child)
                el.text = None
                self.ctx.counts["cda_addresses"] += 1
                continue
            if local == "name" and parent_local in _CDA_PERSON_PARENTS:
                label = self.ctx.owner_label if parent_local == "patient" else "[NAME]"
                for child in list(el):
                    el.remove(child)
                el.text = label
                for k in list(el.attrib):
                    if k != "use":
                        del el.attrib[k]
                self.ctx.counts["cda_names"] += 1
                continue
            if local == "birthTime":
                year = birth_year(el.get("value"), self.ctx.reference_year)
                if year:
                    el.set("value", year)
                elif "value" in el.attrib:  # over 89: not even the year
                    del el.attrib["value"]
                    el.set("nullFlavor", "MSK")
                continue
            for k, v in el.attrib.items():
                if k in ("ID", "IDREF") or (k == "value" and local == "reference" and v.startswith("#")):
                    # Document-local anchors are free text to their author ("obs-Jane-1").
                    hashed = pseudonym(self.ctx.secret, "cda-anchor", v.lstrip("#"), 16)
                    el.set(k, ("#" if v.startswith("#") else "") + "a" + hashed)
                elif k == "value" and (local in _CDA_TIME_ELEMENTS or el.get(_XSI_TYPE) in ("TS", "IVL_TS")):
                    el.set(k, self.cda_time(v))
                elif _local(k) not in _CDA_SAFE_ATTRS and k != "value":
                    new = self.sc.value(v) if not k.endswith("displayName") else self.sc.text(v)
                    if new != v:
                        el.set(k, new)
                elif k == "value" and not _NUMERIC(v.encode("utf-8", "replace")):
                    new = self.sc.text(v)
                    if new != v:
                        el.set(k, new)
            if el.text:
                el.text = self.text_for(local, el.text)
            if el.tail and el is not root and el.tail.strip():
                el.tail = self.shift.text(self.sc.text(el.tail))
        for el in drop:
            parent = el.getparent()
            if parent is not None:
                if el.tail and el.tail.strip():
                    _append_text(el, self.sc.text(el.tail))
                parent.remove(el)


def _append_text(el: Any, text: str) -> None:
    prev = el.getprevious()
    parent = el.getparent()
    if prev is not None:
        prev.tail = (prev.tail or "") + text
    else:
        parent.text = (parent.text or "") + text


class GpxRewriter(_FileRewriter):
    """Coarse routes: coordinates rounded to 0.01°, times shifted, texts scrubbed,
    links and authors dropped. A point keeps only its cell and the hour: elevation,
    speed, course and accuracies are dropped (per-second speed and course let dead
    reckoning recover the exact route from a coarse start), and a point in the same
    cell and hour as the one before is dropped (per-second points would time every
    cell crossing)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._last: tuple[str | None, ...] | None = None

    @staticmethod
    def containers(local: str, parent: str | None) -> bool:
        return parent is None or local in ("trk", "trkseg", "rte")

    def root_attrs(self, attrs: dict[str, str]) -> dict[str, str]:
        return {k: (v if _local(k) in ("version", "creator", "schemaLocation") else self.sc.value(v))
                for k, v in attrs.items()}

    def unit(self, root: Any) -> bool:
        if _local(root.tag) in ("trkpt", "rtept", "wpt") and not self._point(root):
            return False
        drop = []
        for el in list(root.iter()):
            if not isinstance(el.tag, str):
                drop.append(el)
                continue
            local = _local(el.tag)
            if local in ("link", "author", "email", "copyright"):
                drop.append(el)
                continue
            for k in ("lat", "lon"):
                if k in el.attrib:
                    el.set(k, coarse_coordinate(el.get(k)))
            for k, v in el.attrib.items():
                if k not in ("lat", "lon"):
                    el.set(k, self.sc.value(v))
            if el.text and el.text.strip():
                el.text = self.shift.text(el.text) if local == "time" else self.shift.text(self.sc.text(el.text))
        for el in drop:
            if el.getparent() is not None:
                el.getparent().remove(el)
        return True

    def _point(self, point: Any) -> bool:
        """Reduce a track point to cell and hour; False when it repeats the previous one."""
        for child in list(point):
            if _local(child.tag) != "time":
                point.remove(child)
            elif child.text and len(child.text.strip()) >= 13:
                child.text = child.text.strip()[:13] + ":00:00Z"
        time = point.find("{*}time")
        key = (coarse_coordinate(point.get("lat", "")), coarse_coordinate(point.get("lon", "")),
               time.text if time is not None else None)
        if key == self._last:
            self.ctx.counts["route_points_merged"] += 1
            return False
        self._last = key
        return True


# --------------------------------------------------------------------------- FHIR JSON

_PERSON_TYPES = frozenset({"Patient", "RelatedPerson", "Practitioner", "Person"})
_PERSON_KEEP = frozenset({"resourceType", "id", "gender", "birthDate", "active", "deceasedBoolean",
                          "deceasedDateTime", "multipleBirthBoolean", "communication", "managingOrganization",
                          "generalPractitioner", "careProvider", "patient", "relationship", "qualification"})
_CODE_KEYS = frozenset({"system", "code", "resourceType", "status", "use", "unit", "version", "profile", "url",
                        "language", "contentType", "gender", "intent", "priority", "fhirVersion", "mode",
                        "valueCode", "severity", "criticality", "comparator", "type"})
_PEOPLE_REF_KEYS = frozenset({"subject", "patient", "performer", "requester", "author", "recorder", "asserter",
                              "prescriber", "practitioner", "individual", "actor", "attester", "enterer",
                              "informationSource", "sender", "recipient", "orderer", "agent", "who", "source",
                              "generalPractitioner", "careProvider", "participant", "party", "collector",
                              "verifiedWith", "resultsInterpreter", "onBehalfOf", "custodian", "contributor"})
_PEOPLE_REF_TYPES = ("Patient", "Practitioner", "RelatedPerson", "Person", "PractitionerRole")
_TEXT_MIME = re.compile(r"^(?:text/|application/(?:xml|json|xhtml\+xml|fhir\+json|fhir\+xml|rtf))", re.IGNORECASE)
_FHIR_DATE = re.compile(r"^\d{4}(?:-\d{2}(?:-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)?)?$")
_REF = re.compile(r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
_XHTML_TAG = re.compile(r"(<[^>]*>)")
_XHTML_ATTR = re.compile(r"""([^\s=/<>"']+)(\s*=\s*)("[^"]*"|'[^']*'|[^\s>]+)""")
# Attributes that point somewhere (mailto:, a patient portal, an image of a document).
_XHTML_LINK_ATTRS = frozenset({"href", "src", "cite", "action", "background", "longdesc", "usemap", "data",
                               "poster", "srcset", "formaction", "xlink:href"})
# Identifiers under their own names in FHIR (not in an `identifier` element).
_FHIR_ID_OBJECTS = frozenset({"accessionIdentifier", "groupIdentifier", "requisition", "masterIdentifier",
                              "identifier", "valueIdentifier"})
_FHIR_ID_STRINGS = frozenset({"serialNumber", "lotNumber", "distinctIdentifier", "subscriberId", "deviceIdentifier",
                              "carrierHRF", "carrierAIDC", "issuer", "jurisdiction", "udi", "modelNumber"})
# Free-text names of other people.
_FHIR_NAME_STRINGS = frozenset({"authorString", "performerString", "sourceString", "requesterString"})
_FHIR_PEOPLE_DISPLAY = frozenset({"subscriber", "policyHolder", "payor", "beneficiary"})
# Canonical URLs of code systems and profiles name no one; any other URL may (a portal,
# a query with a name and a birth date).
_CANONICAL_PATH = re.compile(r"^https?://[^?#\s]+/(?:StructureDefinition|CodeSystem|ValueSet|NamingSystem|sid)/"
                             r"[^?#\s]*$", re.IGNORECASE)
_CANONICAL_HOSTS = re.compile(r"^(?:https?://)?(?:[\w-]+\.)*(?:hl7\.org|fhir\.org|loinc\.org|snomed\.info|"
                              r"unitsofmeasure\.org|nlm\.nih\.gov|cdc\.gov|who\.int|ama-assn\.org|"
                              r"apple\.com|fhir\.apple\.com|nucc\.org|ietf\.org|w3\.org)(?:/[^?#]*)?$",
                              re.IGNORECASE)


def _over_89(value: Any) -> bool:
    """Safe Harbor: ages over 89 are aggregated into one category."""
    try:
        return float(value) > 89
    except (TypeError, ValueError):
        return False


class FhirRewriter(_FileRewriter):
    def file(self, src: Path, dst: Path) -> None:
        import orjson

        try:
            if src.stat().st_size > MAX_FHIR_BYTES:
                raise InputError("a clinical record file is too large to de-identify")
            data = src.read_bytes()
        except OSError as exc:
            raise InputError("a clinical record file cannot be read") from exc
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise InputError("a clinical record file is not valid JSON") from None
        out = self.document(doc)
        dst.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")

    def document(self, doc: Any) -> Any:
        if isinstance(doc, list):
            return [self.document(d) for d in doc]
        if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
            out = {k: self.walk(v, k, self.ctx.shift_for(None)) for k, v in doc.items() if k != "entry"}
            if isinstance(doc.get("id"), str):
                out["id"] = pseudonym(self.ctx.secret, "fhir-id", doc["id"])
            entries = []
            for entry in doc.get("entry") or []:
                if not isinstance(entry, dict):
                    continue
                new = {}
                for k, v in entry.items():
                    if k == "resource":
                        new[k] = self.document(v)
                    elif k == "fullUrl" and isinstance(v, str):
                        new[k] = self.reference(v)
                    else:
                        new[k] = self.walk(v, k, self.ctx.shift_for(None))
                entries.append(new)
            out["entry"] = entries
            return out
        if isinstance(doc, dict):
            return self.resource(doc)
        return doc

    def subject_of(self, res: dict[str, Any]) -> str | None:
        if res.get("resourceType") == "Patient" and isinstance(res.get("id"), str):
            return self.ctx.fhir_subjects.get(f"Patient/{res['id']}")
        for key in ("subject", "patient", "beneficiary"):
            ref = res.get(key)
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                m = _REF.search(ref["reference"])
                if m and m.group("type") == "Patient":
                    return self.ctx.fhir_subjects.get(f"Patient/{m.group('id')}")
        return None

    def resource(self, res: dict[str, Any]) -> dict[str, Any]:
        kind = res.get("resourceType")
        person = self.subject_of(res)
        shift = self.ctx.shift_for(person)
        self.ctx.counts["fhir_resources"] += 1
        binary_data = None
        if kind == "Binary":  # base64 content: text is decoded and scrubbed, anything else dropped
            raw = next((res[k] for k in ("data", "content") if isinstance(res.get(k), str)), None)
            res = {k: v for k, v in res.items() if k not in ("data", "content")}
            if raw is not None:
                binary_data = self.attachment({"contentType": res.get("contentType"), "data": raw}, shift).get("data")
        if kind == "FamilyMemberHistory":
            self.ctx.counts["fhir_relatives"] += 1
            res = {k: v for k, v in res.items() if k not in ("name", "bornString", "bornPeriod")}
        if kind in _PERSON_TYPES:
            self.ctx.counts["fhir_person_resources"] += 1
            res = {k: v for k, v in res.items() if k in _PERSON_KEEP}
            if "birthDate" in res:
                res["birthDate"] = birth_year(str(res["birthDate"]), self.ctx.reference_year)
                if res["birthDate"] is None:
                    del res["birthDate"]
            if "deceasedDateTime" in res:
                res["deceasedDateTime"] = birth_year(str(res["deceasedDateTime"]))
            label = self.ctx.labels.get(person or "", "[NAME]") if kind == "Patient" else "[NAME]"
            res["name"] = [{"text": label}]
        out = {}
        for k, v in res.items():
            if k == "id" and isinstance(v, str):
                out[k] = pseudonym(self.ctx.secret, "fhir-id", v)
            elif k == "name" and kind in _PERSON_TYPES:
                out[k] = v
            elif k in ("birthDate", "bornDate") and isinstance(v, str):
                year = birth_year(v, self.ctx.reference_year)
                if year:
                    out[k] = year
                else:
                    self.ctx.counts["fhir_ages_over_89"] += 1
            else:
                out[k] = self.walk(v, k, shift)
        if binary_data is not None:
            out["data"] = binary_data
        return out

    def reference(self, value: str) -> str:
        if value.startswith("#"):
            return value
        m = _REF.search(value)
        if m:
            return f"{m.group('type')}/{pseudonym(self.ctx.secret, 'fhir-id', m.group('id'))}"
        return "urn:healthdelta:" + pseudonym(self.ctx.secret, "fhir-ref", value)

    def walk(self, value: Any, key: str, shift: DateShift) -> Any:
        if isinstance(value, str) and key in _FHIR_ID_STRINGS:
            self.ctx.counts["fhir_identifiers"] += 1
            return "[REDACTED]"
        if isinstance(value, str) and key in _FHIR_NAME_STRINGS:
            self.ctx.counts["fhir_names"] += 1
            return "[NAME]"
        if isinstance(value, dict):
            return self.object(value, key, shift)
        if isinstance(value, list):
            return [self.walk(v, key, shift) for v in value]
        if isinstance(value, str):
            return self.string(value, key, shift)
        return value

    def object(self, obj: dict[str, Any], key: str, shift: DateShift) -> Any:
        if "resourceType" in obj:  # contained resources
            return self.resource(obj)
        if key in ("telecom", "valueContactPoint", "photo", "contact"):
            self.ctx.counts["fhir_telecom"] += 1
            return {"use": obj["use"]} if isinstance(obj.get("use"), str) else {}
        if key in ("address", "valueAddress"):
            self.ctx.counts["fhir_addresses"] += 1
            return {k: v for k, v in obj.items() if k in ("use", "type", "state", "country")}
        if key in _FHIR_ID_OBJECTS:
            self.ctx.counts["fhir_identifiers"] += 1
            out = {k: self.walk(v, k, shift) for k, v in obj.items() if k in ("use", "type", "system")}
            if "value" in obj:
                out["value"] = "[REDACTED]"
            return out
        if key in ("valueHumanName",):
            return {"text": "[NAME]"}
        if key in ("valueAge", "ageAge", "onsetAge", "abatementAge", "deceasedAge") and _over_89(obj.get("value")):
            self.ctx.counts["fhir_ages_over_89"] += 1
            return {**{k: v for k, v in obj.items() if k in ("unit", "system", "code")}, "value": 90,
                    "comparator": ">="}
        if "div" in obj and isinstance(obj.get("div"), str):  # Narrative
            out = dict(obj)
            out["div"] = self.xhtml(obj["div"], shift)
            return out
        if "contentType" in obj or "data" in obj and key in ("attachment", "content", "valueAttachment", "presentedForm",
                                                             "photo"):
            return self.attachment(obj, shift)
        is_ref = "reference" in obj or (set(obj) <= {"display", "type", "identifier", "extension", "id"}
                                        and "display" in obj and key in _PEOPLE_REF_KEYS | _FHIR_PEOPLE_DISPLAY)
        out = {}
        for k, v in obj.items():
            if k == "reference" and isinstance(v, str):
                out[k] = self.reference(v)
            elif k == "display" and is_ref and isinstance(v, str):
                out[k] = self.ref_display(obj, key, v)
            else:
                out[k] = self.walk(v, k, shift)
        return out

    def ref_display(self, obj: dict[str, Any], key: str, display: str) -> str:
        ref = obj.get("reference")
        m = _REF.search(ref) if isinstance(ref, str) else None
        target = m.group("type") if m else None
        if target == "Patient":
            person = self.ctx.fhir_subjects.get(f"Patient/{m.group('id')}")
            self.ctx.counts["fhir_displays"] += 1
            if person and person in self.ctx.labels:
                return self.ctx.labels[person]
            return self.sc.value(display) if self.sc.value(display) in self.sc.labels else "[NAME]"
        if target in _PEOPLE_REF_TYPES or (target is None and key in _PEOPLE_REF_KEYS | _FHIR_PEOPLE_DISPLAY):
            self.ctx.counts["fhir_displays"] += 1
            return "[NAME]"
        return self.sc.text(display)

    def string(self, value: str, key: str, shift: DateShift) -> str:
        if _FHIR_DATE.match(value):
            if value[:10] in self.sc.birth_dates:  # a birth date under another name keeps its year only
                self.ctx.counts["fhir_birth_date_values"] += 1
                return value[:4]
            return shift.fhir(value)
        if key in ("url", "fullUrl", "source") and ("/" in value or "?" in value) and not (
                _CANONICAL_HOSTS.match(value) or _CANONICAL_PATH.match(value)):
            self.ctx.counts["fhir_urls"] += 1
            return self.reference(value) if key == "fullUrl" else "[URL]"
        if key in _CODE_KEYS:
            return self.sc.value(value)
        return shift.text(self.sc.text(value))

    def xhtml(self, div: str, shift: DateShift) -> str:
        """Narrative XHTML: text read as a browser shows it (entities resolved) and scrubbed;
        in tags, links dropped and every other attribute (title, alt, ...) scrubbed."""
        parts = _XHTML_TAG.split(div)
        out = []
        for i, part in enumerate(parts):
            if i % 2:
                out.append(_XHTML_ATTR.sub(lambda m: self._xhtml_attr(m, shift), part))
            else:
                out.append(html.escape(shift.text(self.sc.text(html.unescape(part))), quote=False))
        return "".join(out)

    def _xhtml_attr(self, m: re.Match[str], shift: DateShift) -> str:
        name, eq, raw = m.groups()
        if name.lower() in _XHTML_LINK_ATTRS:
            self.ctx.counts["fhir_narrative_links"] += 1
            return ""
        if name.lower().startswith("xmlns") or name.lower() in ("class", "style", "id", "lang", "xml:lang"):
            return m.group(0)
        quoted = raw[:1] in ("'", '"')
        value = html.unescape(raw[1:-1] if quoted else raw)
        return f'{name}{eq}"{html.escape(shift.text(self.sc.text(value)), quote=True)}"'

    def attachment(self, obj: dict[str, Any], shift: DateShift) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if k in ("url", "hash", "size"):
                continue
            if k == "data":
                mime = obj.get("contentType") if isinstance(obj.get("contentType"), str) else ""
                decoded = None
                if _TEXT_MIME.match(mime or ""):
                    try:
                        decoded = base64.b64decode(v, validate=False).decode("utf-8")
                    except (binascii.Error, ValueError, UnicodeDecodeError, TypeError):
                        decoded = None
                if decoded is None:
                    self.ctx.counts["fhir_binary_attachments_dropped"] += 1
                    continue
                text = shift.text(self.sc.text(decoded)) if "<" not in decoded else self.xhtml(decoded, shift)
                data = text.encode("utf-8")
                out["data"] = base64.b64encode(data).decode("ascii")
                out["size"] = len(data)
                self.ctx.counts["fhir_text_attachments"] += 1
            else:
                out[k] = self.walk(v, k, shift)
        return out


# --------------------------------------------------------------------------- ECG CSV

_ECG_NAME_LABELS = frozenset({"name", "nom", "nombre", "nome", "naam"})
_ECG_BIRTH_LABELS = frozenset({"date of birth", "dob", "d.o.b.", "d.o.b", "birth date", "birthdate", "born",
                               "geburtsdatum", "date de naissance", "fecha de nacimiento", "data di nascita",
                               "geboortedatum"})
_ECG_RECORDED_LABELS = frozenset({"recorded date", "aufzeichnungsdatum", "aufnahmedatum", "date d'enregistrement",
                                  "date de l'enregistrement", "fecha de registro", "fecha de grabacion",
                                  "data di registrazione", "opnamedatum", "registratiedatum"})
_ECG_SAMPLE = re.compile(r'^\s*"?[+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][+-]?\d+)?"?\s*(?:,\s*\d*\s*)?$')


def _fold_label(text: str) -> str:
    return " ".join(fold_accents(text.replace("\u2019", "'")).casefold().split())


class EcgRewriter(_FileRewriter):
    """Header lines: name -> the owner's label, birth date emptied, recorded date shifted,
    anything else scrubbed; sample lines copied unchanged."""

    def file(self, src: Path, dst: Path) -> None:
        with open(src, "rb") as fh:
            head = fh.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            encoding = "utf-16"
        else:
            encoding = "utf-8-sig"
        try:
            with open(src, encoding=encoding, newline="") as fin, open(dst, "w", encoding="utf-8", newline="") as fout:
                self._copy(fin, fout)
        except UnicodeDecodeError:
            raise InputError("an ECG file is not a readable CSV") from None

    def _copy(self, fin: Any, fout: Any) -> None:
        position = 0
        in_header = True
        writer = csv.writer(fout, lineterminator="\n")
        for raw in fin:
            line = raw.rstrip("\r\n")
            if not in_header:
                fout.write(raw if _ECG_SAMPLE.match(line) or not line.strip() else self._other(line) + "\n")
                continue
            if not line.strip():
                fout.write("\n")
                continue
            if _ECG_SAMPLE.match(line) and position > 0:
                in_header = False
                fout.write(raw)
                continue
            row = next(csv.reader([line]))
            label = row[0].strip() if row else ""
            value = ",".join(row[1:]).strip()
            folded = _fold_label(label)
            if folded in _ECG_NAME_LABELS or (position == 0 and folded not in _ECG_RECORDED_LABELS):
                writer.writerow([label, self.ctx.owner_label if value else ""])
                self.ctx.counts["ecg_names"] += 1
            elif folded in _ECG_BIRTH_LABELS or position == 1 and folded not in _ECG_RECORDED_LABELS:
                writer.writerow([label, ""])
                self.ctx.counts["ecg_birth_dates"] += 1
            elif folded in _ECG_RECORDED_LABELS:
                writer.writerow([label, self.shift.text(value)])
            else:
                writer.writerow([self.sc.text(label), self.shift.text(self.sc.text(value))] if len(row) > 1
                                else [self.sc.text(label)])
            position += 1

    def _other(self, line: str) -> str:
        return self.shift.text(self.sc.text(line))


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class DeidResult:
    """What the de-identification stage did: counts and flags only (no values, no offsets)."""

    run_id: str
    files_written: int
    files_dropped: int
    bytes_in: int
    bytes_out: int
    date_shift: bool
    keep_routes: str
    owner_label: str
    share_person_id: str
    replacements: dict[str, int]

    def as_report(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "date_shift": self.date_shift,
            "keep_routes": self.keep_routes,
            "files_written": self.files_written,
            "files_dropped": self.files_dropped,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "owner_label": self.owner_label,
            "replacements": self.replacements,
        }


def share_person_id(label: str) -> str:
    """The person id share-mode rows carry: `Patient 3` -> `patient-3` (assigned, not derived)."""
    return label.lower().replace(" ", "-")


def build_context(identity_dir: Path, run_dir: Path, run_id: str, *, date_shift: bool) -> Context:
    """Scrubber and people of the store for one run (resolving the run first if needed)."""
    from healthdelta import identity
    from healthdelta.parse.healthkit import read_me

    owner = identity.run_owner(identity_dir, run_id)
    if owner is None:
        identity.resolve_run(identity_dir, run_dir, run_id)
        owner = identity.run_owner(identity_dir, run_id)
        assert owner is not None
    people = identity.load_people_pii(identity_dir)
    labels = identity.share_labels(identity_dir)
    owner_label = labels.get(owner.owner_person_id, "[NAME]")
    export_date = read_me(run_dir / _read_json(run_dir / "layout.json", "layout.json")["export_xml"]).get("ExportDate")
    return Context(
        reference_year=int(export_date[:4]) if export_date and export_date[:4].isdigit() else date.today().year,
        scrubber=Scrubber(people, owner_label, owner.owner_person_id),
        secret=identity.read_secret(identity_dir),
        owner_person_id=owner.owner_person_id,
        owner_label=owner_label,
        labels=labels,
        fhir_subjects=owner.fhir_subjects,
        date_shift=date_shift,
    )


def deidentify_run(
    run_dir: Path,
    dest: Path,
    identity_dir: Path,
    *,
    date_shift: bool = False,
    keep_routes: str = "drop",
    progress: ProgressFn = no_progress,
) -> DeidResult:
    """Write a de-identified copy of the staged run `run_dir` into the empty directory `dest`.

    `dest` gets `layout.json`, `manifest.json`, `deid_report.json` and `source/...` in the
    staged run's shape. The caller owns atomicity (a `WorkDir` renamed into place) and the
    state lock (the run is resolved against the identity store first when it was not yet).
    A past run whose staged files are in the store is read from a temporary plain copy.
    """
    with stagestore.plain_run(run_dir) as plain:
        return _deidentify_plain(plain, dest, identity_dir, date_shift=date_shift, keep_routes=keep_routes,
                                 progress=progress)


def _deidentify_plain(run_dir: Path, dest: Path, identity_dir: Path, *, date_shift: bool, keep_routes: str,
                      progress: ProgressFn) -> DeidResult:
    if keep_routes not in KEEP_ROUTES:
        raise UsageError("--keep-routes must be drop or coarse")
    manifest = _read_json(run_dir / "manifest.json", "manifest.json")
    layout = _read_json(run_dir / "layout.json", "layout.json")
    run_id = manifest.get("run_id")
    if not isinstance(run_id, str) or not isinstance(layout.get("export_xml"), str):
        raise InputError("the run directory is not a staged run")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise UsageError("the de-identification output directory must be empty")
    ctx = build_context(identity_dir, run_dir, run_id, date_shift=date_shift)
    check_share_settings(identity_dir, date_shift=date_shift)

    total = sum(_size(run_dir / p) for p in _layout_paths(layout))
    new_layout: dict[str, Any] = {k: ([] if isinstance(v, list) else v) for k, v in layout.items()}
    new_layout["other"] = []
    files: list[dict[str, Any]] = []
    dropped = bytes_in = 0

    def target(rel: str) -> tuple[Path, str]:
        new_rel = ctx.member_path(rel)
        path = dest / new_rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, new_rel

    def done(rel_in: str, rel_out: str, kind: str) -> None:
        nonlocal bytes_in
        size_in = _size(run_dir / rel_in)
        bytes_in += size_in
        files.append({"path": rel_out, "kind": kind})
        if kind != "export_xml":
            progress("deid", size_in, total)

    xml_rel = layout["export_xml"]
    out_path, out_rel = target(xml_rel)
    with open(run_dir / xml_rel, "rb") as src, open(out_path, "wb") as dst:
        ExportXmlRewriter(ctx, keep_routes).rewrite(src, dst, progress, total)
    new_layout["export_xml"] = out_rel
    done(xml_rel, out_rel, "export_xml")

    if layout.get("export_cda_xml"):
        rel = layout["export_cda_xml"]
        out_path, out_rel = target(rel)
        cda = CdaRewriter(ctx)
        with open(out_path, "wb") as dst:
            stream_xml(run_dir / rel, dst, containers=cda.containers, unit=cda.unit, root_attrs=cda.root_attrs)
        new_layout["export_cda_xml"] = out_rel
        done(rel, out_rel, "export_cda_xml")

    fhir = FhirRewriter(ctx)
    for rel in layout.get("clinical_json", []):
        out_path, out_rel = target(rel)
        fhir.file(run_dir / rel, out_path)
        new_layout["clinical_json"].append(out_rel)
        done(rel, out_rel, "clinical_json")

    ecg = EcgRewriter(ctx)
    for rel in layout.get("ecg_csv", []):
        out_path, out_rel = target(rel)
        ecg.file(run_dir / rel, out_path)
        new_layout["ecg_csv"].append(out_rel)
        done(rel, out_rel, "ecg_csv")

    for rel in layout.get("workout_route_gpx", []):
        if keep_routes == "drop":
            dropped += 1
            ctx.counts["gpx_dropped"] += 1
            bytes_in += _size(run_dir / rel)
            progress("deid", _size(run_dir / rel), total)
            continue
        out_path, out_rel = target(rel)
        gpx = GpxRewriter(ctx)
        with open(out_path, "wb") as dst:
            stream_xml(run_dir / rel, dst, containers=gpx.containers, unit=gpx.unit, root_attrs=gpx.root_attrs)
        new_layout["workout_route_gpx"].append(out_rel)
        done(rel, out_rel, "workout_route_gpx")

    for rel in layout.get("other", []):
        dropped += 1  # unknown content cannot be de-identified: never copied
        ctx.counts["other_dropped"] += 1
        bytes_in += _size(run_dir / rel)

    for key in ("clinical_json", "ecg_csv", "workout_route_gpx"):
        new_layout[key].sort()
    from healthdelta.fsutil import atomic_write_json, hash_stream

    entries = []
    bytes_out = 0
    for f in sorted(files, key=lambda f: f["path"]):
        with open(dest / f["path"], "rb") as fh:
            sha, size = hash_stream(fh)
        bytes_out += size
        entries.append({"path": f["path"], "size": size, "sha256": sha})
    replacements = dict(sorted((ctx.counts + ctx.scrubber.counts).items()))
    result = DeidResult(
        run_id=run_id,
        files_written=len(entries),
        files_dropped=dropped,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        date_shift=date_shift,
        keep_routes=keep_routes,
        owner_label=ctx.owner_label,
        share_person_id=share_person_id(ctx.owner_label),
        replacements=replacements,
    )
    atomic_write_json(dest / "layout.json", new_layout)
    atomic_write_json(dest / "manifest.json", {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "parent_run_id": manifest.get("parent_run_id"),
        "deidentified": True,
        "input": {"form": "deid", "path_redacted": True},
        "input_fingerprint": manifest.get("input_fingerprint", {}),
        "files": entries,
        "counts": {"files": len(entries), "bytes": bytes_out, "dropped_files": dropped},
    })
    atomic_write_json(dest / "deid_report.json", {"schema_version": SCHEMA_VERSION, "run_id": run_id,
                                                  "mode": "share", **result.as_report()})
    return result


SETTINGS_FILE = "share_settings.json"


def check_share_settings(identity_dir: Path, *, date_shift: bool) -> None:
    """One output directory holds shifted or unshifted share runs, never both: the
    `removed/` rows of one run (real dates) next to the `added/` rows of the other
    (shifted dates) would give the shift away. The first share run decides."""
    from healthdelta.fsutil import atomic_write_json

    path = identity_dir / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        atomic_write_json(path, {"date_shift": date_shift, "schema_version": SCHEMA_VERSION})
        return
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("the identity store's share settings are damaged") from None
    if settings.get("date_shift") != date_shift:
        made = "with" if settings.get("date_shift") else "without"
        raise UsageError(f"the share runs of this output directory were made {made} --date-shift; "
                         "mixing shifted and unshifted runs would reveal the shift (use a new --out)")


def _layout_paths(layout: dict[str, Any]) -> list[str]:
    paths = [layout["export_xml"]]
    if layout.get("export_cda_xml"):
        paths.append(layout["export_cda_xml"])
    for key in ("clinical_json", "ecg_csv", "workout_route_gpx", "other"):
        paths += layout.get(key, [])
    return paths


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise InputError("a file of the staged run is missing") from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"the run directory has no {what} (not a staged run)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"the run directory's {what} is damaged") from None
    if not isinstance(doc, dict):
        raise InputError(f"the run directory's {what} is damaged")
    return doc

