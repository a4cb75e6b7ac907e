"""Fault injection through the real CLI (issue 6): SIGKILL/SIGINT/SIGTERM at many points of
staging, parsing, merge/delta (and warehouse/report under `run all`), a full disk and a
read-only output directory.

After every fault: the registry, LAST_RUN and every earlier run's files are byte-identical
to before (`.tmp-*` leftovers and `.lock` aside; new files may only appear under the new
run's own directories), the identity store too when the fault came before the identity
stage, and a plain rerun completes and writes exactly what an uninterrupted run writes
(timestamps aside). To add a fault point, add a `Case` to CASES.

Kill points are given as a fraction of the stage's total progress (measured on the
uninterrupted reference run), so they stay meaningful when the generated export changes.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from healthdelta import doctor, pipeline, streamfile
from healthdelta.layout import OutLayout

SECRET = "5e" * 32  # a fixed identity secret: person ids are then equal across trees
FORMS = ("zip", "folder", "parent")
STAGES_BEFORE_IDENTITY = frozenset({"hashing", "copying", "extracting"})
RUN_DIR_PARENTS = ("staging", "ndjson", "deid", "reports")

pytestmark = pytest.mark.slow  # real runs killed at precise points


@dataclass(frozen=True)
class Case:
    command: tuple[str, ...]  # ("pipeline", "run") or ("run", "all")
    run: int  # 1: first run into an empty tree, 2: the next export on top of run 1
    form: str  # zip | folder | parent
    stage: str  # a progress stage name
    at: float | int  # fraction (float) of the stage's total progress, or absolute units (int)
    sig: str = "KILL"
    mode: str = "local"

    @property
    def id(self) -> str:
        cmd = "-".join(self.command)
        return f"{cmd}-run{self.run}-{self.form}-{self.mode}-{self.stage}@{self.at}-{self.sig}"

    @property
    def ref(self) -> tuple:
        return (self.command, self.run, self.form, self.mode)


PIPE, ALL = ("pipeline", "run"), ("run", "all")
CASES = [
    # first run, staging
    Case(PIPE, 1, "zip", "hashing", 0.3),
    Case(PIPE, 1, "zip", "hashing", 1.0),  # hashed, nothing extracted yet
    Case(PIPE, 1, "zip", "extracting", 0.05),
    Case(PIPE, 1, "zip", "extracting", 0.5),
    Case(PIPE, 1, "zip", "extracting", 1.0),  # extracted, manifest not written, not renamed
    Case(PIPE, 1, "folder", "copying", 0.05),
    Case(PIPE, 1, "folder", "copying", 0.5),
    Case(PIPE, 1, "folder", "copying", 1.0),
    Case(PIPE, 1, "parent", "copying", 0.7),
    # first run, identity resolution (reads the person sources file by file)
    Case(PIPE, 1, "folder", "identity", 0.5),
    # first run, parsing and merge/delta
    Case(PIPE, 1, "zip", "parsing", 1),  # after the first parse task
    Case(PIPE, 1, "folder", "parsing", 0.6),
    Case(PIPE, 1, "folder", "parsing", 1.0),  # every task parsed, nothing merged
    Case(PIPE, 1, "zip", "merging", 0.05),
    Case(PIPE, 1, "folder", "merging", 0.5),
    Case(PIPE, 1, "zip", "merging", 1.0),  # every stream merged; delta.json/commit not yet
    # second run (a delta against run 1)
    Case(PIPE, 2, "folder", "copying", 0.3),
    Case(PIPE, 2, "folder", "copying", 1.0),
    Case(PIPE, 2, "zip", "hashing", 0.5),
    Case(PIPE, 2, "zip", "extracting", 0.6),
    Case(PIPE, 2, "zip", "parsing", 0.5),
    Case(PIPE, 2, "folder", "merging", 0.3),
    Case(PIPE, 2, "zip", "merging", 1.0),
    # share mode: de-identification, then parsing of the de-identified copy
    Case(PIPE, 2, "zip", "deid", 0.3, mode="share"),
    Case(PIPE, 2, "zip", "deid", 1.0, mode="share"),
    Case(PIPE, 2, "zip", "parsing", 0.5, mode="share"),
    # Ctrl-C and SIGTERM unwind (one error line), after the point where staging is renamed
    Case(PIPE, 2, "folder", "parsing", 0.5, sig="INT"),
    Case(PIPE, 2, "zip", "merging", 0.5, sig="TERM"),
    # `run all`: warehouse load and reports (skipped where the command does not exist yet)
    Case(ALL, 1, "zip", "merging", 1.0),
    # mid-frame in the zstd writers of the streams, added/ and removed/ (one `.tmp-*` file each)
    Case(ALL, 2, "folder", "merging", 0.5),
    Case(ALL, 1, "zip", "loading", 0.5),
    Case(ALL, 1, "zip", "loading", 1.0),
    Case(ALL, 2, "zip", "loading", 0.5),
    Case(ALL, 2, "folder", "report", 1),
    Case(ALL, 2, "zip", "report", 3),  # reports written, not registered
    # the staged files moving into the shared store, the last step before registration
    Case(PIPE, 1, "zip", "storing", 0.5),  # mid-blob
    Case(PIPE, 2, "folder", "storing", 1.0),  # every blob durable, source/ not yet removed
    Case(ALL, 2, "zip", "storing", 0.5),
]


# --------------------------------------------------------------------------- fixtures


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HEALTHDELTA_TEST_FAULT"}
    return {**env, **(extra or {})}


def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None, preexec_fn=None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "healthdelta", *args], cwd=cwd, env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


def input_of(exports: dict, run: int, form: str) -> Path:
    exp = exports[run]
    return {"zip": exp.zip_path, "folder": exp.export_dir, "parent": exp.export_dir.parent}[form]


def empty_tree(path: Path) -> Path:
    """An output tree holding only a fixed identity secret."""
    ident = path / "state" / "identity"
    ident.mkdir(parents=True)
    os.chmod(ident, 0o700)
    (ident / "secret.key").write_text(SECRET + "\n")
    return path


def command_exists(command: tuple[str, ...]) -> bool:
    proc = subprocess.run([sys.executable, "-m", "healthdelta", *command, "--help"], capture_output=True,
                          text=True, timeout=60)
    return proc.returncode == 0


class Refs:
    """Reference trees (uninterrupted runs) and each stage's progress totals, built lazily."""

    def __init__(self, root: Path, exports: dict) -> None:
        self.root, self.exports = root, exports
        self._trees: dict[tuple, Path] = {}
        self._totals: dict[tuple, dict[str, int]] = {}

    def base(self, command: tuple[str, ...], run: int, mode: str = "local") -> Path:
        """The tree a case starts from: empty for run 1, run 1 (zip, same mode) done for run 2."""
        return self.tree((command, 1, "zip", mode))[0] if run == 2 else self._empty()

    def _empty(self) -> Path:
        path = self.root / "empty"
        if not path.exists():
            empty_tree(path)
        return path

    def tree(self, ref: tuple) -> tuple[Path, dict[str, int]]:
        if ref not in self._trees:
            command, run, form, mode = ref
            base = self.base(command, run, mode)
            path = self.root / ("ref-" + "-".join(map(str, (*command, run, form, mode))))
            shutil.rmtree(path, ignore_errors=True)  # a reference that failed half-way before
            shutil.copytree(base, path, symlinks=True)
            totals: dict[str, int] = defaultdict(int)

            def record(stage: str, advance: int, total: int | None) -> None:
                totals[stage] += advance

            opts = pipeline.PipelineOptions(input=input_of(self.exports, run, form),
                                            layout=OutLayout.create(path), mode=mode)
            runner = pipeline.run_all if command == ALL else pipeline.run_pipeline
            result = runner(opts, record)
            assert result.status == "created"
            self._trees[ref], self._totals[ref] = path, dict(totals)
        return self._trees[ref], self._totals[ref]


