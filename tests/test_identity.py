"""Identity (CONTRACT §8): name rules, linking decisions, the store across runs, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED_FIXTURE
from healthdelta import identity, pipeline, synth
from healthdelta.identity import (
    Cluster,
    Observation,
    PersonEvidence,
    cluster_observations,
    decide,
    identifier_fp,
    normalise_name,
)

SECRET = b"k" * 32

# --------------------------------------------------------------------------- pure rules

_names = st.text(alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Zs", "Pd")), max_size=40)
_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyzäöüéñ", min_size=1, max_size=12)


@given(_names)
def test_normalise_name_is_idempotent(text):
    once = normalise_name(text)
    assert normalise_name(once) == once


@given(_word, _word, _word)
def test_last_comma_first_equals_first_last(first, middle, last):
    assert normalise_name(f"{last}, {first} {middle}") == normalise_name(f"{first} {middle} {last}")


@given(_word, _word)
@settings(max_examples=50)
def test_case_spacing_and_accents_do_not_matter(first, last):
    assert normalise_name(f"  {first.upper()}   {last}\t") == normalise_name(f"{first} {last.title()}")
    assert normalise_name("Zoë  O’Brien-Smith") == normalise_name("zoe obrien smith")


def test_identifier_fingerprint_is_keyed_and_needs_a_system():
    a = identifier_fp(SECRET, "urn:oid:1.2.3", "K1234567")
    assert a == identifier_fp(SECRET, "1.2.3", " K1234567 ")  # CDA root == FHIR urn:oid
    assert a != identifier_fp(b"x" * 32, "urn:oid:1.2.3", "K1234567")
    assert a != hashlib.sha256(b"K1234567").hexdigest()
    assert identifier_fp(SECRET, None, "K1234567") is None


def _obs(name=None, dob=None, ids=(), source="fhir"):
    names = ({"text": name},) if name else ()
    return Observation(source=source, names=names, birth_date=dob, identifiers=tuple(ids))


def test_same_name_other_birth_date_is_kept_apart():
    clusters, conflicts = cluster_observations(
        [_obs("Jane Doe", "1961-04-07", source="owner"), _obs("Doe, Jane", "1961-04-07"),
         _obs("JANE DOE", "1979-01-01")], SECRET)
    assert [c.members for c in clusters] == [[0, 1], [2]]
    assert conflicts == [(0, 1, "name_birth_date_conflict")]


def test_shared_identifier_links_but_never_across_birth_dates():
    mrn = ("urn:oid:1.2.3", "M1")
    clusters, _ = cluster_observations([_obs("A B", "1970-01-01", [mrn]), _obs("C D", None, [mrn])], SECRET)
    assert [c.members for c in clusters] == [[0, 1]]
    clusters, conflicts = cluster_observations([_obs("A B", "1970-01-01", [mrn]), _obs("A B", "1980-01-01", [mrn])],
                                               SECRET)
    assert len(clusters) == 2 and conflicts


def test_name_without_birth_date_joins_only_an_unambiguous_namesake():
    clusters, conflicts = cluster_observations(
        [_obs("Jane Doe", "1961-04-07"), _obs("Jane Doe", "1979-01-01"), _obs("Jane Doe")], SECRET)
    assert len(clusters) == 3 and any(r == "ambiguous_name" for *_, r in conflicts)


def _person(pid, names=(), dobs=(), ids=(), samples=()):
    return PersonEvidence(pid, frozenset(names), frozenset(dobs), frozenset(ids), frozenset(samples))


def test_decide_rules():
    c = Cluster(members=[0], name_keys={"jane doe"}, birth_date="1961-04-07")
    assert decide(c, [_person("p1", ["jane doe"], ["1961-04-07"])]).kind == "name"
    assert decide(c, []).kind == "new"
    d = decide(c, [_person("p1", ["jane doe"], ["1970-01-01"])])
    assert d.kind == "new" and d.conflicts == ("p1",)
    both = decide(c, [_person("p1", ["jane doe"], ["1961-04-07"]), _person("p2", ["jane doe"])])
    assert both.kind == "new" and set(both.conflicts) == {"p1", "p2"}  # ambiguous: never merged
    c_id = Cluster(members=[0], id_fps={"f1"}, birth_date="1961-04-07")
    assert decide(c_id, [_person("p1", ids=["f1"])]).kind == "identifier"
    two = decide(c_id, [_person("p1", ids=["f1"]), _person("p2", ids=["f1"])])
    assert two.kind == "conflict" and two.person_id is None
    assert decide(c_id, [_person("p1", ids=["f1"], dobs=["1999-09-09"])]).kind == "conflict"
    c_s = Cluster(members=[0], record_samples={"s1", "s2", "s3"})
    assert decide(c_s, [_person("p1", samples=["s1", "s2"])]).person_id == "p1"
    assert decide(c_s, [_person("p1", samples=["s1"])]).kind == "new"


# --------------------------------------------------------------------------- the store over runs


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Three successive exports of one owner (with a child and a namesake), staged."""
    root = tmp_path_factory.mktemp("family")
    e1 = synth.generate_export(root / "e1", seed=11, records=300, people=2, ambiguous_person=True)
    e2 = synth.generate_export(root / "e2", base=e1, new_records=40)
    e3 = synth.generate_export(root / "e3", base=e2, new_records=40)
    staged = [pipeline.ingest_only(e.root, root / "staging") for e in (e1, e2, e3)]
    return e1, [(path, run_id) for run_id, path in staged]


