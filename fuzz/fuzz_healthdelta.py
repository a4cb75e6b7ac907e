#!/usr/bin/env python3
"""Coverage-guided fuzzing of HealthDelta's input parsers (issue 6). Not collected by pytest.

    python fuzz/fuzz_healthdelta.py --target healthkit --minutes 5
    python fuzz/fuzz_healthdelta.py --target all --minutes 2      # each target in turn

Targets (see fuzz/README.md): `healthkit` (export.xml: `iter_healthkit` on a temp file,
every input also read by the lxml-only tier and compared: the tiers must agree),
`fhir`, `cda`, `ecg`, `gpx` (one parser each on a temp file) and `zip` (a zip archive
built from the fuzz input, structure-aware, then `inputs.detect_input` +
`ingest.stage_export` into a temp dir).

The contract being checked: a parser either yields rows that the NDJSON writer can
encode (64-hex `record_key`, JSON-encodable) or raises `HealthDeltaError`, whose
message holds no path. Anything else is a finding. Findings are deduplicated by
(exception type, innermost package frame), saved with their input under `--findings`
and summarised at the end; the run goes on until its time is up. Hangs and memory
blow-ups are caught by libFuzzer's `-timeout` / `-rss_limit_mb` (the child is then
restarted by this script and the input is saved as `timeout-*` / `oom-*`).

Engine: atheris (libFuzzer) when importable, else `--engine random`, a plain mutation
loop over the same seeds (much weaker, but it needs nothing).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("healthkit", "fhir", "cda", "ecg", "gpx", "zip")
MAX_LEN = {"healthkit": 1 << 16, "fhir": 1 << 16, "cda": 1 << 16, "ecg": 1 << 15, "gpx": 1 << 16, "zip": 1 << 16}

# Filled by setup(): the package is imported under atheris' instrumentation.
hd: dict = {}
_SCRATCH: Path | None = None
_FINDINGS: Path | None = None
_SEEN: set[tuple[str, str]] = set()


# --------------------------------------------------------------------------- setup


_MODULES = {"healthkit": ("parse.healthkit",), "fhir": ("parse.fhir",), "cda": ("parse.cda",),
            "ecg": ("parse.ecg",), "gpx": ("parse.gpx",), "zip": ("inputs", "ingest")}


def setup(target: str, instrument: bool) -> None:
    """Import what `target` needs (only that: a broken module elsewhere does not stop it)."""
    import importlib

    def imports():
        for name in ("errors", "ndjson", "parse.report", *_MODULES[target]):
            module = importlib.import_module(f"healthdelta.{name}")
            hd[name.rsplit(".", 1)[-1]] = module
        hd["ParseReport"] = hd["report"].ParseReport

    if instrument:
        import atheris

        with atheris.instrument_imports(include=["healthdelta"]):
            imports()
    else:
        imports()


def scratch() -> Path:
    global _SCRATCH
    if _SCRATCH is None:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        _SCRATCH = Path(tempfile.mkdtemp(prefix="hd-fuzz-", dir=base))
        atexit.register(shutil.rmtree, _SCRATCH, True)
    return _SCRATCH


# --------------------------------------------------------------------------- oracle


def _check_rows(rows) -> int:
    """Every row must be what the NDJSON writer accepts."""
    n = 0
    for stream, row in rows:
        assert stream in hd["ndjson"].STREAMS, f"unknown stream {stream!r}"
        key = row.get("record_key")
        assert isinstance(key, str) and len(key) == 64 and all(c in "0123456789abcdef" for c in key), "bad key"
        hd["ndjson"].encode_row(row)  # orjson: must not raise
        et = row.get("event_time")
        if et is not None:
            assert isinstance(et, str) and et.endswith("Z"), "event_time not UTC"
            hd["ndjson"].sort_key(et).decode("ascii")
        n += 1
    return n


def _check_message(exc: Exception) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg, "error message empty or multi-line"
    assert str(scratch()) not in msg and "/tmp" not in msg and "/dev/shm" not in msg, "path in error message"


def _write(name: str, data: bytes) -> Path:
    path = scratch() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- targets


def t_healthkit(data: bytes) -> None:
    hk, PR = hd["healthkit"], hd["ParseReport"]
    path = _write("export.xml", data)
    fast = slow = None
    fast_err = slow_err = None
    try:
        fast = list(hk.iter_healthkit(path, PR()))
        _check_rows(fast)
    except hd["errors"].HealthDeltaError as exc:
        _check_message(exc)
        fast_err = exc
    try:
        slow = list(hk._iter_healthkit(path, PR(), force_slow=True))
    except hd["errors"].HealthDeltaError as exc:
        slow_err = exc
    # Differential: the fast tiers are documented to read exactly what lxml reads.
    if fast_err is None and slow_err is None:
        assert [r for r in fast] == [r for r in slow], "fast tiers and lxml disagree on rows"
    elif (fast_err is None) != (slow_err is None):
        raise AssertionError(f"fast tiers {'ok' if fast_err is None else 'fail'} but lxml "
                             f"{'ok' if slow_err is None else 'fail'}")
    try:
        hk.read_me(path)
    except hd["errors"].HealthDeltaError as exc:
        _check_message(exc)


def _parser_target(module: str, func: str, name: str):
    def target(data: bytes) -> None:
        path = _write(name, data)
        try:
            _check_rows(getattr(hd[module], func)(path, hd["ParseReport"](), source_file=name))
        except hd["errors"].HealthDeltaError as exc:
            _check_message(exc)

    return target


def t_cda(data: bytes) -> None:
    _parser_target("cda", "iter_cda", "export_cda.xml")(data)
    try:
        hd["cda"].read_cda_patient(scratch() / "export_cda.xml")
    except hd["errors"].HealthDeltaError as exc:
        _check_message(exc)


_NAMES = [
    "apple_health_export/export.xml", "apple_health_export/export_cda.xml", "export.xml",
    "apple_health_export/clinical-records/Observation-1.json", "apple_health_export/", "other/export.xml",
    "apple_health_export/workout-routes/r.gpx", "apple_health_export/electrocardiograms/e.csv",
    "../evil", "/abs", "a/../../b", "apple_health_export/./export.xml", "apple_health_export//x",
    "apple_health_export/export.xml/child", "C:\\x", "a\\b", "apple_health_export/\x00x", ".", "..",
]


def build_zip(data: bytes) -> bytes:
    """A zip archive whose members (names, flags, modes, contents) come from the fuzz input."""
    rnd = random.Random(data[:64])
    rest = data[64:]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        n = 1 + (data[0] % 6 if data else 0)
        cut = [0, *sorted(rnd.randrange(len(rest) + 1) for _ in range(n - 1)), len(rest)]
        for i in range(n):
            if rnd.random() < 0.7:
                name = rnd.choice(_NAMES)
            else:
                name = rest[cut[i]:cut[i] + 24].decode("utf-8", "replace") or "x"
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = rnd.choice((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
            if rnd.random() < 0.15:
                info.external_attr = rnd.choice((0o120777, 0o010644, 0o040755, 0o100644)) << 16
            if rnd.random() < 0.05:
                info.flag_bits |= 0x1
            try:
                zf.writestr(info, rest[cut[i]:cut[i + 1]])
            except (ValueError, UnicodeEncodeError):
                pass
    raw = bytearray(buf.getvalue())
    for _ in range(rnd.choice((0, 0, 1, 3))):  # a few byte flips: lying headers
        if raw:
            raw[rnd.randrange(len(raw))] ^= 1 << rnd.randrange(8)
    return bytes(raw)


def t_zip(data: bytes) -> None:
    inputs, ingest = hd["inputs"], hd["ingest"]
    root = scratch() / "zip"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    zpath = root / "export.zip"
    zpath.write_bytes(build_zip(data))
    dest = root / "work"
    dest.mkdir()
    try:
        inp = inputs.detect_input(zpath)
        staged = ingest.stage_export(inp, dest)
        ingest.write_manifest(dest, staged, inp, run_id="0" * 64, parent_run_id=None)
    except hd["errors"].HealthDeltaError as exc:
        _check_message(exc)
    # Nothing may land outside the work dir, and nothing inside it may be a link.
    for p in root.rglob("*"):
        assert p == zpath or p.is_relative_to(dest), "file written outside the staging dir"
        assert not p.is_symlink(), "symlink staged"


TARGET_FUNCS = {
    "healthkit": t_healthkit,
    "fhir": _parser_target("fhir", "iter_fhir", "Observation-1.json"),
    "cda": t_cda,
    "ecg": _parser_target("ecg", "iter_ecg", "ecg_2024-01-01.csv"),
    "gpx": _parser_target("gpx", "iter_gpx", "route_2024-01-01.gpx"),
    "zip": t_zip,
}


def guarded(target: str):
    """Run one input; record non-HealthDeltaError failures as findings instead of stopping."""
    func = TARGET_FUNCS[target]

    def one(data: bytes) -> None:
        try:
            func(data)
        except Exception as exc:  # noqa: BLE001 - the point is to see everything else
            record_finding(target, data, exc)

    return one


def record_finding(target: str, data: bytes, exc: BaseException) -> None:
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if "healthdelta" in f.filename] or tb
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    # Oracle failures (AssertionError) at one line differ by their message.
    sig = (type(exc).__name__, where + (f" {exc}" if isinstance(exc, AssertionError) else ""))
    digest = hashlib.sha1(data).hexdigest()[:12]
    if sig in _SEEN:
        return
    _SEEN.add(sig)
    assert _FINDINGS is not None
    _FINDINGS.mkdir(parents=True, exist_ok=True)
    (_FINDINGS / f"{target}-{digest}.bin").write_bytes(data)
    entry = {"target": target, "type": type(exc).__name__, "where": where,
             "message": str(exc)[:300], "input": f"{target}-{digest}.bin",
             "traceback": "".join(traceback.format_exception(exc))[-4000:]}
    with open(_FINDINGS / "findings.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    print(f"FINDING {target} {sig[0]} at {where}: {entry['message'][:120]}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- seeds


def write_seeds(target: str, corpus: Path) -> None:
    """Small valid inputs generated by healthdelta.synth (nothing committed)."""
    if any(corpus.iterdir()):
        return
    from healthdelta.synth import generate_export

    with tempfile.TemporaryDirectory() as tmp:
        exp = generate_export(Path(tmp) / "e", seed=3, records=300)
        d = exp.export_dir
        seeds: list[bytes] = []
        if target == "healthkit":
            xml = (d / "export.xml").read_bytes()
            seeds += [xml[:60000] if len(xml) > 60000 else xml,
                      b'<HealthData locale="en_US">\n <Record type="T" value="1" '
                      b'startDate="2024-01-01 00:00:00 -0800"/>\n</HealthData>\n']
        elif target == "fhir":
            seeds += [p.read_bytes() for p in sorted((d / "clinical-records").glob("*.json"))[:12]]
        elif target == "cda":
            seeds.append((d / "export_cda.xml").read_bytes()[:60000])
        elif target == "ecg":
            seeds += [p.read_bytes()[:30000] for p in sorted((d / "electrocardiograms").glob("*.csv"))]
        elif target == "gpx":
            seeds += [p.read_bytes()[:60000] for p in sorted((d / "workout-routes").glob("*.gpx"))]
        elif target == "zip":
            xml = (d / "export.xml").read_bytes()[:2000]
            seeds += [bytes(64) + xml, os.urandom(64) + b"<HealthData/>"]
    for i, s in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(s)


# --------------------------------------------------------------------------- engines


def child_main(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    setup(target, instrument=True)
    atheris.Setup([sys.argv[0], *libfuzzer_args], guarded(target))
    atheris.Fuzz()


def random_engine(target: str, corpus: Path, seconds: float) -> int:
    """Fallback without atheris: byte-level mutations of the seeds."""
    setup(target, instrument=False)
    one = guarded(target)
    seeds = [p.read_bytes() for p in sorted(corpus.iterdir())] or [b""]
    rnd = random.Random(0)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        data = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 8)):
            op = rnd.randrange(4)
            pos = rnd.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] ^= 1 << rnd.randrange(8)
            elif op == 1:
                data[pos:pos] = rnd.choice([b"<", b">", b"&", b'"', b"\xff", b"{", b"]", b"\n", b"0x",
                                            bytes([rnd.randrange(256)])])
            elif op == 2:
                del data[pos:pos + rnd.randint(1, 64)]
            else:
                src = rnd.randrange(len(data) + 1)
                data[pos:pos] = data[src:src + rnd.randint(1, 256)]
        one(bytes(data[: MAX_LEN[target]]))
        n += 1
    return n


def run_target(target: str, minutes: float, workdir: Path, engine: str) -> dict:
    global _FINDINGS
    corpus = workdir / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    findings = workdir / "findings"
    _FINDINGS = findings
    write_seeds(target, corpus)
    started = time.monotonic()
    budget = minutes * 60
    restarts = 0
    if engine == "random":
        execs = random_engine(target, corpus, budget)
    else:
        execs = None
        quick_failures = 0
        while (left := budget - (time.monotonic() - started)) > 5:
            cmd = [sys.executable, __file__, "--child", target, "--findings", str(findings), "--",
                   f"-max_total_time={int(left)}", f"-max_len={MAX_LEN[target]}", "-timeout=20",
                   "-rss_limit_mb=2048", f"-artifact_prefix={findings}/{target}-", "-print_final_stats=1",
                   str(corpus)]
            findings.mkdir(parents=True, exist_ok=True)
            child_start = time.monotonic()
            with open(workdir / f"{target}.log", "a") as log:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                restarts += 1  # a timeout or OOM artifact was written; go on
                if time.monotonic() - child_start < 10:
                    quick_failures += 1
                    if quick_failures >= 3:
                        raise SystemExit(f"{target}: the fuzz child keeps failing at start; see {target}.log")
                else:
                    quick_failures = 0
    elapsed = time.monotonic() - started
    return {"target": target, "seconds": round(elapsed), "engine": engine, "restarts": restarts,
            "execs": execs, "corpus_files": sum(1 for _ in corpus.iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    ap.add_argument("--minutes", type=float, default=2.0, help="per target")
    ap.add_argument("--workdir", type=Path, default=Path("fuzz-out"), help="corpus, logs, findings")
    ap.add_argument("--engine", choices=("atheris", "random"), default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--findings", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        global _FINDINGS
        _FINDINGS = args.findings
        child_main(args.child, args.rest)
        return
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    args.workdir.mkdir(parents=True, exist_ok=True)
    targets = TARGETS if args.target == "all" else (args.target,)
    summary = [run_target(t, args.minutes, args.workdir, engine) for t in targets]
    findings_file = args.workdir / "findings" / "findings.jsonl"
    found = [json.loads(line) for line in findings_file.read_text().splitlines()] if findings_file.exists() else []
    for s in summary:
        s["findings"] = sum(1 for f in found if f["target"] == s["target"])
        s["artifacts"] = sorted(p.name for p in (args.workdir / "findings").glob(f"{s['target']}-*")
                                if p.name.split("-", 1)[1].startswith(("crash", "timeout", "oom", "leak")))
        print(json.dumps(s))
    if _SCRATCH is not None:
        shutil.rmtree(_SCRATCH, ignore_errors=True)
    sys.exit(1 if found or any(s["artifacts"] for s in summary) else 0)


if __name__ == "__main__":
    main()
