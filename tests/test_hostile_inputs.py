"""Hostile and damaged inputs through the real CLI (issue 6).

Every input is generated here (nothing committed). Each case must end in one of:
- `error`: exit 1, exactly one `error: ...` line holding the expected words, no traceback,
  no path; the registry, LAST_RUN and the earlier run untouched (and, for inputs refused
  before staging, the whole output tree byte-identical);
- `ok` / `repair`: exit 0, a registered run, and for `repair` the repair counted in the
  run report.
Never a hang (subprocess timeout), never unbounded memory (RLIMIT_AS), never a file
outside `<out>` (planted sentinels and escape targets are checked).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import pytest

from conftest import stream_bytes, write_mini_export, zip_folder

from healthdelta import pipeline, stagestore, streamfile
from healthdelta.layout import OutLayout

MEMORY_LIMIT = 2 << 30
TIMEOUT = 180
SECRET_TOKEN = "XXE-SECRET-7f3a9c"  # content of a file outside the export that must never be read
PERSON = "Margarethe Okonkwo-Lindqvist"


# --------------------------------------------------------------------------- running


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HEALTHDELTA_TEST_FAULT"}
    return subprocess.run([sys.executable, "-m", "healthdelta", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT, preexec_fn=limited)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != ".lock" and ".tmp-" not in p.as_posix()}


@pytest.fixture(scope="session")
def base_tree(tmp_path_factory) -> Path:
    """An output tree with one registered run (the 'earlier run' every case must leave alone)."""
    root = tmp_path_factory.mktemp("hostile-base")
    write_mini_export(root / "first", records=10)
    out = root / "data"
    pipeline.run_pipeline(pipeline.PipelineOptions(input=root / "first", layout=OutLayout.create(out)))
    return out


@pytest.fixture
def out(base_tree, tmp_path) -> Path:
    shutil.copytree(base_tree, tmp_path / "data", symlinks=True)
    return tmp_path / "data"


@pytest.fixture
def sentinel(tmp_path) -> Path:
    """A folder outside the export and <out>, holding a secret file; nothing may read or change it."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text(SECRET_TOKEN + "\n")
    return d


def export_tree(tmp_path: Path, records: int = 40) -> Path:
    """A fresh `apple_health_export/` (returned) inside `tmp_path/in/`."""
    return write_mini_export(tmp_path / "in", records=records)


