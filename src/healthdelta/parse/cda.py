"""Apple's `export_cda.xml` (HL7 CDA R2) → canonical NDJSON rows.

Each clinical statement `observation` becomes one `observations` row (kind
`cda:observation`); other top-level clinical statements (act, procedure, ...), which
Apple does not write today, are kept generically as `clinical` rows (kind `cda:<tag>`).
Observations nested inside another statement stay part of that statement's row.

A trimmed example of what Apple writes (one HealthKit sample per observation):

    <entry><organizer classCode="CLUSTER" moodCode="EVN">
      <code code="46680005" displayName="Vital signs" .../>
      <component><observation classCode="OBS" moodCode="EVN">
        <code code="8867-4" codeSystem="2.16.840.1.113883.6.1" displayName="Heart rate"/>
        <text><sourceName>Watch</sourceName><device>&lt;&lt;HKDevice: 0x2834...&gt;, ...&gt;</device>
              <value>62</value><type>HKQuantityTypeIdentifierHeartRate</type><unit>count/min</unit>
              <metadataEntry><key>...</key><value>...</value></metadataEntry></text>
        <statusCode code="completed"/>
        <effectiveTime><low value="20140606202417-0700"/><high value="20140606202417-0700"/></effectiveTime>
        <value xsi:type="PQ" value="62" unit="count/min"/>
      </observation></component>
    </organizer></entry>

Every row keeps the whole statement as a generic element tree in `element` (nothing
dropped). `record_key = keys.record_key("cda", kind, element)` with the volatile `0x...`
pointer of `device` texts removed.

The `recordTarget` (the patient) is not a row: `read_cda_patient` returns its facts.

Robustness. CDA exports can be hundreds of MB: they are streamed (iterparse, finished
subtrees cleared). Apple's file has been seen with content after the root element and
with missing opening tags. libxml2's recover mode alone handles the first but not the
second: a stray end tag closes the *current* element, the root closes early and
everything after it is lost. So a fast C-only well-formedness scan runs first; a file
that fails it (or does not start with `ClinicalDocument`) is parsed through
`_RepairingReader`, which fixes the tag structure (drops stray end tags, closes unclosed
ones, inserts a missing root, cuts trailing content) before lxml's recover mode fixes
what is left (invalid characters ...). Each repair is counted in `report.repairs`.
Entities are never resolved, no DTD is loaded, nothing is fetched from the network.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson
from lxml import etree

from healthdelta.errors import InputError
from healthdelta.keys import record_key, strip_device_pointer
from healthdelta.parse.report import ParseReport
from healthdelta.parse.xmlnames import local_name
from healthdelta.parse.timefmt import from_cda

HL7 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
_PREFIXES = {XSI: "xsi", "urn:hl7-org:sdtc": "sdtc", "http://www.w3.org/XML/1998/namespace": "xml"}

CHUNK_BYTES = 1 << 20
# The longest single markup token (tag, comment, PI) the repairing reader waits for
# before treating a `<` as stray text.
MAX_TOKEN_BYTES = 1 << 16
_HEAD_BYTES = 1 << 16

ROOT = "ClinicalDocument"
_SYNTHETIC_ROOT = (
    b'<ClinicalDocument xmlns="urn:hl7-org:v3" '
    b'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:sdtc="urn:hl7-org:sdtc">'
)
# Elements that may legitimately open an export_cda.xml whose root tag went missing.
_CDA_TOP_LEVEL = frozenset(
    """
    realmCode typeId templateId id code title effectiveTime confidentialityCode
    languageCode setId versionNumber recordTarget author dataEnterer informant custodian
    informationRecipient legalAuthenticator authenticator participant inFulfillmentOf
    documentationOf relatedDocument authorization componentOf component structuredBody
    section entry
    """.split()
)

STATEMENTS = frozenset(
    """
    observation organizer act procedure substanceAdministration supply encounter
    observationMedia regionOfInterest
    """.split()
)
# An observation inside one of these is part of that statement, not a row of its own.
_ENCLOSING = STATEMENTS - {"organizer"}
_CONTAINERS = frozenset({"entry", "component"})

_XML_OPTIONS: dict[str, Any] = {
    # Security: no entity expansion, no DTD, no network; libxml2's size/depth limits stay on.
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "dtd_validation": False,
    "huge_tree": False,
}

# ------------------------------------------------------------------ tag repair

_TOKEN = re.compile(
    rb"""<(?:
        !--.*?-->
      | !\[CDATA\[.*?\]\]>
      | \?.*?\?>
      | !DOCTYPE(?:[^\[>]|\[.*?\])*>
      | /\s*(?P<end>[^\s<>/]+)\s*>
      | (?P<start>[^\s<>/!?"'=]+)(?:[^<>"']++|"[^"<]*+"|'[^'<]*+')*+>
    )""",
    re.S | re.X,
)


def _local(qname: bytes) -> bytes:
    return qname.rsplit(b":", 1)[-1]


class _RepairingReader:
    """File-like byte stream that hands lxml a tag-balanced version of a damaged document.

    It tokenises markup only (text passes through untouched) and keeps a stack of open
    element names: an end tag matching nothing open is dropped, one matching an element
    further down closes the ones above it first, elements still open at the end of the
    file are closed, content after the root element is cut, and a first element that is
    not the expected root gets a synthetic root around it.
    """

    def __init__(
        self, raw: IO[bytes], report: ParseReport, prefix: str, root: bytes, synthetic_root: bytes
    ) -> None:
        self._raw = raw
        self._report = report
        self._prefix = prefix
        self._root = root
        self._synthetic_root = synthetic_root
        self._buffer = b""
        self._out: list[bytes] = []
        self._out_len = 0
        self._stack: list[bytes] = []
        self._seen_root = False
        self._done = False
        self._eof = False

    def _count(self, what: str) -> None:
        self._report.repairs[f"{self._prefix}_{what}"] += 1

    def _emit(self, data: bytes) -> None:
        if data:
            self._out.append(data)
            self._out_len += len(data)

    def _finish(self) -> None:
        while self._stack:
            name = self._stack.pop()
            self._emit(b"</" + name + b">")
            self._count("end_tag_inserted")
        self._done = True

    def _text(self, data: bytes) -> None:
        if self._seen_root and not self._stack:
            if data.strip():
                self._count("trailing_content")
                self._done = True
            return
        self._emit(data)

    def _token(self, match: re.Match[bytes], next_end: bytes | None = None) -> None:
        token = match.group(0)
        start, end = match.group("start"), match.group("end")
        if start is None and end is None:  # comment, CDATA, PI, DOCTYPE
            self._emit(token)
            return
        if self._seen_root and not self._stack:
            self._count("trailing_content")
            self._done = True
            return
        if start is not None:
            if not self._seen_root:
                self._seen_root = True
                if _local(start) != self._root:
                    self._count("root_tag_inserted")
                    self._emit(self._synthetic_root)
                    self._stack.append(self._root)
            if not token.endswith(b"/>"):
                self._stack.append(start)
            self._emit(token)
            return
        if self._stack and self._stack[-1] == end:
            self._stack.pop()
            self._emit(token)
        elif end in self._stack and next_end != self._stack[-1]:
            # Elements above `end` were never closed: close them. (When the next end tag
            # closes the current element instead, `end` is the stray one: see _process.)
            while self._stack[-1] != end:
                self._emit(b"</" + self._stack.pop() + b">")
                self._count("end_tag_inserted")
            self._stack.pop()
            self._emit(token)
        else:
            self._count("stray_end_tag_removed")

    def _process(self) -> None:
        buffer, pos = self._buffer, 0
        while not self._done:
            lt = buffer.find(b"<", pos)
            if lt < 0:
                self._text(buffer[pos:])
                pos = len(buffer)
                break
            self._text(buffer[pos:lt])
            if self._done:
                break
            match = _TOKEN.match(buffer, lt)
            if match is None:
                if not self._eof and len(buffer) - lt < MAX_TOKEN_BYTES:
                    pos = lt  # maybe a token cut by the chunk boundary: wait for more
                    break
                self._count("stray_lt_escaped")
                self._text(b"&lt;")
                pos = lt + 1
                continue
            next_end = None
            end = match.group("end")
            if end is not None and self._stack and self._stack[-1] != end and end in self._stack:
                # Missing opening tag or missing closing tags? Look at the next markup:
                # if it closes the current element, this end tag lost its opening tag.
                after = buffer.find(b"<", match.end())
                following = _TOKEN.match(buffer, after) if after >= 0 else None
                if following is None and not self._eof and len(buffer) - lt < MAX_TOKEN_BYTES:
                    pos = lt
                    break
                next_end = following.group("end") if following is not None else None
            self._token(match, next_end)
            pos = match.end()
        self._buffer = buffer[pos:] if not self._done else b""
        if self._eof and not self._done:
            if self._buffer:
                self._text(self._buffer)
                self._buffer = b""
            self._finish()

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or self._out_len < size):
            chunk = self._raw.read(CHUNK_BYTES)
            if not chunk:
                self._eof = True
            self._buffer += chunk
            self._process()
        data = b"".join(self._out)
        if size < 0 or len(data) <= size:
            self._out, self._out_len = [], 0
            return data
        self._out, self._out_len = [data[size:]], len(data) - size
        return data[:size]


class _NullTarget:
    """A parser target without start/end/data: libxml2 checks the document in C only."""

    def close(self) -> None:
        return None


def _well_formed(path: Path) -> bool:
    parser = etree.XMLParser(target=_NullTarget(), **_XML_OPTIONS)
    try:
        with path.open("rb") as raw:
            while chunk := raw.read(CHUNK_BYTES):
                parser.feed(chunk)
        parser.close()
    except etree.XMLSyntaxError:
        return False
    return True


def first_element_name(head: bytes) -> str | None:
    """Local name of the first element in `head` (prolog, comments, PIs skipped)."""
    pos = 0
    while (lt := head.find(b"<", pos)) >= 0:
        match = _TOKEN.match(head, lt)
        if match is None:
            return None
        if match.group("start") is not None:
            return _local(match.group("start")).decode("utf-8", "replace")
        pos = match.end()
    return None


def _open_source(path: Path, report: ParseReport, *, check: bool) -> tuple[Any, IO[bytes]]:
    """What lxml should read: the path itself when the file is sound, else a repairing stream."""
    try:
        with path.open("rb") as raw:
            head = raw.read(_HEAD_BYTES)
        first = first_element_name(head)
        if first is not None and first != ROOT and first not in _CDA_TOP_LEVEL:
            raise InputError("the CDA file does not hold a ClinicalDocument")
        if check and first == ROOT and _well_formed(path):
            raw = path.open("rb")
            return raw, raw
        raw = path.open("rb")
    except OSError as exc:
        raise InputError("the CDA file cannot be read") from exc
    return _RepairingReader(raw, report, "cda", ROOT.encode(), _SYNTHETIC_ROOT), raw


def _count_recoveries(parser_log: Any, report: ParseReport) -> None:
    for entry in parser_log:
        if entry.level < etree.ErrorLevels.ERROR:
            continue
        if entry.type_name == "ERR_DOCUMENT_END":
            report.repairs["cda_trailing_content"] += 1
        elif entry.type_name == "ERR_INVALID_CHAR":
            report.repairs["cda_invalid_char_removed"] += 1
        else:
            report.repairs["cda_recovered"] += 1


# -------------------------------------------------------------- element readers

_NAMES: dict[str, str] = {}


def _name(qname: str) -> str:
    """`{urn:hl7-org:v3}code` → `code`, `{xsi-ns}type` → `xsi:type` (memoised: few distinct tags)."""
    name = _NAMES.get(qname)
    if name is None:
        if qname[:1] != "{":
            name = qname
        else:
            namespace, local = qname[1:].split("}", 1)
            prefix = None if namespace == HL7 else _PREFIXES.get(namespace)
            name = local if namespace == HL7 else (f"{prefix}:{local}" if prefix else qname)
        if len(_NAMES) < 4096:
            _NAMES[qname] = name
    return name


_local_name = local_name


def element_dict(element: Any) -> dict[str, Any]:
    """Generic tree of one element: `tag`, `attrs`, `text`, `children`, `tail` (when present)."""
    out: dict[str, Any] = {"tag": _name(element.tag)}
    if element.attrib:
        out["attrs"] = {_name(key): value for key, value in element.attrib.items()}
    text = element.text
    if text and not text.isspace():
        out["text"] = text
    children = [element_dict(child) for child in element if isinstance(child.tag, str)]
    if children:
        out["children"] = children
    tail = element.tail
    if tail and not tail.isspace():
        out["tail"] = tail
    return out


def _key_content(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` with the volatile `0x...` pointer removed from every `device` text (keys.py)."""
    copy = dict(tree)
    if copy["tag"] == "device" and "text" in copy:
        copy["text"] = strip_device_pointer(copy["text"])
    if "children" in copy:
        copy["children"] = [_key_content(child) for child in copy["children"]]
    return copy


# Readers over element_dict trees (plain dict look-ups: much faster than ElementPath).

Node = dict[str, Any]


def _kids(node: Node | None, tag: str) -> list[Node]:
    if node is None:
        return []
    return [child for child in node.get("children", ()) if child["tag"] == tag]


def _kid(node: Node | None, tag: str) -> Node | None:
    if node is None:
        return None
    for child in node.get("children", ()):
        if child["tag"] == tag:
            return child
    return None


def _attr(node: Node | None, name: str) -> str | None:
    return node.get("attrs", {}).get(name) if node is not None else None


def _all_text(node: Node) -> str:
    parts = [node.get("text", "")]
    for child in node.get("children", ()):
        parts.append(_all_text(child))
        parts.append(child.get("tail", ""))
    return "".join(parts)


def _text(node: Node | None) -> str | None:
    if node is None:
        return None
    text = _all_text(node).strip()
    return text or None


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


# What the NDJSON encoder (orjson) can write as a JSON integer.
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1


def _number(text: str | None) -> int | float | None:
    """The numeric value, or None. Out of range (an integer past 64 bits, which also
    spares int() Python's 4300-digit limit, or a float that overflows) is None too:
    the statement's element tree keeps the text as written."""
    if text is None:
        return None
    text = text.strip()
    if _INT.fullmatch(text):
        if len(text.lstrip("+-").lstrip("0")) > 20:
            return None
        number = int(text)
        return number if _INT_MIN <= number <= _INT_MAX else None
    if _FLOAT.fullmatch(text):
        value = float(text)
        return value if math.isfinite(value) else None
    return None


def _time(report: ParseReport, value: str | None) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    try:
        return from_cda(value)
    except ValueError:
        report.unknown["cda:unparsed_time"] += 1
        return None, value


def _effective(node: Node, report: ParseReport) -> dict[str, Any]:
    effective = _kid(node, "effectiveTime")
    start = _attr(effective, "value") or _attr(_kid(effective, "low"), "value")
    end = _attr(_kid(effective, "high"), "value")
    out: dict[str, Any] = {}
    out["effective_start"], out["effective_start_local"] = _time(report, start)
    out["effective_end"], out["effective_end_local"] = _time(report, end)
    return out


def _code_fields(node: Node) -> dict[str, Any]:
    code = _kid(node, "code")
    return {
        "code": _attr(code, "code"),
        "code_system": _attr(code, "codeSystem"),
        "code_system_name": _attr(code, "codeSystemName"),
        "display_name": _attr(code, "displayName") or _text(_kid(code, "originalText")),
    }


def _value_fields(node: Node, report: ParseReport) -> dict[str, Any]:
    out: dict[str, Any] = {
        "value_type": None,
        "value": None,
        "unit": None,
        "value_text": None,
        "value_code": None,
        "value_code_system": None,
        "value_low": None,
        "value_high": None,
    }
    values = _kids(node, "value")
    if not values:
        return out
    if len(values) > 1:
        report.unknown["cda:observation.several_values"] += 1
    value = values[0]
    kind = _attr(value, "xsi:type")
    kind = kind.rsplit(":", 1)[-1] if kind else None
    out["value_type"] = kind
    raw = _attr(value, "value")
    if kind in ("PQ", "INT", "REAL", "MO"):
        out["value"] = _number(raw)
        out["unit"] = _attr(value, "unit") if kind == "PQ" else _attr(value, "currency")
        if out["value"] is None and raw is not None:
            out["value_text"] = raw
    elif kind in ("CD", "CE", "CV", "CO", "CS"):
        out["value_code"] = _attr(value, "code")
        out["value_code_system"] = _attr(value, "codeSystem")
        out["value_text"] = (
            _attr(value, "displayName") or _text(_kid(value, "originalText")) or out["value_code"]
        )
    elif kind == "IVL_PQ":
        low, high = _kid(value, "low"), _kid(value, "high")
        out["value_low"] = _number(_attr(low, "value"))
        out["value_high"] = _number(_attr(high, "value"))
        out["unit"] = _attr(low, "unit") or _attr(high, "unit")
    else:
        # ST, ED, BL, TS and untyped values: text, as the source wrote it.
        out["value_text"] = raw if raw is not None else _text(value)
    return out


_HEALTHKIT_TEXT = (
    ("sourceName", "source_name"),
    ("sourceVersion", "source_version"),
    ("device", "device"),
    ("type", "hk_type"),
)


def _healthkit_text(node: Node) -> dict[str, Any]:
    """Apple's `<text>` block: the HealthKit sample's source, device, type and metadata."""
    text = _kid(node, "text")
    out: dict[str, Any] = {field: _text(_kid(text, tag)) for tag, field in _HEALTHKIT_TEXT}
    if out["device"] is not None:  # a memory address, as in export.xml: rows never carry it
        out["device"] = strip_device_pointer(out["device"])
    out["metadata"] = {}
    for entry in _kids(text, "metadataEntry"):
        key = _text(_kid(entry, "key"))
        if key is not None:
            out["metadata"][key] = _text(_kid(entry, "value"))
    return out


def _first_child(element: Any, local: str) -> Any:
    for child in element:
        if _local_name(child) == local:
            return child
    return None


class _Context:
    """Organizer and section around a statement, read while they are still in the tree.

    Remembers the last organizer/section seen: consecutive observations share them, and
    lxml hands back the same proxy object while we hold a reference to it.
    """

    def __init__(self) -> None:
        self._organizer: Any = None
        self._organizer_fields: tuple[str | None, str | None] = (None, None)
        self._section: Any = None
        self._section_fields: tuple[str | None, str | None] = (None, None)

    def _organizer_of(self, organizer: Any) -> tuple[str | None, str | None]:
        if organizer is not self._organizer:
            code = _first_child(organizer, "code")
            self._organizer = organizer
            self._organizer_fields = (
                (code.get("code"), code.get("displayName")) if code is not None else (None, None)
            )
        return self._organizer_fields

    def _section_of(self, section: Any) -> tuple[str | None, str | None]:
        if section is not self._section:
            title = _first_child(section, "title")
            code = _first_child(section, "code")
            self._section = section
            self._section_fields = (
                ("".join(title.itertext()).strip() or None) if title is not None else None,
                code.get("code") if code is not None else None,
            )
        return self._section_fields

    def fields(self, element: Any) -> dict[str, Any]:
        organizer = section = (None, None)
        parent = element.getparent()
        while parent is not None:
            name = _local_name(parent)
            if name == "organizer" and organizer == (None, None):
                organizer = self._organizer_of(parent)
            elif name == "section":
                section = self._section_of(parent)
                break
            parent = parent.getparent()
        return {
            "organizer_code": organizer[0],
            "organizer_display_name": organizer[1],
            "section_title": section[0],
            "section_code": section[1],
        }


def _enclosed(element: Any) -> bool:
    parent = element.getparent()
    while parent is not None:
        if _local_name(parent) in _ENCLOSING:
            return True
        parent = parent.getparent()
    return False


def _release(element: Any) -> None:
    """Free a finished subtree and the finished siblings before it (flat memory)."""
    element.clear()
    parent = element.getparent()
    if parent is None:
        return
    previous = element.getprevious()
    while previous is not None and previous.tag == element.tag:
        parent.remove(previous)
        previous = element.getprevious()


def _row(
    element: Any, report: ParseReport, source_file: str, context: _Context
) -> tuple[str, dict[str, Any]]:
    local = _local_name(element)
    kind = f"cda:{local}"
    tree = element_dict(element)
    try:
        key = record_key("cda", kind, _key_content(tree))
    except orjson.JSONEncodeError:
        raise InputError("a CDA statement is nested too deeply") from None
    row: dict[str, Any] = {
        "record_key": key,
        "source": "cda",
        "source_file": source_file,
        "kind": kind,
    }
    row["class_code"] = _attr(tree, "classCode")
    row["mood_code"] = _attr(tree, "moodCode")
    row.update(_code_fields(tree))
    row["status"] = _attr(_kid(tree, "statusCode"), "code")
    row.update(_effective(tree, report))
    row["event_time"] = row["effective_start"] or row["effective_end"]
    if local == "observation":
        row.update(_value_fields(tree, report))
        row["interpretation"] = _attr(_kid(tree, "interpretationCode"), "code")
        row["reference_range"] = [
            _text(_kid(r, "text")) or _text(r)
            for rr in _kids(tree, "referenceRange")
            for r in _kids(rr, "observationRange")
        ]
        row.update(_healthkit_text(tree))
    row.update(context.fields(element))
    row["element"] = tree
    return ("observations" if local == "observation" else "clinical"), row


def iter_cda(
    path: Path, report: ParseReport, *, source_file: str = "export_cda.xml"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(stream, row)` for every clinical statement of an export_cda.xml, streaming."""
    source, raw = _open_source(path, report, check=True)
    tags = [f"{{*}}{name}" for name in sorted(STATEMENTS | _CONTAINERS | {"section"})]
    context = _Context()
    try:
        events = etree.iterparse(
            source,
            events=("end",),
            tag=tags,
            recover=True,
            remove_comments=True,
            remove_pis=True,
            **_XML_OPTIONS,
        )
        try:
            for _, element in events:
                local = _local_name(element)
                if local in STATEMENTS:
                    if _enclosed(element):
                        report.elements[f"cda:{local}_nested"] += 1
                        continue
                    report.elements[f"cda:{local}"] += 1
                    if local == "organizer":
                        _release(element)
                        continue
                    if local != "observation":
                        report.unknown[f"cda:{local}"] += 1
                    yield _row(element, report, source_file, context)
                    _release(element)
                elif local in _CONTAINERS:
                    if not _enclosed(element):
                        _release(element)
                else:
                    report.elements["cda:section"] += 1
        except etree.XMLSyntaxError:
            raise InputError("the CDA file is not valid XML") from None
        if events.root is None:
            raise InputError("the CDA file is not valid XML")
        _count_recoveries(events.error_log, report)
    finally:
        raw.close()


# ------------------------------------------------------------------ patient facts

_SEX = {"F": "female", "M": "male", "UN": "other", "UNK": "unknown"}
_TELECOM_SCHEMES = {
    "tel": "phone",
    "mailto": "email",
    "fax": "fax",
    "http": "url",
    "https": "url",
    "sms": "sms",
}


def _name_facts(name: Node) -> dict[str, Any]:
    def texts(tag: str) -> list[str]:
        return [t for t in (_text(part) for part in _kids(name, tag)) if t]

    text = name.get("text", "").strip() or None
    return {
        "text": text,
        "given": texts("given"),
        "family": " ".join(texts("family")) or None,
        "prefix": texts("prefix"),
        "suffix": texts("suffix"),
        "use": _attr(name, "use"),
    }


def _patient_facts(target: Node) -> dict[str, Any]:
    facts = _empty_patient()
    role = _kid(target, "patientRole")
    for ident in _kids(role, "id"):
        if _attr(ident, "nullFlavor"):
            continue
        root, extension = _attr(ident, "root"), _attr(ident, "extension")
        if extension:
            facts["identifiers"].append(
                {"system": root, "value": extension, "type": None, "use": None}
            )
        elif root:
            # HL7: a root without extension is itself the identifier.
            facts["identifiers"].append({"system": None, "value": root, "type": None, "use": None})
    for addr in _kids(role, "addr"):
        if _attr(addr, "nullFlavor"):
            continue
        facts["addresses"].append(
            {
                "use": _attr(addr, "use"),
                "text": addr.get("text", "").strip() or None,
                "lines": [t for t in (_text(x) for x in _kids(addr, "streetAddressLine")) if t],
                "city": _text(_kid(addr, "city")),
                "state": _text(_kid(addr, "state")),
                "postal_code": _text(_kid(addr, "postalCode")),
                "country": _text(_kid(addr, "country")),
            }
        )
    for telecom in _kids(role, "telecom"):
        value = _attr(telecom, "value")
        if not value or _attr(telecom, "nullFlavor"):
            continue
        scheme, _, rest = value.partition(":")
        system = _TELECOM_SCHEMES.get(scheme.lower()) if rest else None
        facts["telecom"].append(
            {"system": system, "value": rest if system else value, "use": _attr(telecom, "use")}
        )
    patient = _kid(role, "patient")
    facts["names"] = [_name_facts(n) for n in _kids(patient, "name") if not _attr(n, "nullFlavor")]
    gender = _attr(_kid(patient, "administrativeGenderCode"), "code")
    if gender:
        facts["sex"] = _SEX.get(gender.upper(), gender)
    birth = _attr(_kid(patient, "birthTime"), "value")
    if birth:
        facts["birth_time"] = birth
        try:
            facts["birth_date"] = from_cda(birth)[1][:10]
        except ValueError:
            facts["birth_date"] = None
    return facts


def _empty_patient() -> dict[str, Any]:
    return {
        "source": "cda",
        "names": [],
        "birth_date": None,
        "birth_time": None,
        "sex": None,
        "identifiers": [],
        "addresses": [],
        "telecom": [],
    }


def read_cda_patient(path: Path) -> dict[str, Any]:
    """Person facts of the CDA `recordTarget` (identity stage input; holds PII).

    Reads only up to the end of the first recordTarget. Empty lists / None when absent.
    """
    report = ParseReport()
    # Always through the repairing reader: the header is small and we stop early.
    source, raw = _open_source(path, report, check=False)
    try:
        events = etree.iterparse(
            source,
            events=("end",),
            tag="{*}recordTarget",
            recover=True,
            remove_comments=True,
            **_XML_OPTIONS,
        )
        try:
            for _, element in events:
                return _patient_facts(element_dict(element))
        except etree.XMLSyntaxError:
            raise InputError("the CDA file is not valid XML") from None
        if events.root is None:
            raise InputError("the CDA file is not valid XML")
        return _empty_patient()
    finally:
        raw.close()
