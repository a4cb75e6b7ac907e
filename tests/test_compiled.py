"""The compiled fast path against the pure-Python one (issue 12).

Every CLI command here runs twice in subprocesses, once with HEALTHDELTA_PURE_PYTHON=1 (the
`.py` modules) and once without (the Cython-compiled ones), on identical copies of the input
and output trees; the two must give byte-identical NDJSON (streams, key index, delta, parse
report), the same exit code and the same messages. Covered: generated exports (several
seeds, with planted PII and markup that takes every reader tier), Apple's public sample,
and every case of test_hostile_inputs.py (collected again below under a differential
runner). The parser's own tests and the property tests also run on the pure path here,
since the rest of the suite runs on whichever path is installed; the fuzz harness runs on both.

Skipped when no compiled module is built (a pure-Python install); failing when one is built
but not used, since then the compiled path would silently go untested.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import test_hostile_inputs as hostile
from conftest import SHARED_FIXTURE
from test_hostile_inputs import base_tree, out, sentinel  # noqa: F401 - fixtures of the re-run hostile cases

from healthdelta import _fastpath, streamfile, synth

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PURE = {_fastpath.PURE_ENV: "1"}


def _env(pure: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (_fastpath.PURE_ENV, "HEALTHDELTA_TEST_FAULT")}
    return {**env, **PURE} if pure else env


def _compiled_in_subprocess(pure: bool) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", "import healthdelta, json; print(json.dumps(healthdelta.compiled()))"],
                          env=_env(pure), capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def _built_extensions() -> list[Path]:
    found = []
    for name in _fastpath.MODULES:
        source = SRC.joinpath(*name.split(".")).with_suffix(".py")
        found += [p for suffix in importlib.machinery.EXTENSION_SUFFIXES
                  if (p := source.with_name(source.stem + suffix)).is_file()]
    return found


@pytest.fixture(scope="module", autouse=True)
def both_paths() -> None:
    compiled = _compiled_in_subprocess(pure=False)
    if not compiled:
        built = _built_extensions()
        if built:
            pytest.fail(f"compiled modules are built ({', '.join(p.name for p in built)}) but not used: "
                        "built from other source than the .py now holds; rebuild with `make venv`")
        pytest.skip("the compiled fast path is not built (a pure-Python install)")
    assert sorted(compiled) == sorted(_fastpath.MODULES), compiled  # every module built, none failed
    assert _compiled_in_subprocess(pure=True) == []


def _cli(cwd: Path, pure: bool, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "healthdelta", *args], cwd=cwd, env=_env(pure),
                          capture_output=True, text=True, timeout=timeout)


def _ndjson_tree(out: Path) -> dict[str, bytes]:
    """Every file of every stored NDJSON run, compressed streams as their canonical bytes."""
    root = out / "ndjson"
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): streamfile.read_bytes(p) for p in sorted(root.rglob("*"))
            if p.is_file() and ".tmp-" not in p.as_posix()}


def _same(cwd: Path, pure: subprocess.CompletedProcess, fast: subprocess.CompletedProcess, pure_dir: Path,
          fast_dir: Path) -> None:
    def text(proc: subprocess.CompletedProcess, own: Path) -> tuple[str, str]:
        forms = (str(own), os.path.relpath(own, cwd))  # paths are printed as given, relative to cwd
        out, err = proc.stdout, proc.stderr
        for form in forms:
            out, err = out.replace(form, "<out>"), err.replace(form, "<out>")
        return out, err

    assert fast.returncode == pure.returncode, (pure.stderr[-2000:], fast.stderr[-2000:])
    assert text(fast, fast_dir) == text(pure, pure_dir)
    pure_tree, fast_tree = _ndjson_tree(pure_dir), _ndjson_tree(fast_dir)
    assert fast_tree.keys() == pure_tree.keys()
    for rel, data in pure_tree.items():
        assert fast_tree[rel] == data, rel


def _runs_both_ways(tmp_path: Path, inputs: list[Path], *extra: str) -> dict[str, bytes]:
    """`pipeline run` of each input in turn (so later ones have a delta base), once per path."""
    trees = {}
    for pure in (True, False):
        out = tmp_path / ("pure" if pure else "compiled")
        # One identity secret for both trees, else their person ids (HMACs) differ.
        (out / "state" / "identity").mkdir(parents=True)
        (out / "state" / "identity" / "secret.key").write_text("5e" * 32 + "\n", encoding="ascii")
        procs = [_cli(tmp_path, pure, "--progress", "never", "pipeline", "run", "--input", str(inp),
                      "--out", str(out), *extra) for inp in inputs]
        trees[pure] = (procs, out)
    (pure_procs, pure_out), (fast_procs, fast_out) = trees[True], trees[False]
    for p, f in zip(pure_procs, fast_procs):
        _same(tmp_path, p, f, pure_out, fast_out)
    return _ndjson_tree(fast_out)


# --------------------------------------------------------------------------- generated and sample exports

# What the generator never writes but readers must agree on: attribute values with every
# XML normalisation (tab, CR, LF, references), a tag over several lines (the regex tier),
# CDATA and text content (the lxml tier), unknown kinds, exact repeats (occurrence keys).
HOSTILE_TAIL = (
    ' <Record type="HKQuantityTypeIdentifierStepCount" sourceName="A\tB&#13;C&#x263A;&amp;&lt;x&gt;" '
    'unit="count" value="1e400" startDate="2024-02-30 25:00:00 -0800" endDate="2024-03-01 00:00:00 +0545"/>\n'
    ' <Record type="HKQuantityTypeIdentifierStepCount" sourceName="Phone" unit="count" value="7"\n'
    '   startDate="2024-03-01 09:00:00 -0800"\n   endDate="2024-03-01 09:01:00 -0800"/>\n'
    ' <Record type="HKQuantityTypeIdentifierStepCount" sourceName="Phone" unit="count" value="7" '
    'startDate="2024-03-01 09:00:00 -0800" endDate="2024-03-01 09:01:00 -0800"/>\n'
    ' <Record type="HKQuantityTypeIdentifierStepCount" sourceName="Phone" unit="count" value="7" '
    'startDate="2024-03-01 09:00:00 -0800" endDate="2024-03-01 09:01:00 -0800"/>\n'
    ' <StateOfMind kind="dailyMood" valence="0.4" startDate="2024-02-09 21:00:00 -0800">\n'
    '  <Note>calm <![CDATA[<and> & "quoted"]]></Note>\n </StateOfMind>\n'
    " <Record type='HKCategoryTypeIdentifierMindfulSession' sourceName='Calm' value='x' "
    "startDate='2024-03-02 07:00:00 Z'/>\n"
)


def _generated(tmp_path: Path, seed: int, hostile_tail: bool, **kw) -> tuple[Path, Path]:
    """Two successive exports of one generated person (the second a delta on the first)."""
    first = synth.generate_export(tmp_path / f"gen{seed}-1", seed=seed, **kw)
    synth.generate_export(tmp_path / f"gen{seed}-2", base=first, new_records=40)
    dirs = (tmp_path / f"gen{seed}-1" / "apple_health_export", tmp_path / f"gen{seed}-2" / "apple_health_export")
    if hostile_tail:
        for d in dirs:
            xml = d / "export.xml"
            xml.write_text(xml.read_text(encoding="utf-8").replace("</HealthData>", HOSTILE_TAIL + "</HealthData>"),
                           encoding="utf-8")
    return dirs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generated_exports_give_identical_ndjson(tmp_path: Path, seed: int) -> None:
    tree = _runs_both_ways(tmp_path, list(_generated(tmp_path, seed, hostile_tail=seed != 1, records=1500,
                                                     people=1 + seed % 2)))
    assert any(rel.endswith("observations.ndjson.zst") and data for rel, data in tree.items())


@pytest.mark.slow
def test_export_parsed_by_the_worker_pool_gives_identical_ndjson(tmp_path: Path) -> None:
    """Past export.IN_PROCESS_BELOW the parse runs in spawned workers, split into ranges."""
    _runs_both_ways(tmp_path, list(_generated(tmp_path, 7, hostile_tail=True, target_bytes=40_000_000)))


def test_share_mode_gives_identical_ndjson(tmp_path: Path) -> None:
    _runs_both_ways(tmp_path, list(_generated(tmp_path, 4, hostile_tail=True, records=800)), "--mode", "share")


def test_apple_sample_gives_identical_ndjson(tmp_path: Path) -> None:
    _runs_both_ways(tmp_path, [SHARED_FIXTURE])


@pytest.mark.parametrize("tier", ["lines", "regex", "lxml"])
def test_nesting_deeper_than_any_stack_is_refused_alike(tmp_path: Path, tier: str) -> None:
    """Compiled, the builders recurse in C, without Python's recursion limit: a million
    levels must still be the clear error, never a crashed process."""
    levels = 1_000_000
    inner = {"lines": b"  <a>\n" * levels + b"  </a>\n" * levels,
             "regex": b"<a>" * levels + b"</a>" * levels,
             "lxml": b"<![CDATA[x]]>" + b"<a>" * levels + b"</a>" * levels}[tier]  # CDATA: lxml reads it
    export = _generated(tmp_path, 5, hostile_tail=False, records=50)[0]
    xml = export / "export.xml"
    xml.write_bytes(xml.read_bytes().replace(b"</HealthData>", b' <Record type="X" sourceName="s">\n' + inner
                                             + b" </Record>\n</HealthData>"))
    _runs_both_ways(tmp_path, [export])
    proc = _cli(tmp_path, False, "pipeline", "run", "--input", str(export), "--out", str(tmp_path / "compiled"))
    assert proc.stderr == "error: export.xml is nested too deeply to be an Apple Health export\n"


# --------------------------------------------------------------------------- every hostile case, both ways


def _differential_run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """test_hostile_inputs.run_cli on the compiled path against the real `--out` (which the
    case then checks as usual), and on the pure path against a copy of `--out` as it was."""
    args_list = list(args)
    out = Path(args_list[args_list.index("--out") + 1])
    with tempfile.TemporaryDirectory(prefix="hd-pure-twin-") as twin_root:
        twin = Path(twin_root) / "data"
        if out.exists():
            shutil.copytree(out, twin, symlinks=True)
        fast = _real_run_cli(cwd, *args_list)
        secret = Path("state") / "identity" / "secret.key"  # made by the run when new: shared, as above
        if (out / secret).is_file() and not (twin / secret).exists():
            (twin / secret).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out / secret, twin / secret)
        saved = os.environ.get(_fastpath.PURE_ENV)
        os.environ[_fastpath.PURE_ENV] = "1"
        try:
            pure = _real_run_cli(cwd, *[str(twin) if a == str(out) else a for a in args_list])
        finally:
            if saved is None:
                del os.environ[_fastpath.PURE_ENV]
            else:
                os.environ[_fastpath.PURE_ENV] = saved
        _same(cwd, pure, fast, twin, out)
    return fast


_real_run_cli = hostile.run_cli


@pytest.fixture(autouse=True)
def _hostile_cases_run_both_ways(monkeypatch) -> None:
    monkeypatch.setattr(hostile, "run_cli", _differential_run_cli)
    monkeypatch.delenv(_fastpath.PURE_ENV, raising=False)


globals().update({f"test_hostile_{name[len('test_'):]}": fn for name, fn in vars(hostile).items()
                  if name.startswith("test_") and callable(fn)})


# --------------------------------------------------------------------------- the pure path's own tests


@pytest.mark.slow
def test_parser_and_property_tests_pass_on_the_pure_path(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
         "tests/parse", "tests/test_properties.py", "tests/test_ndjson.py"],
        cwd=ROOT, env=_env(pure=True), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]


# Found on main's pure parser as well (f76b212): damaged inputs where the fast tiers and
# the lxml tier disagree on failing. Not this issue's; anything else is a finding here.
KNOWN_FINDINGS = ("fast tiers fail but lxml ok", "fast tiers ok but lxml fail")


@pytest.mark.slow
@pytest.mark.parametrize("pure", [True, False], ids=["pure", "compiled"])
def test_fuzz_harness_finds_nothing_new(tmp_path: Path, pure: bool) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_healthdelta.py"), "--target", "healthkit", "--engine", "random",
         "--minutes", "0.25", "--workdir", str(tmp_path / "fuzz")],
        cwd=tmp_path, env=_env(pure), capture_output=True, text=True, timeout=300,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["execs"] > 0 and summary["artifacts"] == [], summary
    findings = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if line.startswith("FINDING")]
    assert all(line.endswith(KNOWN_FINDINGS) for line in findings), findings
