"""Shared fixtures: a CLI runner over a real subprocess and small export trees."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# Apple's public sample Health Records export, carried by the project so a fresh clone tests alone.
SHARED_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "apple-sample-export"

MINI_XML = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE HealthData [
<!ELEMENT HealthData (ExportDate,Me,(Record)*)>
]>
<HealthData locale="en_US">
 <ExportDate value="2024-03-01 09:15:02 -0800"/>
 <Me HKCharacteristicTypeIdentifierDateOfBirth="1961-04-07" HKCharacteristicTypeIdentifierBiologicalSex="HKBiologicalSexFemale"/>
{records}</HealthData>
"""


def write_mini_export(root: Path, records: int = 3, pad_bytes: int = 0) -> Path:
    """A minimal export folder `root/apple_health_export/`; `pad_bytes` grows export.xml."""
    export = root / "apple_health_export"
    (export / "clinical-records").mkdir(parents=True, exist_ok=True)
    (export / "electrocardiograms").mkdir(exist_ok=True)
    (export / "workout-routes").mkdir(exist_ok=True)
    lines = "".join(
        f' <Record type="HKQuantityTypeIdentifierStepCount" sourceName="Phone" unit="count" '
        f'value="{i}" startDate="2024-02-01 08:{i % 60:02d}:00 -0800" endDate="2024-02-01 08:{i % 60:02d}:30 -0800"/>\n'
        for i in range(records)
    )
    if pad_bytes:
        filler = ' <!-- padding -->\n'
        lines += filler * (pad_bytes // len(filler))
    (export / "export.xml").write_text(MINI_XML.format(records=lines), encoding="utf-8")
    (export / "export_cda.xml").write_text("<ClinicalDocument/>\n", encoding="utf-8")
    (export / "clinical-records" / "Observation-1.json").write_text('{"resourceType": "Observation"}\n')
    (export / "electrocardiograms" / "ecg_2024-02-03.csv").write_text("Sample Rate,512 hertz\n\n1\n2\n")
    (export / "workout-routes" / "route_2024-02-01.gpx").write_text("<gpx/>\n")
    return export


def zip_folder(export_dir: Path, zip_path: Path) -> Path:
    """Zip an export folder as the phone does: top folder `apple_health_export/`."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(export_dir.rglob("*")):
            if p.is_file():
                zf.write(p, f"apple_health_export/{p.relative_to(export_dir).as_posix()}")
    return zip_path


class Cli:
    """Runs `python -m healthdelta` in a subprocess, in a working directory."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd

    def __call__(self, *args: str, env: dict[str, str] | None = None, check: bool = False,
                 timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "healthdelta", *args], cwd=self.cwd, env=full_env,
            capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "healthdelta", *args], cwd=self.cwd, env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


@pytest.fixture
def mini_export(tmp_path: Path) -> Path:
    """The parent folder of a small `apple_health_export/`."""
    root = tmp_path / "inputs" / "mini"
    write_mini_export(root)
    return root


def kv(stdout: str) -> dict[str, str]:
    """`key=value` lines of a command's stdout."""
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="session")
def synth_pair(tmp_path_factory):
    """A generated export with planted PII (two people and a namesake) and its next export."""
    from healthdelta.synth import generate_export

    root = tmp_path_factory.mktemp("synth")
    first = generate_export(root / "export-1", seed=5, records=3000, people=2, ambiguous_person=True, zip=True)
    second = generate_export(root / "export-2", base=first, new_records=120, zip=True)
    return first, second


def stream_path(path: Path) -> Path:
    """The stored file of the canonical stream path `<dir>/<stream>.ndjson`, in the form it has."""
    from healthdelta import streamfile

    found = streamfile.find(path.parent, streamfile.stream_name(path))
    assert found is not None, path
    return found


def stream_bytes(path: Path) -> bytes:
    """The plain canonical bytes of `<dir>/<stream>.ndjson`, however the run stores it."""
    from healthdelta import streamfile

    return streamfile.read_bytes(stream_path(path))


def read_ndjson(path: Path) -> list[dict]:
    import orjson

    return [orjson.loads(line) for line in stream_bytes(path).splitlines()]


def decompress_run(ndjson_dir: Path) -> None:
    """Turn a run's stored streams into plain `.ndjson` files: the form runs had before
    streams were stored compressed (an old state dir)."""
    from healthdelta import streamfile

    for folder in (ndjson_dir, ndjson_dir / "added", ndjson_dir / "removed"):
        for path in streamfile.stream_files(folder):
            if path.name.endswith(streamfile.COMPRESSED):
                plain = folder / streamfile.file_name(streamfile.stream_name(path), compressed=False)
                plain.write_bytes(streamfile.read_bytes(path))
                path.unlink()
    for path in sorted((ndjson_dir / "index").glob(f"*{streamfile.INDEX}{streamfile.ZST}")):
        path.with_suffix("").write_bytes(streamfile.read_bytes(path))  # `<stream>.keys`
        path.unlink()
