"""Identity (CONTRACT §8): who the people in an export are, and which person owns it.

Two halves, kept apart on purpose:

* **Pure rules** (top of the file): `normalise_name`, identifier fingerprints,
  the within-run clustering of person observations and the decision that links
  a cluster to a known person. Functions of values only (the HMAC key is an
  argument), tested with hypothesis.
* **The store** (bottom): `<state>/identity/` read and written atomically, and
  the stage entry points `resolve_run`, `build`, `review`, `confirm_link`,
  `share_labels`, `load_people_pii`. The store holds PII (names, birth dates,
  MRNs, contact details): it is local only and never bundled.

Linking rules (the safe direction is always "keep apart"):

* a shared external identifier (system + value) links for sure (`verified`);
  the first Record lines of `export.xml` act as such an identifier for the
  owner: identical HealthKit samples only come from the same HealthKit store;
* a name match (normalised) links only when it is unambiguous, and the link
  is `unverified` until `identity confirm --link ID` makes it `user_confirmed`;
* conflicting evidence (same name with another birth date, identifiers that
  point at two people) never merges: the people stay apart and a `conflict`
  link shows up in `identity review`.

Store format (`<state>/identity/`, directory 0700):

    secret.key     64 hex chars, 0600: HMAC key for every fingerprint and id
    people.json    {"people": {person_id: {created_run, provisional, owner_of_runs, seen_in_runs}}}
    aliases.json   {"aliases": {alias_id: one observed identity of a person: names,
                   birth date, identifiers, telecom, addresses (raw, for scrubbing),
                   identifier fingerprints, sources, runs}}
    links.json     {"links": {link_id: {kind, state, person_ids, alias_ids, reason,
                   evidence (HMAC fingerprints only), created_run}}}
    owners.json    {"runs": {run_id: {owner_person_id, provisional, reason, people, fhir_subjects}}}
    mapping.json   {"labels": {person_id: "Patient N"}, "next_label": N + 1}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healthdelta import stagestore
from healthdelta.errors import InputError, StateError, UsageError
from healthdelta.progress import ProgressFn, no_progress

SCHEMA_VERSION = 1
PERSON_PREFIX = "p_"
HEALTHKIT_SYSTEM = "urn:healthdelta:healthkit-sample"
RECORD_SAMPLES = 32  # first top-level Record lines of export.xml used as the owner's store fingerprint
MAX_RECORD_SAMPLES = 512  # kept per alias across runs
_SAMPLE_HEAD_BYTES = 4 << 20

# Reason codes (shown in run reports and review; never names or values).
REASON_NO_EVIDENCE = "owner_no_evidence"
REASON_OWNER_CONFLICT = "owner_sources_conflict"
REASON_IDENTIFIER_CONFLICT = "owner_identifier_conflict"
REASON_BIRTH_DATE_CONFLICT = "owner_birth_date_conflict"

# --------------------------------------------------------------------------- pure: names

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u00b4": "'", "`": "'"})
_NOT_NAME = re.compile(r"[^\w' -]+")
_DROP = re.compile(r"['_]+")
_SPACES = re.compile(r"[\s-]+")


def fold_accents(text: str) -> str:
    """`Zoë` -> `Zoe`: compatibility decomposition without combining marks."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def fold_for_match(text: str) -> str:
    """`D’Ángelo` -> `d'angelo`: case, accents (composed or not) and apostrophe styles do not
    matter; for matching a value a person typed against stored text."""
    return fold_accents(text.translate(_APOSTROPHES)).casefold()


def normalise_name(text: str) -> str:
    """One comparable form of a person's name; idempotent.

    Case, accents, spacing, hyphens and apostrophes do not matter, and
    `"Last, First Middle"` equals `"First Middle Last"` (the first comma swaps).
    """
    text = fold_accents(text.translate(_APOSTROPHES)).casefold()
    if "," in text:
        last, _, first = text.partition(",")
        text = f"{first.replace(',', ' ')} {last}"
    text = _NOT_NAME.sub(" ", text)
    text = _DROP.sub("", text)
    return " ".join(_SPACES.split(text)).strip()


def name_strings(name: dict[str, Any]) -> list[str]:
    """The full-name strings one parsed name entry stands for (`text` and given + family)."""
    out: list[str] = []
    text = name.get("text")
    if isinstance(text, str) and text.strip():
        out.append(text.strip())
    given = [g for g in name.get("given") or [] if isinstance(g, str) and g.strip()]
    family = name.get("family")
    if given or (isinstance(family, str) and family.strip()):
        out.append(" ".join([*given, family if isinstance(family, str) else ""]).strip())
    return out


def name_keys(names: Iterable[dict[str, Any]]) -> frozenset[str]:
    """Normalised full names of a list of name entries (empty ones dropped)."""
    keys = {normalise_name(s) for n in names for s in name_strings(n)}
    return frozenset(k for k in keys if k)


# --------------------------------------------------------------------------- pure: fingerprints


def mac(secret: bytes, *parts: str) -> str:
    """HMAC-SHA256 hex over the parts (unit-separator joined): every fingerprint and id."""
    return hmac.new(secret, "\x1f".join(parts).encode("utf-8"), hashlib.sha256).hexdigest()


def normalise_system(system: str | None) -> str | None:
    """`urn:oid:1.2.3` and CDA's bare root `1.2.3` name the same identifier system."""
    if not system or not system.strip():
        return None
    s = system.strip().lower()
    return s[len("urn:oid:"):] if s.startswith("urn:oid:") else s.rstrip("/")


def identifier_fp(secret: bytes, system: str | None, value: str) -> str | None:
    """Keyed fingerprint of an external identifier; None when it has no system
    (a bare value is not evidence enough to link two sources)."""
    norm = normalise_system(system)
    if norm is None or not value.strip():
        return None
    return mac(secret, "identifier", norm, value.strip())


def birth_dates_compatible(a: str | None, b: str | None) -> bool:
    return a is None or b is None or a == b


