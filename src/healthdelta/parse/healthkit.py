"""HealthKit `export.xml` -> canonical rows (docs/ndjson.md, CONTRACT §5).

Apple writes one tag per line, always in the same few shapes (the Record tag is
one line in the file, wrapped here):

    <Record type="HKQuantityTypeIdentifierHeartRate" sourceName="Jane’s Apple Watch" sourceVersion="10.2"
      device="&lt;&lt;HKDevice: 0x283a1c7d0&gt;, name:Apple Watch, ...&gt;" unit="count/min"
      creationDate="2024-02-03 08:19:04 -0800" startDate="2024-02-03 08:14:22 -0800"
      endDate="2024-02-03 08:14:22 -0800" value="72">
      <MetadataEntry key="HKMetadataKeyHeartRateMotionContext" value="0"/>
     </Record>

Measured on this kind of file (benchmarks/bench_parse.py --candidates): a
general parser spends its time building objects we throw away, expat with
Python callbacks is slower than ElementTree, and Python's regex engine costs
~10 ns per character, more than the rest of a row. So reading happens in three
tiers that all produce the same node tuples `(tag, attrs, children[, text])`:

1. line shapes: each line is split at `"` (C speed); the tuple of the pieces
   between the values (` <Record type=`, ` sourceName=`, ..., `/>`) is the
   line's "shape", checked once against XML's grammar and then cached, so a
   known line costs one split, one dict lookup and one `dict(zip())`.
2. a compiled-regex tokenizer, exact for any well-formed tag (attributes over
   several lines, multi-line comments, ...), takes over the rest of a chunk
   from the start of the top-level element holding a line tier 1 does not know.
3. lxml (no DTD, no entity resolution, no network) takes over the rest of the
   range for what the tokenizer does not read (CDATA, text content,
   single-quoted attributes) and reports malformed markup.

Rows and record keys are built from nodes only, so the tiers cannot disagree:
the tests run every input through the tiers and through lxml alone and compare.
XML's attribute-value rules (literal tab/CR/LF become spaces, the five
predefined entities, character references) are applied by hand in tiers 1 and 2.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import date
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any

from healthdelta.errors import InputError
from healthdelta.keys import blank_device_pointers, record_key, strip_device_pointer
from healthdelta.parse.report import ParseReport
from healthdelta.parse.xmlrepair import CHUNK_BYTES, find_body_start, iter_text_chunks, repair_text

SOURCE = "healthkit"
ROOT = "HealthData"
HEAD_BYTES = 1 << 20  # read_me looks no further than this past the DTD

Node = tuple  # (tag, attrs: dict[str, str], children: list | tuple[, text])
Row = dict[str, Any]

# A top-level element is held whole until it ends; Apple's largest (a workout with
# its route inline, in old exports) are a few MB. Past this, the file is damaged
# (an end tag missing) and holding on would only exhaust memory.
_MAX_ELEMENT_BYTES = 64 << 20
# Apple's elements nest 3 deep. The row and key builders recurse once per level, and when
# compiled (setup.py) in C, without Python's recursion limit to stop them before the stack
# ends: so deeper markup is refused here, the same on both paths. Far above what orjson can
# encode in a key anyway (255 levels of JSON), well below Python's limit.
_MAX_DEPTH = 400

# --------------------------------------------------------------------------- attribute values

_ENTITY = re.compile(r"&(?:#x([0-9a-fA-F]+)|#([0-9]+)|(lt|gt|amp|quot|apos));")
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


def _entity(m: re.Match[str]) -> str:
    hexa, dec, name = m.groups()
    if name is not None:
        return _NAMED[name]
    return chr(int(hexa, 16) if hexa is not None else int(dec))


def _attr_value(v: str) -> str:
    """XML attribute-value normalisation (no DTD: every attribute is CDATA):
    literal tab/CR/LF become spaces (CRLF first becomes one LF), then references
    are replaced; a character reference's result is not normalised again."""
    if "\r" in v:
        v = v.replace("\r\n", "\n").replace("\r", "\n")
    if "\n" in v or "\t" in v:
        v = v.replace("\n", " ").replace("\t", " ")
    if "&" in v:
        if "&#" in v:
            v = _ENTITY.sub(_entity, v)
        else:  # named entities only (device strings): `&amp;` last, so `&amp;lt;` stays `&lt;`
            v = v.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&apos;", "'")
            v = v.replace("&amp;", "&")
    return v


def _decode_attrs(attrs: dict[str, str]) -> dict[str, str]:
    return {k: _attr_value(v) if "&" in v or "\t" in v or "\r" in v or "\n" in v else v for k, v in attrs.items()}


_device_value = lru_cache(maxsize=1 << 12)(_attr_value)


# --------------------------------------------------------------------------- cursor


class RangeSplitError(InputError):
    """A byte range ended inside an element: the cut before it was not between
    top-level elements (only a hand-edited file can fool the cut rule)."""


class _Cursor:
    """Where the parse of one byte range stands; read by error messages."""

    __slots__ = ("in_root", "root_closed", "elements", "byte_pos", "size", "final", "start", "end")

    def __init__(self, *, in_root: bool, size: int, start: int, end: int) -> None:
        self.in_root = in_root  # inside <HealthData> (its start tag consumed)
        self.root_closed = False
        self.elements = 0  # top-level elements completed
        self.byte_pos = start
        self.size = size
        self.start = start
        self.end = end
        self.final = end >= size  # this range holds the end of the file

    def where(self) -> str:
        pct = int(100 * self.byte_pos / self.size) if self.size else 0
        return f"stopped after {self.elements} elements at {pct}% of the file"

    def truncated(self) -> InputError:
        return InputError(f"export.xml is truncated: {self.where()}")

    def malformed(self) -> InputError:
        return InputError(f"export.xml is not well-formed XML: {self.where()}")

    def unclosed(self) -> InputError:
        return InputError(f"export.xml is not well-formed XML: an element does not end within "
                          f"{_MAX_ELEMENT_BYTES >> 20} MB, {self.where()}")

    @staticmethod
    def bad_split() -> InputError:
        return RangeSplitError("export.xml byte range does not end at a top-level element boundary")

    @staticmethod
    def too_deep() -> InputError:
        return InputError("export.xml is nested too deeply to be an Apple Health export")


# --------------------------------------------------------------------------- tier 1: line shapes

_BLANK, _SKIP, _EMPTY, _OPEN, _CLOSE = 0, 1, 2, 3, 4  # _SKIP: a comment or processing instruction
_WS = " \t\r\n"  # XML's whitespace; `\s` would also accept U+00A0 and friends
_NAME = r"[A-Za-z_][\w.:-]*"
_SHAPE_FIRST = re.compile(rf"[ \t\r]*<({_NAME})[ \t\r]+({_NAME})[ \t\r]*=[ \t\r]*\Z").match
_SHAPE_NEXT = re.compile(rf"[ \t\r]+({_NAME})[ \t\r]*=[ \t\r]*\Z").match
_SHAPE_LAST = re.compile(r"[ \t\r]*(/?)>[ \t\r]*\Z").match
_SHAPE_BARE = re.compile(rf"[ \t\r]*<(/?)({_NAME})[ \t\r]*(/?)>[ \t\r]*\Z").match
_SHAPE_CACHE_MAX = 1 << 13
# Record attributes with a typed field; any other one goes to `extra`.
_RECORD_TYPED = frozenset(
    {"type", "sourceName", "sourceVersion", "device", "creationDate", "startDate", "endDate", "unit", "value"}
)

