"""FHIR clinical records (`clinical-records/*.json`, DSTU2 or R4) → canonical NDJSON rows.

One JSON file holds one resource (Apple's layout) or a Bundle (entries are followed,
nested Bundles too). Every resource becomes one row; which stream depends on its type:

| resourceType | stream |
|---|---|
| Observation | `observations` |
| Condition | `conditions` |
| MedicationRequest, MedicationOrder (DSTU2), MedicationStatement, MedicationAdministration, MedicationDispense, Medication | `medications` |
| DocumentReference, DiagnosticReport | `documents` |
| anything else (Patient, Immunization, AllergyIntolerance, Procedure, unknown types, ...) | `clinical` |

Each row keeps the whole original resource in `resource` (nothing dropped) next to typed
fields. `record_key = keys.record_key("fhir", resourceType, resource)`: the resource alone,
so the same resource gets the same key whatever file, folder, Bundle or zip it came from.

The person facts a Patient carries (names, birth date, identifiers, address, telecom) are
exposed separately by `read_patients_fhir` / `patient_facts` for the identity stage; rows
get no typed copies of them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from healthdelta.errors import InputError
from healthdelta.keys import record_key
from healthdelta.parse.report import ParseReport
from healthdelta.parse.timefmt import from_iso

# A clinical record is a few KiB; a Bundle of a whole chart a few MiB. Parsing is in
# memory (orjson), so refuse anything absurd before reading it.
MAX_JSON_BYTES = 256 * 1024 * 1024

MEDICATION_TYPES = frozenset(
    {
        "MedicationRequest",
        "MedicationOrder",
        "MedicationStatement",
        "MedicationAdministration",
        "MedicationDispense",
        "Medication",
    }
)
DOCUMENT_TYPES = frozenset({"DocumentReference", "DiagnosticReport"})

_UTF8_BOM = b"\xef\xbb\xbf"
# Report counters are share-safe: only schema-shaped names from the data may enter them.
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z0-9]{1,63}")
_VALUE_KEY = re.compile(r"value[A-Z][A-Za-z0-9]{1,40}")
_WHITESPACE = re.compile(rb"\s+")

# ---------------------------------------------------------------------------- reading


def _load_json(path: Path, report: ParseReport) -> Any:
    """Read and decode one JSON file; damage the user must fix raises InputError."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            report.unknown["fhir:file_too_large"] += 1
            raise InputError(
                f"a clinical record file is larger than {MAX_JSON_BYTES // (1024 * 1024)} MiB"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise InputError("a clinical record file cannot be read") from exc
    if data.startswith(_UTF8_BOM):
        # Not allowed by RFC 8259 but written by some tools; orjson rejects it.
        data = data[len(_UTF8_BOM) :]
        report.repairs["fhir_bom_removed"] += 1
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        # orjson reports nesting deeper than 1024 levels as a decode error too.
        if "depth" in str(exc) or "recursion" in str(exc).lower():
            report.unknown["fhir:too_deep"] += 1
            raise InputError("a clinical record file is nested too deeply") from None
        report.unknown["fhir:invalid_json"] += 1
        raise InputError("a clinical record file is not valid JSON") from None


def _iter_resources(document: Any, report: ParseReport) -> Iterator[tuple[Any, str | None]]:
    """Yield (resource, bundle fullUrl) for every resource of a file, Bundles unpacked."""
    stack: list[tuple[Any, str | None]] = [(document, None)]
    # Depth-first, in document order: push in reverse.
    while stack:
        item, full_url = stack.pop()
        if isinstance(item, list):
            # Not FHIR, but a plain JSON array of resources is unambiguous enough.
            report.repairs["fhir_top_level_array"] += 1
            stack.extend((element, None) for element in reversed(item))
            continue
        if isinstance(item, dict) and item.get("resourceType") == "Bundle":
            report.elements["fhir:Bundle"] += 1
            entries = item.get("entry") or []
            children: list[tuple[Any, str | None]] = []
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    url = entry.get("fullUrl")
                    children.append((entry["resource"], url if isinstance(url, str) else None))
                else:
                    report.unknown["fhir:bundle_entry_without_resource"] += 1
            stack.extend(reversed(children))
            continue
        yield item, full_url


def _key(kind: str, resource: Any) -> str:
    try:
        return record_key("fhir", kind, resource)
    except orjson.JSONEncodeError:
        # orjson serialises at most ~255 levels; the NDJSON writer would fail the same way.
        raise InputError("a clinical record is nested too deeply") from None


# ----------------------------------------------------------------- version guessing

_VERSION_ALIASES = {"DSTU2": "DSTU2", "STU3": "STU3", "R4": "R4", "R4B": "R4", "R5": "R5"}
_DSTU2_ONLY_TYPES = frozenset(
    {
        "MedicationOrder",
        "DiagnosticOrder",
        "Order",
        "OrderResponse",
        "DeviceUseRequest",
        "ProcedureRequest",
        "ReferralRequest",
        "Conformance",
        "BodySite",
    }
)
_R4_ONLY_TYPES = frozenset(
    {
        "MedicationRequest",
        "ServiceRequest",
        "DeviceRequest",
        "RequestGroup",
        "MedicationKnowledge",
        "Invoice",
        "ChargeItem",
        "CoverageEligibilityRequest",
    }
)


def normalise_fhir_version(value: str | None) -> str | None:
    """`1.0.2` / `DSTU2` → `DSTU2`, `4.0.1` / `R4` → `R4` (Apple's `fhirVersion` attribute)."""
    if not value:
        return None
    text = value.strip().upper()
    if text in _VERSION_ALIASES:
        return _VERSION_ALIASES[text]
    major = text.split(".", 1)[0]
    if text.startswith("1.0") or text.startswith("0."):
        return "DSTU2"
    return {"3": "STU3", "4": "R4", "5": "R5"}.get(major)


def guess_fhir_version(resource: dict[str, Any]) -> str | None:
    """`"DSTU2"`, `"R4"` or None (no telling field) from the shape of one resource."""
    kind = resource.get("resourceType")
    if not isinstance(kind, str):  # damaged files: a list or object here is unhashable
        kind = None
    dstu2 = r4 = 0
    if kind in _DSTU2_ONLY_TYPES:
        dstu2 += 2
    if kind in _R4_ONLY_TYPES:
        r4 += 2
    meta = resource.get("meta")
    if isinstance(meta, dict) and meta.get("profile"):
        r4 += 1
    if (
        "dateWritten" in resource
        or "effectiveTimeDateTime" in resource
        or "effectiveTimePeriod" in resource
    ):
        dstu2 += 1
    for name in ("clinicalStatus", "verificationStatus"):
        if isinstance(resource.get(name), str):
            dstu2 += 1
        elif isinstance(resource.get(name), dict):
            r4 += 1
    if kind in ("Observation", "Condition") and "category" in resource:
        if isinstance(resource["category"], dict):
            dstu2 += 1
        elif isinstance(resource["category"], list):
            r4 += 1
    if kind == "Condition":
        if "dateRecorded" in resource or "notes" in resource or "patient" in resource:
            dstu2 += 1
        if "recordedDate" in resource or "subject" in resource:
            r4 += 1
    if kind == "AllergyIntolerance":
        if "substance" in resource:
            dstu2 += 1
        if "code" in resource:
            r4 += 1
    if kind == "Immunization":
        if any(k in resource for k in ("date", "wasNotGiven", "reported")):
            dstu2 += 1
        if any(k in resource for k in ("occurrenceDateTime", "occurrenceString", "primarySource")):
            r4 += 1
    if kind == "MedicationStatement" and "wasNotTaken" in resource:
        dstu2 += 1
    if kind == "Procedure" and "notPerformed" in resource:
        dstu2 += 1
    if kind == "Encounter" and "class" in resource:
        if isinstance(resource["class"], str):
            dstu2 += 1
        elif isinstance(resource["class"], dict):
            r4 += 1
    if kind == "DocumentReference" and ("created" in resource or "indexed" in resource):
        dstu2 += 1
    if kind == "Observation":
        if "comments" in resource:
            dstu2 += 1
        if isinstance(resource.get("interpretation"), list) or any(
            k in resource for k in ("valueBoolean", "valueInteger", "effectiveInstant", "note")
        ):
            r4 += 1
    if "authoredOn" in resource:
        r4 += 1
    names = resource.get("name")
    if kind in ("Patient", "Practitioner", "RelatedPerson") and isinstance(names, list):
        for name in names:
            if isinstance(name, dict) and "family" in name:
                if isinstance(name["family"], list):
                    dstu2 += 1
                elif isinstance(name["family"], str):
                    r4 += 1
    if dstu2 > r4:
        return "DSTU2"
    if r4 > dstu2:
        return "R4"
    return None


# -------------------------------------------------------------------- small readers


def _get(obj: Any, path: str) -> Any:
    """`"effectivePeriod.start"` → obj["effectivePeriod"]["start"], None when missing."""
    for part in path.split("."):
        if isinstance(obj, list):
            obj = obj[0] if obj else None
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _number(value: Any) -> int | float | None:
    # bool is an int subclass; a JSON true is not a measurement.
    return value if type(value) in (int, float) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _codings(value: Any) -> list[dict[str, Any]]:
    """Codings of a CodeableConcept, a list of them, or a bare Coding."""
    concepts = value if isinstance(value, list) else [value]
    out: list[dict[str, Any]] = []
    for concept in concepts:
        if not isinstance(concept, dict):
            continue
        codings = concept.get("coding") if "coding" in concept else [concept]
        for coding in codings if isinstance(codings, list) else []:
            if isinstance(coding, dict) and (
                "code" in coding or "system" in coding or "display" in coding
            ):
                out.append(
                    {
                        "system": _str(coding.get("system")),
                        "code": _str(coding.get("code")),
                        "display": _str(coding.get("display")),
                    }
                )
    return out


def _concept_text(value: Any) -> str | None:
    """The human label of a CodeableConcept: its `text`, else the first coding display."""
    concepts = value if isinstance(value, list) else [value]
    for concept in concepts:
        if isinstance(concept, str):
            return concept
        if isinstance(concept, dict) and isinstance(concept.get("text"), str):
            return concept["text"]
    for coding in _codings(value):
        if coding["display"]:
            return coding["display"]
    return None


def _status(value: Any) -> str | None:
    """DSTU2 statuses are codes (`"active"`), R4 clinical statuses CodeableConcepts."""
    if isinstance(value, str):
        return value
    for coding in _codings(value):
        if coding["code"]:
            return coding["code"]
    return _concept_text(value)


def _reference(value: Any) -> str | None:
    """`subject.reference` only: `display` may hold a name."""
    return _str(value.get("reference")) if isinstance(value, dict) else None


def _references(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [ref for ref in (_reference(item) for item in items) if ref]


class _Times:
    """Converts FHIR times of one resource; unparseable values stay as given in `_local`."""

    def __init__(self, report: ParseReport, kind: str) -> None:
        self.report = report
        self.kind = kind

    def pair(self, value: Any) -> tuple[str | None, str | None]:
        if not isinstance(value, str):
            return None, None
        try:
            return from_iso(value)
        except ValueError:
            self.report.unknown[f"fhir:{self.kind}.unparsed_time"] += 1
            return None, value

    def put(
        self, row: dict[str, Any], name: str, resource: dict[str, Any], paths: tuple[str, ...]
    ) -> str | None:
        """Set `row[name]`, `row[name_local]` from the first present path; return that path."""
        for path in paths:
            value = _get(resource, path)
            if isinstance(value, list):  # Timing.event is a list of dateTimes
                value = value[0] if value else None
            if value is not None:
                row[name], row[f"{name}_local"] = self.pair(value)
                return path
        row[name], row[f"{name}_local"] = None, None
        return None


def _choose_event_time(row: dict[str, Any], names: tuple[str, ...]) -> None:
    """event_time = the first of `names` that holds a UTC time (most meaningful first)."""
    for name in names:
        if row.get(name):
            row["event_time"] = row[name]
            row["event_time_field"] = name
            return
    row["event_time"] = None
    row["event_time_field"] = None


# ------------------------------------------------------------------------ value[x]

_VALUE_FIELDS = (
    "value_type",
    "value",
    "unit",
    "unit_code",
    "unit_system",
    "value_comparator",
    "value_text",
    "value_code",
    "value_boolean",
    "value_low",
    "value_high",
    "value_numerator",
    "value_denominator",
    "value_denominator_unit",
    "value_time",
    "value_time_local",
    "value_end",
    "value_end_local",
    "value_sampled",
    "value_attachment",
    "data_absent_reason",
)


def _quantity(quantity: Any) -> tuple[int | float | None, str | None, str | None, str | None]:
    if not isinstance(quantity, dict):
        return None, None, None, None
    unit = _str(quantity.get("unit")) or _str(quantity.get("code"))
    return (
        _number(quantity.get("value")),
        unit,
        _str(quantity.get("code")),
        _str(quantity.get("system")),
    )


def _attachment(attachment: Any, report: ParseReport) -> dict[str, Any]:
    """Share-safe summary of an Attachment: never the decoded content itself."""
    if not isinstance(attachment, dict):
        return {}
    summary: dict[str, Any] = {
        "content_type": _str(attachment.get("contentType")),
        "language": _str(attachment.get("language")),
        "title": _str(attachment.get("title")),
        "url": _str(attachment.get("url")),
        "creation": _str(attachment.get("creation")),
        "declared_size": _number(attachment.get("size")),
        "declared_hash": _str(attachment.get("hash")),
        "has_data": "data" in attachment,
        "size": _number(attachment.get("size")),
        "sha256": None,
    }
    data = attachment.get("data")
    if isinstance(data, str):
        try:
            decoded = base64.b64decode(_WHITESPACE.sub(b"", data.encode("ascii")), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            report.unknown["fhir:attachment_not_base64"] += 1
        else:
            summary["size"] = len(decoded)
            summary["sha256"] = hashlib.sha256(decoded).hexdigest()
    return summary


def _value_fields(
    holder: dict[str, Any], report: ParseReport, times: _Times, where: str
) -> dict[str, Any]:
    """Typed fields of the value[x] of an Observation or of one of its components."""
    out: dict[str, Any] = dict.fromkeys(_VALUE_FIELDS)
    out["value_code"] = []
    absent = holder.get("dataAbsentReason")
    if absent is not None:
        out["data_absent_reason"] = _status(absent)
    names = [k for k in holder if _VALUE_KEY.fullmatch(k)]
    if not names:
        return out
    if len(names) > 1:
        report.unknown[f"fhir:{where}.several_values"] += 1
    name = sorted(names)[0]
    value = holder[name]
    kind = name[5:]
    out["value_type"] = kind
    if kind in ("Quantity", "Age", "Duration", "Distance", "Count", "Money", "SimpleQuantity"):
        out["value"], out["unit"], out["unit_code"], out["unit_system"] = _quantity(value)
        if kind == "Money" and isinstance(value, dict) and out["unit"] is None:
            out["unit"] = _str(value.get("currency"))
        if isinstance(value, dict):
            out["value_comparator"] = _str(value.get("comparator"))
    elif kind == "CodeableConcept":
        out["value_code"] = _codings(value)
        out["value_text"] = _concept_text(value) or next(
            (c["code"] for c in out["value_code"] if c["code"]), None
        )
    elif kind == "Coding":
        out["value_code"] = _codings(value)
        out["value_text"] = next((c["display"] or c["code"] for c in out["value_code"]), None)
    elif kind in ("String", "Markdown", "Code", "Uri", "Id"):
        out["value_text"] = _str(value)
    elif kind == "Boolean":
        if isinstance(value, bool):
            out["value_boolean"] = value
            out["value_text"] = "true" if value else "false"
    elif kind in ("Integer", "Decimal", "UnsignedInt", "PositiveInt", "Integer64"):
        out["value"] = _number(value)
    elif kind == "Range":
        low, low_unit, low_code, low_system = _quantity(_get(value, "low"))
        high, high_unit, high_code, high_system = _quantity(_get(value, "high"))
        out["value_low"], out["value_high"] = low, high
        out["unit"] = low_unit or high_unit
        out["unit_code"] = low_code or high_code
        out["unit_system"] = low_system or high_system
    elif kind == "Ratio":
        numerator, num_unit, num_code, num_system = _quantity(_get(value, "numerator"))
        denominator, den_unit, _, _ = _quantity(_get(value, "denominator"))
        out["value_numerator"], out["value_denominator"] = numerator, denominator
        out["unit"], out["unit_code"], out["unit_system"] = num_unit, num_code, num_system
        out["value_denominator_unit"] = den_unit
    elif kind == "SampledData":
        data = value.get("data") if isinstance(value, dict) else None
        origin, origin_unit, origin_code, origin_system = _quantity(_get(value, "origin"))
        out["unit"], out["unit_code"], out["unit_system"] = origin_unit, origin_code, origin_system
        out["value_sampled"] = {
            "origin": origin,
            "period": _number(_get(value, "period")),
            "factor": _number(_get(value, "factor")),
            "lower_limit": _number(_get(value, "lowerLimit")),
            "upper_limit": _number(_get(value, "upperLimit")),
            "dimensions": _number(_get(value, "dimensions")),
            "sample_count": len(data.split()) if isinstance(data, str) else 0,
        }
    elif kind == "Time":
        out["value_text"] = _str(value)
    elif kind in ("DateTime", "Instant", "Date"):
        out["value_time"], out["value_time_local"] = times.pair(value)
        out["value_text"] = _str(value)
    elif kind == "Period":
        out["value_time"], out["value_time_local"] = times.pair(_get(value, "start"))
        out["value_end"], out["value_end_local"] = times.pair(_get(value, "end"))
    elif kind == "Attachment":
        out["value_attachment"] = _attachment(value, report)
        out["value_text"] = _str(value.get("title")) if isinstance(value, dict) else None
    else:
        report.unknown[f"fhir:{where}.value{kind}"] += 1
        if isinstance(value, str):
            out["value_text"] = value
        elif _number(value) is not None:
            out["value"] = value
    return out


def _reference_ranges(value: Any) -> list[dict[str, Any]]:
    out = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict):
            continue
        low, low_unit, _, _ = _quantity(item.get("low"))
        high, high_unit, _, _ = _quantity(item.get("high"))
        out.append(
            {
                "low": low,
                "high": high,
                "unit": low_unit or high_unit,
                "text": _str(item.get("text")),
                # DSTU2 `meaning`, R4 `type`
                "type": _concept_text(item.get("type") or item.get("meaning")),
            }
        )
    return out


# ------------------------------------------------------------------- row builders


def _observation(
    resource: dict[str, Any], row: dict[str, Any], report: ParseReport, times: _Times
) -> None:
    row["status"] = _str(resource.get("status"))
    row["code"] = _codings(resource.get("code"))
    row["code_text"] = _concept_text(resource.get("code"))
    row["category"] = _codings(resource.get("category"))
    row["category_text"] = _concept_text(resource.get("category"))
    # CONTRACT §5 / brief: effective[x], falling back to `issued` when no effective time.
    used = times.put(
        row,
        "effective",
        resource,
        (
            "effectiveDateTime",
            "effectiveInstant",
            "effectivePeriod.start",
            "effectiveTiming.event",
            "issued",
        ),
    )
    row["effective_source"] = used
    times.put(row, "effective_end", resource, ("effectivePeriod.end",))
    times.put(row, "issued", resource, ("issued",))
    row.update(_value_fields(resource, report, times, "Observation"))
    row["interpretation"] = _codings(resource.get("interpretation"))
    row["interpretation_text"] = _concept_text(resource.get("interpretation"))
    row["reference_range"] = _reference_ranges(resource.get("referenceRange"))
    components = []
    for component in resource.get("component") or []:
        if not isinstance(component, dict):
            continue
        item = {
            "code": _codings(component.get("code")),
            "code_text": _concept_text(component.get("code")),
        }
        item.update(_value_fields(component, report, times, "Observation.component"))
        item["interpretation"] = _codings(component.get("interpretation"))
        item["reference_range"] = _reference_ranges(component.get("referenceRange"))
        components.append(item)
    row["components"] = components
    row["subject_ref"] = _reference(resource.get("subject"))
    row["encounter_ref"] = _reference(resource.get("encounter") or resource.get("context"))
    _choose_event_time(row, ("effective",))


def _condition(resource: dict[str, Any], row: dict[str, Any], times: _Times) -> None:
    row["status"] = _status(resource.get("clinicalStatus"))
    row["verification_status"] = _status(resource.get("verificationStatus"))
    row["code"] = _codings(resource.get("code"))
    row["code_text"] = _concept_text(resource.get("code"))
    row["category"] = _codings(resource.get("category"))
    row["category_text"] = _concept_text(resource.get("category"))
    row["severity"] = _concept_text(resource.get("severity"))
    times.put(row, "onset", resource, ("onsetDateTime", "onsetPeriod.start"))
    row["onset_text"] = _str(resource.get("onsetString"))
    times.put(row, "abatement", resource, ("abatementDateTime", "abatementPeriod.start"))
    row["abated"] = (
        resource.get("abatementBoolean")
        if isinstance(resource.get("abatementBoolean"), bool)
        else None
    )
    # R4 `recordedDate`, DSTU2 `dateRecorded`
    times.put(row, "recorded", resource, ("recordedDate", "dateRecorded", "assertedDate"))
    row["subject_ref"] = _reference(resource.get("subject") or resource.get("patient"))
    row["encounter_ref"] = _reference(resource.get("encounter"))
    _choose_event_time(row, ("onset", "recorded", "abatement"))


def _dosage_texts(resource: dict[str, Any]) -> list[str]:
    texts: list[str] = []
    for name in ("dosageInstruction", "dosage"):
        value = resource.get(name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                texts.append(item["text"])
    return texts


def _medication(resource: dict[str, Any], row: dict[str, Any], times: _Times) -> None:
    kind = resource.get("resourceType")
    row["status"] = _status(resource.get("status"))
    row["intent"] = _str(resource.get("intent"))
    concept = (
        resource.get("code") if kind == "Medication" else resource.get("medicationCodeableConcept")
    )
    row["code"] = _codings(concept)
    row["code_text"] = _concept_text(concept)
    row["medication_ref"] = _reference(resource.get("medicationReference"))
    # R4 `authoredOn`, DSTU2 MedicationOrder `dateWritten`
    times.put(row, "authored", resource, ("authoredOn", "dateWritten"))
    # MedicationStatement/Administration; DSTU2 Administration spells it effectiveTime[x]
    times.put(
        row,
        "effective",
        resource,
        (
            "effectiveDateTime",
            "effectivePeriod.start",
            "effectiveTimeDateTime",
            "effectiveTimePeriod.start",
        ),
    )
    times.put(row, "effective_end", resource, ("effectivePeriod.end", "effectiveTimePeriod.end"))
    times.put(row, "date_asserted", resource, ("dateAsserted",))
    times.put(row, "handed_over", resource, ("whenHandedOver",))
    row["dosage_text"] = _dosage_texts(resource)
    row["subject_ref"] = _reference(resource.get("subject") or resource.get("patient"))
    _choose_event_time(row, ("authored", "effective", "date_asserted", "handed_over"))


def _document(
    resource: dict[str, Any], row: dict[str, Any], report: ParseReport, times: _Times
) -> None:
    kind = resource.get("resourceType")
    row["status"] = _status(resource.get("status"))
    concept = resource.get("type") if kind == "DocumentReference" else resource.get("code")
    row["code"] = _codings(concept)
    row["code_text"] = _concept_text(concept)
    row["category"] = _codings(resource.get("category") or resource.get("class"))
    row["category_text"] = _concept_text(resource.get("category") or resource.get("class"))
    row["subject_ref"] = _reference(resource.get("subject"))
    attachments: list[dict[str, Any]] = []
    if kind == "DocumentReference":
        row["doc_status"] = _status(resource.get("docStatus"))
        for content in resource.get("content") or []:
            if isinstance(content, dict):
                attachments.append(_attachment(content.get("attachment"), report))
        times.put(row, "period_start", resource, ("context.period.start",))
        times.put(row, "period_end", resource, ("context.period.end",))
        # DSTU2 `created` / `indexed`, R4 `date`; the attachment's own creation date otherwise
        times.put(row, "created", resource, ("created", "content.attachment.creation"))
        times.put(row, "date", resource, ("date", "indexed"))
        event_fields: tuple[str, ...] = ("period_start", "created", "date")
    else:
        for form in resource.get("presentedForm") or []:
            attachments.append(_attachment(form, report))
        times.put(row, "effective", resource, ("effectiveDateTime", "effectivePeriod.start"))
        times.put(row, "effective_end", resource, ("effectivePeriod.end",))
        times.put(row, "issued", resource, ("issued",))
        row["result_refs"] = _references(resource.get("result"))
        event_fields = ("effective", "issued")
    row["attachments"] = attachments
    _choose_event_time(row, event_fields)


# Which dates a resource of the `clinical` stream carries, most meaningful first:
# (row field, FHIR paths R4 first then DSTU2).
_CLINICAL_TIMES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "Immunization": (
        ("occurrence", ("occurrenceDateTime", "date")),
        ("recorded", ("recorded",)),
    ),
    "AllergyIntolerance": (
        ("onset", ("onsetDateTime", "onset", "onsetPeriod.start")),
        ("recorded", ("recordedDate", "assertedDate")),
        ("last_occurrence", ("lastOccurrence", "lastOccurence")),
    ),
    "Procedure": (
        ("performed", ("performedDateTime", "performedPeriod.start")),
        ("performed_end", ("performedPeriod.end",)),
    ),
    "Encounter": (("period_start", ("period.start",)), ("period_end", ("period.end",))),
    "CarePlan": (
        ("period_start", ("period.start",)),
        ("period_end", ("period.end",)),
        ("created", ("created",)),
    ),
    "CareTeam": (("period_start", ("period.start",)), ("period_end", ("period.end",))),
    "EpisodeOfCare": (("period_start", ("period.start",)), ("period_end", ("period.end",))),
    "Goal": (("start", ("startDate",)), ("status_date", ("statusDate",))),
    "ServiceRequest": (
        ("occurrence", ("occurrenceDateTime", "occurrencePeriod.start")),
        ("authored", ("authoredOn",)),
    ),
    "ProcedureRequest": (
        ("occurrence", ("scheduledDateTime", "scheduledPeriod.start")),
        ("authored", ("orderedOn",)),
    ),
    "DiagnosticOrder": (("authored", ("event.dateTime",)),),
    "ImagingStudy": (("started", ("started",)),),
    "Specimen": (
        ("collected", ("collection.collectedDateTime", "collection.collectedPeriod.start")),
    ),
    "FamilyMemberHistory": (("date", ("date",)),),
    "QuestionnaireResponse": (("authored", ("authored",)),),
    "Claim": (("billable_start", ("billablePeriod.start",)), ("created", ("created",))),
    "ExplanationOfBenefit": (
        ("billable_start", ("billablePeriod.start",)),
        ("created", ("created",)),
    ),
    "Coverage": (("period_start", ("period.start",)), ("period_end", ("period.end",))),
}
# Resources about people, places and things: no clinical date (a Patient's birthDate is
# not an event, and must not become one).
_TIMELESS = frozenset(
    {
        "Patient",
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "Location",
        "RelatedPerson",
        "Person",
        "Device",
        "Medication",
        "Substance",
        "HealthcareService",
        "Endpoint",
        "Group",
    }
)
_DEFAULT_TIMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("effective", ("effectiveDateTime", "effectivePeriod.start")),
    ("occurrence", ("occurrenceDateTime", "occurrencePeriod.start")),
    ("performed", ("performedDateTime", "performedPeriod.start")),
    ("onset", ("onsetDateTime",)),
    ("period_start", ("period.start",)),
    ("authored", ("authoredOn", "authored")),
    ("recorded", ("recordedDate", "recorded")),
    ("issued", ("issued",)),
    ("date", ("date",)),
    ("created", ("created",)),
)
_CODE_FIELDS = ("code", "vaccineCode", "substance", "type")


def _clinical(resource: dict[str, Any], kind: str, row: dict[str, Any], times: _Times) -> None:
    status = resource.get("status")
    if status is None:
        status = resource.get("clinicalStatus")
    row["status"] = _status(status)
    concept = next((resource[name] for name in _CODE_FIELDS if name in resource), None)
    row["code"] = _codings(concept)
    row["code_text"] = _concept_text(concept)
    row["subject_ref"] = _reference(resource.get("subject") or resource.get("patient"))
    if kind == "Patient":
        row["gender"] = _str(resource.get("gender"))
    specs = () if kind in _TIMELESS else _CLINICAL_TIMES.get(kind, _DEFAULT_TIMES)
    for name, paths in specs:
        times.put(row, name, resource, paths)
    # Only non-null fields: the default list is long and mostly empty for a given type.
    if kind not in _CLINICAL_TIMES:
        for name, _ in specs:
            if row[name] is None and row[f"{name}_local"] is None:
                del row[name], row[f"{name}_local"]
    _choose_event_time(row, tuple(name for name, _ in specs))


def _row(
    resource: Any,
    full_url: str | None,
    report: ParseReport,
    source_file: str,
    version_hint: str | None,
) -> tuple[str, dict[str, Any]]:
    if not isinstance(resource, dict):
        report.unknown["fhir:not_an_object"] += 1
        kind = "Unknown"
    else:
        declared = resource.get("resourceType")
        kind = (
            declared
            if isinstance(declared, str) and _RESOURCE_TYPE.fullmatch(declared)
            else "Unknown"
        )
        if kind == "Unknown":
            report.unknown["fhir:missing_resourceType"] += 1
    report.elements[f"fhir:{kind}"] += 1
    row: dict[str, Any] = {
        "record_key": _key(kind, resource),
        "source": "fhir",
        "source_file": source_file,
        "kind": kind,
        "resource_type": kind if kind != "Unknown" else None,
        "fhir_id": _str(resource.get("id")) if isinstance(resource, dict) else None,
        "fhir_version": None,
        "bundle_full_url": full_url,
        "resource": resource,
    }
    if not isinstance(resource, dict):
        row["event_time"] = row["event_time_field"] = None
        return "clinical", row
    row["fhir_version"] = version_hint or guess_fhir_version(resource)
    times = _Times(report, kind)
    if kind == "Observation":
        _observation(resource, row, report, times)
        return "observations", row
    if kind == "Condition":
        _condition(resource, row, times)
        return "conditions", row
    if kind in MEDICATION_TYPES:
        _medication(resource, row, times)
        return "medications", row
    if kind in DOCUMENT_TYPES:
        _document(resource, row, report, times)
        return "documents", row
    if kind != "Unknown" and kind not in _CLINICAL_TIMES and kind not in _TIMELESS:
        # No typed reader knows this type: kept with the generic date fields only.
        report.unknown[f"fhir:{kind}"] += 1
    _clinical(resource, kind, row, times)
    return "clinical", row


def iter_fhir(
    path: Path,
    report: ParseReport,
    *,
    source_file: str,
    fhir_version: str | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(stream, row)` for every resource in one FHIR JSON file.

    `fhir_version` is what export.xml's ClinicalRecord says (`1.0.2`, `4.0.1`); without it
    the version is guessed per resource from its fields (None when nothing tells).
    """
    document = _load_json(path, report)
    if not isinstance(document, (dict, list)):
        report.unknown["fhir:not_an_object"] += 1
        raise InputError("a clinical record file does not hold a FHIR resource")
    hint = normalise_fhir_version(fhir_version)
    for resource, full_url in _iter_resources(document, report):
        yield _row(resource, full_url, report, source_file, hint)


# ------------------------------------------------------------------- person facts


def _name_facts(name: Any) -> dict[str, Any] | None:
    if isinstance(name, str):
        return {"text": name, "given": [], "family": None, "prefix": [], "suffix": [], "use": None}
    if not isinstance(name, dict):
        return None

    def strings(value: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        return [item for item in items if isinstance(item, str) and item.strip()]

    family = name.get("family")
    # DSTU2 `family` is a list of strings, R4 a single string.
    family_text = " ".join(strings(family)) or None
    return {
        "text": _str(name.get("text")),
        "given": strings(name.get("given")),
        "family": family_text,
        "prefix": strings(name.get("prefix")),
        "suffix": strings(name.get("suffix")),
        "use": _str(name.get("use")),
    }


def patient_facts(resource: dict[str, Any]) -> dict[str, Any]:
    """Structured person facts of one Patient resource (identity stage input; holds PII)."""
    names = [n for n in (_name_facts(item) for item in resource.get("name") or []) if n]
    identifiers = []
    for item in resource.get("identifier") or []:
        if isinstance(item, dict) and isinstance(item.get("value"), str):
            identifiers.append(
                {
                    "system": _str(item.get("system")),
                    "value": item["value"],
                    "type": _concept_text(item.get("type")),
                    "use": _str(item.get("use")),
                }
            )
    addresses = []
    for item in resource.get("address") or []:
        if isinstance(item, dict):
            lines = item.get("line")
            addresses.append(
                {
                    "use": _str(item.get("use")),
                    "text": _str(item.get("text")),
                    "lines": [x for x in lines if isinstance(x, str)]
                    if isinstance(lines, list)
                    else [],
                    "city": _str(item.get("city")),
                    "state": _str(item.get("state")),
                    "postal_code": _str(item.get("postalCode")),
                    "country": _str(item.get("country")),
                }
            )
    telecom = []
    for item in resource.get("telecom") or []:
        if isinstance(item, dict) and isinstance(item.get("value"), str):
            telecom.append(
                {
                    "system": _str(item.get("system")),
                    "value": item["value"],
                    "use": _str(item.get("use")),
                }
            )
    deceased = resource.get("deceasedDateTime")
    if deceased is None and isinstance(resource.get("deceasedBoolean"), bool):
        deceased = resource["deceasedBoolean"]
    return {
        "source": "fhir",
        "fhir_id": _str(resource.get("id")),
        "names": names,
        "birth_date": _str(resource.get("birthDate")),
        "sex": _str(resource.get("gender")),
        "identifiers": identifiers,
        "addresses": addresses,
        "telecom": telecom,
        "deceased": deceased,
    }


def read_patients_fhir(path: Path) -> list[dict[str, Any]]:
    """Person facts of every Patient resource in one FHIR JSON file (Bundles unpacked)."""
    report = ParseReport()
    document = _load_json(path, report)
    if not isinstance(document, (dict, list)):
        raise InputError("a clinical record file does not hold a FHIR resource")
    return [
        patient_facts(resource)
        for resource, _ in _iter_resources(document, report)
        if isinstance(resource, dict) and resource.get("resourceType") == "Patient"
    ]
