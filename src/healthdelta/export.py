"""The NDJSON export stage: staged run → `ndjson/<run_id>/` streams, key index and delta.

Parse tasks run in worker processes (two cores: export.xml is split at top-level
element boundaries), each spilling sorted runs of encoded lines; the main process
merges every stream into its final file and, in the same pass, computes the delta
against the parent run's key index. Small exports run in-process (the
single-stream fallback, also what a pool-less environment gets).
"""

from __future__ import annotations

import filecmp
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from healthdelta import reuse, streamfile
from healthdelta.delta import derive_index, write_stream
from healthdelta.errors import UsageError
from healthdelta.fsutil import TMP_PREFIX, WorkDir, atomic_write_json, fsync_dir
from healthdelta.ndjson import STREAMS, SpillWriter, merge_stream
from healthdelta.parse import ParseTask, iter_file, iter_xml_range, plan_tasks, source_file
from healthdelta.parse.healthkit import RangeSplitError
from healthdelta.parse.xmlrepair import find_body_start
from healthdelta.parse.report import ParseReport
from healthdelta.progress import ProgressFn, no_progress

SCHEMA_VERSION = 1
IN_PROCESS_BELOW = 32 << 20  # bytes: below this a pool costs more than it saves


@dataclass(frozen=True)
class ExportResult:
    run_id: str
    parent_run_id: str | None
    counts: dict[str, int]
    delta: dict[str, dict[str, int]]
    report: dict


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def export_run(
    run_dir: Path,
    ndjson_parent: Path,
    *,
    run_id: str,
    parent_run_id: str | None,
    person_id: str,
    workers: int | None = None,
    progress: ProgressFn = no_progress,
    compressed: bool = True,
    keep_chunks: bool = True,
    chunk_bytes: int | None = None,
) -> ExportResult:
    """Write `ndjson_parent/<run_id>/` atomically and return its counts.

    Stream files are stored zstd-compressed unless `compressed` is false (`export ndjson`
    writes the plain canonical files; `streamfile` explains the two forms).

    The parent's NDJSON (for the delta) is `ndjson_parent/<parent_run_id>/`; when it
    does not exist every row counts as added, as for a first run. export.xml chunks
    unchanged since the parent are not parsed again when the parent kept its chunk
    cache (`reuse.py`); `keep_chunks` keeps this run's for the next one.
    """
    layout = json.loads((run_dir / "layout.json").read_text(encoding="utf-8"))
    workers = workers or default_workers()
    tasks = plan_tasks(run_dir, layout, workers, chunk_bytes)
    total = sum(t.size for t in tasks)
    parent_dir = ndjson_parent / parent_run_id if parent_run_id else None
    if parent_dir is not None and not (parent_dir / "delta.json").is_file():
        parent_dir = None
    with WorkDir(ndjson_parent, run_id) as work:
        spill_dir = work.path / ".spill"
        points_dir = work.path / "local" / "route_points"
        cache_dir = work.path / reuse.CACHE_DIR if keep_chunks else None
        spill_dir.mkdir()
        points_dir.mkdir(parents=True)
        report = ParseReport()
        spills: dict[str, list[Path]] = {s: [] for s in STREAMS}
        chunks: dict[str, reuse.Entry] = {}
        reused = [0, 0]  # chunks, bytes
        args = (run_dir, spill_dir, points_dir, run_id, person_id, parent_dir, cache_dir)
        if workers == 1 or total < IN_PROCESS_BELOW:
            results = (_parse_task(i, task, *args) for i, task in enumerate(tasks))
            _collect(results, tasks, spills, report, chunks, reused, progress, total)
        else:
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
            try:
                futures = [pool.submit(_parse_task, i, task, *args) for i, task in enumerate(tasks)]
                _collect((f.result() for f in futures), tasks, spills, report, chunks, reused, progress, total)
            finally:
                # On a failure (a damaged file, Ctrl-C) do not parse the rest first.
                pool.shutdown(wait=True, cancel_futures=True)
        counts, delta = _merge_all(work.path, spills, parent_dir, progress, compressed)
        if parent_dir is not None:
            _link_unchanged_points(points_dir, parent_dir / "local" / "route_points")
        for p in spill_dir.iterdir():
            p.unlink()
        spill_dir.rmdir()
        if cache_dir is not None:
            reuse.write_index(cache_dir, chunks)
        result = ExportResult(run_id, parent_run_id if parent_dir else None, counts, delta, report.as_dict())
        atomic_write_json(work.path / "delta.json", {
            "schema_version": SCHEMA_VERSION,
            "run_id": run_id,
            "parent_run_id": result.parent_run_id,
            "streams": delta,
            "added": sum(d["added"] for d in delta.values()),
            "removed": sum(d["removed"] for d in delta.values()),
        })
        atomic_write_json(work.path / "export_report.json", {
            "schema_version": SCHEMA_VERSION,
            "run_id": run_id,
            "counts": counts,
            "parse": report.as_dict(),
        })
        # Beside the canonical files, not in them: how much parsing was saved.
        atomic_write_json(work.path / "reuse.json", {"chunks": len(chunks), "reused_chunks": reused[0],
                                                     "reused_bytes": reused[1], "parsed_bytes": total - reused[1]})
        work.commit(ndjson_parent / run_id)
    return result