Shape = tuple  # (kind, tag, attribute names, Record attribute names without a typed field)


def _line_shape(markup: tuple[str, ...]) -> Shape | None:
    """Kind, tag and attribute names of a line holding exactly one tag, from the
    pieces between its `"`-delimited values; None for anything else."""
    if len(markup) == 1:
        only = markup[0]
        bare = only.strip(_WS)
        if not bare:
            return (_BLANK, None, (), ())
        if bare.startswith("<!--") and bare.endswith("-->") and len(bare) >= 7 and "--" not in bare[4:-3]:
            return (_SKIP, None, (), ())
        if bare.startswith("<?") and bare.endswith("?>") and len(bare) >= 5 and not bare[2:5].lower() == "xml":
            return (_SKIP, None, (), ())
        m = _SHAPE_BARE(only)
        if m is None or (m.group(1) and m.group(3)):
            return None
        kind = _CLOSE if m.group(1) else _EMPTY if m.group(3) else _OPEN
        return (kind, m.group(2), (), ())
    m = _SHAPE_FIRST(markup[0])
    if m is None:
        return None
    tag, first = m.groups()
    names = [first]
    for piece in markup[1:-1]:
        m = _SHAPE_NEXT(piece)
        if m is None:
            return None
        names.append(m.group(1))
    last = _SHAPE_LAST(markup[-1])
    if last is None or len(set(names)) != len(names):
        return None
    extra = tuple(n for n in names if n not in _RECORD_TYPED) if tag == "Record" else ()
    return (_EMPTY if last.group(1) else _OPEN, tag, tuple(names), extra)


# --------------------------------------------------------------------------- tier 2: regex tokenizer

# One tag with the whitespace before it. Groups: end-tag slash, name, attribute
# list, empty-element slash. Comments and processing instructions match with
# all groups None. Attribute values exclude `<` (XML forbids it there), so a
# broken tag never swallows the next one.
_TOKEN = re.compile(
    r"[ \t\r\n]*<(?:"
    rf'(/?)({_NAME})((?:[ \t\r\n]+{_NAME}[ \t\r\n]*=[ \t\r\n]*"[^"<]*")*)[ \t\r\n]*(/?)>'
    r"|!--(?s:.*?)-->"
    r"|\?(?s:.*?)\?>"
    r")"
)
_ATTR = re.compile(rf'({_NAME})[ \t\r\n]*=[ \t\r\n]*"([^"]*)"')

# What the regex tier tells the chunk driver when it stops.
_NEXT, _SLOW, _STOP = 0, 1, 2


def _regex_chunk(buf: str, pos: int, cur: _Cursor, report: ParseReport, is_last: bool) -> Iterator[Node]:
    """Top-level nodes of `buf[pos:]`; returns (action, position) for the driver:
    _NEXT with the text to carry into the next chunk, _SLOW with where lxml must
    take over, _STOP when the range is done."""
    findall = _ATTR.findall
    tab_cr = "\t" in buf or "\r" in buf
    in_root = cur.in_root
    stack: list[Node] = []
    last = top = None
    bad_at = -1
    for m in iter(_TOKEN.scanner(buf, pos).match, None):
        last = m
        close, tag, attrs, empty = m.groups()
        if tag is None:  # comment or processing instruction
            continue
        if close:
            if stack and stack[-1][0] == tag and not attrs and not empty:
                node = stack.pop()
                if not stack:
                    top = m
                    cur.elements += 1
                    yield node
                continue
            if not stack and in_root and tag == ROOT and not attrs and not empty:
                top = m
                in_root = cur.in_root = False
                cur.root_closed = True
                continue
            bad_at = m.start()
            break
        if attrs:
            pairs = findall(attrs)
            a = dict(pairs)
            if len(a) != len(pairs):  # a repeated attribute: lxml reports it
                bad_at = m.start()
                break
            if "&" in attrs or "\n" in attrs or (tab_cr and ("\t" in attrs or "\r" in attrs)):
                a = _decode_attrs(a)
        else:
            a = {}
        if stack:
            if empty:
                stack[-1][2].append((tag, a, ()))
            else:
                node = (tag, a, [])
                stack[-1][2].append(node)
                stack.append(node)
                if len(stack) > _MAX_DEPTH:
                    raise cur.too_deep()
        elif in_root:
            if empty:
                top = m
                cur.elements += 1
                yield (tag, a, ())
            else:
                stack.append((tag, a, []))
        elif tag == ROOT and not cur.root_closed:
            top = m
            if empty:  # <HealthData/>: an export without a single element
                cur.root_closed = True
            else:
                in_root = cur.in_root = True
        else:
            bad_at = m.start()
            break
    bad = bad_at >= 0
    stop = bad_at if bad else last.end() if last is not None else pos
    resume = (top.end() if top is not None else pos) if stack else stop
    if bad or not (stop == len(buf) or buf[stop:].strip(_WS) == ""):
        if cur.root_closed and not stack:
            # Content after </HealthData>: ignored, counted, not read further.
            report.repairs["trailing_content_ignored"] += 1
            return _STOP, stop
        if not bad and not is_last and buf.find(">", stop) == -1:
            return _NEXT, resume  # a tag cut by the chunk boundary
        return _SLOW, resume
    if is_last:
        if cur.final:
            if stack or not cur.root_closed:
                raise cur.truncated()
        elif stack:
            raise cur.bad_split()
        return _STOP, stop
    return _NEXT, resume if stack else len(buf)


# --------------------------------------------------------------------------- tier 3: lxml

# libxml2's errors that a file cut short (or padded with zeros after a crash) gives; any
# other error in the last piece, such as an attribute given twice, is malformed XML.
_CUT_OFF = ("ERR_DOCUMENT_END", "ERR_INVALID_CHAR", "ERR_GT_REQUIRED", "ERR_LTSLASH_REQUIRED",
            "ERR_TAG_NOT_FINISHED", "ERR_ATTRIBUTE_NOT_FINISHED", "ERR_LITERAL_NOT_FINISHED")

_LXML_SLICE = 1 << 14


def _lxml_node(el: Any) -> Node:
    children = []
    texts = [el.text] if el.text else []
    for c in el:
        if isinstance(c.tag, str):
            children.append(_lxml_node(c))
        if c.tail:
            texts.append(c.tail)
    text = "".join(texts).strip(_WS)
    node = (el.tag, dict(el.attrib), children if children else ())
    return node + (text,) if text else node


