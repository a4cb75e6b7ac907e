"""`identity build|review|confirm`, `deid`, `share bundle|verify`.

Nothing printed here ever holds a name, birth date or identifier: only ids,
labels, states, reason codes and counts (CONTRACT §8).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from healthdelta import deid, identity, ingest, registry, share
from healthdelta.cli.options import cli, global_options, lock_timeout_option, make_progress, notice
from healthdelta.errors import InputError, UsageError
from healthdelta.fsutil import StateLock, WorkDir


def _state_for(out: Path, state: Path | None) -> Path:
    return state if state is not None else out / "state"


def _run_id_of(run_dir: Path) -> str:
    run_id = ingest.read_manifest(run_dir)["run_id"]
    if not registry.is_run_id(run_id):
        raise InputError("the run directory's manifest.json is damaged")
    return run_id


# --------------------------------------------------------------------------- identity


@cli.group("identity")
@global_options
def identity_group() -> None:
    """People across exports: build the local identity store, review and confirm links."""


@identity_group.command("build")
@click.option("--run", "run_dirs", multiple=True, type=click.Path(path_type=Path),
              help="A staged run directory (repeatable); default: every registered run, oldest first.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
              help="Base output directory.")
@click.option("--state", type=click.Path(path_type=Path), default=None, help="State directory (default <out>/state).")
@lock_timeout_option
@global_options
def identity_build(run_dirs, out, state, lock_timeout):
    """Resolve the people and the owner of staged runs into <state>/identity (idempotent).

    Example: healthdelta identity build --out data
    """
    state = _state_for(out, state)
    if run_dirs:
        runs = [(d, _run_id_of(d)) for d in run_dirs]
    else:
        reg = registry.read_registry(state)
        runs = []
        for entry in reg.ordered():
            rel = entry.get("artifacts", {}).get("staging_dir") or f"staging/{entry['run_id']}"
            runs.append((out / rel, entry["run_id"]))
        if not runs:
            raise UsageError("no registered runs; give --run or run `healthdelta pipeline run` first")
    with StateLock(state, lock_timeout):
        result = identity.build(state / "identity", runs)
    for r in result.results:
        click.echo(f"run_id={r.run_id} owner_person_id={r.owner_person_id} label={r.owner_label.replace(' ', '_')} "
                   f"provisional={'yes' if r.provisional else 'no'}"
                   + (f" reason={r.reason}" if r.reason else ""))
    review = identity.review(state / "identity")
    click.echo(f"people={len(review.people)}")
    click.echo(f"needs_review={review.needs_attention}")


@identity_group.command("review")
@click.option("--state", type=click.Path(path_type=Path), default=Path("data/state"), show_default=True,
              help="State directory.")
@global_options
def identity_review(state):
    """People, links and provisional runs: ids, labels and states only, never names.

    Example: healthdelta identity review --state data/state
    """
    review = identity.review(state / "identity")
    click.echo("PEOPLE")
    _table([("PERSON", "LABEL", "OWNS_RUNS", "PROVISIONAL")]
           + [(pid, label, str(runs), "yes" if prov else "no") for pid, label, runs, prov in review.people])
    click.echo("LINKS")
    _table([("LINK", "KIND", "STATE", "REASON", "PERSONS")]
           + [(r.link_id, r.kind, r.state, r.reason, ",".join(r.person_ids)) for r in review.links])
    if review.provisional_runs:
        click.echo("PROVISIONAL RUNS")
        _table([("RUN", "REASON")] + [(rid[:12], reason) for rid, reason in review.provisional_runs])
    click.echo(f"needs_review={review.needs_attention}")


def _table(rows: list[tuple[str, ...]]) -> None:
    if len(rows) == 1:
        click.echo("  (none)")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@identity_group.command("confirm")
@click.option("--link", "link_id", required=True, help="A link id from `identity review` (l_...).")
@click.option("--state", type=click.Path(path_type=Path), default=Path("data/state"), show_default=True,
              help="State directory.")
@lock_timeout_option
@global_options
def identity_confirm(link_id, state, lock_timeout):
    """Mark an unverified (name-only) link as confirmed by you; confirming again changes nothing.

    Example: healthdelta identity confirm --link l_0123456789ab
    """
    with StateLock(state, lock_timeout):
        row = identity.confirm_link(state / "identity", link_id)
    click.echo(f"link_id={row.link_id}")
    click.echo(f"state={row.state}")


# --------------------------------------------------------------------------- deid


@cli.command("deid")
@click.option("--input", "run_dir", required=True, type=click.Path(path_type=Path),
              help="A staged run directory, <out>/staging/<run_id>.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Receives the de-identified copy in <out>/<run_id>/ (e.g. data/deid).")
@click.option("--identity", "identity_dir", type=click.Path(path_type=Path), default=None,
              help="Identity store (default <out of the run>/state/identity).")
@click.option("--date-shift", is_flag=True, help="Move every date of a person by one secret per-person offset.")
@click.option("--keep-routes", type=click.Choice(list(deid.KEEP_ROUTES)), default="drop", show_default=True,
              help="GPS tracks: drop them, or keep them coarsened to about 1 km.")
@lock_timeout_option
@global_options
@click.pass_context
def deid_cmd(ctx, run_dir, out, identity_dir, date_shift, keep_routes, lock_timeout):
    """Write a de-identified copy of a staged run (share mode); NDJSON can be exported from it.

    Example: healthdelta deid --input data/staging/<run_id> --out data/deid
    """
    run_id = _run_id_of(run_dir)
    if identity_dir is None:
        identity_dir = run_dir.absolute().parent.parent / "state" / "identity"
    progress = make_progress(ctx)
    try:
        with StateLock(identity_dir.parent, lock_timeout), WorkDir(out, f"deid-{run_id[:12]}") as work:
            result = deid.deidentify_run(run_dir, work.path, identity_dir, date_shift=date_shift,
                                         keep_routes=keep_routes, progress=progress)
            work.commit(out / run_id)
    finally:
        progress.close()
    owner = identity.run_owner(identity_dir, run_id)
    if owner is not None and owner.provisional:
        notice(ctx, f"the owner of this export could not be resolved safely ({owner.reason}); "
                    "its rows get a provisional person id")
    click.echo(f"run_id={run_id}")
    click.echo(f"deid_dir={(out / run_id).as_posix()}")
    click.echo(f"owner_label={result.owner_label.replace(' ', '_')}")
    click.echo(f"files={result.files_written}")
    click.echo(f"dropped_files={result.files_dropped}")
    click.echo(f"date_shift={'yes' if result.date_shift else 'no'}")


# --------------------------------------------------------------------------- share


@cli.group("share")
@global_options
def share_group() -> None:
    """Share bundles: a deterministic archive of one share-mode run, and its verifier."""


@share_group.command("bundle")
@click.option("--run", "run_id", required=True, help="Run id (or unique prefix) of a share-mode run.")
@click.option("--out", "dest", required=True, type=click.Path(path_type=Path), help="The FILE.tar.gz to write.")
@click.option("--out-dir", "out_dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
              help="Base output directory of the runs.")
@click.option("--state", type=click.Path(path_type=Path), default=None, help="State directory (default <out-dir>/state).")
@lock_timeout_option
@global_options
def share_bundle(run_id, dest, out_dir, state, lock_timeout):
    """Bundle a run's share-safe artifacts after scanning them for every known identifier.

    Example: healthdelta share bundle --run 3fa2 --out share.tar.gz
    """
    if not dest.name.endswith(".tar.gz"):
        raise UsageError("--out must name a .tar.gz file")
    state = _state_for(out_dir, state)
    with StateLock(state, lock_timeout):
        result = share.build_bundle(out_dir, run_id, dest, state / "identity", state)
    click.echo(f"run_id={result.run_id}")
    click.echo(f"bundle={dest.as_posix()}")
    click.echo(f"members={result.members}")
    click.echo(f"sha256={result.sha256}")
    click.echo("share_safe=this bundle only: de-identified NDJSON and share-mode reports, every member "
               "checked against every known identifier; nothing else under --out-dir may be sent")


@share_group.command("verify")
@click.option("--bundle", "bundle", required=True, type=click.Path(path_type=Path), help="A bundle .tar.gz.")
@global_options
def share_verify(bundle):
    """Check member paths (no absolute, no .., no links), manifest, sizes and hashes.

    Example: healthdelta share verify --bundle share.tar.gz
    """
    problems = share.verify_bundle(bundle)
    for line in problems:
        click.echo(line)
    if problems:
        click.echo(f"errors={len(problems)}")
        raise click.exceptions.Exit(1)
    click.echo("ok")
