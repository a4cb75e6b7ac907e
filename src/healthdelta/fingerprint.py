"""Input fingerprint and run id (CONTRACT §4, byte-exact with the seed documents). Pure."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

PIPELINE_SALT = "healthdelta_pipeline_v1"
ALGORITHM = "sha256"


@dataclass(frozen=True)
class Fingerprint:
    sha256: str
    file_count: int
    total_bytes: int

    def as_dict(self) -> dict[str, object]:
        return {
            "algorithm": ALGORITHM,
            "sha256": self.sha256,
            "file_count": self.file_count,
            "total_bytes": self.total_bytes,
        }


def input_fingerprint(entries: Iterable[tuple[str, int, str]]) -> Fingerprint:
    """Fingerprint of `(relpath, size, sha256hex)` entries, in any discovery order.

    Feeds `relpath \\0 size \\0 sha256hex \\n` per file, sorted by relative POSIX path.
    """
    digest = hashlib.sha256()
    count = total = 0
    for relpath, size, file_sha in sorted(entries):
        digest.update(f"{relpath}\0{size}\0{file_sha}\n".encode("utf-8"))
        count += 1
        total += size
    return Fingerprint(digest.hexdigest(), count, total)


def run_id(parent_run_id: str | None, fingerprint_sha256: str) -> str:
    """sha256_hex(salt \\n parent \\n fingerprint \\n); the first run has an empty parent."""
    text = f"{PIPELINE_SALT}\n{parent_run_id or ''}\n{fingerprint_sha256}\n"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