def _slow_nodes(texts: Iterable[str], cur: _Cursor, report: ParseReport, byte_pos: int) -> Iterator[Node]:
    """The same nodes as the tokenizers, read by lxml: never loads a DTD, never
    resolves an entity, never touches the network."""
    from lxml import etree

    parser = etree.XMLPullParser(
        events=("start", "end"),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=True,
        remove_comments=True,
        remove_pis=True,
    )
    depth = 0
    if cur.in_root:  # the real start tag was read before the switch
        parser.feed(f"<{ROOT}>".encode())

    def drain() -> Iterator[Node]:
        nonlocal depth
        for event, el in parser.read_events():
            if event == "start":
                depth += 1
                if depth > _MAX_DEPTH + 1:  # + <HealthData>
                    raise cur.too_deep()
                if depth == 1:
                    if el.tag != ROOT:
                        raise InputError("export.xml is not an Apple Health export: unexpected root element")
                    cur.in_root = True
                continue
            depth -= 1
            if depth == 1:
                node = _lxml_node(el)
                el.clear(keep_tail=True)
                parent = el.getparent()
                if parent.text and parent.text.strip(_WS):
                    report.repairs["stray_text_ignored"] += 1
                    parent.text = None
                while el.getprevious() is not None:
                    prev = el.getprevious()
                    if prev.tail and prev.tail.strip(_WS):
                        report.repairs["stray_text_ignored"] += 1
                    del parent[0]
                cur.elements += 1
                yield node
            elif depth == 0:
                cur.in_root = False
                cur.root_closed = True

    last_text = ""
    texts = iter(texts)
    failed: int | None = None  # libxml2's error code
    for text in texts:
        data = text.encode("utf-8")
        if text.strip(_WS):
            last_text = text
        # Small slices: errors then point close to where the file went wrong.
        for i in range(0, len(data), _LXML_SLICE):
            try:
                parser.feed(data[i:i + _LXML_SLICE])
            except etree.XMLSyntaxError as exc:
                failed = exc.code
            before = cur.elements
            yield from drain()  # events before an error are still delivered
            if cur.elements != before:
                cur.byte_pos = byte_pos + min(i + _LXML_SLICE, len(data))
            if failed is not None:
                break
        if failed is not None:
            break
        byte_pos += len(data)
    if failed is not None:
        if cur.root_closed:
            report.repairs["trailing_content_ignored"] += 1
            return
        if cur.final and next(texts, None) is None and failed in {getattr(etree.ErrorTypes, n) for n in _CUT_OFF}:
            raise cur.truncated()  # the data stops (or turns to zeros) in the last piece: a cut-off file
        raise cur.malformed()
    if cur.final:
        if not cur.root_closed:
            raise cur.truncated()
    elif depth != 1 or (last_text and not last_text.rstrip(_WS).endswith(">")):
        raise cur.bad_split()


# --------------------------------------------------------------------------- chunk driver


def _line_pos(text: str, n: int) -> int:
    """Index in `text` where its line `n` (0-based) starts."""
    if n == 0:
        return 0
    rest = text.split("\n", n)
    return len(text) - len(rest[-1]) if len(rest) > n else len(text)


def _iter_rows(
    chunks: Iterator[tuple[str, int, bool]], cur: _Cursor, b: _RowBuilder, report: ParseReport, force_slow: bool
) -> Iterator[tuple[str, Row]]:
    """(stream, row) for every top-level element of the range, in file order."""
    shapes: dict[tuple[str, ...], Shape] = {}
    shapes_get = shapes.get
    record_row = b.record_row
    rows = b.rows
    count_children = b.count_children
    counts = report.elements
    n_records = 0
    carry = ""
    carry_bytes = 0
    chunk_start = cur.start
    try:
        for text, end_byte, is_last in chunks:
            buf = carry + text if carry else text
            buf_byte = chunk_start - carry_bytes
            chunk_start = end_byte
            if force_slow:
                for node in _slow_nodes(chain([buf], (t for t, _, _ in chunks)), cur, report, buf_byte):
                    yield from rows(node)
                return

            # Tier 1 over the whole chunk.
            amp = "&" in buf
            tab_cr = "\t" in buf or "\r" in buf
            special = amp or tab_cr
            lines = buf.split("\n")
            stack: list[Node] = []
            in_root = cur.in_root
            top_i = 0  # first line of the current top-level element
            n_tags = 0
            n_top = cur.elements
            unusual = -1
            for i, line in enumerate(lines):
                parts = line.split('"')
                markup = tuple(parts[0::2])
                shape = shapes_get(markup)
                if shape is None:
                    shape = _line_shape(markup)
                    if shape is None:
                        unusual = i
                        break
                    if len(shapes) < _SHAPE_CACHE_MAX:
                        shapes[markup] = shape
                kind, tag, names, extra = shape
                if kind < _EMPTY:
                    if kind == _SKIP:
                        n_tags += line.count("<")
                    continue
                n_tags += 1
                if kind == _CLOSE:
                    if stack:
                        if stack[-1][0] != tag:
                            unusual = i
                            break
                        node = stack.pop()
                        if not stack:
                            top_i = i + 1
                            n_top += 1
                            if tag == "Record":  # with metadata: a third of all Records
                                n_records += 1
                                count_children("Record", node[2])
                                yield "observations", record_row(node[1], node[2], False)
                            else:
                                yield from rows(node)
                        continue
                    if in_root and tag == ROOT:
                        top_i = i + 1
                        in_root = cur.in_root = False
                        cur.root_closed = True
                        continue
                    unusual = i
                    break
                if names:
                    a = dict(zip(names, parts[1::2]))
                    if special:
                        n_amp = line.count("&") if amp else 0
                        if tab_cr and ("\t" in line or "\r" in line):
                            a = _decode_attrs(a)
                        elif n_amp:
                            # Almost always the `&lt;...&gt;` of a device string, which
                            # repeats all through the file: decoded once, cached.
                            device = a.get("device")
                            if device is not None and device.count("&") == n_amp:
                                a["device"] = _device_value(device)
                            else:
                                a = _decode_attrs(a)
                else:
                    a = {}
                if stack:
                    if kind == _EMPTY:
                        stack[-1][2].append((tag, a, ()))
                    else:
                        node = (tag, a, [])
                        stack[-1][2].append(node)
                        stack.append(node)
                        if len(stack) > _MAX_DEPTH:
                            raise cur.too_deep()
                elif in_root:
                    if kind == _OPEN:
                        stack.append((tag, a, []))
                    elif tag == "Record":
                        top_i = i + 1
                        n_top += 1
                        n_records += 1
                        yield "observations", record_row(a, (), False, extra)
                    else:
                        top_i = i + 1
                        n_top += 1
                        yield from rows((tag, a, ()))
                elif tag == ROOT and not cur.root_closed:
                    top_i = i + 1
                    if kind == _EMPTY:
                        cur.root_closed = True
                    else:
                        in_root = cur.in_root = True
                else:
                    unusual = i
                    break
            cur.elements = n_top
            n_lines = len(lines)
            del lines
            # Every `<` of the lines read in tier 1 must open its line's one tag: one
            # anywhere else sits in an attribute value, which XML forbids.
            if buf.count("<", 0, _line_pos(buf, unusual) if unusual >= 0 else len(buf)) != n_tags:
                cur.byte_pos = buf_byte
                raise cur.malformed()
            top_pos = _line_pos(buf, top_i) if top_i < n_lines else len(buf)
            if unusual < 0:
                if is_last:
                    cur.byte_pos = end_byte
                    if cur.final:
                        if stack or not cur.root_closed:
                            cur.byte_pos = buf_byte + len(buf[:top_pos].encode("utf-8"))
                            raise cur.truncated()
                    elif stack:
                        raise cur.bad_split()
                    return
                carry = buf[top_pos:] if stack else ""
                carry_bytes = len(carry.encode("utf-8")) if carry else 0
                cur.byte_pos = end_byte - carry_bytes
                if carry_bytes > _MAX_ELEMENT_BYTES:
                    raise cur.unclosed()
                continue

            # Tier 2 from the start of the element holding the unusual line.
            gen = _regex_chunk(buf, top_pos, cur, report, is_last)
            while True:
                try:
                    node = next(gen)
                except StopIteration as done:
                    action, pos = done.value
                    break
                yield from rows(node)
            if action == _STOP:
                return
            if action == _NEXT:
                carry = buf[pos:]
                carry_bytes = len(carry.encode("utf-8")) if carry else 0
                cur.byte_pos = end_byte - carry_bytes
                if carry_bytes > _MAX_ELEMENT_BYTES:
                    raise cur.unclosed()
                continue
            # Tier 3 for the rest of the range.
            cur.byte_pos = buf_byte + len(buf[:pos].encode("utf-8"))
            report.repairs["lxml_fallback"] += 1
            rest = chain([buf[pos:]], (t for t, _, _ in chunks))
            for node in _slow_nodes(rest, cur, report, cur.byte_pos):
                yield from rows(node)
            return
    finally:
        if n_records:
            counts["Record"] += n_records


