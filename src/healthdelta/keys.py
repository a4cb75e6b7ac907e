"""Content-based record keys (CONTRACT §5). Pure: no I/O.

Recipe (documented in docs/record_keys.md): the key of a source record is
sha256 over the canonical JSON encoding (sorted keys, compact, UTF-8) of
`[source, kind, content]`, where `content` is the record exactly as the source
holds it (all attributes and children), minus volatile parts such as the
`0x...` object pointer inside Apple's `device` strings. Where it was read from
(zip or folder, which export, which line) is never part of it.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from healthdelta.errors import InputError

# Apple writes e.g. `<<HKDevice: 0x283a1c7d0>, name:Apple Watch, ...>`; the pointer
# differs between exports of the very same sample.
_DEVICE_POINTER = re.compile(r"0x[0-9a-fA-F]+")


def strip_device_pointer(device: str) -> str:
    """Remove the volatile `0x...` object address from an Apple `device` string."""
    return _DEVICE_POINTER.sub("0x", device)


# The same address as export.xml's bytes hold it (`&lt;&lt;HKDevice: 0x283a1c7d0&gt;`).
# export.xml is parsed with it blanked, so rows never carry it and a re-export whose only
# change is new addresses is, to the parser, the same bytes (parse reuse, docs/ndjson.md).
_RAW_DEVICE_POINTER = re.compile(rb"HKDevice: 0x[0-9a-fA-F]+")


def blank_device_pointers(data: bytes) -> bytes:
    """`HKDevice: 0x283a1c7d0` -> `HKDevice: 0x` wherever it occurs in `data`."""
    return _RAW_DEVICE_POINTER.sub(b"HKDevice: 0x", data)


class RecordTooDeep(InputError, orjson.JSONEncodeError):
    """A record nested deeper than the canonical encoding allows (orjson stops at 255
    levels). An InputError, so the user gets one clear line instead of an internal
    error; still an orjson.JSONEncodeError, so parsers that catch that to say more
    precisely what was too deep keep doing so."""


def canonical_bytes(value: Any) -> bytes:
    """Canonical JSON: sorted keys, compact, UTF-8."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        if "recursion" in str(exc).lower():
            raise RecordTooDeep("a record of the export is nested too deeply (more than 255 levels)") from None
        raise


def record_key(source: str, kind: str, content: Any) -> str:
    """64-hex content key of one source record."""
    return hashlib.sha256(canonical_bytes([source, kind, content])).hexdigest()


def occurrence_key(key: str, occurrence: int) -> str:
    """Key of the n-th (n >= 1) exact repeat of a record within one export.

    Apple exports do contain byte-identical duplicate samples; each copy is a
    record of its own, so the copies get distinct, still deterministic keys.
    """
    if occurrence == 0:
        return key
    return hashlib.sha256(f"{key}#{occurrence}".encode()).hexdigest()
