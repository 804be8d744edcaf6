"""``references add`` of a photo that nearly copies a reference the gallery holds (the same photo re-encoded,
re-cropped: other bytes, cosine >= the ``speciesid clean`` leak rule) stores it and names that reference in a note;
byte-identical photos stay "already in the gallery". Tiny random ``timm:test_vit@random`` encoder: the embeddings
are given (``add_photos(embeddings=...)``) where a test needs photos that are not near-copies."""

from __future__ import annotations

import re

import numpy as np
from _cli_support import ENCODER, _photo, _run, two_species_gallery
from PIL import Image


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_a_near_copy_is_stored_with_a_note_naming_the_reference_it_copies(tmp_path, capsys):
    """Stop 48's note: near-copies of held references got no word (byte copies say "already in the gallery")."""
    from retrieval.findings import DEFAULT_DUP_THRESHOLD
    from retrieval.workflows import add_photos, open_gallery

    index, root = two_species_gallery(tmp_path, capsys)
    gallery, enc = open_gallery(index)
    meta = gallery.store.metadata()
    cobra = int(meta.index[meta["species"] == "Naja samarensis"][0])
    held = gallery.reference_vectors([cobra])[0]
    rng = np.random.default_rng(0)
    away = _unit(rng.standard_normal((2, gallery.dim)))  # unlike every reference (cosine about 0)
    near = _unit(held + 0.05 * away[0])  # cosine about 0.999 with the cobra's reference
    assert float(near @ held) >= DEFAULT_DUP_THRESHOLD and float(np.max(gallery.store.vectors()[1] @ away[1])) < 0.5
    files = [_photo(tmp_path / "new" / f"{i}.png", 200 + i) for i in range(3)]
    # the third photo nearly copies the second (this call's own): not a reference held before, no note
    emb = np.stack([near, away[1], _unit(away[1] + 0.01 * away[0])])
    res = add_photos(gallery, enc, "Naja samarensis", files, embeddings=emb)
    first = res.report.ids[0]
    src = meta.loc[cobra, "source_path"].rsplit("/", 1)[-1]
    assert [(n.photo, n.id, n.of, n.species, n.same_species) for n in res.near_copies] == [
        (str(files[0]), first, cobra, "Naja samarensis", True)]
    assert res.notes == [f"{files[0]} (reference {first}) is a near-copy of reference {cobra} of Naja samarensis "
                         f"({src}, cosine {res.near_copies[0].cosine:.3f}): it adds little to the vote (and 'probe "
                         "train' counts near-copies once); if it was added by mistake, delete it: speciesid "
                         f"references delete {first}"]
    # under another species: one of the two is likely mislabelled (the nearest held is the one stored just now)
    other = add_photos(gallery, enc, "Natrix maura", [_photo(tmp_path / "new" / "x.png", 300)],
                       embeddings=_unit(held + 0.05 * away[:1] + 0.001 * away[1:]))
    (note,) = other.notes
    assert note.startswith(f"{tmp_path / 'new' / 'x.png'} (reference {other.report.ids[0]}) is a near-copy of "
                           f"reference {first} of Naja samarensis (0.png, cosine "), note
    assert note.endswith(", another species: one of the two photos is likely mislabelled; delete that one: speciesid "
                         f"references delete {other.report.ids[0]} (or {first})"), note


def test_references_add_prints_the_near_copy_note_and_exits_0(tmp_path, capsys):
    """The same pixels under other bytes (re-saved): the same embedding, a note naming the reference; exit status 0
    (a note, not a refusal); the byte copy beside it stays "already in the gallery"."""
    index, root = two_species_gallery(tmp_path, capsys)
    src = root / "Natrix maura" / "0.png"
    resaved = tmp_path / "resaved.png"
    Image.open(src).save(resaved, compress_level=1)  # other bytes, the same photo
    assert resaved.read_bytes() != src.read_bytes()
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Natrix maura", resaved, src,
                          "-q", *ENCODER[2:])
    assert code == 0, (out, err)
    assert "added 1, skipped 0 unreadable, 1 already in the gallery" in out, out
    held = int(re.search(r"0\.png \(same bytes as reference (\d+)\)", out).group(1))
    (added,) = re.findall(r"^ids: (\d+)$", out, re.M)
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {resaved} (reference {added}) is a near-copy of reference {held} of Natrix maura (0.png, "
                     "cosine 1.000): it adds little to the vote (and 'probe train' counts near-copies once); if it was "
                     f"added by mistake, delete it: speciesid references delete {added}"], out