# --------------------------------------------------------------------------- pure: observations


@dataclass(frozen=True)
class Observation:
    """One source's view of one person within one run (holds PII, never persisted as is)."""

    source: str  # "owner" (Me + CDA recordTarget + ECG headers + HealthKit samples) or "fhir"
    names: tuple[dict[str, Any], ...] = ()
    birth_date: str | None = None
    sex: str | None = None
    identifiers: tuple[tuple[str | None, str], ...] = ()  # (system, value)
    telecom: tuple[dict[str, Any], ...] = ()
    addresses: tuple[dict[str, Any], ...] = ()
    fhir_ids: tuple[str, ...] = ()
    record_samples: tuple[str, ...] = ()  # HMAC fingerprints
    extra_names: tuple[str, ...] = ()  # scrub-only name hints (device possessors: "Jane’s iPhone")
    birth_texts: tuple[str, ...] = ()  # birth dates as the sources wrote them ("April 7, 1961")
    sources: tuple[str, ...] = ()

    @property
    def keys(self) -> frozenset[str]:
        return name_keys(self.names)


@dataclass
class Cluster:
    """Observations of one run that describe the same person."""

    members: list[int]
    name_keys: set[str] = field(default_factory=set)
    birth_date: str | None = None
    id_fps: set[str] = field(default_factory=set)
    record_samples: set[str] = field(default_factory=set)
    # member index -> "identifier" | "name" (how it joined); the first member is the anchor
    joined_by: dict[int, str] = field(default_factory=dict)


def cluster_observations(
    observations: Sequence[Observation], secret: bytes
) -> tuple[list[Cluster], list[tuple[int, int, str]]]:
    """Group one run's observations into people.

    Returns the clusters (in order of their first member) and conflict pairs
    `(cluster_a, cluster_b, reason)` between clusters that were kept apart.
    A union never joins two different birth dates, whatever the evidence.
    """
    n = len(observations)
    parent = list(range(n))
    dob: dict[int, str | None] = {i: o.birth_date for i, o in enumerate(observations)}
    how: dict[int, str] = {}
    conflicts: set[tuple[int, int, str]] = set()
    fps = [
        {fp for s, v in o.identifiers if (fp := identifier_fp(secret, s, v))}
        for o in observations
    ]

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int, kind: str, reason: str) -> None:
        ri, rj = find(i), find(j)
        if ri == rj:
            return
        if not birth_dates_compatible(dob[ri], dob[rj]):
            conflicts.add((min(i, j), max(i, j), reason))
            return
        lo, hi = min(ri, rj), max(ri, rj)
        parent[hi] = lo
        dob[lo] = dob[lo] or dob[hi]
        later = max(i, j)
        how.setdefault(later, kind)

    # 1. shared identifiers
    for i in range(n):
        for j in range(i + 1, n):
            if fps[i] & fps[j]:
                union(i, j, "identifier", "identifier_birth_date_conflict")
    # 2. same name and same birth date
    by_name_dob: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(observations):
        if o.birth_date:
            for key in o.keys:
                by_name_dob.setdefault((key, o.birth_date), []).append(i)
    for members in by_name_dob.values():
        for j in members[1:]:
            union(members[0], j, "name", "name_birth_date_conflict")
    # 3. a name without birth date joins only an unambiguous namesake
    for i, o in enumerate(observations):
        if o.birth_date or not o.keys:
            continue
        dated = {find(j) for j in range(n) if observations[j].birth_date and observations[j].keys & o.keys}
        if len(dated) == 1:
            union(i, dated.pop(), "name", "name_conflict")
        elif not dated:
            twin = next((j for j in range(i) if not observations[j].birth_date and observations[j].keys & o.keys),
                        None)
            if twin is not None:
                union(twin, i, "name", "name_conflict")
        else:
            for r in dated:
                conflicts.add((min(i, r), max(i, r), "ambiguous_name"))
    # 4. same name, other birth date: kept apart, reported
    for i in range(n):
        for j in range(i + 1, n):
            oi, oj = observations[i], observations[j]
            if oi.keys & oj.keys and oi.birth_date and oj.birth_date and oi.birth_date != oj.birth_date:
                conflicts.add((i, j, "name_birth_date_conflict"))

    clusters: dict[int, Cluster] = {}
    for i, o in enumerate(observations):
        root = find(i)
        c = clusters.get(root)
        if c is None:
            c = clusters[root] = Cluster(members=[])
        c.members.append(i)
        c.name_keys |= o.keys
        c.birth_date = c.birth_date or o.birth_date
        c.id_fps |= fps[i]
        c.record_samples |= set(o.record_samples)
        if i in how:
            c.joined_by[i] = how[i]
    ordered = sorted(clusters.values(), key=lambda c: c.members[0])
    index_of = {m: k for k, c in enumerate(ordered) for m in c.members}
    pairs = {
        (min(index_of[a], index_of[b]), max(index_of[a], index_of[b]), reason)
        for a, b, reason in conflicts
        if index_of[a] != index_of[b]
    }
    return ordered, sorted(pairs)


# --------------------------------------------------------------------------- pure: linking


@dataclass(frozen=True)
class PersonEvidence:
    """What the store knows about one (non-provisional) person, for matching."""

    person_id: str
    name_keys: frozenset[str]
    birth_dates: frozenset[str]
    id_fps: frozenset[str]
    record_samples: frozenset[str]


@dataclass(frozen=True)
class Decision:
    kind: str  # "identifier" | "name" | "new" | "conflict"
    person_id: str | None = None
    conflicts: tuple[str, ...] = ()
    reason: str | None = None


def samples_match(mine: set[str] | frozenset[str], theirs: frozenset[str]) -> bool:
    """Same HealthKit store: at least two identical sample lines (or all, when fewer)."""
    if not mine or not theirs:
        return False
    return len(mine & theirs) >= min(2, len(mine))


