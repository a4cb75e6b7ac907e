"""Apple Watch ECG recordings (`electrocardiograms/*.csv`) → one `ecg` row per file.

Apple's layout (labels are localised, values too; German shown on the right):

    Name,Jane Doe                             Name,Jane Doe
    Date of Birth,"April 7, 1961"             Geburtsdatum,07.04.1961
    Recorded Date,2024-02-03 08:14:22 -0800   Aufzeichnungsdatum,2024-02-03 08:14:22 +0100
    Classification,Sinus Rhythm               Klassifizierung,Sinusrhythmus
    Symptoms,                                 Symptome,
    Software Version,1.70                     Softwareversion,1.70
    Device,"Watch6,2"                         Gerät,"Watch6,2"
    Sample Rate,512 hertz                     Abtastrate,512 Hertz
    (blank)
    Lead,Lead I                               Ableitung,Ableitung I
    Unit,µV                                   Einheit,µV
    (blank)
    -145.631                                  "-145,631"
    ...                                       ...

The samples (~15k) are streamed, summarised (count, min, max, mean, sha256 of the
normalised sequence) and referenced by `samples_file`, never inlined. Name and date of
birth never enter the row: `read_ecg_person` hands them to the identity stage.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any

from healthdelta.errors import InputError
from healthdelta.keys import record_key
from healthdelta.parse.report import ParseReport
from healthdelta.parse.timefmt import from_iso

# One recording is ~200 KB (30 s at 512 Hz); anything far bigger is not an Apple ECG.
MAX_ECG_BYTES = 64 * 1024 * 1024

# Header labels by language. English and German are Apple's own; the others are
# Apple's wording as far as known, matched case- and accent-insensitively.
_LABELS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "name": ("name",),
        "birth_date": ("date of birth",),
        "recorded": ("recorded date",),
        "classification": ("classification",),
        "symptoms": ("symptoms",),
        "software_version": ("software version",),
        "device": ("device",),
        "sample_rate": ("sample rate",),
        "lead": ("lead",),
        "unit": ("unit",),
    },
    "de": {
        "name": ("name",),
        "birth_date": ("geburtsdatum",),
        "recorded": ("aufzeichnungsdatum", "aufnahmedatum"),
        "classification": ("klassifizierung", "klassifikation"),
        "symptoms": ("symptome",),
        "software_version": ("softwareversion", "software-version"),
        "device": ("gerat",),
        "sample_rate": ("abtastrate",),
        "lead": ("ableitung",),
        "unit": ("einheit",),
    },
    "fr": {
        "name": ("nom",),
        "birth_date": ("date de naissance",),
        "recorded": ("date d'enregistrement", "date de l'enregistrement"),
        "classification": ("classification",),
        "symptoms": ("symptomes",),
        "software_version": ("version du logiciel", "version logicielle"),
        "device": ("appareil",),
        "sample_rate": ("frequence d'echantillonnage", "taux d'echantillonnage"),
        "lead": ("derivation",),
        "unit": ("unite",),
    },
    "es": {
        "name": ("nombre",),
        "birth_date": ("fecha de nacimiento",),
        "recorded": ("fecha de registro", "fecha de grabacion"),
        "classification": ("clasificacion",),
        "symptoms": ("sintomas",),
        "software_version": ("version de software", "version del software"),
        "device": ("dispositivo",),
        "sample_rate": ("frecuencia de muestreo",),
        "lead": ("derivacion",),
        "unit": ("unidad",),
    },
    "it": {
        "name": ("nome",),
        "birth_date": ("data di nascita",),
        "recorded": ("data di registrazione",),
        "classification": ("classificazione",),
        "symptoms": ("sintomi",),
        "software_version": ("versione software", "versione del software"),
        "device": ("dispositivo",),
        "sample_rate": ("frequenza di campionamento",),
        "lead": ("derivazione",),
        "unit": ("unita",),
    },
    "nl": {
        "name": ("naam",),
        "birth_date": ("geboortedatum",),
        "recorded": ("opnamedatum", "registratiedatum"),
        "classification": ("classificatie",),
        "symptoms": ("symptomen",),
        "software_version": ("softwareversie",),
        "device": ("apparaat",),
        "sample_rate": ("samplefrequentie", "bemonsteringsfrequentie"),
        "lead": ("afleiding",),
        "unit": ("eenheid",),
    },
}


def _fold(text: str) -> str:
    """Lower-case, accents and typographic apostrophes removed, spaces collapsed."""
    text = unicodedata.normalize("NFKD", text.replace("\u2019", "'").replace("\u00b4", "'"))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return " ".join(text.casefold().split())


# folded label → (canonical field, languages using that label)
_LABEL_INDEX: dict[str, tuple[str, frozenset[str]]] = {}
for _language, _fields in _LABELS.items():
    for _field, _names in _fields.items():
        for _label in _names:
            _known_field, _languages = _LABEL_INDEX.get(_fold(_label), (_field, frozenset()))
            assert _known_field == _field, "one label, two meanings"
            _LABEL_INDEX[_fold(_label)] = (_field, _languages | {_language})
_LANGUAGE_ORDER = list(_LABELS)

_PERSON_FIELDS = ("name", "birth_date")
_RECORDED_VALUE = re.compile(
    r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}([.,]\d+)?)? ?([+-]\d{2}:?\d{2}|Z|UTC|GMT)?"
)
_RATE = re.compile(r"\s*(\d+(?:[.,]\d+)?)")
_SAMPLE = re.compile(r"[+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][+-]?\d+)?")
_DIGITS = re.compile(r"[+-]?\d+")
_DECIMAL_TAIL = re.compile(r"\d+")


@dataclass
class _Header:
    """What the header block held; `fields` by canonical name, `lines` verbatim."""

    fields: dict[str, str] = field(default_factory=dict)
    lines: dict[str, str] = field(default_factory=dict)
    languages: Counter[str] = field(default_factory=Counter)
    recognised: int = 0

    @property
    def language(self) -> str | None:
        """The language most labels belong to (`Name` is English and German alike)."""
        if not self.languages:
            return None
        return max(
            self.languages, key=lambda lang: (self.languages[lang], -_LANGUAGE_ORDER.index(lang))
        )


def _open_text(path: Path) -> IO[str]:
    try:
        size = path.stat().st_size
        if size > MAX_ECG_BYTES:
            raise InputError(f"an ECG file is larger than {MAX_ECG_BYTES // (1024 * 1024)} MiB")
        raw = path.open("rb")
        head = raw.read(4)
        raw.seek(0)
    except OSError as exc:
        raise InputError("an ECG file cannot be read") from exc
    # Re-saved by a spreadsheet: UTF-16 with a BOM; Apple writes UTF-8.
    encoding = "utf-16" if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    return io.TextIOWrapper(raw, encoding=encoding, errors="strict", newline="")


def _sample(row: list[str], report: ParseReport | None) -> float | None:
    """One sample line → float; `"-12,345"` (decimal comma) and unquoted `-12,345` too."""
    cells = [cell.strip() for cell in row]
    while cells and cells[-1] == "":
        cells.pop()
    if len(cells) == 1:
        text = cells[0]
    elif len(cells) == 2 and _DIGITS.fullmatch(cells[0]) and _DECIMAL_TAIL.fullmatch(cells[1]):
        # A decimal-comma sample the writer forgot to quote: the CSV split it in two.
        if report is not None:
            report.repairs["ecg_unquoted_decimal_comma"] += 1
        text = f"{cells[0]}.{cells[1]}"
    else:
        return None
    if not _SAMPLE.fullmatch(text):
        return None
    value = float(text.replace(",", "."))
    return value if value == value and abs(value) != float("inf") else None


class _EcgFile:
    """Reads the header block, then hands out the sample rows one by one."""

    def __init__(self, path: Path, report: ParseReport | None) -> None:
        self._text = _open_text(path)
        self._rows = csv.reader(self._text)
        self._report = report
        self.header = _Header()
        self.first_sample: float | None = None
        self.bad_lines = 0

    def close(self) -> None:
        self._text.close()

    def _unknown(self, what: str) -> None:
        if self._report is not None:
            self._report.unknown[what] += 1

    def read_header(self) -> None:
        position = 0
        try:
            for row in self._rows:
                if not row or all(not cell.strip() for cell in row):
                    continue
                if self.header.lines or self.header.fields:
                    sample = _sample(row, self._report)
                    if sample is not None:
                        self.first_sample = sample
                        return
                label, value = row[0].strip(), ",".join(row[1:]).strip()
                if not self.header.lines and not self.header.fields:
                    sample = _sample(row, None)
                    if sample is not None:  # samples without any header
                        self.first_sample = sample
                        return
                self._header_line(position, label, value)
                position += 1
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError("an ECG file is not a readable CSV") from exc

    def _header_line(self, position: int, label: str, value: str) -> None:
        header = self.header
        known = _LABEL_INDEX.get(_fold(label))
        if known is not None and known[0] not in header.fields:
            name, languages = known
            header.recognised += 1
            header.languages.update(languages)
        elif "recorded" not in header.fields and _RECORDED_VALUE.fullmatch(value):
            name = "recorded"
            self._unknown("ecg:header_label")
        elif position < len(_PERSON_FIELDS) and _PERSON_FIELDS[position] not in header.fields:
            # Apple always opens with name and date of birth. An unknown label there is
            # most likely one of them in a language we do not know: treat it as such so
            # the person's name never lands in the row's `header`.
            name = _PERSON_FIELDS[position]
            self._unknown("ecg:header_label")
        else:
            self._unknown("ecg:header_label")
            header.lines[label] = value
            return
        header.fields[name] = value
        if name not in _PERSON_FIELDS:
            header.lines[label] = value

    def samples(self) -> Iterator[float]:
        if self.first_sample is not None:
            yield self.first_sample
        try:
            for row in self._rows:
                if not row or all(not cell.strip() for cell in row):
                    continue
                sample = _sample(row, self._report)
                if sample is None:
                    self.bad_lines += 1
                    self._unknown("ecg:non_sample_line")
                    continue
                yield sample
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError("an ECG file is not a readable CSV") from exc


def _sample_rate_hz(text: str | None) -> int | float | None:
    match = _RATE.match(text or "")
    if match is None:
        return None
    number = match.group(1).replace(",", ".")
    value = float(number)
    return int(value) if value.is_integer() else value


def iter_ecg(
    path: Path, report: ParseReport, *, source_file: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield the one `("ecg", row)` of an Apple ECG CSV."""
    ecg = _EcgFile(path, report)
    try:
        ecg.read_header()
        header = ecg.header
        if header.recognised == 0 and "recorded" not in header.fields:
            raise InputError("an ECG file has no recognised header")
        digest = hashlib.sha256()
        count, total = 0, 0.0
        low = high = None
        for value in ecg.samples():
            # Normalised sequence: Python's shortest round-trip float text, one per line,
            # so "-12,345" (German) and "-12.345" hash the same.
            digest.update(repr(value).encode("ascii") + b"\n")
            count += 1
            total += value
            low = value if low is None or value < low else low
            high = value if high is None or value > high else high
    finally:
        ecg.close()
    report.elements["ecg:recording"] += 1
    report.elements["ecg:sample"] += count
    fields = header.fields
    recorded = recorded_local = None
    if fields.get("recorded"):
        try:
            recorded, recorded_local = from_iso(fields["recorded"])
        except ValueError:
            report.unknown["ecg:unparsed_time"] += 1
            recorded_local = fields["recorded"]
    sample_rate_hz = _sample_rate_hz(fields.get("sample_rate"))
    samples_sha256 = digest.hexdigest()
    row: dict[str, Any] = {
        "source": "ecg",
        "source_file": source_file,
        "kind": "ECG",
        "event_time": recorded,
        "recorded": recorded,
        "recorded_local": recorded_local,
        "classification": fields.get("classification") or None,
        "symptoms": fields.get("symptoms") or None,
        "software_version": fields.get("software_version") or None,
        "device": fields.get("device") or None,
        "sample_rate_hz": sample_rate_hz,
        "lead": fields.get("lead") or None,
        "unit": fields.get("unit") or None,
        "sample_count": count,
        "samples": {
            "min": low,
            "max": high,
            "mean": round(total / count, 6) if count else None,
            "sha256": samples_sha256,
        },
        "bad_sample_lines": ecg.bad_lines,
        "samples_file": source_file,
        "header_language": header.language,
        # Every header line but name and date of birth, under its original label.
        "header": header.lines,
    }
    row["record_key"] = record_key(
        "ecg",
        "ECG",
        {
            "recorded": recorded or recorded_local,
            "device": row["device"],
            "classification": row["classification"],
            "sample_rate_hz": sample_rate_hz,
            "lead": row["lead"],
            "unit": row["unit"],
            "samples_sha256": samples_sha256,
        },
    )
    yield "ecg", row