@pytest.fixture(scope="session")
def fault_exports(tmp_path_factory) -> dict:
    from healthdelta.synth import generate_export

    root = tmp_path_factory.mktemp("fault-exports")
    first = generate_export(root / "export-1", seed=11, records=2000, zip=True)
    second = generate_export(root / "export-2", base=first, new_records=150, zip=True)
    return {1: first, 2: second}


@pytest.fixture(scope="session")
def refs(tmp_path_factory, fault_exports) -> Refs:
    return Refs(tmp_path_factory.mktemp("fault-refs"), fault_exports)


@pytest.fixture(scope="session")
def run_all_exists() -> bool:
    return command_exists(ALL)


# --------------------------------------------------------------------------- snapshots


def is_transient(rel: str) -> bool:
    return rel.endswith("/.lock") or rel == "state/.lock" or any(
        part.startswith(".tmp-") for part in rel.split("/"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` by relative path, `.lock` and `.tmp-*` leftovers aside."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.is_symlink() and not is_transient(rel):
            out[rel] = p.read_bytes()
    return out


def normalised(snap: dict[str, bytes], *, identity_counts: bool = True) -> dict[str, bytes]:
    """Drop the wall-clock fields (created_at, finished_at) so two runs compare by bytes.

    `identity_counts=False` also drops the identity stage's "new people/links" counters
    of run reports: after a kill past the identity stage the rerun finds them already
    made (the identity bug below, checked by the xfail test there).
    """
    out = dict(snap)
    days: set[str] = set()
    if "state/runs.json" in out:
        doc = json.loads(out["state/runs.json"])
        for entry in doc["runs"].values():
            days.add((entry["created_at"] or "")[:10])
            entry["created_at"] = None
        out["state/runs.json"] = json.dumps(doc, sort_keys=True).encode()
    # Reports show each run's created_at (in any spelling): blank every time of those days.
    stamp = re.compile(rb"(\d{4}-\d\d-\d\d)[T ]\d\d:\d\d(?::\d\d)?(?:\.\d+)?Z?")
    for rel in [r for r in out if r.startswith("reports/")]:
        out[rel] = stamp.sub(lambda m: b"<time>" if m.group(1).decode() in days else m.group(0), out[rel])
    for rel in list(out):
        if rel.endswith("/run_report.json"):
            doc = json.loads(out[rel])
            doc["finished_at"] = None
            if not identity_counts:
                for name in ("new_people", "new_links"):
                    doc.get("stages", {}).get("identity", {}).pop(name, None)
            out[rel] = json.dumps(doc, sort_keys=True).encode()
    return out


def new_run_id(before: dict[str, bytes], ref: dict[str, bytes]) -> str:
    old = set(json.loads(before["state/runs.json"])["runs"]) if "state/runs.json" in before else set()
    new = set(json.loads(ref["state/runs.json"])["runs"]) - old
    assert len(new) == 1
    return new.pop()


def assert_untouched(before: dict[str, bytes], after: dict[str, bytes], new_id: str, *,
                     identity_strict: bool, allow_warehouse: bool = False) -> None:
    """Earlier files unchanged and none removed; new files only in the new run's dirs."""
    changed = sorted(rel for rel in before if after.get(rel) != before[rel])
    if not identity_strict:
        changed = [rel for rel in changed if not rel.startswith("state/identity/")]
    if allow_warehouse:  # the warehouse file itself changes while loading; run all unloads on failure
        changed = [rel for rel in changed if not rel.startswith("warehouse.duckdb")]
    assert not changed, f"changed or removed: {changed[:10]}"
    for rel in after:
        if rel in before:
            continue
        top = rel.split("/")
        if top[0] in RUN_DIR_PARENTS and len(top) > 1 and top[1] == new_id:
            continue
        if rel.startswith("staging/store/"):  # the new run's blobs (earlier ones are never changed)
            continue
        if not identity_strict and rel.startswith("state/identity/"):
            continue
        if allow_warehouse and rel.startswith("warehouse.duckdb"):
            continue
        raise AssertionError(f"unexpected new file {rel}")
    for rel in ("state/runs.json", "state/LAST_RUN"):
        assert after.get(rel) == before.get(rel), rel


def fault_units(case: Case, totals: dict[str, int]) -> int:
    total = totals.get(case.stage)
    assert total, f"stage {case.stage!r} reports no progress on this run (stages: {sorted(totals)})"
    if isinstance(case.at, int):
        assert case.at <= total, f"{case.stage} reports only {total} units"
        return case.at
    return max(1, math.ceil(case.at * total))


# --------------------------------------------------------------------------- the kill matrix


def _inject(case: Case, refs: Refs, tmp_path: Path, run_all_exists: bool):
    if case.command == ALL and not run_all_exists:
        pytest.skip("`run all` does not exist yet")
    ref_tree, totals = refs.tree(case.ref)
    out = tmp_path / "data"
    shutil.copytree(refs.base(case.command, case.run, case.mode), out, symlinks=True)
    before = snapshot(out)
    units = fault_units(case, totals)
    args = [*case.command, "--input", str(input_of(refs.exports, case.run, case.form)), "--out", str(out),
            "--mode", case.mode]
    proc = run_cli(tmp_path, *args, env={"HEALTHDELTA_TEST_FAULT": f"{case.stage}:{units}:{case.sig}"})
    return ref_tree, out, before, args, proc


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_leaves_state_intact_and_rerun_completes(case, refs, tmp_path, run_all_exists):
    ref_tree, out, before, args, proc = _inject(case, refs, tmp_path, run_all_exists)
    if case.sig == "KILL":
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    else:
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
        assert proc.stderr.strip().splitlines() == ["error: interrupted; nothing was registered"]
    ref = snapshot(ref_tree)
    new_id = new_run_id(before, ref)
    assert_untouched(before, snapshot(out), new_id, identity_strict=case.stage in STAGES_BEFORE_IDENTITY,
                     allow_warehouse=case.command == ALL)

    rerun = run_cli(tmp_path, *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"run_id={new_id}" in rerun.stdout.splitlines()
    assert "Traceback" not in rerun.stderr
    after = snapshot(out)
    assert not [p for p in out.rglob(".tmp-*")], "leftovers survived the rerun"
    if case.command == ALL:  # DuckDB's file bytes are not deterministic; its runs must be
        for snap in (after, ref):
            snap.pop("warehouse.duckdb", None)
    strict = case.stage in STAGES_BEFORE_IDENTITY
    assert normalised(after, identity_counts=strict) == normalised(ref, identity_counts=strict)
    assert doctor.check(OutLayout.create(out)).ok


# Kills after the identity stage leave the identity store changed by a run that was never
# registered (pipeline.py resolves identity before the NDJSON export and writes the store
# at once). Reported to the lead; these turn into passes once that is fixed.
IDENTITY_CASES = [
    Case(PIPE, 1, "folder", "parsing", 0.6),
    Case(PIPE, 2, "zip", "merging", 1.0),
    Case(PIPE, 2, "zip", "deid", 0.3, mode="share"),
]


@pytest.mark.parametrize("case", IDENTITY_CASES, ids=[c.id for c in IDENTITY_CASES])
def test_fault_after_identity_leaves_identity_store_intact(case, refs, tmp_path, run_all_exists):
    ref_tree, out, before, args, proc = _inject(case, refs, tmp_path, run_all_exists)
    assert proc.returncode == -signal.SIGKILL
    after = snapshot(out)
    state_after = {k: v for k, v in after.items() if k.startswith("state/")}
    state_before = {k: v for k, v in before.items() if k.startswith("state/")}
    # ...and so the rerun's run report differs from an uninterrupted run's (new_people 0).
    assert run_cli(tmp_path, *args).returncode == 0
    rerun_same = normalised(snapshot(out)) == normalised(snapshot(ref_tree))
    assert state_after == state_before and rerun_same


def test_kill_between_ndjson_commit_and_registration(refs, tmp_path):
    """No progress call separates the NDJSON commit from the registry write, so this
    point is simulated: a complete run 2 whose registry and LAST_RUN are those of run 1."""
    case = Case(PIPE, 2, "folder", "copying", 1.0)
    ref_tree, _ = refs.tree(case.ref)
    base = refs.base(PIPE, 2)
    out = tmp_path / "data"
    shutil.copytree(ref_tree, out, symlinks=True)
    for name in ("runs.json", "LAST_RUN"):
        shutil.copy(base / "state" / name, out / "state" / name)
    # Run 1 is retired only once run 2 is registered: at this point it still has its key
    # index and parse cache.
    for run in (base / "ndjson").iterdir():
        for part in ("index", "chunks"):
            if (run / part).is_dir() and not (out / "ndjson" / run.name / part).exists():
                shutil.copytree(run / part, out / "ndjson" / run.name / part)
    found = doctor.check(OutLayout.create(out))
    assert any(f.code == "unregistered_run_dir" for f in found.findings)
    args = ["pipeline", "run", "--input", str(input_of(refs.exports, 2, "folder")), "--out", str(out)]
    rerun = run_cli(tmp_path, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert normalised(snapshot(out)) == normalised(snapshot(ref_tree))


# --------------------------------------------------------------------------- full disk, read-only


def _fsize_limit(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _largest(root: Path, *, plain: bool = False) -> int:
    """The largest file under `root`; with `plain`, compressed streams count their plain bytes
    (the NDJSON stage writes those in its spill runs before it compresses them)."""
    return max(len(streamfile.read_bytes(p)) if plain else p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("where", ["nothing_writable", "during_staging", "during_ndjson"])
def test_file_size_limit_fails_cleanly(where, refs, tmp_path):
    """RLIMIT_FSIZE: a write past the limit fails with EFBIG, like a full disk would with ENOSPC."""
    ref_tree, _ = refs.tree((PIPE, 2, "zip", "local"))
    out = tmp_path / "data"
    shutil.copytree(refs.base(PIPE, 2), out, symlinks=True)
    before = snapshot(out)
    new_id = new_run_id(before, snapshot(ref_tree))
    staged = max(f["size"] for f in json.loads((ref_tree / "staging" / new_id / "manifest.json").read_text())["files"])
    limit = {"nothing_writable": 0, "during_staging": staged // 2, "during_ndjson": staged + 1}[where]
    assert limit < _largest(ref_tree / "ndjson" / new_id, plain=True)
    args = ["pipeline", "run", "--input", str(input_of(refs.exports, 2, "zip")), "--out", str(out)]
    proc = run_cli(tmp_path, *args, preexec_fn=_fsize_limit(limit))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: File too large"], proc.stderr
    assert_untouched(before, snapshot(out), new_id, identity_strict=where != "during_ndjson")
    if where != "during_ndjson":
        assert snapshot(out) == before
    rerun = run_cli(tmp_path, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert normalised(snapshot(out)) == normalised(snapshot(ref_tree))


def _can_unshare_mount() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp 2>/dev/null"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_unshare_mount(),
                                 reason="needs `unshare -m` and mount (root with CAP_SYS_ADMIN); "
                                        "the RLIMIT_FSIZE cases cover the same failure paths")

# Runs inside a private mount namespace: the tree is copied onto a tmpfs of a given free
# size mounted over the output dir, the command runs, and the tmpfs's files are reported
# back as JSON (the mount vanishes with the namespace, so no cleanup can be forgotten).
_TMPFS_RUNNER = r"""
import hashlib, json, os, shutil, subprocess, sys
target, base, free, report = sys.argv[1:5]
cmd = sys.argv[5:]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", target], check=True)
shutil.copytree(base, target, dirs_exist_ok=True, symlinks=True)
st = os.statvfs(target)
used = (st.f_blocks - st.f_bfree) * st.f_frsize
subprocess.run(["mount", "-o", f"remount,size={used + int(free)}", target], check=True)
proc = subprocess.run(cmd, capture_output=True, text=True)
files = {}
for dirpath, _, names in os.walk(target):
    for n in names:
        p = os.path.join(dirpath, n)
        rel = os.path.relpath(p, target)
        if not os.path.islink(p):
            files[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
json.dump({"rc": proc.returncode, "stderr": proc.stderr, "files": files}, open(report, "w"))
"""


@needs_mount
@pytest.mark.parametrize("free,message", [
    (64 << 10, "error: not enough free disk space to stage the export"),
    ("staged+256k", "error: No space left on device"),
])
def test_full_disk_fails_cleanly(free, message, refs, tmp_path):
    import hashlib

    ref_tree, _ = refs.tree((PIPE, 2, "zip", "local"))
    base = refs.base(PIPE, 2)
    before = {rel: hashlib.sha256(b).hexdigest() for rel, b in snapshot(base).items()}
    new_id = new_run_id(snapshot(base), snapshot(ref_tree))
    if free == "staged+256k":
        manifest = json.loads((ref_tree / "staging" / new_id / "manifest.json").read_text())
        free = sum(f["size"] for f in manifest["files"]) + (256 << 10)
    out = tmp_path / "data"
    out.mkdir()
    runner = tmp_path / "runner.py"
    runner.write_text(_TMPFS_RUNNER)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "healthdelta", "pipeline", "run", "--input",
           str(input_of(refs.exports, 2, "zip")), "--out", str(out)]
    subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, str(runner), str(out), str(base),
                    str(free), str(report), *cmd], check=True, timeout=300, env=cli_env())
    result = json.loads(report.read_text())
    assert result["rc"] == 1, result["stderr"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    after = {rel: h for rel, h in result["files"].items() if not is_transient(rel)}
    for rel, h in before.items():
        if not rel.startswith("state/identity/"):
            assert after.get(rel) == h, rel
    assert not [rel for rel in after if rel not in before and not rel.startswith(
        tuple(f"{d}/{new_id}" for d in RUN_DIR_PARENTS)) and not rel.startswith("state/identity/")]
    assert after.get("state/runs.json") == before["state/runs.json"]
    assert after.get("state/LAST_RUN") == before["state/LAST_RUN"]


@needs_mount
def test_read_only_output_dir_fails_cleanly(refs, tmp_path):
    """A read-only bind mount of the output dir (chmod does not stop root)."""
    out = tmp_path / "data"
    shutil.copytree(refs.base(PIPE, 2), out, symlinks=True)
    before = snapshot(out)
    script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"')
    cmd = [sys.executable, "-m", "healthdelta", "pipeline", "run", "--input",
           str(input_of(refs.exports, 2, "zip")), "--out", str(out)]
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(out), *cmd],
                          capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: Read-only file system"]
    assert snapshot(out) == before
    # doctor still checks a read-only tree (it cannot take the lock there, and needs not).
    doc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(out),
                          sys.executable, "-c",
                          "import healthdelta.cli.commands_doctor; from healthdelta.cli import main; main()",
                          "doctor", "--out", str(out)], capture_output=True, text=True, timeout=300, env=cli_env())
    assert doc.returncode == 0, doc.stdout + doc.stderr
    assert doc.stdout.splitlines()[-1] == "errors=0"