def decide(cluster: Cluster, people: Sequence[PersonEvidence]) -> Decision:
    """Link one cluster to a known person, create a new one, or report a conflict."""
    id_hits = [
        p for p in people
        if (cluster.id_fps & p.id_fps) or samples_match(cluster.record_samples, p.record_samples)
    ]
    if id_hits:
        dob = cluster.birth_date
        if len(id_hits) == 1 and (dob is None or not id_hits[0].birth_dates or dob in id_hits[0].birth_dates):
            return Decision("identifier", id_hits[0].person_id, reason="same_identifier")
        reason = "identifier_conflict" if len(id_hits) > 1 else "identifier_birth_date_conflict"
        return Decision("conflict", None, tuple(sorted(p.person_id for p in id_hits)), reason)
    if not cluster.name_keys:
        return Decision("new")
    hits = [p for p in people if cluster.name_keys & p.name_keys]
    dob = cluster.birth_date
    same = [p for p in hits if dob and dob in p.birth_dates]
    unknown = [p for p in hits if not dob or not p.birth_dates]
    differ = [p for p in hits if dob and p.birth_dates and dob not in p.birth_dates]
    if len(same) == 1 and not unknown:
        return Decision("name", same[0].person_id, tuple(sorted(p.person_id for p in differ)),
                        "same_name_birth_date")
    if not same and len(unknown) == 1 and not differ:
        return Decision("name", unknown[0].person_id, reason="same_name")
    if hits:
        reason = "name_birth_date_conflict" if differ and not same and not unknown else "ambiguous_name"
        return Decision("new", None, tuple(sorted(p.person_id for p in hits)), reason)
    return Decision("new")


def provisional_person_id(run_id: str) -> str:
    """Per-run owner id when the owner cannot be resolved safely (the pipeline's format)."""
    return f"provisional-{run_id[:16]}"


def person_id_for(secret: bytes, anchor: str) -> str:
    """Opaque canonical id: HMAC of the creating alias, never a plain hash of PII."""
    return PERSON_PREFIX + mac(secret, "person", anchor)[:16]


# --------------------------------------------------------------------------- reading a run


def _sex_from_me(value: str | None) -> str | None:
    return {
        "HKBiologicalSexFemale": "female",
        "HKBiologicalSexMale": "male",
        "HKBiologicalSexOther": "other",
    }.get(value or "")


_RECORD_LINE = re.compile(rb"^[ \t]*<Record\s[^\n]*", re.MULTILINE)
_CLINICAL_LINE = re.compile(rb"^[ \t]*<ClinicalRecord\s[^\n]*", re.MULTILINE)
_DEVICES = r"(?:Apple\s*Watch|iPhone|iPad|iPod|Mac|MacBook|AirPods|Watch)"
_POSSESSOR = re.compile(r"^\s*(.+?)(?:['\u2019]s|s)\s+" + _DEVICES, re.IGNORECASE)
# "iPhone de Jean", "iPhone d’Élodie", "Apple Watch von Jana", "iPad di Luca", and "Jane_iPhone".
_POSSESSOR_AFTER = re.compile(r"^\s*" + _DEVICES + r"(?:\s+\w+)?\s+(?:de|di|da|van|von|of|del|do|du|d['\u2019])\s*"
                              r"([^\W\d_][\w.-]*(?:\s+[^\W\d_][\w.-]*){0,2})\s*$", re.IGNORECASE)
_POSSESSOR_JOINED = re.compile(r"^\s*([^\W\d_][\w.-]*?)[_-]" + _DEVICES + r"\s*$", re.IGNORECASE)


# "My-iPhone", "iPhone de travail": words, not owners (they would be scrubbed from every text).
_NOT_POSSESSORS = frozenset({"my", "the", "new", "old", "work", "home", "office", "mein", "meine", "mon", "ma",
                             "mi", "mio", "travail", "trabajo", "arbeit", "lavoro", "werk", "maison", "casa",
                             "famille", "familia", "test", "backup"})


def device_possessors(source_name: str) -> set[str]:
    """The names a device name says its owner has ("Jane’s iPhone", "Janes iPhone"
    (German: both "Jane" and "Janes"), "iPhone d’Élodie", "Jane_iPhone")."""
    found: set[str] = set()
    m = _POSSESSOR.match(source_name)
    if m and len(m.group(1).strip()) >= 2:
        found.add(m.group(1).strip())
        if m.group(0)[m.end(1):m.end(1) + 1] == "s":
            found.add(m.group(1).strip() + "s")
    for pattern in (_POSSESSOR_AFTER, _POSSESSOR_JOINED):
        m = pattern.match(source_name)
        if m and len(m.group(1).strip()) >= 2 and m.group(1).strip().casefold() not in _NOT_POSSESSORS:
            found.add(m.group(1).strip())
    return found
_SOURCE_NAME = re.compile(rb'sourceName="([^"]*)"')


