"""`identity build|review|confirm`, `deid`, `share bundle|verify`.

Nothing printed here ever holds a name, birth date or identifier: only ids,
labels, states, reason codes and counts; the one exception is `identity review
--show-names`, which the user asks for on a local-mode state, for their own screen.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from healthdelta import deid, identity, ingest, registry, share
from healthdelta.cli.options import cli, global_options, lock_timeout_option, make_progress, notice
from healthdelta.errors import InputError, UsageError
from healthdelta.fsutil import StateLock, WorkDir, json_bytes


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
@click.option("--show-names", is_flag=True,
              help="Also show the names and birth dates each person and link rests on (local-mode state only; "
                   "for your own screen, never for sharing).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@global_options
def identity_review(state, show_names, as_json):
    """People, links (and what each rests on) and provisional runs, with the command that
    confirms each unverified link. Ids, labels and states only unless --show-names.

    Example: healthdelta identity review --state data/state --show-names
    """
    if show_names and any(e.get("mode") == "share" for e in registry.read_registry(state).runs.values()):
        raise UsageError("--show-names is for local-mode outputs: this state holds share-mode runs")
    review = identity.review(state / "identity", with_names=show_names)
    confirm = {r.link_id: f"healthdelta identity confirm --link {r.link_id} --state {shlex.quote(state.as_posix())}"
               for r in review.links if r.state == "unverified"}
    if as_json:
        click.echo(json_bytes(_review_json(review, confirm)).decode("utf-8"), nl=False)
        return
    names = _names_text if show_names else None
    click.echo("PEOPLE")
    _table([("PERSON", "LABEL", "OWNS_RUNS", "PROVISIONAL") + (("NAMES",) if names else ())]
           + [(p.person_id, p.label, str(p.owns_runs), "yes" if p.provisional else "no")
              + ((names(p.names),) if names else ()) for p in review.people])
    click.echo("LINKS")
    _table([("LINK", "KIND", "STATE", "REASON", "BASED_ON", "PERSONS") + (("NAMES",) if names else ())]
           + [(r.link_id, r.kind, r.state, r.reason, "+".join(r.based_on), ",".join(r.person_ids))
              + ((names(r.names),) if names else ()) for r in review.links])
    if review.provisional_runs:
        click.echo("PROVISIONAL RUNS")
        _table([("RUN", "REASON")] + [(rid[:12], reason) for rid, reason in review.provisional_runs])
    if confirm:
        click.echo("TO CONFIRM (after checking that both sides are the same person)")
        for command in confirm.values():
            click.echo(f"  {command}")
    click.echo(f"needs_review={review.needs_attention}")


def _names_text(names: identity.Names | None) -> str:
    if names is None or not (names.names or names.birth_dates):
        return "-"
    return "; ".join(names.names) + (f" (born {', '.join(names.birth_dates)})" if names.birth_dates else "")


def _review_json(review: identity.Review, confirm: dict[str, str]) -> dict:
    def names(found: identity.Names | None) -> dict:
        return {} if found is None else {"names": list(found.names), "birth_dates": list(found.birth_dates)}

    return {
        "people": [{"person_id": p.person_id, "label": p.label, "owns_runs": p.owns_runs,
                    "provisional": p.provisional, **names(p.names)} for p in review.people],
        "links": [{"link_id": r.link_id, "kind": r.kind, "state": r.state, "reason": r.reason,
                   "based_on": list(r.based_on), "person_ids": list(r.person_ids),
                   "confirm_command": confirm.get(r.link_id), **names(r.names)} for r in review.links],
        "provisional_runs": [{"run_id": rid, "reason": reason} for rid, reason in review.provisional_runs],
        "needs_review": review.needs_attention,
    }


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