def check_outcome(proc, out: Path, before: dict[str, bytes], tmp_path: Path, expect: str, detail: str = "",
                  *, early: bool = False) -> None:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "internal error" not in text, text[-2000:]
    assert str(tmp_path) not in text, text[-500:]
    assert PERSON not in text
    after = snapshot(out)
    if expect == "error":
        assert proc.returncode == 1, (proc.returncode, text[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert detail in lines[0], lines[0]
        for rel in ("state/runs.json", "state/LAST_RUN"):
            assert after.get(rel) == before.get(rel), rel
        for rel, data in before.items():
            if not rel.startswith("state/identity/"):
                assert after.get(rel) == data, rel  # the earlier run's files
        if early:  # refused before anything was staged: nothing at all changed
            assert after == before
    else:
        assert proc.returncode == 0, text[-2000:]
        runs = json.loads((out / "state" / "runs.json").read_text())["runs"]
        earlier = json.loads(before["state/runs.json"])["runs"] if "state/runs.json" in before else {}
        assert len(runs) == len(earlier) + 1
        if expect == "repair":
            new = (out / "state" / "LAST_RUN").read_text().strip()
            report = json.loads((out / "staging" / new / "run_report.json").read_text())
            repairs = report["stages"]["ndjson"]["parse"]["repairs"]
            assert repairs.get(detail, 0) >= 1, repairs


def run_case(tmp_path: Path, out: Path, inp: Path, expect: str, detail: str = "", *, early: bool = False,
             mode: str = "local") -> subprocess.CompletedProcess:
    before = snapshot(out)
    args = ["pipeline", "run", "--input", str(inp), "--out", str(out)]
    if mode == "share":
        args += ["--mode", "share"]
    proc = run_cli(tmp_path, *args)
    check_outcome(proc, out, before, tmp_path, expect, detail, early=early)
    return proc


def tree_text(out: Path) -> bytes:
    """Every file's bytes, compressed streams as their plain text (else an absence check is void)."""
    return b"\n".join(streamfile.read_bytes(p) for p in out.rglob("*") if p.is_file() and not p.is_symlink())


# --------------------------------------------------------------------------- raw zips


def _local(name: bytes, raw: bytes, crc: int, size: int, method: int, flags: int) -> bytes:
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc, len(raw), size,
                       len(name), 0) + name + raw


def raw_zip(members: list[dict], *, shared_data: bool = False) -> bytes:
    """A zip written byte by byte: what zipfile refuses to write (lying sizes, overlapping
    entries, raw names, unix modes) and fast for 100k members (zip64 end records).

    Each member: name (bytes), raw (compressed bytes), crc, size (declared uncompressed),
    method (0 stored / 8 deflate), flags, mode (unix mode bits, 0 for none).
    With `shared_data`, every central entry points at the first local header (overlap bomb).
    """
    body = bytearray()
    central = bytearray()
    offsets = []
    for i, m in enumerate(members):
        if shared_data and i > 0:
            offsets.append(offsets[0])
            continue
        offsets.append(len(body))
        body += _local(m["name"], m["raw"], m["crc"], m["size"], m.get("method", 8), m.get("flags", 0))
    for m, off in zip(members, offsets):
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x031E, 20, m.get("flags", 0), m.get("method", 8),
                               0, 0x21, m["crc"], len(m["raw"]), m["size"], len(m["name"]), 0, 0, 0, 0,
                               m.get("mode", 0o100644) << 16, off) + m["name"]
    n = len(members)
    cd_offset = len(body)
    tail = bytearray()
    if n >= 0xFFFF:
        z64 = len(body) + len(central)
        tail += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central), cd_offset)
        tail += struct.pack("<IIQI", 0x07064B50, 0, z64, 1)
        tail += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        tail += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), cd_offset, 0)
    return bytes(body + central + tail)


def member(name: str | bytes, data: bytes, *, deflate: bool = True, **extra) -> dict:
    raw = zlib.compress(data, 9)[2:-4] if deflate else data
    name_b = name.encode() if isinstance(name, str) else name
    return {"name": name_b, "raw": raw, "crc": zlib.crc32(data), "size": len(data), "method": 8 if deflate else 0,
            **extra}


def export_members(tmp_path: Path) -> list[dict]:
    """The members of a small valid export, as the phone zips it."""
    export = export_tree(tmp_path, records=5)
    return [member(f"apple_health_export/{p.relative_to(export).as_posix()}", p.read_bytes())
            for p in sorted(export.rglob("*")) if p.is_file()]


# --------------------------------------------------------------------------- export.xml


def _records_xml(export: Path) -> str:
    return (export / "export.xml").read_text()


def _with_doctype(xml: str, internal_subset: str) -> str:
    start = xml.index("<!DOCTYPE")
    end = xml.index("]>", start) + 2
    return xml[:start] + f"<!DOCTYPE HealthData [\n{internal_subset}\n]>" + xml[end:]


def test_billion_laughs_is_never_expanded(tmp_path, out):
    export = export_tree(tmp_path)
    lol = '<!ENTITY lol0 "lol">\n' + "".join(
        f'<!ENTITY lol{i} "{("&lol%d;" % (i - 1)) * 10}">\n' for i in range(1, 10))
    xml = _with_doctype(_records_xml(export), lol).replace('value="1"', 'value="&lol9;"', 1)
    (export / "export.xml").write_text(xml)
    cda = ('<?xml version="1.0"?>\n<!DOCTYPE ClinicalDocument [\n' + lol + ']>\n'
           '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&lol9;</title></ClinicalDocument>\n')
    (export / "export_cda.xml").write_text(cda)
    gpx = ('<?xml version="1.0"?>\n<!DOCTYPE gpx [\n' + lol + ']>\n<gpx xmlns="http://www.topografix.com/GPX/1/1">'
           '<trk><name>&lol9;</name><trkseg><trkpt lat="1" lon="2"><time>2024-01-01T00:00:00Z</time></trkpt>'
           '</trkseg></trk></gpx>\n')
    (export / "workout-routes" / "route_2024-02-01.gpx").write_text(gpx)
    run_case(tmp_path, out, export, "repair", "bare_ampersand_escaped")
    assert b"lollollol" not in tree_text(out)


