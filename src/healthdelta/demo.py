"""`healthdelta demo`: a synthetic export and its next export through `run all`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from healthdelta import synth
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


def run_demo(out: Path, progress: ProgressFn = no_progress) -> DemoResult:
    """Generate export 1 and export 2 (export 1 plus new records) as zips, run both.

    The inputs are the demo's own files, so they are regenerated every time; the
    data dir is kept, so a second demo shows the no-op path.
    """
    inputs = out / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
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