def _link_unchanged_points(points_dir: Path, parent_points: Path) -> None:
    """A route's points file is named by the route's record key, so the same route in the
    parent run usually has the same file: keep one copy (a hard link) when the bytes are
    equal. Every export repeats all routes; without this each run stored them again."""
    if not parent_points.is_dir():
        return
    for path in sorted(points_dir.iterdir()):
        old = parent_points / path.name
        if old.is_file() and not old.is_symlink() and old.stat().st_size == path.stat().st_size \
                and not os.path.samefile(old, path) and filecmp.cmp(old, path, shallow=False):
            tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
            os.link(old, tmp)
            os.replace(tmp, path)


def retire(ndjson_dir: Path) -> None:
    """Drop what a run keeps only while it is its person's latest run (the next run's
    delta base): the chunk cache (parse reuse) and the key index (the delta reads the
    rows themselves without it; `plain_copy` derives it). Both are first moved into one
    `.tmp-*` dir beside the run dirs, so a crash leaves an orphan the next command
    removes, never an index or cache cut short."""
    doomed = ndjson_dir.parent / f"{TMP_PREFIX}retired-{ndjson_dir.name}-{os.getpid()}"
    parts = [p for p in (ndjson_dir / reuse.CACHE_DIR, ndjson_dir / "index") if p.is_dir()]
    if not parts:
        return
    doomed.mkdir()
    for part in parts:
        part.rename(doomed / part.name)
    fsync_dir(ndjson_dir)
    shutil.rmtree(doomed)


def plain_copy(ndjson_dir: Path, out: Path) -> ExportResult:
    """`out/<run_id>/`: a stored run's NDJSON with every stream file in the plain canonical
    form (CONTRACT §5), byte for byte what the plain writer writes; delta.json, the export
    report and the key index beside them. A pruned run has only its delta files left."""
    doc = json.loads((ndjson_dir / "delta.json").read_text(encoding="utf-8"))
    run_id = doc["run_id"]
    if (out / run_id).resolve() == ndjson_dir.resolve():
        raise UsageError("--out must not be the directory the run is stored in")
    with WorkDir(out, run_id) as work:
        for sub in ("", "added", "removed"):
            (work.path / sub).mkdir(exist_ok=True)
            for path in streamfile.stream_files(ndjson_dir / sub):
                name = streamfile.file_name(streamfile.stream_name(path), compressed=False)
                stream_file = ndjson_dir / path.name
                if sub == "added" and stream_file.is_file() and path.samefile(stream_file):
                    os.link(work.path / name, work.path / sub / name)  # a first run's added/, as written
                    continue
                with streamfile.open_read(path) as src, streamfile.StreamWriter(work.path / sub / name) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        for path in streamfile.stream_files(ndjson_dir):
            stream = streamfile.stream_name(path)
            (work.path / "index").mkdir(exist_ok=True)
            name = streamfile.index_name(stream, compressed=False)
            with streamfile.StreamWriter(work.path / "index" / name) as dst:
                stored = streamfile.find_index(ndjson_dir, stream)
                if stored is None:  # a retired run: the index is derived from the rows
                    derive_index(path, dst)
                else:
                    with streamfile.open_read(stored) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
        for name in ("delta.json", "export_report.json"):
            if (ndjson_dir / name).is_file():
                shutil.copy2(ndjson_dir / name, work.path / name)
        work.commit(out / run_id)
    streams = doc.get("streams", {})
    return ExportResult(run_id, doc.get("parent_run_id"), {s: d["total"] for s, d in streams.items()},
                        streams, {})


