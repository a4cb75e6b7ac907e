"""Side by side: healthdelta `run all` against a floor, a baseline and peer tools, in one run.

    .venv/bin/python benchmarks/side_by_side.py --size-mb 136 --repeat 1
    .venv/bin/python benchmarks/side_by_side.py --size-mb 1024 --repeat 3 --json-out bench-out/side_by_side.json

Inputs. Unless `--export ZIP` is given, generates with the project's generator (fixed seed,
so the same bytes every time) an export.zip whose export.xml is about `--size-mb` MB, and
its next export (the same records plus 1% later ones; the generator rewrites every
`HKDevice: 0x...` pointer in a new generation, as real re-exports do). Both are cached
under `<workdir>/exports/` and reused by later runs of the same size.

Rows, each a separate process started under `/usr/bin/time -v`:
  - sha256 of export.xml (the floor: reading the bytes once);
  - ElementTree iterparse of export.xml with nothing kept (the baseline: `etree_baseline`
    in _common.py, the one bench_export.py uses);
  - healthdelta `run all` on the zip into a fresh --out; then the same zip again (the
    no-op, checked to print `no changes detected`); then the next export;
  - each peer (apple-health-export-mcp, vitalog), installed from the package index into
    its own venv under `<workdir>/peers/<name>/venv` (reused when present), ingesting the
    zip with the command its README gives, its database and temp files under `<workdir>`.

Figures. Wall time and the largest process's peak RSS come from `/usr/bin/time -v`
(Maximum resident set size: the largest single process of the tree). "All processes"
is the peak of the summed RSS of the whole process tree, polled every 100 ms with
psutil when it is importable (`pip install psutil` into the venv; it is not a project
dependency), else shown as n/a; a spike shorter than the poll can be missed, so it is
floored at the largest process's peak. "Bytes under out" is the apparent size of the
files the tool left in its output dir (hard links counted once); for healthdelta after
the next export it covers both runs and is compared with the two zips together. The
floor and baseline rows include a Python start-up (~0.1 s). With `--repeat N` every
figure is the median.

export.xml is read from the page cache in every row (it was just written or extracted),
so the comparison is CPU and memory, not disk. The load average is printed and kept in
the JSON: on a shared machine absolute figures are pessimistic, ratios less so. A peer
that fails to install or run gets a `failed: <reason>` row; the rest of the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from _common import etree_baseline, fresh, median, sha256_file

from healthdelta.synth import generate_export

try:
    import psutil
except ImportError:  # optional: without it the all-processes column is n/a
    psutil = None

SEED = 12
POLL_S = 0.1
PEER_INSTALL_TIMEOUT_S = 900
TIME_BIN = "/usr/bin/time"


class StepFailed(Exception):
    """A measured command or a peer install failed; the message is the row's short reason."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    zip: Path
    xml: Path  # export.xml of `zip`, extracted, for the floor and the baseline
    next_zip: Path | None  # the export that follows `zip`, when there is one
    about: dict  # what is known of the input (record counts for a generated one)


