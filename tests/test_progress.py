"""Progress: units per stage, `stage k of n` lines, and stages that report while they work."""

from __future__ import annotations

import io
import time
from collections import defaultdict

import pytest

from healthdelta import export, pipeline, warehouse
from healthdelta.cli.progress import ProgressDisplay, command_plan
from healthdelta.layout import OutLayout
from healthdelta.progress import stage_unit



def _lines(plan, calls, mode="always") -> list[str]:
    stream = io.StringIO()
    display = ProgressDisplay(mode, stream=stream, plan=plan)
    for call in calls:
        display(*call)
    display.close()
    return stream.getvalue().splitlines()


def test_units_bytes_human_readable_and_counts_with_their_unit():
    assert (stage_unit("copying"), stage_unit("identity"), stage_unit("report")) == ("bytes", "files", "steps")
    lines = _lines(None, [("copying", 3 << 20, 12 << 20), ("report", 1, 3), ("report", 2, 3), ("merging", 5, None)])
    assert lines[0].startswith("copying:  25% 3.00MB/12.0MB [")
    assert lines[-2].startswith("report: 100% 3/3 steps [") and "steps/s" in lines[-2]
    assert lines[-1].startswith("merging: 5.00B [")  # no total: no percentage


def test_stage_k_of_n_once_per_step_in_plan_order():
    plan = command_plan("run all", share=False)
    assert [title for title, _ in plan] == ["staging the export", "resolving people", "parsing",
                                            "merging and delta", "loading the warehouse", "writing the reports",
                                            "storing the staged export"]
    assert [t for t, _ in command_plan("pipeline run", share=True)][1:3] == ["resolving people", "de-identifying"]
    assert command_plan("duckdb build", share=False) is None
    calls = [("hashing", 10, 10), ("extracting", 5, 10), ("extracting", 5, 10), ("identity", 2, 2), ("parsing", 1, 1),
             ("merging", 1, 1), ("loading", 1, 1), ("report", 3, 3), ("storing", 1, 1)]
    headers = [line for line in _lines(plan, calls) if line.startswith("stage ")]
    assert headers == ["stage 1 of 7: staging the export", "stage 2 of 7: resolving people", "stage 3 of 7: parsing",
                       "stage 4 of 7: merging and delta", "stage 5 of 7: loading the warehouse",
                       "stage 6 of 7: writing the reports", "stage 7 of 7: storing the staged export"]


def test_auto_mode_off_a_terminal_stays_quiet_for_short_stages():
    plan = command_plan("pipeline run", share=False)
    assert _lines(plan, [("copying", 10, 10), ("parsing", 1, 1)], mode="auto") == []
    assert _lines(plan, [("copying", 10, 10)], mode="never") == []


class _FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_shows_the_step_line_above_the_bar():
    stream = _FakeTty()
    display = ProgressDisplay("auto", stream=stream, plan=command_plan("pipeline run", share=False))
    display("copying", 1 << 20, 2 << 20)
    display("parsing", 1, 2)
    display.close()
    text = stream.getvalue()
    assert text.index("stage 1 of 5: staging the export") < text.index("copying")
    assert text.index("stage 3 of 5: parsing") < text.rindex("parsing:")


@pytest.mark.slow
def test_merging_and_loading_report_within_a_stream(tmp_path, monkeypatch):
    """The largest stream no longer reports once at its end: merging reports as it reads the
    spill runs, and each stage still adds up to exactly its total."""
    monkeypatch.setattr(export, "MERGE_REPORT_BYTES", 1024)
    from healthdelta.synth import generate_export

    exp = generate_export(tmp_path / "e", seed=2, records=1500)
    calls: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
    opts = pipeline.PipelineOptions(input=exp.root, layout=OutLayout.create(tmp_path / "data"))
    assert pipeline.run_all(opts, lambda s, a, t: calls[s].append((a, t))).status == "created"
    for stage in ("identity", "merging", "loading"):
        totals = {t for _, t in calls[stage]}
        assert len(totals) == 1 and sum(a for a, _ in calls[stage]) == totals.pop(), stage
    assert len(calls["merging"]) > 20  # observations alone is many reports, not one


class _SlowStatement:
    """A connection whose running statement advances as DuckDB's progress estimate does."""

    def __init__(self) -> None:
        self.percent = -1.0

    def execute(self, sql: str) -> None:
        pass

    def query_progress(self) -> float:
        return self.percent


def test_statement_progress_reports_while_the_statement_runs(monkeypatch):
    monkeypatch.setattr(warehouse, "PROGRESS_POLL_SECONDS", 0.01)
    con = _SlowStatement()
    reports: list[int] = []
    with warehouse._statement_progress(con, reports.append, 1000):
        for percent, reached in ((-1.0, 0), (25.0, 250), (60.0, 600), (80.0, 800)):
            con.percent = percent
            deadline = time.monotonic() + 5
            while sum(reports) < reached and time.monotonic() < deadline:
                time.sleep(0.005)
            assert sum(reports) == reached  # reported while the statement still runs
    assert reports == [250, 350, 200, 200]  # the rest once it has finished


def test_statement_progress_reports_no_rest_when_the_statement_fails(monkeypatch):
    monkeypatch.setattr(warehouse, "PROGRESS_POLL_SECONDS", 0.01)
    reports: list[int] = []
    try:
        with warehouse._statement_progress(_SlowStatement(), reports.append, 1000):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert reports == []
