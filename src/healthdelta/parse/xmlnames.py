"""Namespace-free element names for the lxml-based parsers (CDA, GPX)."""

from __future__ import annotations

from typing import Any

_LOCALS: dict[Any, str] = {}
_MAX_CACHED = 4096  # a hostile file may invent endless tag names; keep the cache bounded


def local_name(element: Any) -> str:
    """`{urn:hl7-org:v3}observation` -> `observation`; comments and PIs -> ``."""
    tag = element.tag
    local = _LOCALS.get(tag)
    if local is None:
        local = tag.rpartition("}")[2] if isinstance(tag, str) else ""
        if len(_LOCALS) < _MAX_CACHED:
            _LOCALS[tag] = local
    return local