def _read_healthkit_head(xml: Path, secret: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Fingerprints of the first Record lines and the last ClinicalRecord lines (old
    samples keep their exact text in later exports of the same HealthKit store), and the
    device possessors near the start."""
    from healthdelta.keys import strip_device_pointer
    from healthdelta.parse.xmlrepair import find_body_start

    with open(xml, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        body = find_body_start(f, size)
        f.seek(body)
        head = f.read(_SAMPLE_HEAD_BYTES)
        tail_start = max(body, size - _SAMPLE_HEAD_BYTES)
        f.seek(tail_start)
        tail = f.read(_SAMPLE_HEAD_BYTES)
    cut = head.rfind(b"\n")
    head = head[:cut] if cut > 0 else head
    if tail_start > body:
        tail = tail[tail.find(b"\n") + 1:]
    samples: list[str] = []
    for pattern, text in ((_RECORD_LINE, head), (_CLINICAL_LINE, tail)):
        taken = 0
        for m in pattern.finditer(text):
            line = strip_device_pointer(m.group(0).decode("utf-8", "replace").strip())
            samples.append(mac(secret, "healthkit-sample", line))
            taken += 1
            if taken >= RECORD_SAMPLES:
                break
    possessors: set[str] = set()
    for raw in set(_SOURCE_NAME.findall(head)):
        possessors.update(device_possessors(_unescape_xml(raw.decode("utf-8", "replace"))))
    return tuple(samples), tuple(sorted(possessors))


def _unescape_xml(text: str) -> str:
    if "&" not in text:
        return text
    import html

    return html.unescape(text)


@dataclass(frozen=True)
class RunFacts:
    observations: tuple[Observation, ...]  # [0] is the owner's
    owner_conflict: bool
    unreadable: int


def read_run_facts(run_dir: Path, secret: bytes, progress: ProgressFn = no_progress) -> RunFacts:
    """Person facts of a staged run: Me, CDA recordTarget, ECG headers, FHIR Patients,
    and the HealthKit sample fingerprints. Damaged person sources are counted, not fatal
    (the NDJSON stage reports them). Progress: `identity`, in files read."""
    from healthdelta.parse.cda import read_cda_patient
    from healthdelta.parse.ecg import read_ecg_person
    from healthdelta.parse.fhir import read_patients_fhir
    from healthdelta.parse.healthkit import read_me

    layout = _read_layout(run_dir)
    files = 1 + bool(layout.get("export_cda_xml")) + len(layout.get("ecg_csv", [])) + len(layout.get("clinical_json", []))

    def file_read() -> None:
        progress("identity", 1, files)

    unreadable = 0
    xml = run_dir / layout["export_xml"]
    try:
        me = read_me(xml)
    except InputError:
        me, unreadable = {}, unreadable + 1
    try:
        samples, possessors = _read_healthkit_head(xml, secret)
    except InputError:
        samples, possessors = (), ()
    file_read()
    owner_dobs: set[str] = set()
    owner_names: list[dict[str, Any]] = []
    name_sets: list[frozenset[str]] = []
    identifiers: list[tuple[str | None, str]] = []
    telecom: list[dict[str, Any]] = []
    addresses: list[dict[str, Any]] = []
    extra: set[str] = set(possessors)
    birth_texts: set[str] = set()
    sources = ["me"]
    me_dob = (me.get("HKCharacteristicTypeIdentifierDateOfBirth") or "").strip() or None
    if me_dob:
        owner_dobs.add(me_dob[:10])
    sex = _sex_from_me(me.get("HKCharacteristicTypeIdentifierBiologicalSex"))

    if layout.get("export_cda_xml"):
        try:
            cda = read_cda_patient(run_dir / layout["export_cda_xml"])
        except InputError:
            cda, unreadable = None, unreadable + 1
        file_read()
        if cda is not None:
            sources.append("cda")
            if cda.get("birth_date"):
                owner_dobs.add(cda["birth_date"])
            if cda.get("birth_time"):
                birth_texts.add(cda["birth_time"])
            if cda.get("names"):
                owner_names += cda["names"]
                name_sets.append(name_keys(cda["names"]))
            identifiers += [(i.get("system"), i["value"]) for i in cda.get("identifiers", [])]
            telecom += cda.get("telecom", [])
            addresses += cda.get("addresses", [])
            sex = sex or cda.get("sex")
    for rel in layout.get("ecg_csv", []):
        try:
            ecg = read_ecg_person(run_dir / rel)
        except InputError:
            unreadable += 1
            continue
        finally:
            file_read()
        if "ecg" not in sources:
            sources.append("ecg")
        if ecg.get("birth_date"):
            owner_dobs.add(ecg["birth_date"])
        if ecg.get("birth_date_text"):
            birth_texts.add(ecg["birth_date_text"])
        if ecg.get("names"):
            keys = name_keys(ecg["names"])
            if keys not in name_sets:
                owner_names += ecg["names"]
                name_sets.append(keys)
    # Every owner source must tell the same story: one birth date, one name.
    conflict = len(owner_dobs) > 1 or any(not (a & b) for a in name_sets for b in name_sets)
    owner = Observation(
        source="owner",
        names=tuple(owner_names),
        birth_date=next(iter(owner_dobs)) if len(owner_dobs) == 1 else None,
        sex=sex,
        identifiers=tuple(identifiers),
        telecom=tuple(telecom),
        addresses=tuple(addresses),
        record_samples=samples,
        extra_names=tuple(sorted(extra)),
        birth_texts=tuple(sorted(birth_texts)),
        sources=tuple(sources),
    )
    patients: list[Observation] = []
    for rel in layout.get("clinical_json", []):
        path = run_dir / rel
        try:
            with open(path, "rb") as fh:
                if b"Patient" not in fh.read():
                    continue
            found = read_patients_fhir(path)
        except (InputError, OSError):
            unreadable += 1
            continue
        finally:
            file_read()
        for facts in found:
            patients.append(Observation(
                source="fhir",
                names=tuple(facts.get("names", [])),
                birth_date=(facts.get("birth_date") or None) and facts["birth_date"][:10],
                sex=facts.get("sex"),
                identifiers=tuple((i.get("system"), i["value"]) for i in facts.get("identifiers", [])),
                telecom=tuple(facts.get("telecom", [])),
                addresses=tuple(facts.get("addresses", [])),
                fhir_ids=(facts["fhir_id"],) if facts.get("fhir_id") else (),
                sources=("fhir",),
            ))
    # Deterministic order whatever the file order: by content.
    patients.sort(key=lambda o: json.dumps(_obs_sort_key(o), sort_keys=True))
    return RunFacts((owner, *patients), conflict, unreadable)


def _obs_sort_key(o: Observation) -> list:
    return [sorted(o.keys), o.birth_date or "", sorted(v for _, v in o.identifiers), list(o.fhir_ids)]


def _read_layout(run_dir: Path) -> dict[str, Any]:
    try:
        layout = json.loads((run_dir / "layout.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("the run directory has no layout.json (not a staged run)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("the run directory's layout.json is damaged") from None
    if not isinstance(layout, dict) or not layout.get("export_xml"):
        raise InputError("the run directory's layout.json is damaged")
    return layout


# --------------------------------------------------------------------------- the store

_FILES = ("people", "aliases", "links", "owners", "mapping")


def _empty(name: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "people": {"people": {}},
        "aliases": {"aliases": {}},
        "links": {"links": {}},
        "owners": {"runs": {}},
        "mapping": {"labels": {}, "next_label": 1},
    }[name]
    return {"schema_version": SCHEMA_VERSION, **body}


def read_secret(identity_dir: Path, *, create: bool = False) -> bytes:
    """The per-state HMAC key, created once (0600) when `create` is set."""
    path = identity_dir / "secret.key"
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            raise StateError("the identity store has not been built yet; run `healthdelta identity build`") from None
        _ensure_dir(identity_dir)
        text = os.urandom(32).hex()
        tmp = identity_dir / f".tmp-secret-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (text + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a secret another process just made
        except FileExistsError:
            text = path.read_text(encoding="ascii").strip()
        finally:
            tmp.unlink(missing_ok=True)
    except UnicodeDecodeError:
        raise StateError("the identity store's secret is damaged") from None
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise StateError("the identity store's secret is damaged")
    return bytes.fromhex(text)


def _ensure_dir(identity_dir: Path) -> None:
    identity_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(identity_dir, 0o700)  # the store holds PII


class Store:
    """The identity store in memory; `save` writes the files that changed, atomically."""

    def __init__(self, identity_dir: Path, data: dict[str, dict[str, Any]], secret: bytes) -> None:
        self.dir = identity_dir
        self.data = data
        self.secret = secret

    @classmethod
    def open(cls, identity_dir: Path, *, create: bool = False) -> Store:
        secret = read_secret(identity_dir, create=create)
        data = {}
        for name in _FILES:
            path = identity_dir / f"{name}.json"
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                doc = _empty(name)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise StateError("the identity store is damaged") from None
            if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
                raise StateError("the identity store is damaged or from another version")
            data[name] = doc
        return cls(identity_dir, data, secret)

    def save(self) -> None:
        from healthdelta.fsutil import atomic_write_json

        _ensure_dir(self.dir)
        # mapping last: a label exists only for people already written
        for name in ("aliases", "people", "links", "owners", "mapping"):
            atomic_write_json(self.dir / f"{name}.json", self.data[name])

    # -- accessors
    @property
    def people(self) -> dict[str, dict[str, Any]]:
        return self.data["people"]["people"]

    @property
    def aliases(self) -> dict[str, dict[str, Any]]:
        return self.data["aliases"]["aliases"]

    @property
    def links(self) -> dict[str, dict[str, Any]]:
        return self.data["links"]["links"]

    @property
    def owners(self) -> dict[str, dict[str, Any]]:
        return self.data["owners"]["runs"]

    @property
    def labels(self) -> dict[str, str]:
        return self.data["mapping"]["labels"]

    def label(self, person_id: str) -> str:
        """The person's share label, assigned once and never changed."""
        found = self.labels.get(person_id)
        if found is None:
            n = int(self.data["mapping"]["next_label"])
            found = self.labels[person_id] = f"Patient {n}"
            self.data["mapping"]["next_label"] = n + 1
        return found

    def evidence(self) -> list[PersonEvidence]:
        acc: dict[str, dict[str, set[str]]] = {}
        for alias in self.aliases.values():
            pid = alias["person_id"]
            if self.people.get(pid, {}).get("provisional"):
                continue
            e = acc.setdefault(pid, {"names": set(), "dobs": set(), "ids": set(), "samples": set()})
            e["names"] |= set(alias.get("name_keys", []))
            if alias.get("birth_date"):
                e["dobs"].add(alias["birth_date"])
            e["ids"] |= {i["fp"] for i in alias.get("identifiers", []) if i.get("fp")}
            e["samples"] |= set(alias.get("record_samples", []))
        return [
            PersonEvidence(pid, frozenset(e["names"]), frozenset(e["dobs"]), frozenset(e["ids"]),
                           frozenset(e["samples"]))
            for pid, e in sorted(acc.items())
        ]

    def add_link(self, *, kind: str, state: str, person_ids: Sequence[str], alias_ids: Sequence[str],
                 reason: str, evidence: Iterable[str], run_id: str) -> tuple[str, bool]:
        ends = sorted(set(person_ids)) + sorted(set(alias_ids))
        link_id = "l_" + mac(self.secret, "link", kind, *ends)[:12]
        existing = self.links.get(link_id)
        if existing is not None:
            return link_id, False  # a user's confirmation is never undone by a later run
        self.links[link_id] = {
            "link_id": link_id,
            "kind": kind,
            "state": state,
            "person_ids": sorted(set(person_ids)),
            "alias_ids": sorted(set(alias_ids)),
            "reason": reason,
            "evidence": sorted(set(evidence)),
            "created_run": run_id,
        }
        return link_id, True


# --------------------------------------------------------------------------- resolving a run


@dataclass(frozen=True)
class IdentityResult:
    """What a run's identity stage decided. Ids and counts only: safe for run reports."""

    run_id: str
    owner_person_id: str
    provisional: bool
    reason: str | None
    owner_label: str
    people_in_run: int
    new_people: int
    new_links: int
    unverified_links: int
    conflicts: int
    unreadable_sources: int
    fhir_subjects: dict[str, str] = field(default_factory=dict)  # "Patient/<fhir id>" -> person_id

    def as_report(self) -> dict[str, Any]:
        return {
            "status": "provisional" if self.provisional else "ok",
            "owner_person_id": self.owner_person_id,
            "provisional": self.provisional,
            "reason": self.reason,
            "people_in_run": self.people_in_run,
            "new_people": self.new_people,
            "new_links": self.new_links,
            "unverified_links": self.unverified_links,
            "conflicts": self.conflicts,
            "unreadable_sources": self.unreadable_sources,
        }


def resolve_run(identity_dir: Path, run_dir: Path, run_id: str,
                progress: ProgressFn = no_progress) -> IdentityResult:
    """Resolve the people of a staged run and the owner of its HealthKit data; update the store.

    Idempotent: resolving a run again gives the same ids and leaves the store's bytes
    unchanged. The caller holds the state lock.
    """
    store = Store.open(identity_dir, create=True)
    result = _resolve(store, run_dir, run_id, progress)
    store.save()
    return result


def _resolve(store: Store, run_dir: Path, run_id: str, progress: ProgressFn = no_progress) -> IdentityResult:
    facts = read_run_facts(run_dir, store.secret, progress)
    obs = facts.observations
    clusters, conflict_pairs = cluster_observations(obs, store.secret)
    people_before = set(store.people)
    links_before = set(store.links)
    person_of_cluster: dict[int, str] = {}
    owner_reason: str | None = None
    owner_cluster = next(k for k, c in enumerate(clusters) if 0 in c.members)

    for k, cluster in enumerate(clusters):
        is_owner = k == owner_cluster
        known = store.evidence()  # includes what earlier clusters of this run added
        decision = decide(cluster, known)
        if is_owner:
            if facts.owner_conflict:
                owner_reason = REASON_OWNER_CONFLICT
            elif decision.kind == "conflict":
                owner_reason = (REASON_BIRTH_DATE_CONFLICT if decision.reason == "identifier_birth_date_conflict"
                                else REASON_IDENTIFIER_CONFLICT)
            elif decision.kind == "new" and not (cluster.name_keys or cluster.id_fps or cluster.record_samples):
                owner_reason = REASON_NO_EVIDENCE
        # A run resolved before resolves to what it resolved to then (stable ids, idempotent).
        previous = store.owners.get(run_id, {}).get("clusters", {}).get(_cluster_key(store, obs, cluster))
        if is_owner and owner_reason is not None:
            pid = provisional_person_id(run_id)
            store.people.setdefault(pid, {"person_id": pid, "created_run": run_id, "provisional": True,
                                          "owner_of_runs": [], "seen_in_runs": []})
        elif previous and previous in store.people and not store.people[previous].get("provisional"):
            pid = previous
        elif decision.kind in ("identifier", "name") and decision.person_id:
            pid = decision.person_id
        else:
            pid = person_id_for(store.secret, _alias_id(store, "new", obs, cluster))
            if pid not in store.people:
                store.people[pid] = {"person_id": pid, "created_run": run_id, "provisional": False,
                                     "owner_of_runs": [], "seen_in_runs": []}
        person_of_cluster[k] = pid
        store.label(pid)
        for other in decision.conflicts:
            if other != pid:
                store.add_link(kind="conflict", state="conflict", person_ids=[pid, other], alias_ids=[],
                               reason=decision.reason or "conflict", evidence=[], run_id=run_id)
        _record_aliases(store, obs, cluster, pid, decision, run_id)
        entry = store.people[pid]
        _add_run(entry["seen_in_runs"], run_id)
        if is_owner:
            _add_run(entry["owner_of_runs"], run_id)

    for a, b, reason in conflict_pairs:
        pa, pb = person_of_cluster[a], person_of_cluster[b]
        if pa != pb:
            store.add_link(kind="conflict", state="conflict", person_ids=[pa, pb], alias_ids=[],
                           reason=reason, evidence=[], run_id=run_id)

    owner_pid = person_of_cluster[owner_cluster]
    fhir_subjects = {
        f"Patient/{fid}": person_of_cluster[k]
        for k, c in enumerate(clusters) for m in c.members for fid in obs[m].fhir_ids
    }
    store.owners[run_id] = {
        "owner_person_id": owner_pid,
        "provisional": owner_reason is not None,
        "reason": owner_reason,
        "people": sorted(set(person_of_cluster.values())),
        "fhir_subjects": dict(sorted(fhir_subjects.items())),
        "clusters": {_cluster_key(store, obs, c): person_of_cluster[k] for k, c in enumerate(clusters)},
    }
    new_links = [store.links[lid] for lid in store.links if lid not in links_before]
    in_run = set(person_of_cluster.values())
    return IdentityResult(
        run_id=run_id,
        owner_person_id=owner_pid,
        provisional=owner_reason is not None,
        reason=owner_reason,
        owner_label=store.label(owner_pid),
        people_in_run=len(in_run),
        new_people=len(set(store.people) - people_before),
        new_links=len(new_links),
        unverified_links=sum(1 for lk in store.links.values()
                             if lk["state"] == "unverified" and set(lk["person_ids"]) & in_run),
        conflicts=sum(1 for lk in store.links.values()
                      if lk["state"] == "conflict" and set(lk["person_ids"]) & in_run),
        unreadable_sources=facts.unreadable,
        fhir_subjects=fhir_subjects,
    )


def _add_run(runs: list[str], run_id: str) -> None:
    if run_id not in runs:
        runs.append(run_id)


def _cluster_key(store: Store, obs: Sequence[Observation], cluster: Cluster) -> str:
    return "c_" + mac(store.secret, "cluster", *sorted(_obs_digest(store, obs[m]) for m in cluster.members))[:16]


def _obs_digest(store: Store, o: Observation) -> str:
    return mac(store.secret, "obs", o.source, json.dumps(_obs_sort_key(o), sort_keys=True))


def _alias_id(store: Store, person: str, obs: Sequence[Observation], cluster: Cluster) -> str:
    return "a_" + mac(store.secret, "alias", person, _cluster_key(store, obs, cluster))[:16]


def _record_aliases(store: Store, obs: Sequence[Observation], cluster: Cluster, pid: str,
                    decision: Decision, run_id: str) -> None:
    """One alias per observation (its PII, for scrubbing), plus the link saying why it
    belongs to the person. An alias seen before keeps the links decided back then."""
    person_fps = {fp for a in store.aliases.values() if a["person_id"] == pid
                  for fp in (i.get("fp") for i in a.get("identifiers", [])) if fp}
    anchor_free = decision.kind in ("new", "conflict") and not any(
        a["person_id"] == pid for a in store.aliases.values())
    for position, m in enumerate(cluster.members):
        o = obs[m]
        alias_id = "a_" + mac(store.secret, "alias", pid, _obs_digest(store, o))[:16]
        ids = [{"system": s, "value": v, "fp": identifier_fp(store.secret, s, v)} for s, v in o.identifiers]
        my_fps = {i["fp"] for i in ids if i["fp"]}
        alias = store.aliases.get(alias_id)
        if alias is None:
            alias = store.aliases[alias_id] = {
                "alias_id": alias_id,
                "person_id": pid,
                "source": o.source,
                "sources": list(o.sources),
                "names": [dict(n) for n in o.names],
                "name_keys": sorted(o.keys),
                "extra_names": list(o.extra_names),
                "birth_texts": list(o.birth_texts),
                "birth_date": o.birth_date,
                "sex": o.sex,
                "identifiers": ids,
                "telecom": [dict(t) for t in o.telecom],
                "addresses": [dict(a) for a in o.addresses],
                "fhir_ids": list(o.fhir_ids),
                "record_samples": [],
                "runs": [],
            }
            if position == 0 and anchor_free:
                pass  # the anchor of a new person: nothing to link it to
            elif (my_fps & person_fps or cluster.joined_by.get(m) == "identifier"
                  or (decision.kind == "identifier" and position == 0)):
                evidence = sorted(my_fps) or list(o.record_samples[:4])
                store.add_link(kind="identifier", state="verified", person_ids=[pid], alias_ids=[alias_id],
                               reason="same_identifier", evidence=evidence, run_id=run_id)
            else:
                evidence = [mac(store.secret, "name", k, o.birth_date or "") for k in sorted(o.keys)]
                store.add_link(kind="name", state="unverified", person_ids=[pid], alias_ids=[alias_id],
                               reason="same_name_birth_date" if o.birth_date else "same_name",
                               evidence=evidence, run_id=run_id)
        samples = alias["record_samples"]
        for sample in o.record_samples:
            if sample not in samples:
                samples.append(sample)
        del samples[:-MAX_RECORD_SAMPLES]
        for key, values in (("extra_names", o.extra_names), ("birth_texts", o.birth_texts)):
            for value in values:
                if value not in alias.setdefault(key, []):
                    alias[key].append(value)
        _add_run(alias["runs"], run_id)
        person_fps |= my_fps


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class ReviewRow:
    link_id: str
    kind: str
    state: str
    person_ids: tuple[str, ...]
    reason: str
    based_on: tuple[str, ...] = ()
    names: "Names | None" = None  # only when review() was asked for names (local use)


@dataclass(frozen=True)
class Names:
    """Names and birth dates a person or a link rests on: PII, for the user's own terminal only."""

    names: tuple[str, ...]
    birth_dates: tuple[str, ...]


@dataclass(frozen=True)
class ReviewPerson:
    person_id: str
    label: str
    owns_runs: int
    provisional: bool
    names: Names | None = None


@dataclass(frozen=True)
class Review:
    people: tuple[ReviewPerson, ...]
    links: tuple[ReviewRow, ...]
    provisional_runs: tuple[tuple[str, str], ...]  # (run_id, reason)

    @property
    def needs_attention(self) -> int:
        return sum(1 for r in self.links if r.state in ("unverified", "conflict"))


# What each link reason code rests on, in the words `identity review` shows.
_LINK_BASIS = {
    "same_identifier": ("identifier",),
    "same_name": ("name",),
    "same_name_birth_date": ("name", "birth_date"),
    "identifier_conflict": ("identifier",),
    "identifier_birth_date_conflict": ("identifier", "birth_date"),
    "name_birth_date_conflict": ("name", "birth_date"),
    "name_conflict": ("name", "birth_date"),
    "ambiguous_name": ("name",),
}


def link_basis(reason: str, by_identifier: bool = True) -> tuple[str, ...]:
    """What a link rests on. A `same_identifier` link without a shared identifier rests on
    identical HealthKit samples (the same phone's store)."""
    if reason == "same_identifier" and not by_identifier:
        return ("healthkit_samples",)
    return _LINK_BASIS.get(reason, ("unknown",))


def review(identity_dir: Path, *, with_names: bool = False) -> Review:
    """Ids, states, reason codes and what each link rests on; names and birth dates only
    `with_names` (the caller makes sure that is a local terminal, never a share artifact)."""
    store = Store.open(identity_dir)
    aliases_of: dict[str, list[dict[str, Any]]] = {}
    for alias in sorted(store.aliases.values(), key=lambda a: a["alias_id"]):
        aliases_of.setdefault(alias["person_id"], []).append(alias)

    def names(aliases: Iterable[dict[str, Any]]) -> Names | None:
        if not with_names:
            return None
        aliases = list(aliases)
        found = (s for a in aliases for n in a.get("names", []) for s in name_strings(n))
        return Names(tuple(dict.fromkeys(found)),
                     tuple(sorted({a["birth_date"] for a in aliases if a.get("birth_date")})))

    people = tuple(
        ReviewPerson(pid, store.labels.get(pid, ""), len(p.get("owner_of_runs", [])), bool(p.get("provisional")),
                     names(aliases_of.get(pid, [])))
        for pid, p in sorted(store.people.items(), key=lambda kv: _label_order(store.labels.get(kv[0])))
    )
    rows = []
    for lk in store.links.values():
        ends = [store.aliases[a] for a in lk.get("alias_ids", []) if a in store.aliases]
        if not ends:  # a conflict keeps people apart: it rests on what those people are known by
            ends = [a for pid in lk["person_ids"] for a in aliases_of.get(pid, [])]
        id_fps = {i.get("fp") for a in ends for i in a.get("identifiers", [])}
        rows.append(ReviewRow(lk["link_id"], lk["kind"], lk["state"], tuple(lk["person_ids"]), lk["reason"],
                              link_basis(lk["reason"], bool(id_fps & set(lk.get("evidence", [])))), names(ends)))
    order = {"conflict": 0, "unverified": 1, "user_confirmed": 2, "verified": 3}
    links = tuple(sorted(rows, key=lambda r: (order.get(r.state, 9), r.link_id)))
    provisional = tuple(sorted((rid, o.get("reason") or "") for rid, o in store.owners.items()
                               if o.get("provisional")))
    return Review(people, links, provisional)


def _label_order(label: str | None) -> int:
    try:
        return int((label or "").rsplit(" ", 1)[-1])
    except ValueError:
        return 1 << 30


def confirm_link(identity_dir: Path, link_id: str) -> ReviewRow:
    """`unverified` -> `user_confirmed`; idempotent. Conflicts cannot be confirmed."""
    if not re.fullmatch(r"l_[0-9a-f]{12}", link_id):
        raise UsageError("a link id looks like l_ followed by 12 hex characters (see `identity review`)")
    store = Store.open(identity_dir)
    link = store.links.get(link_id)
    if link is None:
        raise StateError("no link with that id; see `healthdelta identity review`")
    if link["state"] == "conflict":
        raise StateError("a conflict link keeps two people apart and cannot be confirmed")
    if link["state"] == "unverified":
        link["state"] = "user_confirmed"
        store.save()
    return ReviewRow(link["link_id"], link["kind"], link["state"], tuple(link["person_ids"]), link["reason"])


def share_labels(identity_dir: Path) -> dict[str, str]:
    """person_id -> "Patient N" for reports; labels never change once assigned."""
    store = Store.open(identity_dir)
    return dict(store.labels)


@dataclass(frozen=True)
class RunOwner:
    owner_person_id: str
    provisional: bool
    reason: str | None
    fhir_subjects: dict[str, str]


def run_owners(identity_dir: Path) -> dict[str, str]:
    """run_id -> owner person id for every run the store resolved ({} without a store)."""
    try:
        store = Store.open(identity_dir)
    except StateError:
        return {}
    return {rid: o["owner_person_id"] for rid, o in store.owners.items()}


def run_owner(identity_dir: Path, run_id: str) -> RunOwner | None:
    """What `resolve_run` decided for a run, or None if the run was never resolved."""
    try:
        store = Store.open(identity_dir)
    except StateError:
        return None
    found = store.owners.get(run_id)
    if found is None:
        return None
    return RunOwner(found["owner_person_id"], bool(found.get("provisional")), found.get("reason"),
                    dict(found.get("fhir_subjects", {})))


@dataclass(frozen=True)
class PersonPII:
    """Everything the store knows that identifies one person (for scrubbing and leak scans)."""

    person_id: str
    label: str
    names: tuple[dict[str, Any], ...]
    extra_names: tuple[str, ...]
    birth_dates: tuple[str, ...]
    birth_texts: tuple[str, ...]
    identifiers: tuple[str, ...]
    telecom: tuple[dict[str, Any], ...]
    addresses: tuple[dict[str, Any], ...]


def load_people_pii(identity_dir: Path) -> list[PersonPII]:
    """Every person's known identifiers, grouped from their aliases (holds PII; local only)."""
    store = Store.open(identity_dir)
    grouped: dict[str, dict[str, list]] = {}
    for alias in sorted(store.aliases.values(), key=lambda a: a["alias_id"]):
        g = grouped.setdefault(alias["person_id"], {"names": [], "extra": [], "dobs": [], "ids": [],
                                                    "telecom": [], "addresses": [], "texts": []})
        g["texts"] += alias.get("birth_texts", [])
        g["names"] += alias.get("names", [])
        g["extra"] += alias.get("extra_names", [])
        if alias.get("birth_date"):
            g["dobs"].append(alias["birth_date"])
        g["ids"] += [i["value"] for i in alias.get("identifiers", []) if i.get("value")]
        g["telecom"] += alias.get("telecom", [])
        g["addresses"] += alias.get("addresses", [])
    return [
        PersonPII(
            person_id=pid,
            label=store.labels.get(pid) or "[NAME]",
            names=tuple(_unique_dicts(g["names"])),
            extra_names=tuple(dict.fromkeys(g["extra"])),
            birth_dates=tuple(dict.fromkeys(g["dobs"])),
            birth_texts=tuple(dict.fromkeys(g["texts"])),
            identifiers=tuple(dict.fromkeys(g["ids"])),
            telecom=tuple(_unique_dicts(g["telecom"])),
            addresses=tuple(_unique_dicts(g["addresses"])),
        )
        for pid, g in sorted(grouped.items())
    ]


def _unique_dicts(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for item in items:
        seen.setdefault(json.dumps(item, sort_keys=True), item)
    return list(seen.values())


def date_shift_key(identity_dir: Path) -> bytes:
    """The per-state secret, for the de-identification stage's date offsets."""
    return read_secret(identity_dir)


@dataclass(frozen=True)
class BuildResult:
    results: tuple[IdentityResult, ...]


def build(identity_dir: Path, run_dirs: Sequence[tuple[Path, str]]) -> BuildResult:
    """`identity build`: resolve several staged runs in order (idempotent)."""
    store = Store.open(identity_dir, create=True)
    results = []
    for run_dir, run_id in run_dirs:
        # One plain copy at a time: a past run's files may have to come out of the store.
        with stagestore.plain_run(run_dir) as plain:
            results.append(_resolve(store, plain, run_id))
    store.save()
    return BuildResult(tuple(results))