# --------------------------------------------------------------------------- dates and numbers

_ISO_DATE = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[T ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(\.[0-9]+)?)?"
    r"[ ]?(Z|[+-][0-9]{2}:?[0-9]{2})?\Z"
).match
_NO_DATE: tuple[None, None] = (None, None)
_MMSS = frozenset(f":{m:02d}:{s:02d}" for m in range(60) for s in range(60))
_DATE_CACHE_MAX = 1 << 14  # (day, hour, offset) triples: a few per day of data


@lru_cache(maxsize=256)
def _offset(off: str) -> tuple[int, str] | None:
    """'-0800' / '-08:00' / 'Z' -> (seconds east of UTC, '-08:00')."""
    if off == "Z":
        return 0, "Z"
    digits = off[1:].replace(":", "")
    h, m = int(digits[:2]), int(digits[2:])
    if h > 23 or m > 59:
        return None
    secs = h * 3600 + m * 60
    return (-secs if off[0] == "-" else secs), f"{off[0]}{digits[:2]}:{digits[2:]}"


@lru_cache(maxsize=1 << 14)
def _ordinal(day: str) -> int | None:
    """Proleptic ordinal of 'YYYY-MM-DD', None if no such day."""
    if len(day) != 10 or day[4] != "-" or day[7] != "-":
        return None
    try:
        return date(int(day[:4]), int(day[5:7]), int(day[8:10])).toordinal()
    except ValueError:
        return None


@lru_cache(maxsize=1 << 12)
def _day(ordinal: int) -> str:
    return date.fromordinal(ordinal).isoformat()


