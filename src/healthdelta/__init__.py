"""HealthDelta: Apple Health exports as a private, versioned, queryable health record.

Python API (docs/api.md): `healthdelta.open(path)` returns a read-only `Warehouse`.
"""

from healthdelta import _fastpath

__version__ = "0.1.0"

# Before any submodule is imported: it decides compiled or `.py` for the hot modules.
_fastpath.install()


def compiled() -> list[str]:
    """The modules running compiled (Cython) in this process; empty on the pure-Python path."""
    return _fastpath.compiled()


def open(path):  # noqa: A001 - `hd.open` is the API's name
    """Open a warehouse or cohort database read-only; see `healthdelta.api`."""
    from healthdelta import api  # DuckDB is imported on first use only, not by `--version`

    return api.open(path)