def test_many_near_copies_are_named_ten_then_counted():
    from retrieval.workflows import NEAR_COPY_NOTES, NearCopy, near_copy_notes

    found = [NearCopy(photo=f"p{i}.jpg", id=100 + i, of=i, species="Naja haje", of_photo=f"r{i}.jpg", cosine=0.99,
                      same_species=True) for i in range(NEAR_COPY_NOTES + 3)]
    notes = near_copy_notes(found)
    assert len(notes) == NEAR_COPY_NOTES + 1 and notes[0].startswith("p0.jpg (reference 100) is a near-copy of ")
    assert notes[-1] == ("3 more photos are near-copies of references held (references 110, 111, 112); 'speciesid "
                         "clean --index GALLERY --no-zero-shot --report DIR' lists every pair (near-duplicate)")
    assert near_copy_notes(found[:NEAR_COPY_NOTES + 1])[-1] == ("1 more photo is a near-copy of references held "
                                                               "(references 110); 'speciesid clean --index GALLERY "
                                                               "--no-zero-shot --report DIR' lists every pair "
                                                               "(near-duplicate)")


def test_a_near_copy_check_that_fails_leaves_the_add_done_and_says_so(tmp_path, capsys, monkeypatch, caplog):
    """The photos are committed before the check: its failure (a reference deleted meanwhile, the store) is a
    warning, not an error of an add that was done."""
    import logging

    import retrieval.workflows
    from retrieval.workflows import add_photos, open_gallery

    index, _ = two_species_gallery(tmp_path, capsys)
    gallery, enc = open_gallery(index)

    def broken(*args, **kw):
        raise OSError("the store did not answer")

    monkeypatch.setattr(retrieval.workflows, "find_near_copies", broken)
    with caplog.at_level(logging.WARNING, logger="retrieval.workflows"):
        res = add_photos(gallery, enc, "Natrix maura", [_photo(tmp_path / "n.png", 400)])
    assert len(res.report.ids) == 1 and res.near_copies == [] and len(gallery) == 7
    assert "the near-copy check of the photos added was skipped: the store did not answer" in caplog.text


def test_a_burst_of_ten_frames_nearly_copying_a_held_reference_is_each_named(tmp_path, capsys, monkeypatch):
    """Re-read finding: the search asked for min(own photos + 1, 8) neighbours, so with 8 or more frames of one
    animal (nearer each other than to the held photo) each one's 8 nearest were all the add's own: the held
    reference they nearly copy was never seen. The search now goes past the add's own photos: at once (own + 8
    neighbours), and again with twice as many while they are all the add's own (a first search of 2 here)."""
    import retrieval.workflows
    from retrieval.findings import DEFAULT_DUP_THRESHOLD
    from retrieval.workflows import add_photos, open_gallery

    index, _ = two_species_gallery(tmp_path, capsys)
    gallery, enc = open_gallery(index)
    meta = gallery.store.metadata()
    rng = np.random.default_rng(1)
    for species, first_k, seed in (("Naja samarensis", retrieval.workflows.NEAR_COPY_FIRST_K, 500),
                                   ("Natrix maura", 2, 600)):
        monkeypatch.setattr(retrieval.workflows, "NEAR_COPY_FIRST_K", first_k)
        of = int(meta.index[meta["species"] == species][0])
        held = gallery.reference_vectors([of])[0]
        base = _unit(held + 0.25 * _unit(rng.standard_normal(gallery.dim)))  # cosine about 0.97 with the held one
        frames = _unit(base + 0.02 * _unit(rng.standard_normal((10, gallery.dim))))
        assert float((frames @ frames.T).min()) > float((frames @ held).max()) >= DEFAULT_DUP_THRESHOLD
        files = [_photo(tmp_path / f"burst{seed}" / f"{i}.png", seed + i) for i in range(10)]
        res = add_photos(gallery, enc, species, files, embeddings=frames)
        assert [(n.id, n.of) for n in res.near_copies] == [(i, of) for i in res.report.ids], first_k


