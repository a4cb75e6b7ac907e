"""Unit normalisation: one tested table from the unit strings HealthKit writes to one
unit per dimension, and the display units of the two measurement systems.

Normalised units (`unit_si`): kg, m, kcal, degC, s, L, mmol/L (blood glucose), and the
unit itself for counts, rates and percentages. Why kcal and not J: every reader of a
Health export thinks in kcal (HealthKit's `Cal` is a kilocalorie). Why mmol/L for glucose:
it is the SI unit and HealthKit's own canonical glucose unit carries it
(`mmol<180.15588000005408>/L`, the number being glucose's molar mass).

The table is exact where a definition exists (the international pound and yard,
the thermochemical calorie) and is the only place these factors are written: the
warehouse views read it as a SQL VALUES list (`sql_values`).
"""

from __future__ import annotations

from dataclasses import dataclass

GLUCOSE_MG_PER_MMOL = 180.15588  # g/mol; mg/dL -> mmol/L divides by a tenth of it
_LB = 0.45359237
_FT = 0.3048


@dataclass(frozen=True)
class Conversion:
    unit_si: str
    factor: float
    shift: float = 0.0  # value_si = value * factor + shift


# HealthKit unit strings (as written in export.xml) -> normalised unit.
CONVERSIONS: dict[str, Conversion] = {
    # mass
    "kg": Conversion("kg", 1.0), "g": Conversion("kg", 0.001), "mg": Conversion("kg", 1e-6),
    "lb": Conversion("kg", _LB), "oz": Conversion("kg", _LB / 16), "st": Conversion("kg", _LB * 14),
    # length and distance
    "m": Conversion("m", 1.0), "km": Conversion("m", 1000.0), "cm": Conversion("m", 0.01),
    "mm": Conversion("m", 0.001), "in": Conversion("m", _FT / 12), "ft": Conversion("m", _FT),
    "yd": Conversion("m", _FT * 3), "mi": Conversion("m", _FT * 5280),
    # energy (HealthKit's `Cal` is the dietary Calorie, a kilocalorie)
    "kcal": Conversion("kcal", 1.0), "Cal": Conversion("kcal", 1.0), "cal": Conversion("kcal", 0.001),
    "kJ": Conversion("kcal", 1 / 4.184), "J": Conversion("kcal", 1 / 4184),
    # temperature
    "degC": Conversion("degC", 1.0), "degF": Conversion("degC", 5 / 9, -160 / 9),
    "K": Conversion("degC", 1.0, -273.15),
    # time
    "s": Conversion("s", 1.0), "ms": Conversion("s", 0.001), "min": Conversion("s", 60.0),
    "hr": Conversion("s", 3600.0), "d": Conversion("s", 86400.0),
    # volume
    "L": Conversion("L", 1.0), "mL": Conversion("L", 0.001), "fl_oz_us": Conversion("L", 0.0295735295625),
    # blood glucose: HealthKit writes mg/dL only for glucose
    "mg/dL": Conversion("mmol/L", 10 / GLUCOSE_MG_PER_MMOL), "mmol/L": Conversion("mmol/L", 1.0),
    # dimensionless, counts and rates: kept as they are
    "count": Conversion("count", 1.0), "count/min": Conversion("count/min", 1.0), "%": Conversion("%", 1.0),
    "dBASPL": Conversion("dBASPL", 1.0), "mmHg": Conversion("mmHg", 1.0),
    "mL/(kg·min)": Conversion("mL/(kg·min)", 1.0), "kcal/hr·kg": Conversion("kcal/hr·kg", 1.0),
    "m/s": Conversion("m/s", 1.0), "km/hr": Conversion("m/s", 1 / 3.6), "mi/hr": Conversion("m/s", _FT * 5280 / 3600),
    "W": Conversion("W", 1.0), "IU": Conversion("IU", 1.0),
}


def canonical_unit(unit: str) -> str:
    """HealthKit spells molar units with the molar mass: 'mmol<180.15588000005408>/L' -> 'mmol/L'."""
    if unit.startswith("mmol<") and unit.endswith(">/L"):
        return "mmol/L"
    return unit


def to_si(value: float, unit: str | None) -> tuple[float, str] | None:
    """(normalised value, normalised unit), or None for a unit the table does not know."""
    conv = CONVERSIONS.get(canonical_unit(unit)) if unit else None
    if conv is None:
        return None
    return value * conv.factor + conv.shift, conv.unit_si


def sql_values() -> str:
    """The table as `(VALUES ...) AS t(unit, unit_si, factor, shift)` for the warehouse views."""
    def lit(s: str) -> str:
        return "'" + s.replace("'", "''") + "'"
    rows = ", ".join(f"({lit(u)}, {lit(c.unit_si)}, {c.factor!r}::DOUBLE, {c.shift!r}::DOUBLE)"
                     for u, c in CONVERSIONS.items())
    return f"(VALUES {rows}) AS t(unit, unit_si, factor, shift)"


# --------------------------------------------------------------------------- display

SYSTEMS = ("metric", "us")
# Display unit and conversion from the normalised unit, per system.
_DISPLAY = {
    "metric": {"kg": ("kg", 1.0, 0.0), "m": ("km", 0.001, 0.0), "degC": ("°C", 1.0, 0.0)},
    "us": {"kg": ("lb", 1 / _LB, 0.0), "m": ("mi", 1 / (_FT * 5280), 0.0), "degC": ("°F", 9 / 5, 32.0)},
}
# Locales whose Health app shows pounds, miles and °F (the United States and its territories,
# Liberia, Myanmar); the Health app writes the export in the phone's units.
_US_REGIONS = frozenset({"US", "LR", "MM", "PR", "GU", "VI", "AS", "MP", "UM"})


def system_for_locale(locale: str | None) -> str:
    """'en_US' -> 'us'; any other region (or none) -> 'metric'."""
    region = (locale or "").replace("-", "_").split("_")[1:2]
    return "us" if region and region[0].upper() in _US_REGIONS else "metric"


def system_for_units(units: dict[str, int]) -> str:
    """The system an export is written in, from how many samples use each unit: 'us' when
    pounds and miles outnumber kilograms and kilometres."""
    us = sum(n for u, n in units.items() if u in ("lb", "mi", "degF", "ft", "in", "yd"))
    metric = sum(n for u, n in units.items() if u in ("kg", "km", "degC", "cm", "m"))
    return "us" if us > metric else "metric"


def display(value_si: float | None, unit_si: str, system: str) -> tuple[float | None, str]:
    """A normalised value in the units of `system` ('metric' or 'us')."""
    unit, factor, shift = _DISPLAY[system].get(unit_si, (unit_si, 1.0, 0.0))
    return (None if value_si is None else value_si * factor + shift), unit