# ------------------------------------------------------------------ person facts

_MONTHS: dict[str, int] = {}
for _number_, _names_ in enumerate(
    (
        "january jan januar janvier enero gennaio januari jänner janner",
        "february feb februar fevrier febrero febbraio februari",
        "march mar marz maerz mars marzo maart",
        "april apr avril abril aprile",
        "may mai mayo maggio mei",
        "june jun juni juin junio giugno",
        "july jul juli juillet julio luglio",
        "august aug aout agosto augustus",
        "september sep sept septembre septiembre settembre",
        "october oct oktober octobre octubre ottobre okt",
        "november nov novembre noviembre",
        "december dec dezember decembre diciembre dicembre dez",
    ),
    start=1,
):
    for _month in _names_.split():
        _MONTHS[_fold(_month)] = _number_


def parse_birth_date(text: str | None) -> str | None:
    """`"April 7, 1961"`, `"7. April 1961"`, `"07.04.1961"`, `"1961-04-07"` → `"1961-04-07"`."""
    if not text:
        return None
    folded = _fold(text)
    iso = re.fullmatch(r"(\d{4})-(\d{1,2})-(\d{1,2})", folded)
    runs = re.findall(r"\d+", folded)
    if any(len(n) > 8 for n in runs):  # not a date (and int() refuses > 4300 digits)
        return None
    numbers = [int(n) for n in runs]
    words = [w for w in re.findall(r"[^\W\d_]+", folded) if w in _MONTHS]
    year = month = day = None
    if iso:
        year, month, day = (int(g) for g in iso.groups())
    elif words and len(numbers) == 2:
        month = _MONTHS[words[0]]
        years = [n for n in numbers if n >= 1000]
        days = [n for n in numbers if n < 100]
        if len(years) == 1 and len(days) == 1:
            year, day = years[0], days[0]
    elif len(numbers) == 3 and numbers[2] >= 1000:
        first, second, year = numbers
        if "." in folded or first > 12:
            day, month = first, second  # 07.04.1961 (German), 25/12/1961
        elif second > 12:
            month, day = first, second  # 12/25/1961 (US)
    if year is None or month is None or day is None:
        return None
    try:
        return date(year, month, day).isoformat()
    except ValueError:
        return None


def read_ecg_person(path: Path) -> dict[str, Any]:
    """Name and date of birth from an ECG header (identity stage input; holds PII)."""
    ecg = _EcgFile(path, None)
    try:
        ecg.read_header()
    finally:
        ecg.close()
    if ecg.header.recognised == 0 and "recorded" not in ecg.header.fields:
        raise InputError("an ECG file has no recognised header")
    fields = ecg.header.fields
    name = fields.get("name") or None
    birth_text = fields.get("birth_date") or None
    return {
        "source": "ecg",
        "names": [
            {"text": name, "given": [], "family": None, "prefix": [], "suffix": [], "use": None}
        ]
        if name
        else [],
        "birth_date": parse_birth_date(birth_text),
        "birth_date_text": birth_text,
        "sex": None,
        "identifiers": [],
        "addresses": [],
        "telecom": [],
    }