def generated_inputs(work: Path, size_mb: int) -> Inputs:
    """The export and its next export for `size_mb`, generated once and reused."""
    root = work / "exports" / f"{size_mb}mb-seed{SEED}"
    done = root / "generated.json"
    if not done.exists():
        print(f"generating a {size_mb} MB export and its next export under {root} ...", flush=True)
        fresh(root)
        first = generate_export(root / "export-1", seed=SEED, target_bytes=size_mb * 1_000_000, zip=True)
        nxt = generate_export(root / "export-2", base=first, new_records=max(1, first.counts["records"] // 100),
                              zip=True, keep_folder=False)
        done.write_text(json.dumps({"generated": True, "records": first.counts["records"],
                                    "next_records": nxt.counts["records"], "seed": SEED}, sort_keys=True) + "\n")
    return Inputs(root / "export-1" / "export.zip", root / "export-1" / "apple_health_export" / "export.xml",
                  root / "export-2" / "export.zip", json.loads(done.read_text()))


def extract_export_xml(zip_path: Path, dest: Path) -> Path:
    """Stream the main export.xml out of a user's export.zip (for the floor and baseline rows)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [n for n in zf.namelist() if n.endswith("export.xml")]
            if not names:
                raise SystemExit(f"error: {zip_path} holds no export.xml")
            target = fresh(dest) / "export.xml"
            with zf.open(min(names, key=len)) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SystemExit(f"error: cannot read {zip_path}: {exc}") from None
    return target


def given_inputs(work: Path, export: Path, next_export: Path | None) -> Inputs:
    for p in (export, next_export):
        if p is not None and not p.is_file():
            raise SystemExit(f"error: no such file: {p}")
    return Inputs(export.resolve(), extract_export_xml(export, work / "extracted"),
                  next_export.resolve() if next_export else None, {"generated": False})


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Sample:
    wall_s: float
    rss_largest_mib: float
    rss_all_mib: float | None  # None without psutil
    out_bytes: int | None = None


def tree_rss(proc) -> int:
    """Bytes of RSS of `proc`'s descendants (the measured command and any children of it)."""
    total = 0
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def parse_time_v(text: str) -> tuple[float, float]:
    """(wall seconds, max RSS MiB) from `/usr/bin/time -v` output."""
    wall = re.search(r"Elapsed \(wall clock\) time.*?: (?:(\d+):)?(\d+):([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not wall or not rss:
        raise StepFailed("no /usr/bin/time figures")
    hours, minutes, seconds = wall.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds), int(rss.group(1)) / 1024


def last_line(text: str, limit: int = 100) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:limit]


def measure(cmd: list[str], cwd: Path, timeout_s: float, env: dict[str, str] | None = None,
            expect: str | None = None) -> Sample:
    """Run `cmd` under `/usr/bin/time -v`, polling its process tree's total RSS meanwhile.

    With `expect`, the command's stdout must start with it (the no-op row checks that
    healthdelta really found nothing to do)."""
    with tempfile.NamedTemporaryFile("r") as timing, tempfile.TemporaryFile("w+") as out, \
            tempfile.TemporaryFile("w+") as err:
        argv = [TIME_BIN, "-v", "-o", timing.name, *cmd]
        popen = psutil.Popen if psutil else subprocess.Popen
        proc = popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=err,
                     start_new_session=True)  # its own process group, so a timeout ends all of it
        peak_all, deadline = 0, time.monotonic() + timeout_s
        while proc.poll() is None:
            if psutil:
                peak_all = max(peak_all, tree_rss(proc))
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StepFailed(f"timed out after {timeout_s:.0f} s")
            time.sleep(POLL_S)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise StepFailed(f"exit {proc.returncode}: {last_line(err.read() or out.read())}")
        if expect is not None and not out.read().startswith(expect):
            raise StepFailed(f"output does not start with {expect!r}")
        wall, largest = parse_time_v(timing.read())
    return Sample(wall, largest, max(peak_all / 2**20, largest) if psutil else None)


def bytes_under(root: Path) -> int:
    """Apparent size of the files under `root`, a file hard-linked twice counted once."""
    sizes = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())


def with_out_bytes(sample: Sample, out: Path) -> Sample:
    return replace(sample, out_bytes=bytes_under(out))


def run_probe(kind: str, xml: Path) -> None:
    """The body of the floor and baseline rows, run in a child so it is measured alone."""
    if kind == "sha256":
        sha256_file(xml)
    else:
        etree_baseline(xml)


