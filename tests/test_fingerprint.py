import hashlib

from hypothesis import given, strategies as st

from healthdelta.fingerprint import input_fingerprint, run_id

entry = st.tuples(
    st.text(st.characters(blacklist_characters="\0\n", blacklist_categories=("Cs",)), min_size=1, max_size=20),
    st.integers(min_value=0, max_value=10**12),
    st.text("0123456789abcdef", min_size=64, max_size=64),
)
entries = st.lists(entry, min_size=1, max_size=8, unique_by=lambda e: e[0])


def seed_formula_fingerprint(files):
    """Independent computation of the seed/CONTRACT §4 formula."""
    h = hashlib.sha256()
    for rel, size, sha in sorted(files, key=lambda f: f[0]):
        h.update(rel.encode() + b"\0" + str(size).encode() + b"\0" + sha.encode() + b"\n")
    return h.hexdigest()


def test_golden_vector():
    files = [("export.xml", 3, hashlib.sha256(b"abc").hexdigest())]
    fp = input_fingerprint(files)
    assert fp.sha256 == seed_formula_fingerprint(files)
    assert (fp.file_count, fp.total_bytes) == (1, 3)
    assert run_id(None, fp.sha256) == hashlib.sha256(
        f"healthdelta_pipeline_v1\n\n{fp.sha256}\n".encode()).hexdigest()
    assert run_id("p" * 64, fp.sha256) == hashlib.sha256(
        f"healthdelta_pipeline_v1\n{'p' * 64}\n{fp.sha256}\n".encode()).hexdigest()


@given(entries, st.randoms())
def test_order_does_not_matter(files, rnd):
    shuffled = list(files)
    rnd.shuffle(shuffled)
    assert input_fingerprint(files) == input_fingerprint(shuffled)
    assert input_fingerprint(files).sha256 == seed_formula_fingerprint(files)


@given(entries, st.integers(min_value=0, max_value=2), st.data())
def test_any_change_changes_it(files, field, data):
    i = data.draw(st.integers(min_value=0, max_value=len(files) - 1))
    rel, size, sha = files[i]
    if field == 0:
        changed = (rel + "x", size, sha)
    elif field == 1:
        changed = (rel, size + 1, sha)
    else:
        changed = (rel, size, ("0" if sha[0] != "0" else "1") + sha[1:])
    if field == 0 and any(f[0] == changed[0] for f in files):
        return
    mutated = files[:i] + [changed] + files[i + 1:]
    assert input_fingerprint(mutated).sha256 != input_fingerprint(files).sha256


@given(st.one_of(st.none(), st.text("0123456789abcdef", min_size=64, max_size=64)),
       st.text("0123456789abcdef", min_size=64, max_size=64))
def test_run_id_shape_and_sensitivity(parent, fp):
    rid = run_id(parent, fp)
    assert len(rid) == 64 and rid == rid.lower() and int(rid, 16) >= 0
    assert rid == run_id(parent, fp)
    assert rid != run_id("f" * 64 if parent != "f" * 64 else "e" * 64, fp)
    flipped = ("0" if fp[0] != "0" else "1") + fp[1:]
    assert rid != run_id(parent, flipped)
