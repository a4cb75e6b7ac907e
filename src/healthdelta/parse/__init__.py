"""Parsing: one module per source, dispatched by the staged file's kind.

`plan_tasks` turns a staged run's layout into independent parse tasks (export.xml
split at top-level element boundaries, the other files grouped); `iter_task` runs
one task and yields `(stream, row)` pairs. Tasks are independent so the export
stage can run them in parallel worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from healthdelta.errors import InputError
from healthdelta.parse.report import ParseReport

# Each export.xml range should be big enough to amortise a task, small enough
# to balance two workers and to give progress a useful granularity.
RANGE_BYTES = 48 << 20
SMALL_FILES_PER_TASK = 256


@dataclass(frozen=True)
class ParseTask:
    kind: str  # export_xml | export_cda_xml | clinical_json | ecg_csv | workout_route_gpx
    paths: tuple[str, ...]  # staged paths relative to the run dir (`source/...`)
    byte_range: tuple[int, int] | None = None
    size: int = 0  # bytes of input this task covers (progress)
    chunks: tuple[tuple[int, int], ...] = ()  # export.xml: the content-defined chunks of byte_range


def source_file(staged_path: str) -> str:
    """`source/clinical-records/x.json` -> `clinical-records/x.json` (same for zip and folder)."""
    return staged_path.split("/", 1)[1]


def plan_tasks(run_dir: Path, layout: dict, workers: int, chunk_bytes: int | None = None) -> list[ParseTask]:
    """export.xml in content-defined chunks (the unit of parse reuse, `reuse.py`), grouped
    into ranges of about RANGE_BYTES (one range with one worker); the other files grouped."""
    from healthdelta.parse.healthkit import CHUNK_TARGET, CHUNK_WINDOW, plan_chunks

    tasks: list[ParseTask] = []
    xml = layout["export_xml"]
    target = chunk_bytes or CHUNK_TARGET
    chunks = plan_chunks(run_dir / xml, target, max(1, target * CHUNK_WINDOW // CHUNK_TARGET))
    group: list[tuple[int, int]] = []
    for i, chunk in enumerate(chunks):
        group.append(chunk)
        if i + 1 == len(chunks) or workers > 1 and group[-1][1] - group[0][0] >= RANGE_BYTES:
            start, end = group[0][0], group[-1][1]
            tasks.append(ParseTask("export_xml", (xml,), (start, end), end - start, tuple(group)))
            group = []
    if layout.get("export_cda_xml"):
        cda = layout["export_cda_xml"]
        tasks.append(ParseTask("export_cda_xml", (cda,), size=(run_dir / cda).stat().st_size))
    for kind in ("clinical_json", "ecg_csv", "workout_route_gpx"):
        paths = layout.get(kind, [])
        for i in range(0, len(paths), SMALL_FILES_PER_TASK):
            chunk = tuple(paths[i:i + SMALL_FILES_PER_TASK])
            tasks.append(ParseTask(kind, chunk, size=sum((run_dir / p).stat().st_size for p in chunk)))
    # Largest first: the pool then finishes close to together.
    tasks.sort(key=lambda t: -t.size)
    return tasks


def iter_task(run_dir: Path, task: ParseTask, report: ParseReport,
              points_dir: Path | None = None) -> Iterator[tuple[str, dict]]:
    """Rows of one task. GPX points go to `points_dir/<record_key>.ndjson` (local only)."""
    if task.kind == "export_xml":
        yield from iter_xml_range(run_dir, task.paths[0], report, task.byte_range)
        return
    for staged in task.paths:
        yield from iter_file(run_dir, task.kind, staged, report, points_dir)


def iter_file(run_dir: Path, kind: str, staged: str, report: ParseReport,
              points_dir: Path | None = None) -> Iterator[tuple[str, dict]]:
    """Rows of one file of the other kinds (everything but export.xml)."""
    path, rel = run_dir / staged, source_file(staged)
    if kind == "export_cda_xml":
        from healthdelta.parse.cda import iter_cda

        yield from iter_cda(path, report, source_file=rel)
    elif kind == "clinical_json":
        from healthdelta.parse.fhir import iter_fhir

        yield from iter_fhir(path, report, source_file=rel)
    elif kind == "ecg_csv":
        from healthdelta.parse.ecg import iter_ecg

        yield from iter_ecg(path, report, source_file=rel)
    elif kind == "workout_route_gpx":
        yield from _iter_route(path, rel, report, points_dir)


def iter_xml_range(run_dir: Path, staged: str, report: ParseReport,
                   byte_range: tuple[int, int] | None) -> Iterator[tuple[str, dict]]:
    """Rows of one byte range of export.xml (`staged`, relative to the run dir)."""
    from healthdelta.parse.healthkit import iter_healthkit

    try:
        yield from iter_healthkit(run_dir / staged, report, source_file=source_file(staged), byte_range=byte_range)
    except RecursionError:
        # Row and key builders recurse per nesting level; Apple's elements nest 3 deep.
        raise InputError("export.xml is nested too deeply to be an Apple Health export") from None


def _iter_route(path: Path, rel: str, report: ParseReport, points_dir: Path | None):
    from healthdelta.parse.gpx import iter_gpx

    if points_dir is None:
        yield from iter_gpx(path, report, source_file=rel)
        return
    tmp = points_dir / f".tmp-{path.name}.ndjson"
    with open(tmp, "wb") as points_out:
        rows = list(iter_gpx(path, report, source_file=rel, points_out=points_out))
    if not rows:
        tmp.unlink()
        return
    # One points file per GPX file, named by its first track's key (content-based too).
    target = points_dir / f"{rows[0][1]['record_key']}.ndjson"
    tmp.replace(target)
    for stream, row in rows:
        row["points_ref"] = f"local/route_points/{target.name}"
        yield stream, row
