"""Counters a parse fills in; they end up in the run report (share-safe: counts only)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ParseReport:
    """What a parser saw, kept, repaired and did not recognise.

    `elements` counts source elements/resources by kind (e.g. `Record`,
    `fhir:Observation`), `repairs` counts each repaired kind of damage
    (e.g. `control_char_removed`), `unknown` counts things that were kept
    generically because no typed parser knows them. Never holds payload values.
    """

    elements: Counter[str] = field(default_factory=Counter)
    repairs: Counter[str] = field(default_factory=Counter)
    unknown: Counter[str] = field(default_factory=Counter)

    def merge(self, other: "ParseReport") -> None:
        self.elements.update(other.elements)
        self.repairs.update(other.repairs)
        self.unknown.update(other.unknown)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "elements": dict(sorted(self.elements.items())),
            "repairs": dict(sorted(self.repairs.items())),
            "unknown": dict(sorted(self.unknown.items())),
        }