def probe_cmd(kind: str, xml: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--probe", kind, str(xml)]


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    key: str
    tool: str
    cmd: str = ""
    samples: list[Sample] = field(default_factory=list)
    failed: str | None = None

    def median(self, attr: str) -> float | None:
        values = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        return median(values) if values else None


# --------------------------------------------------------------------------- healthdelta

HD_KEYS = ("first", "noop", "next")


def healthdelta_cmd(zip_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "healthdelta", "--progress", "never", "run", "all",
            "--input", str(zip_path), "--out", str(out), "--quiet"]


def healthdelta_round(rows: dict[str, Row], inputs: Inputs, work: Path, timeout_s: float) -> None:
    """First run into a fresh --out, the no-op on the same zip, then the next export.

    A failing step fails its row and the ones after it (they need its output)."""
    out = fresh(work / "healthdelta-out")
    steps = {"first": (inputs.zip, None), "noop": (inputs.zip, "no changes detected"),
             "next": (inputs.next_zip, None)}
    for i, key in enumerate(HD_KEYS):
        zip_path, expect = steps[key]
        if zip_path is None or rows[key].failed:
            continue
        cmd = healthdelta_cmd(zip_path, out)
        rows[key].cmd = " ".join(cmd)
        try:
            sample = measure(cmd, work, timeout_s, expect=expect)
        except StepFailed as exc:
            for later in HD_KEYS[i:]:
                rows[later].failed = rows[later].failed or f"failed: {exc}"
            return
        rows[key].samples.append(sample if key == "noop" else with_out_bytes(sample, out))


# --------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class Peer:
    name: str  # the distribution on the package index
    entry: str  # the console script the install must provide
    # (venv bin, export.zip, data dir) -> (argv, extra environment); run with cwd = data dir
    command: Callable[[Path, Path, Path], tuple[list[str], dict[str, str]]]


PEERS = (
    # README, "Ingest": `AH_DB_PATH=.../health.db apple-health-export-mcp-ingest export.zip`
    Peer("apple-health-export-mcp", "apple-health-export-mcp-ingest",
         lambda b, z, d: ([str(b / "apple-health-export-mcp-ingest"), str(z)], {"AH_DB_PATH": str(d / "health.db")})),
    # README, "Load data": `vitalog load apple --file export.zip` (writes ./vitalog.duckdb;
    # it extracts the zip into a temporary directory under $TMPDIR, removed at the end)
    Peer("vitalog", "vitalog",
         lambda b, z, d: ([str(b / "vitalog"), "load", "apple", "--file", str(z)], {})),
)


def install_peer(peer: Peer, peers_dir: Path) -> tuple[Path, str]:
    """(venv bin dir, installed version); a venv that already has the entry point is reused."""
    venv = peers_dir / peer.name / "venv"
    bin_dir = venv / "bin"
    if not (bin_dir / peer.entry).exists():
        print(f"installing {peer.name} into {venv} ...", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        steps = ([sys.executable, "-m", "venv", str(venv)],
                 [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  peer.name])
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=PEER_INSTALL_TIMEOUT_S)
            if done.returncode != 0:
                errors = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")]
                raise StepFailed(f"install: {last_line(errors[0] if errors else done.stderr)}")
        if not (bin_dir / peer.entry).exists():
            raise StepFailed(f"install: no `{peer.entry}` command in the installed package")
    version = subprocess.run([str(bin_dir / "python"), "-c", "import importlib.metadata as m, sys; "
                              "print(m.version(sys.argv[1]))", peer.name], capture_output=True, text=True)
    return bin_dir, version.stdout.strip() or "?"


def peer_sample(peer: Peer, bin_dir: Path, zip_path: Path, work: Path, timeout_s: float) -> tuple[Sample, str]:
    data = fresh(work / "peer-data" / peer.name)
    tmp = fresh(data / "tmp")
    argv, peer_env = peer.command(bin_dir, zip_path, data)
    env = {**peer_env, "TMPDIR": str(tmp), "XDG_DATA_HOME": str(data), "XDG_CACHE_HOME": str(data),
           "XDG_CONFIG_HOME": str(data)}
    sample = measure(argv, data, timeout_s, env)
    return with_out_bytes(sample, data), " ".join([*(f"{k}={v}" for k, v in peer_env.items()), *argv])


# --------------------------------------------------------------------------- collecting


def collect(inputs: Inputs, work: Path, repeat: int, timeout_s: float, skip_peers: bool) -> list[Row]:
    rows = {
        "sha256": Row("sha256", "sha256 of export.xml (floor)"),
        "iterparse": Row("iterparse", "ElementTree iterparse, nothing kept (baseline)"),
        "first": Row("first", "healthdelta run all (first run, fresh --out)"),
        "noop": Row("noop", "healthdelta run all (no-op: same zip again)"),
        "next": Row("next", "healthdelta run all (next export, +1% records)"),
    }
    if inputs.next_zip is None:
        rows["next"].failed = "skipped: no next export (--export without --next-export)"
    peers: dict[str, tuple[Peer, Path]] = {}
    for peer in PEERS:
        row = rows[peer.name] = Row(peer.name, peer.name)
        if skip_peers:
            row.failed = "skipped: --no-peers"
            continue
        try:
            bin_dir, version = install_peer(peer, work / "peers")
        except (StepFailed, OSError, subprocess.SubprocessError) as exc:
            row.failed = f"failed: {exc}"[:140]
            continue
        row.tool = f"{peer.name} {version}"
        peers[peer.name] = (peer, bin_dir)

    sha256_file(inputs.xml)  # warm the page cache, so no row pays for the first read
    for n in range(repeat):
        print(f"round {n + 1}/{repeat} ...", flush=True)
        for kind in ("sha256", "iterparse"):
            cmd = probe_cmd(kind, inputs.xml)
            rows[kind].cmd = " ".join(cmd)
            try:
                rows[kind].samples.append(measure(cmd, work, timeout_s))
            except StepFailed as exc:
                rows[kind].failed = f"failed: {exc}"
        healthdelta_round(rows, inputs, work, timeout_s)
        for name, (peer, bin_dir) in peers.items():
            if rows[name].failed:
                continue
            try:
                sample, rows[name].cmd = peer_sample(peer, bin_dir, inputs.zip, work, timeout_s)
                rows[name].samples.append(sample)
            except (StepFailed, OSError) as exc:
                rows[name].failed = f"failed: {exc}"[:140]
    return list(rows.values())


# --------------------------------------------------------------------------- report


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def fmt_mib(v: float | None) -> str:
    return "n/a (no psutil)" if v is None else f"{v:,.0f} MiB"


def ok(row: Row) -> bool:
    return not row.failed and bool(row.samples)


def ratios(rows: list[Row], zip_bytes: dict[str, int]) -> dict[str, float | str | None]:
    """The figures issue 12 asks for, each a ratio of two medians of this run."""
    by = {r.key: r for r in rows}
    wall = {k: r.median("wall_s") if ok(r) else None for k, r in by.items()}

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    peers = [r for r in rows if r.key not in ("sha256", "iterparse", *HD_KEYS) and ok(r)]
    best = min(peers, key=lambda r: r.median("wall_s"), default=None)
    return {
        "first_over_iterparse": div(wall["first"], wall["iterparse"]),
        "noop_over_sha256": div(wall["noop"], wall["sha256"]),
        "next_over_first": div(wall["next"], wall["first"]),
        "out_after_both_over_both_zips": div(by["next"].median("out_bytes") if ok(by["next"]) else None,
                                             zip_bytes["both"] if ok(by["next"]) else None),
        "best_peer": best.tool if best else None,
        "first_over_best_peer": div(wall["first"], best.median("wall_s") if best else None),
        "first_rss_over_best_peer_rss": div(by["first"].median("rss_largest_mib") if ok(by["first"]) else None,
                                            best.median("rss_largest_mib") if best else None),
    }


def note(row: Row, r: dict) -> str:
    return {
        "first": "" if r["first_over_iterparse"] is None else f"{r['first_over_iterparse']:.1f}x iterparse",
        "noop": "" if r["noop_over_sha256"] is None else f"{r['noop_over_sha256']:.1f}x sha256 floor",
        "next": "" if r["next_over_first"] is None else f"{100 * r['next_over_first']:.0f}% of first run",
    }.get(row.key, "")


def out_cell(row: Row, zip_bytes: dict[str, int]) -> str:
    out = row.median("out_bytes")
    if out is None:
        return ""
    if row.key == "next":
        return f"{fmt_bytes(out)} after both runs ({out / zip_bytes['both']:.1f}x both zips)"
    return f"{fmt_bytes(out)} ({out / zip_bytes['first']:.1f}x zip)"


def table(rows: list[Row], zip_bytes: dict[str, int], r: dict) -> str:
    lines = ["| tool | wall | peak RSS (largest process) | RSS all processes | bytes under out | note |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if not ok(row):
            lines.append(f"| {row.tool} | {row.failed or 'no sample'} | | | | |")
            continue
        lines.append(f"| {row.tool} | {row.median('wall_s'):.1f} s | {fmt_mib(row.median('rss_largest_mib'))} "
                     f"| {fmt_mib(row.median('rss_all_mib'))} | {out_cell(row, zip_bytes)} | {note(row, r)} |")
    return "\n".join(lines)


def ratio_lines(r: dict) -> str:
    def x(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    peer = f" (best peer by wall: {r['best_peer']})" if r["best_peer"] else " (no peer ran)"
    return "\n".join([
        f"healthdelta first run / iterparse baseline, wall: {x(r['first_over_iterparse'])}",
        f"healthdelta first run / best peer, wall: {x(r['first_over_best_peer'])}, "
        f"peak RSS: {x(r['first_rss_over_best_peer_rss'])}{peer}",
        f"healthdelta no-op / sha256 floor, wall: {x(r['noop_over_sha256'])}",
        "healthdelta next export / first run, wall: "
        + ("n/a" if r["next_over_first"] is None else f"{100 * r['next_over_first']:.0f}%"),
        f"bytes under healthdelta --out after both runs / both zips: {x(r['out_after_both_over_both_zips'])}",
    ])


def results_json(rows: list[Row], inputs: Inputs, zip_bytes: dict[str, int], load: dict, repeat: int,
                 r: dict) -> str:
    doc = {
        "input": {**inputs.about, "export_xml_bytes": inputs.xml.stat().st_size, "zip_bytes": zip_bytes["first"],
                  "next_zip_bytes": zip_bytes["both"] - zip_bytes["first"]},
        "machine": {"cpus": os.cpu_count(), "loadavg": load, "python": sys.version.split()[0],
                    "psutil": psutil is not None},
        "repeat": repeat,
        "ratios": r,
        "rows": [{"key": row.key, "tool": row.tool, "cmd": row.cmd, "failed": row.failed,
                  "samples": [asdict(s) for s in row.samples],
                  "median": {a: row.median(a) for a in ("wall_s", "rss_largest_mib", "rss_all_mib", "out_bytes")}}
                 for row in rows],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=positive, default=136, help="size of the generated export.xml in MB")
    ap.add_argument("--export", type=Path, help="use this export.zip instead of generating one")
    ap.add_argument("--next-export", type=Path, help="with --export: the export.zip that follows it")
    ap.add_argument("--repeat", type=positive, default=1, help="rounds; every figure is the median")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "healthdelta-bench" / "side_by_side",
                    help="exports, peer venvs and outputs (default: %(default)s)")
    ap.add_argument("--timeout", type=positive, default=3600, help="seconds allowed to each measured command")
    ap.add_argument("--no-peers", action="store_true", help="leave the peer tools out")
    ap.add_argument("--json-out", type=Path, help="also write every sample, median and ratio here as JSON")
    ap.add_argument("--probe", nargs=2, metavar=("KIND", "XML"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        run_probe(args.probe[0], Path(args.probe[1]))
        return
    if args.next_export and not args.export:
        ap.error("--next-export needs --export")
    if not os.access(TIME_BIN, os.X_OK):
        raise SystemExit(f"error: {TIME_BIN} not found (GNU time; on Debian/Ubuntu: apt-get install time)")

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    inputs = given_inputs(work, args.export, args.next_export) if args.export else generated_inputs(work, args.size_mb)
    zip_bytes = {"first": inputs.zip.stat().st_size}
    zip_bytes["both"] = zip_bytes["first"] + (inputs.next_zip.stat().st_size if inputs.next_zip else 0)
    load = {"start": list(os.getloadavg())}
    records = f", {inputs.about['records']:,} records" if "records" in inputs.about else ""
    next_zip = zip_bytes["both"] - zip_bytes["first"]
    print(f"input: export.xml {fmt_bytes(inputs.xml.stat().st_size)}{records} in a {fmt_bytes(zip_bytes['first'])} "
          f"zip; next export zip {fmt_bytes(next_zip) if next_zip else 'none'}; {args.repeat} round(s); "
          f"{os.cpu_count()} CPUs; load average {loadavg()}", flush=True)

    rows = collect(inputs, work, args.repeat, args.timeout, args.no_peers)
    load["end"] = list(os.getloadavg())
    r = ratios(rows, zip_bytes)
    print(table(rows, zip_bytes, r))
    print(ratio_lines(r))
    print(f"load average at the end: {loadavg()}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(results_json(rows, inputs, zip_bytes, load, args.repeat, r))


if __name__ == "__main__":
    main()