def _parse_task(index: int, task: ParseTask, run_dir: Path, spill_dir: Path, points_dir: Path,
                run_id: str, person_id: str, parent_dir: Path | None, cache_dir: Path | None):
    """Worker body: parse one task into sorted spill runs (top level so it pickles).
    Returns the spill files, the parse report, the task's chunk cache entries and
    the (chunks, bytes) it reused."""
    report = ParseReport()
    writer = SpillWriter(spill_dir, run_id, person_id, prefix=f"t{index:04d}")
    cache_out = reuse.ChunkWriter(cache_dir, f"t{index:04d}.zst")
    cache = reuse.ChunkCache.open(parent_dir)
    try:
        if task.kind == "export_xml":
            reused = _parse_chunks(task, run_dir, writer, report, cache, cache_out, run_id, person_id)
        else:
            reused = _parse_files(task, run_dir, writer, report, cache, cache_out, run_id, person_id,
                                  points_dir, parent_dir)
    finally:
        entries = cache_out.close()
    return writer.close(), report, entries, reused


def _parse_chunks(task: ParseTask, run_dir: Path, writer: SpillWriter, report: ParseReport,
                  cache: reuse.ChunkCache | None, cache_out: reuse.ChunkWriter, run_id: str,
                  person_id: str) -> tuple[int, int]:
    """Each chunk of an export.xml task: its rows from the parent's cache when its
    identity is known there, else parsed; either way recorded in this run's cache."""
    staged = task.paths[0]
    path = run_dir / staged
    src = source_file(staged)
    size = path.stat().st_size
    chunks = list(task.chunks)
    reused = [0, 0]
    with open(path, "rb") as f:
        body = find_body_start(f, size)
        i = 0
        while i < len(chunks):
            start, end = chunks[i]
            ident = reuse.chunk_identity(f, start, end, source_file=src, person_id=person_id, opens=start <= body,
                                         closes=end >= size)
            hit = cache.get(ident, run_id) if cache is not None else None
            if hit is not None:
                chunk_report, by_stream = hit.report, hit.lines
                cache_out.copy(ident, hit.frame)
                reused[0] += 1
                reused[1] += end - start
            else:
                chunk_report = ParseReport()
                by_stream = {}
                try:
                    for stream, row in iter_xml_range(run_dir, staged, chunk_report, (start, end)):
                        by_stream.setdefault(stream, []).append(writer.line(row))
                except RangeSplitError:
                    if i + 1 == len(chunks):
                        raise
                    # A cut a hand-edited file fooled: the chunk goes on into the next one.
                    chunks[i:i + 2] = [(start, chunks[i + 1][1])]
                    continue
                cache_out.add(ident, chunk_report, by_stream, run_id)
            report.merge(chunk_report)
            for stream, stream_lines in by_stream.items():
                writer.add_lines(stream, stream_lines)
            i += 1
    return reused[0], reused[1]