def _hour_prefix(key: str) -> tuple[str, str, str] | None:
    """'2024-02-03 08 -0800' -> ('2024-02-03T16', '2024-02-03T08', '-08:00').

    Apple's offsets are whole hours but for a handful of zones; minutes and
    seconds then pass through unchanged, so one conversion per hour suffices.
    """
    day, hh, off = key[:10], key[11:13], key[14:]
    if (key[10] != " " or key[13] != " " or len(off) != 5 or off[0] not in "+-" or off[3:] != "00"
            or not (hh + off[1:]).isdigit() or not key.isascii() or int(hh) > 23):
        return None
    ordinal = _ordinal(day)
    parsed = _offset(off)
    if ordinal is None or parsed is None:
        return None
    east, off_txt = parsed
    shift, h = divmod(int(hh) - east // 3600, 24)
    utc_day = day if shift == 0 else _day(ordinal + shift)
    return f"{utc_day}T{h:02d}", f"{day}T{hh}", off_txt


def _convert_date(raw: str) -> tuple[str | None, str | None]:
    m = _ISO_DATE(raw)
    if m is None:
        return None, raw
    day, hh, mi, ss, frac, off = m.groups()
    ss = ss or "00"
    frac = frac or ""
    ordinal = _ordinal(day)
    h, mnt, sec = int(hh), int(mi), int(ss)
    if ordinal is None or h > 23 or mnt > 59 or sec > 59:
        return None, raw
    if off is None:
        return None, f"{day}T{hh}:{mi}:{ss}{frac}"
    parsed = _offset(off)
    if parsed is None:
        return None, raw
    east, off_txt = parsed
    t = h * 3600 + mnt * 60 + sec - east
    shift, t = divmod(t, 86400)
    utc_day = day if shift == 0 else _day(ordinal + shift)
    return f"{utc_day}T{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}{frac}Z", f"{day}T{hh}:{mi}:{ss}{frac}{off_txt}"


_hour_cache: dict[str, tuple[str, str, str] | bool] = {}


def _hour_lookup(key: str) -> tuple[str, str, str] | bool:
    if len(_hour_cache) >= _DATE_CACHE_MAX:
        _hour_cache.clear()
    prefix = _hour_cache[key] = _hour_prefix(key) or False
    return prefix


def convert_date(raw: str) -> tuple[str | None, str | None]:
    """Apple's '2024-02-03 08:14:22 -0800' -> ('2024-02-03T16:14:22Z', '2024-02-03T08:14:22-08:00').

    Other ISO 8601 forms are read too (fractions kept, `T` or space). Without an
    offset the UTC form is None; an unreadable value is kept unchanged as the
    local form (nothing dropped) with a None UTC form. A hot path (three calls
    per Record): Apple's form costs two slices and a cache lookup per hour.
    """
    ms = raw[13:19]
    if ms in _MMSS and len(raw) == 25:
        key = raw[:13] + raw[19:]
        prefix = _hour_cache.get(key)
        if prefix is None:
            prefix = _hour_lookup(key)
        if prefix:
            return f"{prefix[0]}{ms}Z", f"{prefix[1]}{ms}{prefix[2]}"
    return _convert_date(raw)


_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z").match
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what orjson can encode


def to_number(v: str) -> int | float | str:
    """'72' -> 72, '0.5' -> 0.5; anything else (NaN, inf, '1_000', huge ints) stays a string."""
    if len(v) > 40:
        return v  # no 64-bit number is that long; int() of 4,300+ digits would even raise
    if v.isdigit():
        if v.isascii():
            n = int(v)
            return n if n <= _INT_MAX else v
    elif _FLOAT(v):
        if "." in v or "e" in v or "E" in v:
            f = float(v)
            return f if math.isfinite(f) else v
        n = int(v)
        return n if _INT_MIN <= n <= _INT_MAX else v
    return v


def _num(v: str | None) -> int | float | str | None:
    return None if v is None else to_number(v)


_SNAKE_1 = re.compile(r"([A-Z]+)([A-Z][a-z])")
_SNAKE_2 = re.compile(r"([a-z0-9])([A-Z])")


@lru_cache(maxsize=1024)
def snake(name: str) -> str:
    """'leftEarValue' -> 'left_ear_value', 'sourceURL' -> 'source_url'."""
    return _SNAKE_2.sub(r"\1_\2", _SNAKE_1.sub(r"\1_\2", name)).lower()


# --------------------------------------------------------------------------- keys

_strip_device_cached = lru_cache(maxsize=1 << 12)(strip_device_pointer)


def _key_attrs(attrs: dict[str, str]) -> dict[str, str]:
    device = attrs.get("device")
    if device is not None and "0x" in device:
        attrs = {**attrs, "device": _strip_device_cached(device)}
    return attrs


def _key_node(node: Node) -> list[Any]:
    out = [node[0], _key_attrs(node[1]), [_key_node(c) for c in node[2]]]
    if len(node) > 3:
        out.append(node[3])
    return out


def element_key(tag: str, attrs: dict[str, str], children: Iterable[Node], text: str | None = None) -> str:
    """record_key of one element: a function of its full content (all attributes,
    all descendants in document order, device pointers stripped at every level),
    never of its position, its attribute order or the file's whitespace."""
    content: dict[str, Any] = {"attrs": _key_attrs(attrs), "children": [_key_node(c) for c in children]}
    if text is not None:
        content["text"] = text
    return record_key(SOURCE, tag, content)


# --------------------------------------------------------------------------- rows


def _generic(node: Node) -> dict[str, Any]:
    out = {"tag": node[0], "attributes": node[1], "children": [_generic(c) for c in node[2]]}
    if len(node) > 3:
        out["text"] = node[3]
    return out


def _meta_pair(node: Node) -> tuple[str, str] | None:
    """(key, value) of a plain <MetadataEntry key=".." value=".."/>, else None."""
    if node[0] == "MetadataEntry" and len(node) == 3 and not node[2]:
        a = node[1]
        if len(a) == 2 and "key" in a and "value" in a:
            return a["key"], a["value"]
    return None


def _split_metadata(children: Iterable[Node]) -> tuple[dict[str, str], list[Node]]:
    metadata: dict[str, str] = {}
    rest: list[Node] = []
    for c in children:
        pair = _meta_pair(c)
        if pair is not None and pair[0] not in metadata:
            metadata[pair[0]] = pair[1]
        else:
            rest.append(c)
    return metadata, rest


def _extra(attrs: dict[str, str], known: frozenset[str]) -> dict[str, str]:
    names = attrs.keys() - known
    return {k: attrs[k] for k in names} if names else {}


def _dates(row: Row, attrs: dict[str, str], pairs: tuple[tuple[str, str], ...]) -> None:
    for attr, field in pairs:
        raw = attrs.get(attr)
        utc, local = convert_date(raw) if raw is not None else _NO_DATE
        row[field] = utc
        row[field + "_local"] = local


_SAMPLE_DATES = (("creationDate", "creation_date"), ("startDate", "start_date"), ("endDate", "end_date"))
_SAMPLE_KNOWN = frozenset({"type", "sourceName", "sourceVersion", "device", "creationDate", "startDate", "endDate"})
_WORKOUT_KNOWN = (_SAMPLE_KNOWN - {"type"}) | {
    "workoutActivityType", "duration", "durationUnit", "totalDistance", "totalDistanceUnit",
    "totalEnergyBurned", "totalEnergyBurnedUnit",
}
_EVENT_KNOWN = frozenset({"type", "date", "duration", "durationUnit"})
_STAT_KNOWN = frozenset({"type", "startDate", "endDate", "average", "minimum", "maximum", "sum", "unit"})
_ACTIVITY_FIELDS = (
    ("activeEnergyBurned", "active_energy_burned"),
    ("activeEnergyBurnedGoal", "active_energy_burned_goal"),
    ("activeEnergyBurnedUnit", "active_energy_burned_unit"),
    ("appleMoveTime", "apple_move_time"),
    ("appleMoveTimeGoal", "apple_move_time_goal"),
    ("appleExerciseTime", "apple_exercise_time"),
    ("appleExerciseTimeGoal", "apple_exercise_time_goal"),
    ("appleStandHours", "apple_stand_hours"),
    ("appleStandHoursGoal", "apple_stand_hours_goal"),
)
_ACTIVITY_KNOWN = frozenset({"dateComponents"} | {a for a, _ in _ACTIVITY_FIELDS})
_CLINICAL_FIELDS = (
    ("type", "type"), ("identifier", "identifier"), ("sourceName", "source_name"),
    ("sourceURL", "source_url"), ("fhirVersion", "fhir_version"), ("resourceFilePath", "resource_file_path"),
)
_CLINICAL_KNOWN = frozenset({a for a, _ in _CLINICAL_FIELDS} | {"receivedDate"})
_VISION_DATES = (("dateIssued", "date_issued"), ("expirationDate", "expiration_date"))
_VISION_KNOWN = _SAMPLE_KNOWN | {"dateIssued", "expirationDate", "brand"}
_NOT_ROWS = frozenset({"Me", "ExportDate"})  # read_me hands them to the identity stage
# Stream of a known kind kept generically (it had text content where Apple writes none).
_STREAM_OF = {"Record": "observations", "Audiogram": "observations", "Correlation": "correlations",
              "Workout": "workouts", "ActivitySummary": "activity_summaries"}


class _RowBuilder:
    """Turns top-level nodes into (stream, row) pairs; counts what it sees."""

    def __init__(self, report: ParseReport, source_file: str, person: dict | None) -> None:
        self.report = report
        self.counts: Counter[str] = report.elements
        self.source_file = source_file
        self.person_id = (person or {}).get("canonical_person_id")
        self.dispatch = {
            "Record": self.record,
            "Correlation": self.correlation,
            "Workout": self.workout,
            "ActivitySummary": self.activity_summary,
            "ClinicalRecord": self.clinical_record,
            "Audiogram": self.audiogram,
            "VisionPrescription": self.vision_prescription,
        }

    def _base(self, key: str, kind: str, event_time: str | None) -> Row:
        row = {"record_key": key, "source": SOURCE, "source_file": self.source_file,
               "event_time": event_time, "kind": kind}
        if self.person_id is not None:
            row["canonical_person_id"] = self.person_id
        return row

    def count_children(self, parent: str, children: Iterable[Node]) -> None:
        counts = self.counts
        for c in children:
            counts[f"{parent}/{c[0]}"] += 1
            if c[2]:
                self.count_children(c[0], c[2])

    def rows(self, node: Node) -> list[tuple[str, Row]]:
        tag, attrs, children = node[0], node[1], node[2]
        self.counts[tag] += 1
        if children:
            self.count_children(tag, children)
        if tag in _NOT_ROWS:
            return []
        build = self.dispatch.get(tag)
        if build is None or len(node) > 3:  # unknown, or text where Apple never writes any
            return [self.unknown(node)]
        return build(attrs, children)

    # -- Record (the hot path: ~99% of an export's elements)

    def record_row(self, a: dict[str, str], children: Any, nested: bool, extra: tuple[str, ...] | None = None) -> Row:
        """`extra`: names of attributes without a typed field, when the caller knows them."""
        get = a.get
        t = get("type")
        value = get("value")
        if value is not None and t is not None and t.startswith("HKQuantityTypeIdentifier"):
            value = to_number(value)
        raw = get("creationDate")
        c_utc, c_local = convert_date(raw) if raw is not None else _NO_DATE
        raw = get("startDate")
        s_utc, s_local = convert_date(raw) if raw is not None else _NO_DATE
        end = get("endDate")
        if end == raw:
            e_utc, e_local = s_utc, s_local
        else:
            e_utc, e_local = convert_date(end) if end is not None else _NO_DATE
        names = a.keys() - _RECORD_TYPED if extra is None else extra
        device = get("device")
        if children:
            key = element_key("Record", a, children)
        elif device is None or "0x" not in device:
            key = record_key(SOURCE, "Record", {"attrs": a, "children": ()})
        else:  # the key without the pointer; `a` is ours, so no copy (same JSON as _key_attrs gives)
            a["device"] = _strip_device_cached(device)
            key = record_key(SOURCE, "Record", {"attrs": a, "children": ()})
            a["device"] = device
        row = {
            "record_key": key,
            "source": SOURCE,
            "source_file": self.source_file,
            "event_time": s_utc,
            "kind": "Record",
            "type": t,
            "value": value,
            "unit": get("unit"),
            "source_name": get("sourceName"),
            "source_version": get("sourceVersion"),
            "device": device,
            "creation_date": c_utc,
            "creation_date_local": c_local,
            "start_date": s_utc,
            "start_date_local": s_local,
            "end_date": e_utc,
            "end_date_local": e_local,
            "metadata": {},
            "hrv_beats": None,
            "extra": {k: a[k] for k in names} if names else {},
        }
        if children:
            metadata, rest = _split_metadata(children)
            row["metadata"] = metadata
            others = []
            for c in rest:
                beats = self._hrv(c)
                if beats is not None and row["hrv_beats"] is None:
                    row["hrv_beats"] = beats
                else:
                    others.append(_generic(c))
            if others:
                row["children"] = others
        if self.person_id is not None:
            row["canonical_person_id"] = self.person_id
        if nested:
            row["_nested"] = True
        return row

    @staticmethod
    def _hrv(node: Node) -> list[dict[str, Any]] | None:
        if node[0] != "HeartRateVariabilityMetadataList" or node[1] or len(node) > 3:
            return None
        beats = []
        for c in node[2]:
            a = c[1]
            if c[0] != "InstantaneousBeatsPerMinute" or c[2] or len(c) > 3 or a.keys() != {"bpm", "time"}:
                return None
            beats.append({"bpm": to_number(a["bpm"]), "time": a["time"]})
        return beats

    def record(self, a: dict[str, str], children: Any) -> list[tuple[str, Row]]:
        return [("observations", self.record_row(a, children, False))]

    # -- other HealthKit kinds

    def _sample(self, kind: str, a: dict[str, str], children: Any, known: frozenset[str]) -> tuple[Row, list[Node]]:
        """Common fields of a sample-like element; returns the row and the
        children not consumed as metadata."""
        row = self._base(element_key(kind, a, children), kind, None)
        if "type" in known:
            row["type"] = a.get("type")
        row["source_name"] = a.get("sourceName")
        row["source_version"] = a.get("sourceVersion")
        row["device"] = a.get("device")
        _dates(row, a, _SAMPLE_DATES)
        row["event_time"] = row["start_date"]
        metadata, rest = _split_metadata(children)
        row["metadata"] = metadata
        row["extra"] = _extra(a, known)
        return row, rest

    def correlation(self, a: dict[str, str], children: Any) -> list[tuple[str, Row]]:
        row, rest = self._sample("Correlation", a, children, _SAMPLE_KNOWN)
        members: list[str] = []
        nested: list[tuple[str, Row]] = []
        others = []
        for c in rest:
            if c[0] == "Record" and len(c) == 3:
                member = self.record_row(c[1], c[2], True)
                members.append(member["record_key"])
                nested.append(("observations", member))
            else:
                others.append(_generic(c))
        row["member_keys"] = members
        if others:
            row["children"] = others
        return [("correlations", row), *nested]

    def workout(self, a: dict[str, str], children: Any) -> list[tuple[str, Row]]:
        row, rest = self._sample("Workout", a, children, _WORKOUT_KNOWN)
        row["activity_type"] = a.get("workoutActivityType")
        row["duration"] = _num(a.get("duration"))
        row["duration_unit"] = a.get("durationUnit")
        row["total_distance"] = _num(a.get("totalDistance"))
        row["total_distance_unit"] = a.get("totalDistanceUnit")
        row["total_energy_burned"] = _num(a.get("totalEnergyBurned"))
        row["total_energy_burned_unit"] = a.get("totalEnergyBurnedUnit")
        events, statistics, others = [], [], []
        route = None
        for c in rest:
            tag, ca = c[0], c[1]
            if len(c) > 3:
                others.append(_generic(c))
            elif tag == "WorkoutEvent":
                events.append(self._workout_event(ca, c[2]))
            elif tag == "WorkoutStatistics" and not c[2]:
                statistics.append(self._workout_statistics(ca))
            elif tag == "WorkoutRoute" and route is None:
                route = self._workout_route(ca, c[2])
            else:
                others.append(_generic(c))
        row["events"] = events
        row["statistics"] = statistics
        row["route"] = route
        if others:
            row["children"] = others
        return [("workouts", row)]

    @staticmethod
    def _workout_event(a: dict[str, str], children: Any) -> dict[str, Any]:
        utc, local = convert_date(a["date"]) if "date" in a else _NO_DATE
        event = {"type": a.get("type"), "date": utc, "date_local": local,
                 "duration": _num(a.get("duration")), "duration_unit": a.get("durationUnit")}
        extra = _extra(a, _EVENT_KNOWN)
        if extra:
            event["extra"] = extra
        if children:
            metadata, rest = _split_metadata(children)
            if metadata:
                event["metadata"] = metadata
            if rest:
                event["children"] = [_generic(c) for c in rest]
        return event

    @staticmethod
    def _workout_statistics(a: dict[str, str]) -> dict[str, Any]:
        stat: dict[str, Any] = {"type": a.get("type")}
        _dates(stat, a, (("startDate", "start_date"), ("endDate", "end_date")))
        for name in ("average", "minimum", "maximum", "sum"):
            stat[name] = _num(a.get(name))
        stat["unit"] = a.get("unit")
        extra = _extra(a, _STAT_KNOWN)
        if extra:
            stat["extra"] = extra
        return stat

    @staticmethod
    def _workout_route(a: dict[str, str], children: Any) -> dict[str, Any]:
        route: dict[str, Any] = {"source_name": a.get("sourceName"), "source_version": a.get("sourceVersion"),
                                 "device": a.get("device")}
        _dates(route, a, _SAMPLE_DATES)
        metadata, rest = _split_metadata(children)
        route["metadata"] = metadata
        route["file_path"] = None
        others = []
        for c in rest:
            if c[0] == "FileReference" and route["file_path"] is None and c[1].keys() == {"path"} and not c[2]:
                route["file_path"] = c[1]["path"]
            else:
                others.append(_generic(c))
        route["extra"] = _extra(a, _SAMPLE_KNOWN)
        if others:
            route["children"] = others
        return route

    def activity_summary(self, a: dict[str, str], children: Any) -> list[tuple[str, Row]]:
        day = a.get("dateComponents")
        event_time = None
        if day is not None and len(day) == 10 and _ordinal(day) is not None and day[4] == day[7] == "-":
            event_time = f"{day}T00:00:00Z"
        row = self._base(element_key("ActivitySummary", a, children), "ActivitySummary", event_time)
        row["date_components"] = day
        for attr, field in _ACTIVITY_FIELDS:
            v = a.get(attr)
            row[field] = v if v is None or attr.endswith("Unit") else to_number(v)
        row["extra"] = _extra(a, _ACTIVITY_KNOWN)
        if children:
            row["children"] = [_generic(c) for c in children]
        return [("activity_summaries", row)]

    def clinical_record(self, a: dict[str, str], children: Any) -> list[tuple[str, Row]]:
        raw = a.get("receivedDate")
        utc, local = convert_date(raw) if raw is not None else _NO_DATE
        row = self._base(element_key("ClinicalRecord", a, children), "ClinicalRecord", utc)
        for attr, field in _CLINICAL_FIELDS:
            row[field] = a.get(attr)
        row["received_date"] = utc
        row["received_date_local"] = local
        row["extra"] = _extra(a, _CLINICAL_KNOWN)
        if children:
            row["children"] = [_generic(c) for c in children]
        return [("clinical", row)]

    def audiogram(self, a: dict[str, str], children: Any) -> list[tuple[str, Row]]:
        row, rest = self._sample("Audiogram", a, children, _SAMPLE_KNOWN)
        points, others = [], []
        for c in rest:
            if c[0] == "SensitivityPoint" and not c[2] and len(c) == 3:
                points.append({snake(k): (v if k.endswith("Unit") else to_number(v)) for k, v in c[1].items()})
            else:
                others.append(_generic(c))
        row["points"] = points
        if others:
            row["children"] = others
        return [("observations", row)]

    def vision_prescription(self, a: dict[str, str], children: Any) -> list[tuple[str, Row]]:
        row, rest = self._sample("VisionPrescription", a, children, _VISION_KNOWN)
        _dates(row, a, _VISION_DATES)
        row["event_time"] = row["date_issued"] or row["start_date"]
        row["brand"] = a.get("brand")
        row["right_eye"] = row["left_eye"] = None
        attachments, others = [], []
        for c in rest:
            slot = {"RightEye": "right_eye", "LeftEye": "left_eye"}.get(c[0])
            if slot and row[slot] is None and not c[2] and len(c) == 3:
                row[slot] = c[1]
            elif c[0] == "Attachment" and not c[2] and len(c) == 3:
                attachments.append(c[1])
            else:
                others.append(_generic(c))
        row["attachments"] = attachments
        if others:
            row["children"] = others
        return [("clinical", row)]

    def unknown(self, node: Node) -> tuple[str, Row]:
        """An element no typed parser knows (or a known one with text content):
        kept whole, counted."""
        tag, a, children = node[0], node[1], node[2]
        self.report.unknown[tag] += 1
        key = element_key(tag, a, children, node[3] if len(node) > 3 else None)
        event_time = None
        for attr in ("startDate", "date", "creationDate"):
            if attr in a:
                event_time = convert_date(a[attr])[0]
                break
        row = self._base(key, tag, event_time)
        row["extra"] = dict(a)
        row["children"] = [_generic(c) for c in children]
        if len(node) > 3:
            row["text"] = node[3]
        return (_STREAM_OF.get(tag, "clinical"), row)


# --------------------------------------------------------------------------- public API


def iter_healthkit(
    path: Path,
    report: ParseReport,
    *,
    source_file: str = "export.xml",
    byte_range: tuple[int, int] | None = None,
    person: dict | None = None,
) -> Iterator[tuple[str, Row]]:
    """Yield (stream, row) for every element of `export.xml`, in file order.

    Streams with flat memory: the file is read in 4 MiB chunks and nothing but
    the current chunk (and a top-level element crossing its end) is held.
    `byte_range` (from `plan_chunks`) restricts the parse to one slice of the
    body; the slices' rows concatenated are the whole file's rows. `person`, when it holds `canonical_person_id`,
    stamps it on every row. A file that ends early raises InputError (rows
    already yielded belong to a failed run and must be discarded).
    """
    return _iter_healthkit(path, report, source_file=source_file, byte_range=byte_range, person=person)


def _iter_healthkit(
    path: Path,
    report: ParseReport,
    *,
    source_file: str = "export.xml",
    byte_range: tuple[int, int] | None = None,
    person: dict | None = None,
    force_slow: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[tuple[str, Row]]:
    path = Path(path)
    with open(path, "rb") as f:
        size = _size(f)
        body = find_body_start(f, size)
        start, end = (body, size) if byte_range is None else byte_range
        if not (0 <= start <= end <= size):
            raise InputError("export.xml byte range is outside the file")
        start = max(start, body)
        cur = _Cursor(in_root=start > body, size=size, start=start, end=end)
        builder = _RowBuilder(report, source_file, person)
        chunks = iter_text_chunks(f, start, end, report.repairs, chunk_bytes, transform=blank_device_pointers)
        yield from _iter_rows(chunks, cur, builder, report, force_slow)


def _size(f: Any) -> int:
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    return size


def read_me(path: Path) -> dict:
    """The owner's characteristics from the head of `export.xml`: the <Me>
    attributes under their own names, `ExportDate` (raw) and `locale`. Holds PII:
    for the local identity stage only. Reads at most the first MiB past the DTD."""
    out: dict[str, str] = {}
    with open(Path(path), "rb") as f:
        size = _size(f)
        body = find_body_start(f, size)
        f.seek(body)
        text = repair_text(f.read(HEAD_BYTES), Counter())
    findall = _ATTR.findall
    for m in iter(_TOKEN.scanner(text).match, None):
        close, tag, attrs, _empty = m.groups()
        if tag is None or close:
            continue
        a = _decode_attrs(dict(findall(attrs)))
        if tag == ROOT:
            if "locale" in a:
                out["locale"] = a["locale"]
        elif tag == "ExportDate":
            if "value" in a:
                out["ExportDate"] = a["value"]
        elif tag == "Me":
            out.update((k, v) for k, v in a.items() if k not in ("locale", "ExportDate"))
        else:
            break
    return out


# --------------------------------------------------------------------------- cuts

# Apple indents top-level elements by exactly one space, their children by more.
_TOP_LINE = re.compile(rb"\n <([A-Za-z_][\w.:-]*)[ \t\r\n/>]")
_LINE_TAG = re.compile(rb" </?([A-Za-z_][\w.:-]*)")
_TOP_TAGS = frozenset({b"Record", b"Correlation", b"Workout", b"ActivitySummary", b"ClinicalRecord",
                       b"Audiogram", b"VisionPrescription", b"Me", b"ExportDate"})
_SPLIT_SCAN_BYTES = 1 << 20
_SPLIT_SCAN_LIMIT = 64 << 20


def _valid_cuts(window: bytes, search: int) -> Iterator[int]:
    """Offsets in `window`, from `search` on, where export.xml may be cut: the start of
    a line ` <Tag` (Apple indents top-level elements by one space, their children by
    more) whose previous line ends a top-level element (` <X .../>` or ` </X>`), both
    tags being ones Apple writes at the top level. A cut that were wrong anyway (a
    hand-edited file) cannot go unnoticed: the parse of a byte range checks that it
    ends at depth zero and raises RangeSplitError otherwise."""
    while True:
        m = _TOP_LINE.search(window, search)
        if m is None:
            return
        i = m.start()
        search = i + 1
        prev_nl = window.rfind(b"\n", 0, i)
        if prev_nl < 0 or m.group(1) not in _TOP_TAGS:
            continue
        prev = window[prev_nl + 1:i].rstrip(b"\r")
        tag = _LINE_TAG.match(prev)
        if tag is None or tag.group(1) not in _TOP_TAGS:
            continue
        if prev.startswith(b" </") and prev.endswith(b">") or prev.endswith(b"/>") and prev[2:3] != b"/":
            yield i + 1


def _read_at(f: Any, start: int, n: int) -> tuple[int, bytes]:
    start = max(start, 0)
    f.seek(start)
    return start, f.read(n)


def _find_cut(f: Any, target: int, size: int) -> int | None:
    pos = target
    while pos < size and pos - target < _SPLIT_SCAN_LIMIT:
        offset, window = _read_at(f, pos - 4096, 4096 + _SPLIT_SCAN_BYTES)
        cut = next(_valid_cuts(window, pos - offset), None)
        if cut is not None:
            return offset + cut
        pos += _SPLIT_SCAN_BYTES
    return None


# --------------------------------------------------------------------------- chunks

# Content-defined chunks (export.py reuses a chunk's rows from the previous export when
# its bytes, device pointers blanked, are unchanged). Apple writes Records grouped by
# type and a re-export adds new samples at the end of each group, so a chunk starts
# wherever a group starts; within a group, the cut after about CHUNK_TARGET bytes is the
# top-level line with the lowest hash in the next CHUNK_WINDOW bytes, so an edit moves
# only the cuts near it and the ones after it fall where they fell before.
CHUNK_TARGET = 1 << 20
CHUNK_WINDOW = 64 << 10
_LINE_SLACK = 64 << 10  # read past a window so that its last candidate line is whole
_BISECT_STOP = 8 << 10
_SECTION = re.compile(rb' <([A-Za-z_][\w.:-]*)(?:[^\n>]*? type="([^"]*)")?')


def plan_chunks(path: Path, target: int = CHUNK_TARGET, window: int = CHUNK_WINDOW) -> list[tuple[int, int]]:
    """Content-defined chunks [start, end) covering the body of `export.xml` exactly,
    cut only between top-level elements (`_valid_cuts`)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = _size(f)
        body = find_body_start(f, size)
        cuts = [body]
        while size - cuts[-1] > target + window:
            cut = _next_chunk_cut(f, cuts[-1], target, window, size)
            if cut is None or cut <= cuts[-1] or cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    return list(zip(cuts, cuts[1:]))


def _section_at(f: Any, pos: int) -> tuple[int, bytes] | None:
    """(offset, group) of the first top-level element starting at or after `pos`; the
    group is the tag and the `type` attribute (Records are grouped by type)."""
    for span in (_LINE_SLACK, _SPLIT_SCAN_BYTES):  # elements are short: look near first
        offset, window = _read_at(f, pos - 4096, 4096 + span)
        cut = next(_valid_cuts(window, pos - offset), None)
        if cut is not None and window.find(b"\n", cut) >= 0:
            return offset + cut, _group(window, cut)
    return None


def _group(window: bytes, at: int) -> bytes:
    m = _SECTION.match(window, at)
    return b"" if m is None else m.group(1) + b"\0" + (m.group(2) or b"")


def _next_chunk_cut(f: Any, pos: int, target: int, window: int, size: int) -> int | None:
    far = pos + target + window
    here, there = _section_at(f, pos), _section_at(f, far)
    if here is not None and there is not None and there[1] != here[1]:
        change = _group_change(f, here[0], there[0], here[1])
        if change is not None and change > pos:
            return change
    return _winnow(f, pos + target, window) or _find_cut(f, far, size)


def _group_change(f: Any, lo: int, hi: int, group: bytes) -> int | None:
    """The first element in (lo, hi] whose group differs from `group` (the element at
    `lo` is in it, the one at `hi` is not), by bisection over byte positions: groups are
    contiguous in Apple's files (where they are not, a cut is only less useful)."""
    while hi - lo > _BISECT_STOP:
        mid = (lo + hi) // 2
        found = _section_at(f, mid)
        if found is None:
            return None
        if found[1] == group:
            lo = mid
        else:
            hi = mid
    end = _section_at(f, hi)
    if end is None:
        return None
    offset, window = _read_at(f, lo - 4096, end[0] - lo + 4096 + _LINE_SLACK)
    for cut in _valid_cuts(window, lo - offset):
        if offset + cut > end[0]:
            return None
        if _group(window, cut) != group:
            return offset + cut
    return None


def _winnow(f: Any, start: int, window: int) -> int | None:
    """The top-level element starting in [start, start + window) whose first line
    (device pointers blanked) hashes lowest."""
    offset, data = _read_at(f, start - 4096, 4096 + window + _LINE_SLACK)
    best: tuple[int, int] | None = None
    for cut in _valid_cuts(data, start - offset):
        if offset + cut >= start + window:
            break
        end = data.find(b"\n", cut)
        if end < 0:
            break
        score = zlib.crc32(blank_device_pointers(data[cut:end]))
        if best is None or score < best[0]:
            best = (score, offset + cut)
    return None if best is None else best[1]
