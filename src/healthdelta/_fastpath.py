"""The compiled fast path: which modules may run compiled, and which do.

`setup.py` compiles the modules of `MODULES` with Cython from their own `.py` files, so
each compiled module has its pure-Python twin beside it: the very source it was built
from. Python's import system prefers the compiled file; the finder installed here picks
the `.py` instead when `HEALTHDELTA_PURE_PYTHON=1` is set, and when the compiled file was
built from other source than the `.py` now holds (an editable install whose source was
edited or checked out since), so an out-of-date build is never run.

Stdlib only: `setup.py` reads `MODULES` and `SOURCES_FILE` from this file before the
package's dependencies exist.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

MODULES = ("healthdelta.keys", "healthdelta.ndjson", "healthdelta.parse.healthkit")
PURE_ENV = "HEALTHDELTA_PURE_PYTHON"
# Written by the build beside the package: module -> sha256 of the `.py` it compiled.
SOURCES_FILE = "_fastpath_sources.json"


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _SourceFinder:
    """Meta-path finder that loads a listed module from its `.py` when the compiled
    one must not be used; otherwise it leaves the module to the regular finders."""

    def __init__(self, pure: bool) -> None:
        self.pure = pure
        self._built: dict[str, str] | None = None

    def _built_from(self, package_dir: Path) -> dict[str, str]:
        if self._built is None:
            try:
                self._built = json.loads((package_dir / SOURCES_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._built = {}
        return self._built

    def find_spec(self, name: str, path=None, target=None):
        if name not in MODULES or not path:
            return None
        for entry in path:
            source = Path(entry) / f"{name.rpartition('.')[2]}.py"
            if not source.is_file():
                continue
            if not self.pure:
                root = source.parents[name.count(".") - 1]  # the `healthdelta` package dir
                if self._built_from(root).get(name) == source_digest(source):
                    return None
            return importlib.util.spec_from_file_location(name, source)
        return None


def install() -> None:
    """Put the finder first on `sys.meta_path` (once per process)."""
    if not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder(os.environ.get(PURE_ENV) == "1"))


def compiled() -> list[str]:
    """The modules of `MODULES` that run compiled in this process (imports them)."""
    return [name for name in MODULES
            if isinstance(importlib.import_module(name).__spec__.loader, importlib.machinery.ExtensionFileLoader)]