def _store_bytes(identity_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(identity_dir.iterdir())}


def test_same_person_keeps_one_id_across_three_exports(family, tmp_path):
    export, runs = family
    ids = [identity.resolve_run(tmp_path / "identity", d, rid) for d, rid in runs]
    assert len({r.owner_person_id for r in ids}) == 1
    assert not any(r.provisional for r in ids)
    assert ids[0].owner_person_id.startswith("p_") and len(ids[0].owner_person_id) == 18
    assert ids[0].owner_label == "Patient 1"
    assert ids[1].new_people == 0 and ids[2].new_people == 0


def test_resolving_again_changes_nothing(family, tmp_path):
    _, runs = family
    d, rid = runs[0]
    first = identity.resolve_run(tmp_path / "identity", d, rid)
    before = _store_bytes(tmp_path / "identity")
    again = identity.resolve_run(tmp_path / "identity", d, rid)
    assert again.owner_person_id == first.owner_person_id
    assert _store_bytes(tmp_path / "identity") == before


def test_ambiguous_namesake_is_never_merged(family, tmp_path):
    export, runs = family
    for d, rid in runs:
        identity.resolve_run(tmp_path / "identity", d, rid)
    review = identity.review(tmp_path / "identity")
    assert len(review.people) == 3  # owner, child, namesake
    conflicts = [r for r in review.links if r.state == "conflict"]
    owner = review.people[0].person_id
    assert any(owner in r.person_ids and len(set(r.person_ids)) == 2 for r in conflicts)
    # The namesake's birth date is nowhere near the owner's aliases.
    aliases = json.loads((tmp_path / "identity" / "aliases.json").read_text())["aliases"]
    namesake = export.people[-1]
    owner_dobs = {a["birth_date"] for a in aliases.values() if a["person_id"] == owner}
    assert namesake.birth_date not in owner_dobs


