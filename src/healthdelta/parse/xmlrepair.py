"""Byte-level handling of Apple's export.xml before any tokenizer sees it.

Two jobs, shared by the fast tokenizer and the lxml fallback in `healthkit.py`
so both read exactly the same text:

* find where the body starts (`<HealthData`), skipping the prolog and the
  internal DTD without parsing it. iOS 16 era exports ship a DTD that is not
  well-formed (an ATTLIST without its closing `>`, ELEMENT declarations with
  invalid syntax), which makes expat, ElementTree and lxml give up before the
  first record. Skipping it also means no entity is ever defined, so neither
  entity expansion ("billion laughs") nor external entities (XXE) can happen.
* read a byte range in chunks cut at a `>` (never inside a multi-byte UTF-8
  character nor inside an entity reference) and repair what real exports
  contain: C0 control characters (U+000B in device names is common), invalid
  UTF-8, bare `&` and character references to characters XML forbids. Every
  repair is counted, none is fatal.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import BinaryIO

from healthdelta.errors import InputError

CHUNK_BYTES = 4 << 20  # ~20 MB of str and line objects at a time
HEAD_STEP = 1 << 20
HEAD_LIMIT = 64 << 20  # a DTD is ~10 KB; past this the file is not an export

# C0 controls XML 1.0 forbids anywhere (tab, LF and CR are allowed). They are
# single bytes in UTF-8 and never part of a multi-byte sequence, so deleting the
# bytes is safe before decoding.
CONTROL_BYTES = bytes(range(0x00, 0x09)) + b"\x0b\x0c" + bytes(range(0x0E, 0x20))

_ROOT_START = re.compile(rb"<HealthData[\s>/]")
# A `&` that does not start one of XML's five predefined entities or a character
# reference. Without the DTD nothing else is defined: keep the text literally.
_BARE_AMP = re.compile(rb"&(?!(?:lt|gt|amp|quot|apos|#[0-9]+|#x[0-9a-fA-F]+);)")
_CHAR_REF = re.compile(rb"&#(?:x([0-9a-fA-F]+)|([0-9]+));")


def _xml_char_ok(cp: int) -> bool:
    return (
        cp in (0x9, 0xA, 0xD)
        or 0x20 <= cp <= 0xD7FF
        or 0xE000 <= cp <= 0xFFFD
        or 0x10000 <= cp <= 0x10FFFF
    )


def find_body_start(f: BinaryIO, size: int) -> int:
    """Byte offset of the `<HealthData` start tag: everything before it (XML
    declaration, DOCTYPE with its possibly broken internal DTD, comments) is skipped."""
    if size == 0:
        raise InputError("export.xml is empty")
    head = bytearray()
    f.seek(0)
    while True:
        search_from = max(len(head) - 16, 0)
        block = f.read(HEAD_STEP)
        head += block
        while True:
            m = _ROOT_START.search(head, search_from)
            if m is None:
                break
            i = m.start()
            # A `<HealthData` inside a DTD comment is not the root.
            if head.rfind(b"<!--", 0, i) > head.rfind(b"-->", 0, i):
                search_from = i + 1
                continue
            return i
        if not block or len(head) >= min(size, HEAD_LIMIT):
            break
    if len(head) >= size:
        raise InputError(
            "export.xml is truncated or is not an Apple Health export: no <HealthData> element found"
        )
    raise InputError("export.xml is not an Apple Health export: no <HealthData> element near its start")


def repair_text(data: bytes, repairs: Counter[str]) -> str:
    """Decode one chunk to str, removing/replacing what XML 1.0 does not allow.

    Works on bytes as far as possible: every pattern involved is ASCII (or a
    fixed UTF-8 sequence), and byte scans are cheaper than scans of the wide
    strings that one `’` in a device name makes of a whole chunk.
    """
    cleaned = data.translate(None, CONTROL_BYTES)
    if len(cleaned) != len(data):
        repairs["control_char_removed"] += len(data) - len(cleaned)
    if b"&" in cleaned:
        cleaned = _repair_references(cleaned, repairs)
    # U+FFFE / U+FFFF: valid UTF-8, but not XML characters. (Single-byte searches
    # run at memchr speed, multi-byte ones do not: look for the lead byte first.)
    if b"\xef" in cleaned and (b"\xef\xbf\xbe" in cleaned or b"\xef\xbf\xbf" in cleaned):
        n = cleaned.count(b"\xef\xbf\xbe") + cleaned.count(b"\xef\xbf\xbf")
        cleaned = cleaned.replace(b"\xef\xbf\xbe", b"").replace(b"\xef\xbf\xbf", b"")
        repairs["noncharacter_removed"] += n
    try:
        return cleaned.decode("utf-8")
    except UnicodeDecodeError:
        text = cleaned.decode("utf-8", "replace")
        # U+FFFD present as valid UTF-8 in the input is not a repair.
        replaced = text.count("\ufffd") - cleaned.count(b"\xef\xbf\xbd")
        repairs["invalid_utf8_replaced"] += max(replaced, 1)
        return text


def _repair_references(data: bytes, repairs: Counter[str]) -> bytes:
    data, n = _BARE_AMP.subn(b"&amp;", data)
    if n:
        repairs["bare_ampersand_escaped"] += n
    if b"#" in data and b"&#" in data:
        removed = 0

        def check(m: re.Match[bytes]) -> bytes:
            nonlocal removed
            hexa, dec = m.groups()
            try:
                cp = int(hexa, 16) if hexa is not None else int(dec)
            except ValueError:  # pragma: no cover - the regex admits digits only
                cp = -1
            if _xml_char_ok(cp):
                return m.group(0)
            removed += 1
            return b""

        data = _CHAR_REF.sub(check, data)
        if removed:
            repairs["control_char_removed"] += removed
    return data


def iter_text_chunks(
    f: BinaryIO, start: int, end: int, repairs: Counter[str], chunk_bytes: int = CHUNK_BYTES,
    transform: Callable[[bytes], bytes] | None = None,
) -> Iterator[tuple[str, int, bool]]:
    """Repaired text of bytes [start, end) as (text, byte offset after it, is_last).

    Chunks end right after a `>`, which is ASCII (never inside a multi-byte
    character) and never inside an entity reference, so per-chunk decoding and
    repair see whole characters and whole references. `transform` is applied to
    each chunk's bytes before repair (so only to whole `>`-delimited pieces).
    """
    f.seek(start)
    pos = start
    pending = b""
    last_sent = False
    while pos < end:
        block = f.read(min(chunk_bytes, end - pos))
        if not block:  # the file shrank under us: treat as its end
            break
        pos += len(block)
        data = pending + block if pending else block
        del block
        if pos < end:
            cut = data.rfind(b">") + 1
            if cut == 0:
                pending = data
                continue
            pending = data[cut:]
            data = data[:cut]
        else:
            pending = b""
        last_sent = pos >= end
        if transform is not None:
            data = transform(data)
        text = repair_text(data, repairs)
        del data  # only the text stays alive while the caller works on it
        yield text, pos - len(pending), last_sent
    if not last_sent:
        yield repair_text(transform(pending) if transform is not None else pending, repairs), pos, True