def _parse_files(task: ParseTask, run_dir: Path, writer: SpillWriter, report: ParseReport,
                 cache: reuse.ChunkCache | None, cache_out: reuse.ChunkWriter, run_id: str, person_id: str,
                 points_dir: Path, parent_dir: Path | None) -> tuple[int, int]:
    """Each file of a task of the other kinds: its rows from the parent's cache when the
    file is byte for byte one the parent parsed (its route points linked from the
    parent's), else parsed; either way recorded in this run's cache."""
    reused = [0, 0]
    for staged in task.paths:
        ident = reuse.file_identity(task.kind, run_dir / staged, source_file=source_file(staged),
                                    person_id=person_id)
        hit = cache.get(ident, run_id) if cache is not None else None
        if hit is not None and parent_dir is not None and _link_points(hit.points, parent_dir, points_dir):
            file_report, by_stream = hit.report, hit.lines
            cache_out.copy(ident, hit.frame)
            reused[0] += 1
            reused[1] += (run_dir / staged).stat().st_size
        else:
            file_report, by_stream = ParseReport(), {}
            points = set()
            for stream, row in iter_file(run_dir, task.kind, staged, file_report, points_dir):
                if row.get("points_ref"):
                    points.add(row["points_ref"].rsplit("/", 1)[1])
                by_stream.setdefault(stream, []).append(writer.line(row))
            cache_out.add(ident, file_report, by_stream, run_id, tuple(sorted(points)))
        report.merge(file_report)
        for stream, stream_lines in by_stream.items():
            writer.add_lines(stream, stream_lines)
    return reused[0], reused[1]


def _link_points(names: tuple[str, ...], parent_dir: Path, points_dir: Path) -> bool:
    """Hard-link the parent's route point files `names` into this run's points dir (they
    are immutable); False, linking nothing, when one is missing."""
    sources = [parent_dir / "local" / "route_points" / name for name in names]
    if not all(p.is_file() for p in sources):
        return False
    for src in sources:
        target = points_dir / src.name
        if not target.exists():
            os.link(src, target)
    return True


def _collect(results, tasks, spills, report, chunks, reused, progress, total) -> None:
    for task, (task_spills, task_report, task_chunks, task_reused) in zip(tasks, results):
        for stream, paths in task_spills.items():
            spills[stream].extend(paths)
        report.merge(task_report)
        for ident, entry in task_chunks.items():
            chunks.setdefault(ident, entry)
        reused[0] += task_reused[0]
        reused[1] += task_reused[1]
        progress("parsing", task.size, total)


def _merge_all(dest: Path, spills: dict[str, list[Path]], parent_dir: Path | None, progress: ProgressFn,
               compressed: bool):
    (dest / "index").mkdir()
    (dest / "added").mkdir()
    (dest / "removed").mkdir()
    counts: dict[str, int] = {}
    delta: dict[str, dict[str, int]] = {}
    spill_bytes = {stream: sum(p.stat().st_size for p in spills[stream]) for stream in STREAMS}
    total = sum(spill_bytes.values())
    for stream in STREAMS:
        name = streamfile.file_name(stream, compressed=compressed)
        # Without a parent every row is added: added/ is then a hard link to the stream
        # (same bytes, immutable) instead of a second copy of a multi-GB file.
        first_run = parent_dir is None
        with streamfile.StreamWriter(dest / name) as rows, \
                streamfile.StreamWriter(dest / "index" / streamfile.index_name(stream, compressed=compressed)) as index, \
                streamfile.StreamWriter(dest / "removed" / name) as removed, \
                (open(os.devnull, "wb") if first_run else streamfile.StreamWriter(dest / "added" / name)) as added:
            n, n_added, n_removed = write_stream(
                _reporting(merge_stream(spills[stream]), progress, total, spill_bytes[stream]), rows, index, added,
                removed,
                streamfile.find(parent_dir, stream) if parent_dir else None,
                streamfile.find_index(parent_dir, stream) if parent_dir else None,
            )
        if first_run:
            os.link(dest / name, dest / "added" / name)
        counts[stream] = n
        delta[stream] = {"added": n_added, "removed": n_removed, "total": n}
    for sub in ("index", "added", "removed"):
        fsync_dir(dest / sub)
    return counts, delta


MERGE_REPORT_BYTES = 4 << 20


def _reporting(lines: Iterator[bytes], progress: ProgressFn, total: int, budget: int) -> Iterator[bytes]:
    """Pass the merged lines through, reporting `merging` progress in bytes of spill data
    as they go (the largest stream takes most of the merge), `budget` in all by its end.
    Resolved duplicates make the merged lines a little shorter than the spill runs."""
    reported = pending = 0
    for line in lines:
        pending += len(line)
        if pending >= MERGE_REPORT_BYTES:
            step = min(pending, budget - reported)
            if step > 0:
                progress("merging", step, total)
                reported += step
            pending = 0
        yield line
    if budget > reported:
        progress("merging", budget - reported, total)