@pytest.mark.parametrize("mode", ["local", "share"])
def test_external_entities_are_never_fetched_or_read(tmp_path, out, sentinel, mode):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    secret = (sentinel / "secret.txt").as_uri()
    subset = (f'<!ENTITY xxe SYSTEM "{secret}">\n<!ENTITY % remote SYSTEM "http://127.0.0.1:{port}/evil.dtd">\n'
              f'%remote;\n<!ENTITY web SYSTEM "http://127.0.0.1:{port}/x">')
    export = export_tree(tmp_path)
    xml = _with_doctype(_records_xml(export), subset)
    xml = xml.replace('value="1"', 'value="&xxe;&web;"', 1).replace(
        'HKCharacteristicTypeIdentifierDateOfBirth="1961-04-07"', 'HKCharacteristicTypeIdentifierDateOfBirth="&xxe;"')
    (export / "export.xml").write_text(xml)
    (export / "export_cda.xml").write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE ClinicalDocument SYSTEM "http://127.0.0.1:{port}/cda.dtd" [\n{subset}\n]>\n'
        '<ClinicalDocument xmlns="urn:hl7-org:v3"><recordTarget><patientRole><patient><name><given>&xxe;</given>'
        '</name></patient></patientRole></recordTarget><component><structuredBody><component><section><entry>'
        '<observation classCode="OBS" moodCode="EVN"><code code="8867-4" displayName="&xxe;"/><text>&xxe;</text>'
        '<effectiveTime><low value="20240101000000-0800"/></effectiveTime></observation></entry></section>'
        '</component></structuredBody></component></ClinicalDocument>\n')
    (export / "workout-routes" / "route_2024-02-01.gpx").write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE gpx [\n{subset}\n]>\n<gpx xmlns="http://www.topografix.com/GPX/1/1">'
        '<trk><name>&xxe;</name><trkseg><trkpt lat="1" lon="2"><time>2024-01-01T00:00:00Z</time></trkpt></trkseg>'
        '</trk></gpx>\n')
    if mode == "share":  # share mode needs a tree of its own
        out = tmp_path / "share-data"
        out.mkdir()
    proc = run_case(tmp_path, out, export, "ok", mode=mode)
    assert SECRET_TOKEN.encode() not in tree_text(out)
    assert SECRET_TOKEN not in proc.stdout + proc.stderr
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected: no DTD or entity was fetched
    listener.close()
    assert (sentinel / "secret.txt").read_text() == SECRET_TOKEN + "\n"


