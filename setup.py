"""The optional compiled fast path; everything else about the package is in pyproject.toml.

Cython compiles the modules of `healthdelta._fastpath.MODULES` from their own `.py` files
(typed by the augmenting `.pxd` beside each), so the pure-Python fallback is the very
source that was compiled. The install never depends on it: without Cython, without a
working C compiler, on a compile error, or with HEALTHDELTA_PURE_PYTHON=1 at build time
the package installs as pure Python. The build records which source each extension was
built from (`_fastpath.SOURCES_FILE`), so an extension older than its `.py` is not used.
"""

import json
import os
import runpy
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"
FASTPATH = runpy.run_path(str(SRC / "healthdelta" / "_fastpath.py"))
MODULES = FASTPATH["MODULES"]
PURE = os.environ.get(FASTPATH["PURE_ENV"]) == "1"


def source_of(module: str) -> Path:
    return SRC.joinpath(*module.split(".")).with_suffix(".py")


def wanted() -> bool:
    if PURE:
        return False
    try:
        import Cython  # noqa: F401
    except ImportError:
        return False
    return True


class OptionalBuildExt(build_ext):
    """Cythonizes each module as its extension is built (not for every setup.py command) and
    turns any failure into a warning and that module staying pure Python."""

    def initialize_options(self) -> None:
        super().initialize_options()
        self._compiled: set[str] = set()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - e.g. no usable compiler at all: still an install
            self.warn(f"compiled fast path not built, the pure-Python modules are used: {exc}")
        self._write_sources({name: FASTPATH["source_digest"](source_of(name)) for name in sorted(self._compiled)})

    def build_extension(self, ext: Extension) -> None:
        try:
            from Cython.Build import cythonize

            (generated,) = cythonize(
                [Extension(ext.name, [str(source_of(ext.name).relative_to(ROOT))])],
                build_dir=str(ROOT / "build" / "cython"),
                quiet=True,
                # Types come from the .pxd files only: in pure-Python mode Cython would
                # also read annotations (a `float` becoming a C double, `dict` refusing None).
                compiler_directives={"language_level": 3, "annotation_typing": False},
            )
            ext.sources = generated.sources
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - a Cython or C compile error: this module stays pure
            self.warn(f"{ext.name} not compiled, its pure-Python module is used: {exc}")
        else:
            self._compiled.add(ext.name)

    def _write_sources(self, built: dict[str, str]) -> None:
        package_dir = Path(self.get_ext_fullpath(MODULES[0])).parent
        package_dir.mkdir(parents=True, exist_ok=True)
        (package_dir / FASTPATH["SOURCES_FILE"]).write_text(json.dumps(built, sort_keys=True, indent=1) + "\n",
                                                            encoding="utf-8")


setup(
    ext_modules=[Extension(m, [str(source_of(m).relative_to(ROOT))]) for m in MODULES] if wanted() else [],
    cmdclass={"build_ext": OptionalBuildExt},
)