def test_store_is_private_and_links_hold_keyed_fingerprints_only(family, tmp_path):
    export, runs = family
    identity.resolve_run(tmp_path / "identity", *runs[0])
    idir = tmp_path / "identity"
    assert stat.S_IMODE(os.stat(idir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(idir / "secret.key").st_mode) == 0o600
    links = (idir / "links.json").read_text()
    owners = (idir / "owners.json").read_text()
    for person in export.people:
        for value in person.pii_strings():
            assert value not in links and value not in owners
        assert hashlib.sha256(person.mrn.encode()).hexdigest() not in links


def test_labels_never_change_when_people_are_added(family, tmp_path):
    _, runs = family
    idir = tmp_path / "identity"
    identity.resolve_run(idir, *runs[0])
    before = identity.share_labels(idir)
    other = synth.generate_export(tmp_path / "other", seed=99, records=200, people=3)
    rid, d = pipeline.ingest_only(other.root, tmp_path / "staging")
    result = identity.resolve_run(idir, d, rid)
    after = identity.share_labels(idir)
    assert all(after[pid] == label for pid, label in before.items())
    assert result.owner_person_id not in before  # another family: another person
    assert len(set(after.values())) == len(after)


def test_caregiver_state_keeps_two_owners_apart_and_stable(tmp_path):
    a1 = synth.generate_export(tmp_path / "a1", seed=21, records=200)
    b1 = synth.generate_export(tmp_path / "b1", seed=22, records=200)
    a2 = synth.generate_export(tmp_path / "a2", base=a1, new_records=20)
    idir = tmp_path / "identity"
    owners = []
    for e in (a1, b1, a2):
        rid, d = pipeline.ingest_only(e.root, tmp_path / "staging")
        owners.append(identity.resolve_run(idir, d, rid).owner_person_id)
    assert owners[0] == owners[2] != owners[1]


def test_owner_without_evidence_is_provisional(tmp_path):
    export = tmp_path / "in" / "apple_health_export"
    export.mkdir(parents=True)
    (export / "export.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<HealthData locale="en_US">\n'
        ' <ExportDate value="2024-03-01 09:15:02 -0800"/>\n <Me HKCharacteristicTypeIdentifierBiologicalSex='
        '"HKBiologicalSexNotSet"/>\n</HealthData>\n', encoding="utf-8")
    rid, d = pipeline.ingest_only(tmp_path / "in", tmp_path / "staging")
    result = identity.resolve_run(tmp_path / "identity", d, rid)
    assert result.provisional and result.reason == identity.REASON_NO_EVIDENCE
    assert result.owner_person_id == f"provisional-{rid[:16]}"
    assert identity.review(tmp_path / "identity").provisional_runs == ((rid, identity.REASON_NO_EVIDENCE),)


def test_real_sample_export_resolves(tmp_path):
    fixture = SHARED_FIXTURE
    rid, d = pipeline.ingest_only(fixture / "apple_health_export", tmp_path / "staging")
    result = identity.resolve_run(tmp_path / "identity", d, rid)
    # Me's birth date differs from the sample account's Patient: two people, the owner anchored
    # by its HealthKit samples.
    assert not result.provisional and result.people_in_run == 2


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # Imports the command module itself so the tests work before and after it is wired
    # into healthdelta.cli.
    code = "import sys; from healthdelta.cli import commands_identity, main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _assert_no_pii(text: str, people) -> None:
    low = text.casefold()
    for person in people:
        for value in person.pii_strings():
            assert value.casefold() not in low, "planted PII in command output"


@pytest.mark.slow
def test_cli_build_review_confirm(family, tmp_path):
    export, runs = family
    args = [a for d, _ in runs for a in ("--run", str(d))]
    state = tmp_path / "state"
    build = run_cli("identity", "build", *args, "--state", str(state), cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    assert len({line.split()[1] for line in build.stdout.splitlines() if line.startswith("run_id=")}) == 1
    review = run_cli("identity", "review", "--state", str(state), cwd=tmp_path)
    assert review.returncode == 0
    for proc in (build, review):
        _assert_no_pii(proc.stdout + proc.stderr, export.people)
    unverified = [line.split()[0] for line in review.stdout.splitlines() if " unverified " in line]
    conflict = [line.split()[0] for line in review.stdout.splitlines() if " conflict " in line]
    assert unverified and conflict
    before = _store_bytes(state / "identity")
    ok = run_cli("identity", "confirm", "--link", unverified[0], "--state", str(state), cwd=tmp_path)
    assert ok.returncode == 0 and "state=user_confirmed" in ok.stdout
    after = _store_bytes(state / "identity")
    again = run_cli("identity", "confirm", "--link", unverified[0], "--state", str(state), cwd=tmp_path)
    assert again.returncode == 0 and _store_bytes(state / "identity") == after != before
    refused = run_cli("identity", "confirm", "--link", conflict[0], "--state", str(state), cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1
    bad = run_cli("identity", "confirm", "--link", "nope", "--state", str(state), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    # A later run never undoes the user's confirmation.
    run_cli("identity", "build", *args, "--state", str(state), cwd=tmp_path)
    links = json.loads((state / "identity" / "links.json").read_text())["links"]
    assert links[unverified[0]]["state"] == "user_confirmed"