def _truncation_offsets(size: int) -> list[int]:
    even = [size * i // 17 for i in range(1, 17)]  # 16 spread over the whole file
    tail = [size - 2, size - 8, size - 14, size - 15]  # inside and just before </HealthData>
    return even + tail


@pytest.mark.slow
def test_truncated_export_xml_fails_clearly_and_never_registers(tmp_path, out):
    export = export_tree(tmp_path, records=200)
    full = (export / "export.xml").read_bytes()
    assert full.endswith(b"</HealthData>\n")
    offsets = _truncation_offsets(len(full))
    assert len(set(offsets)) == 20
    for offset in offsets:
        (export / "export.xml").write_bytes(full[:offset])
        proc = run_case(tmp_path, out, export, "error", "export.xml")
        assert any(w in proc.stderr for w in ("truncated", "not well-formed", "no <HealthData>")), (offset, proc.stderr)


def test_export_xml_damage_found_while_parsing_leaves_everything_as_it_was(tmp_path, out):
    export = export_tree(tmp_path, records=50)
    xml = (export / "export.xml").read_bytes()
    (export / "export.xml").write_bytes(xml[: len(xml) // 2])
    run_case(tmp_path, out, export, "error", "truncated", early=True)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.slow
def test_random_byte_flips_never_crash(tmp_path, out, seed):
    export = export_tree(tmp_path, records=60)
    data = bytearray((export / "export.xml").read_bytes())
    rnd = random.Random(seed)
    body = data.index(b"<HealthData")
    for _ in range(12):
        pos = rnd.randrange(body, len(data))
        data[pos] = rnd.randrange(256)
    (export / "export.xml").write_bytes(bytes(data))
    before = snapshot(out)
    proc = run_cli(tmp_path, "pipeline", "run", "--input", str(export), "--out", str(out))
    check_outcome(proc, out, before, tmp_path, "error" if proc.returncode else "ok",
                  "export.xml" if proc.returncode else "")


def test_duplicate_attributes_are_an_error(tmp_path, out):
    export = export_tree(tmp_path)
    xml = _records_xml(export).replace('<Record type="HKQuantityTypeIdentifierStepCount"',
                                       '<Record type="Other" type="HKQuantityTypeIdentifierStepCount"', 1)
    (export / "export.xml").write_text(xml)
    run_case(tmp_path, out, export, "error", "export.xml is")  # wording: see the test below


def test_duplicate_attribute_message_does_not_say_truncated(tmp_path, out):
    export = export_tree(tmp_path)
    xml = _records_xml(export).replace('<Record type="HKQuantityTypeIdentifierStepCount"',
                                       '<Record type="Other" type="HKQuantityTypeIdentifierStepCount"', 1)
    (export / "export.xml").write_text(xml)
    proc = run_cli(tmp_path, "pipeline", "run", "--input", str(export), "--out", str(out))
    assert "truncated" not in proc.stderr


@pytest.mark.slow
def test_100mb_attribute_value_is_kept_within_memory_bounds(tmp_path, out):
    export = export_tree(tmp_path, records=3)
    xml = (export / "export.xml").read_bytes()
    big = (b' <Record type="HKCategoryTypeIdentifierSleepAnalysis" sourceName="Phone" '
           b'startDate="2024-02-01 08:00:00 -0800" endDate="2024-02-01 08:00:00 -0800" value="' +
           b"HKCategoryValueSleepAnalysisAsleep" * (3 << 20) + b'"/>\n')
    (export / "export.xml").write_bytes(xml.replace(b"</HealthData>", big + b"</HealthData>"))
    run_case(tmp_path, out, export, "ok")
    new = (out / "state" / "LAST_RUN").read_text().strip()
    assert len(stream_bytes(out / "ndjson" / new / "observations.ndjson")) > 100 << 20


@pytest.mark.slow
def test_huge_integer_value_is_kept_as_text(tmp_path, out):
    export = export_tree(tmp_path)
    xml = _records_xml(export).replace('value="1"', 'value="' + "7" * 5000 + '"', 1)
    (export / "export.xml").write_text(xml)
    run_case(tmp_path, out, export, "ok")


@pytest.mark.parametrize("digits", [30, 5000])
@pytest.mark.slow
def test_cda_value_beyond_64_bits_is_kept_in_the_element_only(tmp_path, out, digits):
    """Fixed: 30 digits broke the NDJSON encoder (orjson), 5000 broke int()."""
    export = export_tree(tmp_path)
    (export / "export_cda.xml").write_text(
        '<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        '<component><structuredBody><component><section><entry><observation classCode="OBS" moodCode="EVN">'
        '<code code="8867-4"/><effectiveTime><low value="20240101000000-0800"/></effectiveTime>'
        f'<value xsi:type="PQ" value="{"7" * digits}" unit="count/min"/></observation></entry></section>'
        '</component></structuredBody></component></ClinicalDocument>\n')
    run_case(tmp_path, out, export, "ok")
    new = (out / "state" / "LAST_RUN").read_text().strip()
    assert ("7" * digits).encode() in stream_bytes(out / "ndjson" / new / "observations.ndjson")


def test_ecg_birth_date_with_thousands_of_digits(tmp_path, out):
    """Fixed: the identity stage's ECG header reader called int() on any digit run."""
    export = export_tree(tmp_path)
    (export / "electrocardiograms" / "ecg_2024-02-03.csv").write_text(
        f'Name,{PERSON}\nDate of Birth,"April 7, {"1" * 5000}"\nRecorded Date,2024-02-03 08:14:22 -0800\n'
        "Sample Rate,512 hertz\n\nLead,Lead I\nUnit,µV\n\n1.5\n2.5\n")
    run_case(tmp_path, out, export, "ok")


def _deep(depth: int) -> bytes:
    return (b' <Record type="X" sourceName="s" startDate="2024-01-01 00:00:00 -0800" '
            b'endDate="2024-01-01 00:00:00 -0800">\n' + b"  <a>\n" * depth + b"  </a>\n" * depth + b" </Record>\n")


def test_300_deep_nesting_is_a_clear_error(tmp_path, out):
    export = export_tree(tmp_path)
    xml = (export / "export.xml").read_bytes()
    (export / "export.xml").write_bytes(xml.replace(b"</HealthData>", _deep(300) + b"</HealthData>"))
    run_case(tmp_path, out, export, "error", "nested too deeply")


def test_10000_deep_nesting_is_a_clear_error(tmp_path, out):
    export = export_tree(tmp_path)
    xml = (export / "export.xml").read_bytes()
    (export / "export.xml").write_bytes(xml.replace(b"</HealthData>", _deep(10_000) + b"</HealthData>"))
    run_case(tmp_path, out, export, "error", "nested too deeply")


def test_10000_deep_nesting_in_cda_and_gpx(tmp_path, out):
    export = export_tree(tmp_path)
    deep = b"<a>" * 10_000 + b"</a>" * 10_000
    (export / "export_cda.xml").write_bytes(b'<ClinicalDocument xmlns="urn:hl7-org:v3"><component>' + deep +
                                            b"</component></ClinicalDocument>\n")
    (export / "workout-routes" / "route_2024-02-01.gpx").write_bytes(
        b'<gpx xmlns="http://www.topografix.com/GPX/1/1"><trk>' + deep + b"</trk></gpx>\n")
    before = snapshot(out)
    proc = run_cli(tmp_path, "pipeline", "run", "--input", str(export), "--out", str(out))
    check_outcome(proc, out, before, tmp_path, "error" if proc.returncode else "ok",
                  "" if not proc.returncode else "")


def test_empty_export_xml_is_refused_before_staging(tmp_path, out):
    export = export_tree(tmp_path)
    (export / "export.xml").write_bytes(b"")
    run_case(tmp_path, out, export, "error", "export.xml is empty", early=True)


def test_invalid_utf8_is_replaced_and_counted(tmp_path, out):
    export = export_tree(tmp_path)
    xml = (export / "export.xml").read_bytes().replace(b'sourceName="Phone"', b'sourceName="Ph\xff\xfeone"', 1)
    (export / "export.xml").write_bytes(xml)
    run_case(tmp_path, out, export, "repair", "invalid_utf8_replaced")


# --------------------------------------------------------------------------- zips


def _zip_case(tmp_path: Path, data: bytes, name: str = "export.zip") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


ZIP_CASES: dict[str, tuple[Callable[[Path], list[dict] | bytes], str]] = {}


def zip_case(name: str, detail: str):
    def register(build):
        ZIP_CASES[name] = (build, detail)
        return build
    return register


@zip_case("high_ratio_member", "compression ratio")
def _(tmp_path):
    zeros = b"\0" * (64 << 20)
    return export_members(tmp_path) + [member("apple_health_export/bomb.bin", zeros)]


@zip_case("many_small_high_ratio_members", "200 times its size")
def _(tmp_path):
    one = b"\0" * (1 << 20)  # at the per-member threshold: only the archive-wide ratio catches it
    m = member("x", one)
    return export_members(tmp_path) + [{**m, "name": f"apple_health_export/f{i}.bin".encode()} for i in range(1500)]


@zip_case("overlapping_entries", "200 times its size")
def _(tmp_path):
    one = b"\0" * (1 << 20)
    base = member("apple_health_export/export.xml", one)
    return raw_zip([base] + [{**base, "name": f"apple_health_export/o{i}.bin".encode()} for i in range(2000)],
                   shared_data=True)


@zip_case("100k_members", "more than 50000 members")
def _(tmp_path):
    empty = member("x", b"", deflate=False)
    return export_members(tmp_path) + [{**empty, "name": f"apple_health_export/m/{i}".encode()}
                                       for i in range(100_000)]


@zip_case("absolute_path", "absolute path")
def _(tmp_path):
    return export_members(tmp_path) + [member(str(tmp_path / "evil-abs.txt"), b"evil")]


@zip_case("dotdot", "'..'")
def _(tmp_path):
    return export_members(tmp_path) + [member("apple_health_export/../../evil-dotdot.txt", b"evil")]


@zip_case("symlink_member", "symbolic link")
def _(tmp_path):
    return export_members(tmp_path) + [member("apple_health_export/link", str(tmp_path).encode(), deflate=False,
                                              mode=0o120777)]


@zip_case("invalid_utf8_name_flagged_utf8", "cannot be read")
def _(tmp_path):
    return export_members(tmp_path) + [member(b"apple_health_export/\xff\xfe.json", b"{}", flags=0x800)]


@zip_case("lying_size", "corrupt")
def _(tmp_path):
    members = export_members(tmp_path)
    big = b"A" * (4 << 20)
    m = member("apple_health_export/liar.bin", big)
    return members + [{**m, "size": 100}]  # declares 100 bytes, inflates to 4 MiB


@zip_case("corrupt_deflate_stream", "corrupt")
def _(tmp_path):
    members = export_members(tmp_path)
    m = member("apple_health_export/zz.bin", os.urandom(1000) * 3)
    raw = bytearray(m["raw"])
    raw[0] = 0xFF  # an invalid block header
    return members + [{**m, "raw": bytes(raw)}]


@zip_case("file_and_folder_same_name", "same name")
def _(tmp_path):
    return export_members(tmp_path) + [member("apple_health_export/export.xml/child.txt", b"x")]


@zip_case("dot_segment", "invalid name")
def _(tmp_path):
    return export_members(tmp_path) + [member("apple_health_export/./export.xml", b"<HealthData/>")]


@zip_case("header_offset_before_the_file", "corrupt")
def _(tmp_path):
    data = bytearray(raw_zip(export_members(tmp_path)))
    # The end record claims the central directory starts 1000 bytes later than it does:
    # zipfile then computes negative local header offsets (seek: EINVAL, an OSError).
    (cd_offset,) = struct.unpack("<I", data[-6:-2])
    data[-6:-2] = struct.pack("<I", cd_offset + 1000)
    return bytes(data)


@zip_case("duplicate_member", "same member twice")
def _(tmp_path):
    members = export_members(tmp_path)
    return members + [members[-1]]


@pytest.mark.parametrize("name", list(ZIP_CASES))
def test_hostile_zip_is_refused_before_anything_is_written(name, tmp_path, out):
    build, detail = ZIP_CASES[name]
    built = build(tmp_path)
    data = built if isinstance(built, bytes) else raw_zip(built)
    inp = _zip_case(tmp_path, data)
    # Damage inside a member's data shows only while extracting, into a work dir that is
    # removed on the error: so for every case nothing at all changes.
    run_case(tmp_path, out, inp, "error", detail, early=True)
    for escaped in (tmp_path / "evil-abs.txt", tmp_path.parent / "evil-dotdot.txt", tmp_path / "evil-dotdot.txt"):
        assert not escaped.exists()


def test_nested_zip_bomb_is_staged_as_an_opaque_file(tmp_path, out):
    inner = raw_zip([member("bomb.bin", b"\0" * (1 << 20))] * 1 + [
        {**member("x", b"\0" * (1 << 20)), "name": f"b{i}.bin".encode()} for i in range(200)])
    members = export_members(tmp_path) + [member("apple_health_export/inner.zip", inner)]
    inp = _zip_case(tmp_path, raw_zip(members))
    run_case(tmp_path, out, inp, "ok")
    new = (out / "state" / "LAST_RUN").read_text().strip()
    with stagestore.plain_run(out / "staging" / new) as plain:
        assert (plain / "source" / "inner.zip").read_bytes() == inner
        assert not list((plain / "source").glob("b*.bin"))


def test_non_utf8_member_names_without_the_utf8_flag(tmp_path, out):
    """Legacy zips (no UTF-8 flag) decode names as cp437: staged under that name."""
    members = export_members(tmp_path) + [member(b"apple_health_export/caf\x82.txt", b"x")]
    inp = _zip_case(tmp_path, raw_zip(members))
    run_case(tmp_path, out, inp, "ok")


def test_export_zip_that_is_a_directory_or_a_fifo(tmp_path, out):
    as_dir = tmp_path / "export.zip"
    as_dir.mkdir()
    run_case(tmp_path, out, as_dir, "error", "input folder is empty", early=True)
    fifo = tmp_path / "fifo" / "export.zip"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    run_case(tmp_path, out, fifo, "error", "neither a regular file nor a folder", early=True)
    export = export_tree(tmp_path)
    os.mkfifo(export / "clinical-records" / "pipe.json")
    run_case(tmp_path, out, export.parent, "error", "special file", early=True)


def test_symlink_inside_the_export_folder_is_refused(tmp_path, out, sentinel):
    export = export_tree(tmp_path)
    (export / "clinical-records" / "leak.json").symlink_to(sentinel / "secret.txt")
    run_case(tmp_path, out, export, "error", "symbolic link", early=True)
    assert SECRET_TOKEN.encode() not in tree_text(out)


def test_zip_slip_via_zipfile_names_never_escapes(tmp_path, out):
    target = tmp_path / "slipped.txt"
    export = export_tree(tmp_path)
    z = zip_folder(export, tmp_path / "export.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("apple_health_export/../../../" + "/".join([".."] * 20) + str(target), "x")
    run_case(tmp_path, out, z, "error", "'..'", early=True)
    assert not target.exists()


# --------------------------------------------------------------------------- FHIR JSON


@pytest.mark.slow
def test_fhir_over_the_size_limit_is_a_clear_error(tmp_path, out):
    from healthdelta.parse.fhir import MAX_JSON_BYTES

    export = export_tree(tmp_path)
    with open(export / "clinical-records" / "Observation-huge.json", "wb") as fh:
        fh.truncate(MAX_JSON_BYTES + 1)  # sparse: costs no disk until staged
    run_case(tmp_path, out, export, "error", "larger than")


@pytest.mark.slow
def test_fhir_100mb_valid_json_is_read_within_memory_bounds(tmp_path, out):
    export = export_tree(tmp_path)
    doc = b'{"resourceType": "Observation", "id": "big", "status": "final", "note": [{"text": "' + \
        b"n" * (100 << 20) + b'"}]}'
    (export / "clinical-records" / "Observation-big.json").write_bytes(doc)
    run_case(tmp_path, out, export, "ok")


@pytest.mark.parametrize("content,detail", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a":' * 300 + b"1" + b"}" * 300, "nested too deeply"),
    (b"this is not json {", "not valid JSON"),
    (b"\xff\xfe\x00{", "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_fhir_damaged_json_is_a_clear_error(tmp_path, out, content, detail):
    export = export_tree(tmp_path)
    (export / "clinical-records" / "Observation-1.json").write_bytes(content)
    run_case(tmp_path, out, export, "error", detail)


def test_fhir_resource_type_of_the_wrong_type_is_kept_generically(tmp_path, out):
    """Found by fuzzing: `resourceType` holding an object crashed the version guess."""
    export = export_tree(tmp_path)
    (export / "clinical-records" / "Observation-1.json").write_text(
        '{"resourceType": {"code": "x"}, "id": "1", "status": "final"}')
    run_case(tmp_path, out, export, "ok")