def test_the_few_photos_note_counts_near_copies_once_as_probe_train_does(tmp_path, capsys):
    """A species whose second photo nearly copies its first still has one photo for 'probe train' (its rule,
    ``retrieval.probe.photo_groups``): the add says so beside the near-copy note; a third photo unlike both ends it."""
    from retrieval.probe import distinct_photos, photo_groups
    from retrieval.workflows import add_photos, open_gallery

    index, _ = two_species_gallery(tmp_path, capsys)
    gallery, enc = open_gallery(index)
    away = _unit(np.random.default_rng(1).standard_normal((2, gallery.dim)))
    assert float(np.max(gallery.store.vectors()[1] @ away.T)) < 0.5  # unlike every reference held
    first = add_photos(gallery, enc, "Vipera berus", [_photo(tmp_path / "new" / "0.png", 400)], embeddings=away[:1],
                       new_species=True)
    assert first.few_note.startswith("Vipera berus has 1 reference photo; 'speciesid probe train' needs 2 "), first.notes
    copy = _unit(away[0] + 0.05 * away[1])  # cosine about 0.999 with the first
    second = add_photos(gallery, enc, "Vipera berus", [_photo(tmp_path / "new" / "1.png", 401)],
                        embeddings=copy[None])
    assert [n.of for n in second.near_copies] == first.report.ids
    assert second.few_note == ("Vipera berus has 2 reference photos, 1 counting near-copies once; 'speciesid probe "
                               "train' needs 2 that are not near-copies of each other, and leaves it out until then "
                               "(the kNN vote alone answers it): add another photo of it"), second.notes
    assert second.notes[0] == second.few_note and len(second.notes) == 2  # and the near-copy note
    vectors = gallery.reference_vectors(first.report.ids + second.report.ids)
    assert distinct_photos(photo_groups(vectors), np.zeros(2)) == {0.0: 1}  # probe train's own count
    third = add_photos(gallery, enc, "Vipera berus", [_photo(tmp_path / "new" / "2.png", 402)], embeddings=away[1:])
    assert third.few_note == "" and third.notes == [], third.notes


def test_the_few_photos_count_reads_one_species_rows_not_the_gallerys(tmp_path):
    """The note's read of a species' rows filters in the store (a name with a quote too), excluded rows left out."""
    from index.records import ReferenceRecord
    from index.store import ReferenceStore

    store = ReferenceStore(tmp_path / "s", 4, refresh_s=None)
    names = ["Naja haje", "Boiga o'shaughnessyi", "Naja haje", "Boiga o'shaughnessyi", "Vipera latastei"]
    records = [ReferenceRecord(path=f"/p/{i}.jpg", species=n) for i, n in enumerate(names)]
    store.add(records, [f"{i:064x}" for i in range(5)], np.eye(5, 4, dtype=np.float32), "e", [1, 2, 3, 4, 5])
    store.set_excluded([4], True)
    assert list(store.metadata(species="Boiga o'shaughnessyi").index) == [2, 4]
    assert list(store.metadata(species="Boiga o'shaughnessyi", include_excluded=False).index) == [2]
    assert list(store.metadata([1, 2, 3], species="Naja haje").index) == [1, 3]
    assert store.metadata(species="Naja").empty


def test_the_few_photos_note_counts_what_another_add_of_the_new_species_committed(tmp_path, capsys, monkeypatch):
    """Two adds of one new species race: the second read the gallery before the first committed (``prior`` None),
    yet the species has 5 photos when its note is made: no "add another photo of it"."""
    from retrieval.workflows import add_photos, open_gallery

    index, _ = two_species_gallery(tmp_path, capsys)
    gallery, enc = open_gallery(index)
    before = gallery.species()  # the second add's read, made before the first add committed
    away = _unit(np.random.default_rng(2).standard_normal((5, gallery.dim)))
    first = add_photos(gallery, enc, "Vipera berus", [_photo(tmp_path / "new" / f"{i}.png", 500 + i)
                                                      for i in range(4)], embeddings=away[:4], new_species=True)
    assert first.created and first.few_note == ""
    monkeypatch.setattr(gallery, "species", lambda *a, **k: before)
    second = add_photos(gallery, enc, "Vipera berus", [_photo(tmp_path / "new" / "4.png", 504)],
                        embeddings=away[4:], new_species=True)
    assert second.existed and not second.created  # as the commit found it
    assert second.few_note == "", second.notes


def test_the_few_photos_note_groups_the_stores_float32_vectors_as_probe_train_does(tmp_path, capsys, monkeypatch):
    """An ivfpq gallery's ``reference_vectors`` are its re-rank store's float16 copies: the note groups the store's
    float32 vectors, which ``probe train`` groups (here the index's copies are made near-copies of one)."""
    from retrieval.workflows import add_photos, open_gallery

    index, _ = two_species_gallery(tmp_path, capsys)
    gallery, enc = open_gallery(index)
    away = _unit(np.random.default_rng(3).standard_normal((2, gallery.dim)))
    add_photos(gallery, enc, "Vipera berus", [_photo(tmp_path / "new" / "0.png", 600)], embeddings=away[:1],
               new_species=True)
    monkeypatch.setattr(gallery, "reference_vectors", lambda ids: np.repeat(away[:1], len(ids), axis=0))
    second = add_photos(gallery, enc, "Vipera berus", [_photo(tmp_path / "new" / "1.png", 601)], embeddings=away[1:])
    assert second.few_note == "", second.notes  # 2 distinct photos in the store
