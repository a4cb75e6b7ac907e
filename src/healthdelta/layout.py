"""Every path of the output tree (CONTRACT §1) in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutLayout:
    out: Path
    state: Path

    @classmethod
    def create(cls, out: Path, state: Path | None = None) -> "OutLayout":
        return cls(out=out, state=state if state is not None else out / "state")

    @property
    def runs_json(self) -> Path:
        return self.state / "runs.json"

    @property
    def last_run(self) -> Path:
        return self.state / "LAST_RUN"

    @property
    def identity(self) -> Path:
        return self.state / "identity"

    @property
    def staging(self) -> Path:
        return self.out / "staging"

    @property
    def ndjson(self) -> Path:
        return self.out / "ndjson"

    @property
    def deid(self) -> Path:
        return self.out / "deid"

    @property
    def reports(self) -> Path:
        return self.out / "reports"

    @property
    def warehouse(self) -> Path:
        return self.out / "warehouse.duckdb"

    def staging_dir(self, run_id: str) -> Path:
        return self.staging / run_id

    def rel(self, path: Path) -> str:
        """The POSIX path relative to `<out>` that artifacts store (never absolute)."""
        return path.relative_to(self.out).as_posix()
