"""`healthdelta demo`: a synthetic export and its next export through `run all`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from healthdelta import synth
from healthdelta.errors import UsageError
from healthdelta.layout import OutLayout
from healthdelta.pipeline import PipelineOptions, PipelineResult, run_all
from healthdelta.progress import ProgressFn, no_progress

DEMO_SEED = 7
DEMO_RECORDS = 20_000
DEMO_NEW_RECORDS = 400


@dataclass(frozen=True)
class DemoResult:
    out: Path
    runs: tuple[PipelineResult, ...]


MARKER = ".healthdelta-demo"


def run_demo(out: Path, progress: ProgressFn = no_progress) -> DemoResult:
    """Generate export 1 and export 2 (export 1 plus new records) as zips, `run all` both.

    Every demo starts afresh. `out` must be new, empty, or an earlier demo's
    directory (recognised by its marker file): a demo never deletes anything else.
    """
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UsageError("the demo directory exists and is not an earlier demo's; choose another --out")
    shutil.rmtree(out / "inputs", ignore_errors=True)
    shutil.rmtree(out / "data", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `healthdelta demo`; the directory is replaced by the next demo\n")
    inputs = out / "inputs"
    first = synth.generate_export(inputs / "export-1", seed=DEMO_SEED, records=DEMO_RECORDS, people=2,
                                  zip=True, keep_folder=False)
    second = synth.generate_export(inputs / "export-2", base=first, new_records=DEMO_NEW_RECORDS,
                                   zip=True, keep_folder=False)
    layout = OutLayout.create(out / "data")
    runs = tuple(
        run_all(PipelineOptions(input=export.zip_path, layout=layout, note=f"demo export {i}"), progress)
        for i, export in enumerate((first, second), 1)
    )
    return DemoResult(out=out, runs=runs)
