"""The Python API for notebooks: `hd.open(path)` and a read-only `Warehouse`.

    >>> import healthdelta as hd                     # doctest: +SKIP
    >>> wh = hd.open("data")                         # doctest: +SKIP
    >>> wh.view("daily_steps").df()                  # doctest: +SKIP

`path` is a `run all` output directory (its `warehouse.duckdb`), a cohort output
directory (its `cohort.duckdb`) or a `.duckdb` file. Results are DuckDB relations:
`.fetchall()`, `.df()` (pandas), `.pl()` (polars), `.arrow()` (pyarrow), or more SQL on
top. The library never prints; docs/api.md has the tested examples.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from healthdelta import warehouse
from healthdelta.errors import InputError, UsageError

DB_NAMES = ("warehouse.duckdb", "cohort.duckdb")


def resolve_db(path: str | Path) -> Path:
    """The database file `path` names: itself, or the warehouse or cohort file inside it."""
    path = Path(path)
    if path.is_dir():
        for name in DB_NAMES:
            if (path / name).is_file():
                return path / name
        raise InputError("that directory holds no warehouse.duckdb or cohort.duckdb")
    return path


class Warehouse:
    """A read-only connection to a warehouse or a cohort database; close it (or use `with`)."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path
        self._con = warehouse.connect(db_path, read_only=True)

    def sql(self, query: str, params: list | dict | None = None) -> duckdb.DuckDBPyRelation:
        """One SQL statement; values are bound with `?` (or `$name`) through `params`."""
        try:
            return self._con.sql(query, params=params)
        except (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException) as exc:
            raise UsageError(f"the query is not valid: {str(exc).splitlines()[0]}") from None

    def names(self) -> list[str]:
        """The tables and views one can read, sorted."""
        rows = self._con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' AND NOT internal "
            "UNION SELECT view_name FROM duckdb_views() WHERE schema_name = 'main' AND NOT internal"
        ).fetchall()
        return sorted(r[0] for r in rows if r[0] != "warehouse_meta")

    def view(self, name: str) -> duckdb.DuckDBPyRelation:
        """A table or view by name: `daily_steps`, `sleep_nightly`, `observations`, `records`, ..."""
        if name not in self.names():
            raise UsageError("no table or view of that name; `names()` lists them")
        return self._con.table(name)

    def runs(self) -> duckdb.DuckDBPyRelation:
        """The loaded runs, oldest first (per participant in a cohort)."""
        runs = self.view("runs")
        return runs.order("participant_id, load_seq" if "participant_id" in runs.columns else "load_seq")

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Warehouse":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(path: str | Path) -> Warehouse:  # noqa: A001 - `hd.open` is the API's name
    """Open a warehouse read-only: a `run all` out dir, a cohort out dir, or a `.duckdb` file."""
    return Warehouse(resolve_db(path))
