"""`cohort run|status`: many participants' exports on Dask, pooled as Parquet."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import click

from healthdelta import cohort
from healthdelta.cli.options import cli, global_options, make_progress
from healthdelta.errors import HealthDeltaError
from healthdelta.progress import ProgressFn, no_progress

# Test-only: `<participant>:<stage>:<units>[:once]` makes the Dask worker running that
# participant kill itself (SIGKILL) once the task's `<stage>` reported `<units>` of
# progress; with `once`, only the first attempt in this output directory dies.
FAULT_ENV = "HEALTHDELTA_TEST_COHORT_FAULT"


class WorkerFault:
    """A picklable task-progress factory that kills the worker at one precise point."""

    def __init__(self, spec: str, out: Path) -> None:
        participant, stage, units, *flags = spec.split(":")
        self.participant, self.stage, self.units = participant, stage, int(units)
        self.marker = (out / f".test-fault-{participant}").absolute() if "once" in flags else None

    def __call__(self, participant_id: str) -> ProgressFn:
        if participant_id != self.participant:
            return no_progress
        done = 0

        def progress(stage: str, advance: int, total: int | None) -> None:
            nonlocal done
            if stage != self.stage:
                return
            done += advance
            if done >= self.units and self._arm():
                os.kill(os.getpid(), signal.SIGKILL)

        return progress

    def _arm(self) -> bool:
        if self.marker is None:
            return True
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True


@cli.group("cohort")
@global_options
def cohort_group() -> None:
    """Cohorts: one export per participant, on Dask, pooled as Parquet."""


@cohort_group.command("run")
@click.option("--inputs", required=True, type=click.Path(path_type=Path),
              help="A directory of <participant_id>.zip or <participant_id>/ exports, "
                   "or a CSV manifest with the columns participant_id,path.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The cohort output directory.")
@click.option("--mode", type=click.Choice(["share", "local"]), default="share", show_default=True,
              help="share: every export is de-identified before anything is pooled.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes of the local Dask cluster (default: one per two cores).")
@click.option("--scheduler", default=None,
              help="Address of an existing Dask scheduler, e.g. tcp://host:8786, instead of a local cluster.")
@global_options
@click.pass_context
def cohort_run(ctx, inputs, out, mode, workers, scheduler):
    """Process every participant's export (`run all` each, incremental), publish Parquet, build cohort.duckdb.

    Example: healthdelta cohort run --inputs exports/ --out cohort --workers 2
    """
    fault = os.environ.get(FAULT_ENV)
    progress = make_progress(ctx)
    try:
        result = cohort.run_cohort(inputs, out, mode=mode, workers=workers, scheduler=scheduler,
                                   task_progress=WorkerFault(fault, out) if fault else None, progress=progress)
    finally:
        progress.close()
    for r in result.results:
        fields = [f"participant={r.participant}", f"status={r.status}"]
        if r.status == "failed":
            fields.append(f"reason={r.reason}")
        else:
            fields += [f"run_id={r.run_id}", f"published_runs={r.published_runs}", f"rows_added={r.rows_added}"]
        click.echo(" ".join(fields))
    click.echo(f"participants={len(result.results)}")
    for status in ("created", "no_changes", "failed"):
        click.echo(f"{status}={result.count(status)}")
    if result.db is not None:
        click.echo(f"cohort_db={(out / result.db.name).as_posix()}")
    click.echo(f"parquet={(out / 'parquet').as_posix()}")
    if result.failed:
        names = ", ".join(r.participant for r in result.failed)
        raise HealthDeltaError(f"{len(result.failed)} of {len(result.results)} participant(s) failed: {names}")


@cohort_group.command("status")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The cohort output directory.")
@global_options
def cohort_status_cmd(out):
    """Participants, their published runs and rows, and the last run's failures.

    Example: healthdelta cohort status --out cohort
    """
    status = cohort.cohort_status(out)
    people = status["participants"]
    for pid, info in people.items():
        line = f"participant={pid} runs={info['runs']} rows={info['rows']}"
        if pid in status["failures"]:
            line += f" last_run=failed reason={status['failures'][pid]}"
        click.echo(line)
    click.echo(f"participants={len(people)}")
    click.echo(f"runs={sum(i['runs'] for i in people.values())}")
    click.echo(f"rows={sum(i['rows'] for i in people.values())}")
    click.echo(f"failures={len(status['failures'])}")
