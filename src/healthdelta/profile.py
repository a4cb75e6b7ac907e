"""`export profile`: a share-safe profile of an export — counts and sizes only.

Counts by element type, HealthKit record type, FHIR resource type, stream and file
extension; no payload value, no date, no name, no path beyond an extension.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path, PurePosixPath

from healthdelta import ingest
from healthdelta.fsutil import WorkDir
from healthdelta.inputs import detect_input
from healthdelta.parse import iter_task, plan_tasks
from healthdelta.parse.report import ParseReport
from healthdelta.progress import ProgressFn, no_progress

SCHEMA_VERSION = 1


def profile_export(input_path: Path, scratch_parent: Path, progress: ProgressFn = no_progress) -> dict:
    """Stage the export into a scratch dir (removed afterwards), parse it, count."""
    inp = detect_input(input_path)
    ingest.check_free_space(inp, scratch_parent)
    with WorkDir(scratch_parent, "profile") as work:
        staged = ingest.stage_export(inp, work.path, progress=progress)
        ingest.write_manifest(work.path, staged, inp, run_id="0" * 64, parent_run_id=None)
        layout = json.loads((work.path / "layout.json").read_text(encoding="utf-8"))
        report = ParseReport()
        streams: Counter[str] = Counter()
        record_types: Counter[str] = Counter()
        resource_types: Counter[str] = Counter()
        tasks = plan_tasks(work.path, layout, workers=1)
        total = sum(t.size for t in tasks)
        for task in tasks:
            for stream, row in iter_task(work.path, task, report):
                if row.get("_nested"):
                    continue
                streams[stream] += 1
                if row.get("source") == "healthkit" and isinstance(row.get("type"), str):
                    record_types[row["type"]] += 1
                if isinstance(row.get("resource_type"), str):
                    resource_types[row["resource_type"]] += 1
            progress("profiling", task.size, total)
    extensions = Counter(PurePosixPath(f.path).suffix.lower() or "(none)" for f in staged.files)
    ext_bytes: Counter[str] = Counter()
    for f in staged.files:
        ext_bytes[PurePosixPath(f.path).suffix.lower() or "(none)"] += f.size
    return {
        "schema_version": SCHEMA_VERSION,
        "input_form": inp.form,
        "files": {"count": len(staged.files), "bytes": staged.total_bytes,
                  "by_extension": _sorted(extensions), "bytes_by_extension": _sorted(ext_bytes)},
        "elements": report.as_dict()["elements"],
        "unknown_elements": report.as_dict()["unknown"],
        "repairs": report.as_dict()["repairs"],
        "rows_by_stream": _sorted(streams),
        "record_types": _sorted(record_types),
        "resource_types": _sorted(resource_types),
    }


def _sorted(counter: Counter[str]) -> dict[str, int]:
    return dict(sorted(counter.items()))
