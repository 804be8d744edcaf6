"""Gallery = LanceDB store (truth) + derived FAISS index: writes, reopen, staleness, encoder refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli_support import DIM, ENC, FakeEncoder

from index.gallery import EncoderMismatchError, Gallery
from index.layout import VECTORS_FILE
from index.records import ReferenceRecord
from index.vectors import VectorIndexConfig
from retrieval.identify import Identifier


def _unit(rng: np.random.Generator, n: int, centre: np.ndarray, noise: float = 0.1) -> np.ndarray:
    x = centre + noise * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _records(species: str, n: int, **kw) -> list[ReferenceRecord]:
    return [ReferenceRecord(path=f"/photos/{species}/{i}.jpg", species=species, **kw) for i in range(n)]


@pytest.fixture
def gallery(tmp_path):
    rng = np.random.default_rng(0)
    g = Gallery.create(tmp_path / "g", ENC)
    centres = {"Naja haje": rng.standard_normal(DIM), "Natrix maura": rng.standard_normal(DIM)}
    for i, (sp, c) in enumerate(centres.items()):
        recs = _records(sp, 6, family="Elapidae" if i == 0 else "Natricidae", venomous=(i == 0))
        g.add(recs, [f"{sp}-{j}" for j in range(6)], _unit(rng, 6, c))
    g.centres = centres
    return g


def test_add_search_returns_metadata_and_stable_ids(gallery):
    assert len(gallery) == 12
    q = gallery.centres["Naja haje"] / np.linalg.norm(gallery.centres["Naja haje"])
    hits = gallery.search(q[None].astype(np.float32), 3)[0]
    assert [h.species for h in hits] == ["Naja haje"] * 3
    assert hits[0].similarity >= hits[1].similarity >= hits[2].similarity
    assert hits[0].family == "Elapidae" and hits[0].venomous is True and hits[0].genus == "Naja"
    assert hits[0].path.startswith("/photos/Naja haje/")
    assert all(1 <= h.id <= 12 for h in hits)


def test_identifier_votes_and_flags_unknown(gallery):
    from retrieval.vote import VoteConfig

    ident = Identifier(FakeEncoder(), gallery, VoteConfig(k=5, temperature=0.05, unknown_threshold=0.9))
    q = gallery.centres["Natrix maura"] / np.linalg.norm(gallery.centres["Natrix maura"])
    ans = ident.identify_embeddings(q[None].astype(np.float32), top=2)[0]
    assert ans.predictions[0].species == "Natrix maura" and ans.predictions[0].score > 0.9
    assert not ans.unknown and ans.venomous_score == pytest.approx(1 - ans.scores["Natrix maura"])
    assert ans.family_scores["Natricidae"] == pytest.approx(ans.scores["Natrix maura"])
    mixed = (gallery.centres["Natrix maura"] / np.linalg.norm(gallery.centres["Natrix maura"])) + (
        gallery.centres["Naja haje"] / np.linalg.norm(gallery.centres["Naja haje"])
    )
    ans2 = ident.identify_embeddings((mixed / np.linalg.norm(mixed))[None].astype(np.float32))[0]
    assert ans2.unknown  # half-way between two species: no answer is strong enough


def test_an_observation_of_no_photo_and_a_top_under_1_are_refused_clearly(gallery):
    """Walk-tiny 12: identify_observation of 0 rows warned "Mean of empty slice", then failed inside numpy ("zero-size
    array to reduction operation maximum"); top=-1 acted as the slice [:-1], top=0 gave no prediction."""
    import warnings

    ident = Identifier(FakeEncoder(), gallery)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning on the way
        with pytest.raises(ValueError, match=r"identify_observation needs at least one embedding \(one row per photo "
                           r"of the animal\), got 0 rows"):
            ident.identify_observation(np.zeros((0, DIM), np.float32))
    q = (gallery.centres["Natrix maura"] / np.linalg.norm(gallery.centres["Natrix maura"]))[None]
    for top in (-1, 0):
        with pytest.raises(ValueError, match=f"top must be a whole number of at least 1, got {top}"):
            ident.identify_embeddings(q, top=top)
        with pytest.raises(ValueError, match=f"top must be a whole number of at least 1, got {top}"):
            ident.identify_observation(q, top=top)
    assert len(ident.identify_embeddings(q, top=1)[0].predictions) == 1


def test_a_country_reorders_but_never_makes_an_answer_surer_or_a_bite_safer(tmp_path):
    from retrieval.vote import VoteConfig

    rng = np.random.default_rng(4)
    g = Gallery.create(tmp_path / "g", ENC)  # both species look alike: their photos share one cluster
    centre = rng.standard_normal(DIM)
    g.add(_records("Naja haje", 8, venomous=True), [f"a{i}" for i in range(8)], _unit(rng, 8, centre))
    g.add(_records("Natrix maura", 8, venomous=False), [f"b{i}" for i in range(8)], _unit(rng, 8, centre))
    ident = Identifier(FakeEncoder(), g, VoteConfig(k=16, temperature=0.05, unknown_threshold=0.9))
    q = (centre / np.linalg.norm(centre))[None].astype(np.float32)  # the photo cannot tell them apart
    (plain,) = ident.identify_embeddings(q)
    (abroad,) = ident.identify_embeddings(q, presence={"Naja haje": False, "Natrix maura": True})
    assert plain.unknown and not plain.far and plain.venomous_score > 0.2
    assert abroad.predictions[0].species == "Natrix maura" and abroad.predictions[0].score > 0.9
    assert abroad.unknown  # the photo alone could not tell: the range table does not make it sure
    assert abroad.venomous_score == pytest.approx(plain.venomous_score)  # nor the bite safer
    assert abroad.scores["Naja haje"] > 0  # down-weighted, not removed
    assert plain.country_applied is None and abroad.country_applied is True
    (home,) = ident.identify_embeddings(q, presence={"Naja haje": True, "Natrix maura": True})
    assert home.country_applied is False and home.scores == pytest.approx(plain.scores)  # changed nothing


def test_a_species_of_unknown_venom_status_is_not_counted_harmless(tmp_path):
    rng = np.random.default_rng(3)
    g = Gallery.create(tmp_path / "g", ENC)
    centre = rng.standard_normal(DIM)
    g.add(_records("Tropidolaemus philippinensis", 6), [f"t{i}" for i in range(6)], _unit(rng, 6, centre))
    g.add(_records("Natrix maura", 6, venomous=False), [f"n{i}" for i in range(6)],
          _unit(rng, 6, rng.standard_normal(DIM)))
    (ans,) = Identifier(FakeEncoder(), g).identify_embeddings((centre / np.linalg.norm(centre))[None])
    assert ans.predictions[0].species == "Tropidolaemus philippinensis" and ans.predictions[0].venomous is None
    assert ans.venomous_score < 0.01 and ans.venom_unknown_score > 0.9  # reported as unknown, not as harmless
    assert ans.to_dict()["venom_unknown_score"] == ans.venom_unknown_score
    # a gallery none of whose species records a status: all of it unrecorded (re-read w2 #1: it counted none),
    # until the gallery records that it gives no venom advice (birds, other taxa)
    birds = Gallery.create(tmp_path / "birds", ENC)
    birds.add(_records("Corvus corax", 6), [f"c{i}" for i in range(6)], _unit(rng, 6, centre))
    birds.add(_records("Passer domesticus", 6), [f"p{i}" for i in range(6)], _unit(rng, 6, rng.standard_normal(DIM)))
    (bird,) = Identifier(FakeEncoder(), birds).identify_embeddings((centre / np.linalg.norm(centre))[None])
    assert bird.venomous_score is None and bird.venom_unknown_score > 0.9 and bird.venom_advice.treat_as_venomous
    birds.record_info("venom_advice", False)
    (bird,) = Identifier(FakeEncoder(), birds).identify_embeddings((centre / np.linalg.norm(centre))[None])
    assert bird.venom_unknown_score == 0.0 and bird.venom_advice is None and not bird.venom_applies


def test_reopen_keeps_everything_and_refuses_other_encoders(gallery):
    root = gallery.root
    again = Gallery.open(root, expected_fingerprint=ENC["fingerprint"])
    assert len(again) == 12 and {s.species for s in again.species()} == {"Naja haje", "Natrix maura"}
    with pytest.raises(EncoderMismatchError) as err:
        Gallery.open(root, expected_fingerprint="timm:other#123")
    assert "was built with encoder 'test:synthetic'" in str(err.value)
    assert "--encoder test:synthetic" in str(err.value)


def test_missing_or_stale_index_is_rebuilt_from_the_store(gallery, caplog):
    root = gallery.root
    (root / VECTORS_FILE).unlink()
    reopened = Gallery.open(root)
    assert reopened.index.ntotal == 12
    # a crash between the store write and the index save: store ahead of the index file
    rng = np.random.default_rng(5)
    reopened.add(_records("Vipera monticola", 2), ["v1", "v2"], _unit(rng, 2, rng.standard_normal(DIM)),
                 save_index=False)
    with caplog.at_level("INFO"):
        healed = Gallery.open(root)
    assert healed.index.ntotal == 14 and "stale" in caplog.text
    assert {s.species for s in healed.species()} >= {"Vipera monticola"}
    # the same, while another process holds the write lock: the reader repairs in memory, waits on nobody
    import threading

    from index.layout import GalleryLayout
    from index.locks import WriteLock

    healed.add(_records("Vipera latastei", 1), ["v3"], _unit(rng, 1, rng.standard_normal(DIM)), save_index=False)
    opened = []
    with WriteLock(GalleryLayout(root).write_lock).hold():  # a writer busy elsewhere (its own open file: flock)
        reader = threading.Thread(target=lambda: opened.append(Gallery.open(root)), daemon=True)
        reader.start()
        reader.join(60)  # it waited for the lock's 600 s before
        assert opened and opened[0].index.ntotal == 15


def test_a_photo_repeated_in_one_add_is_stored_once_as_the_cli_and_api_store_it(tmp_path):
    """Walk s55 M19: Gallery.add / add_unique store the first of a call's photos of the same bytes (sha256) and map
    the repeats to None, as retrieval.pipeline.add_references (the CLI, the API) does; a photo already stored maps
    to its id. A repeat stored again would be a duplicate reference that votes twice."""
    import hashlib

    a, b, c, d = (hashlib.sha256(bytes([i])).hexdigest() for i in range(4))
    rng = np.random.default_rng(7)
    x = _unit(rng, 4, rng.standard_normal(DIM))
    recs = _records("Natrix maura", 4)
    g = Gallery.create(tmp_path / "g", ENC)
    (first,) = g.add(recs[:1], [c], x[:1])
    ids, dropped = g.add_unique(recs, [a, a, b, c], x)
    assert len(ids) == 2 and len(g) == 3 and dropped == {1: None, 3: first}, (ids, dropped)
    assert g.store.find_sha256([a, b]) == {a: ids[0], b: ids[1]}
    assert g.add(recs[:3], [d, d, d], x[:3]) == [ids[-1] + 1] and len(g) == 4


def test_delete_removes_from_search_and_store(gallery):
    victim = gallery.search(np.asarray(gallery.store.vectors()[1][:1]), 1)[0][0].id
    assert gallery.delete([victim]) == 1
    assert gallery.delete([victim]) == 0
    ids, _ = gallery.store.vectors()
    assert victim not in ids
    hits = gallery.search(np.asarray(gallery.store.vectors()[1]), 12)
    assert all(h.id != victim for row in hits for h in row)
    assert len(Gallery.open(gallery.root)) == 11


def test_a_delete_alone_since_the_last_sync_reads_no_id_column(gallery, monkeypatch):
    """The only writer since its last sync removes the deleted ids from its index directly (the store's id column,
    O(n), is not read); after another process's write it syncs by difference, that write included."""
    reads = []
    real = type(gallery.store).ids
    monkeypatch.setattr(type(gallery.store), "ids", lambda self, **kw: reads.append(kw) or real(self, **kw))
    first, second, third = real(gallery.store).tolist()[:3]
    assert gallery.delete([first, 10**9]) == 1  # an id the store never held is ignored
    assert reads == []
    assert first not in gallery.index.ids and len(gallery) == 11
    other = Gallery.open(gallery.root)
    other.delete([second])  # another writer: this gallery's index no longer matches the store's previous version
    reads.clear()
    assert gallery.delete([third]) == 1
    assert reads  # synced by difference: the other writer's delete is seen as well
    assert not {first, second, third} & set(gallery.index.ids.tolist()) and len(gallery) == 9
    assert sorted(Gallery.open(gallery.root).index.ids.tolist()) == sorted(real(gallery.store).tolist())


def test_an_exclusion_alone_since_the_last_sync_reads_no_id_column(gallery, monkeypatch):
    """As a delete: the only writer since its last sync removes the excluded ids from its index, and adds back the
    restored ones read by id (stop 50's left-over: set_excluded read the whole id column); after another process's
    write it syncs by difference."""
    reads = []
    real = type(gallery.store).ids
    monkeypatch.setattr(type(gallery.store), "ids", lambda self, **kw: reads.append(kw) or real(self, **kw))
    first, second, third = real(gallery.store).tolist()[:3]
    query = gallery.store.vectors(ids=[first])[1]
    assert gallery.set_excluded([first, 10**9]) == 1 and reads == []
    assert first not in gallery.index.ids and gallery.search(query, 1)[0][0].id != first
    assert gallery.set_excluded([first, second], False) == 2 and reads == []  # one restored, one never excluded
    assert gallery.search(query, 1)[0][0].id == first and len(gallery.index.ids) == 12
    Gallery.open(gallery.root).set_excluded([second])  # another writer
    assert gallery.set_excluded([third]) == 1 and reads  # synced by difference: the other's exclusion seen too
    assert not {second, third} & set(gallery.index.ids.tolist()) and len(gallery.index.ids) == 10
    assert sorted(Gallery.open(gallery.root).index.ids.tolist()) == sorted(gallery.index.ids.tolist())


def test_source_path_of_a_reference_is_read_from_the_store(gallery):
    """The photo a reference was read from (the thumbnail's read): excluded ones too, None once deleted or never
    stored, and another process's delete seen although this gallery's answers' metadata is cached."""
    ids = gallery.store.ids().tolist()
    assert gallery.source_path(ids[0]) == "/photos/Naja haje/0.jpg"
    gallery.set_excluded([ids[1]])
    assert gallery.source_path(ids[1]) == "/photos/Naja haje/1.jpg"
    assert gallery.source_path(987654) is None
    gallery.preload_metadata()  # the answers' cache holds every row now
    Gallery.open(gallery.root).delete([ids[2]])  # another writer
    gallery.store.refresh()
    assert gallery.source_path(ids[2]) is None


def test_species_summary_counts(gallery):
    summary = {s.species: s for s in gallery.species()}
    assert summary["Naja haje"].count == 6 and summary["Naja haje"].venomous is True
    assert summary["Natrix maura"].family == "Natricidae" and summary["Natrix maura"].venomous is False


def test_create_refuses_a_non_gallery_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is not a speciesid gallery"):
        Gallery.create(tmp_path / "x", ENC)
    with pytest.raises(ValueError, match="speciesid index build"):
        Gallery.open(tmp_path / "nowhere")


def test_dimension_mismatch_on_search(gallery):
    with pytest.raises(ValueError, match="query embeddings are 8-d but this gallery holds 16-d"):
        gallery.search(np.zeros((1, 8), np.float32), 3)


def test_approximate_index_kind_is_used_above_threshold(tmp_path):
    rng = np.random.default_rng(1)
    g = Gallery.create(tmp_path / "h", ENC, index_config=VectorIndexConfig(approx_threshold=50))
    g.add(_records("Naja haje", 80), [str(i) for i in range(80)], _unit(rng, 80, rng.standard_normal(DIM), 1.0))
    g.finish_build()
    assert g.index.kind == "ivfpq"
    assert Gallery.open(tmp_path / "h").index.kind == "ivfpq"


def test_answers_metadata_read_whole_once_for_a_small_gallery_and_the_same_as_looked_up(gallery, monkeypatch):
    """A small gallery's metadata is read in one scan at the first answer, and then no answer asks the store; the
    neighbours are the same as per-id lookups give (None where a field is missing), and rows another process adds
    later are still looked up."""
    import index.gallery as gallery_module
    from index.store import ReferenceStore

    root = gallery.root
    looked_up = Gallery.open(root)
    monkeypatch.setattr(gallery_module, "META_LOOKUP_ROWS", 0)  # as before: every miss is a store lookup
    q = np.stack([c / np.linalg.norm(c) for c in gallery.centres.values()]).astype(np.float32)
    expected = looked_up.search(q, 12)
    monkeypatch.undo()

    calls = []
    original = ReferenceStore.metadata
    monkeypatch.setattr(ReferenceStore, "metadata", lambda self, ids=None, **kw: calls.append(ids) or original(
        self, ids, **kw))
    reader = Gallery.open(root)
    assert reader.search(q, 12) == expected
    assert calls == [None]  # one scan of the whole table, no per-id lookups
    for _ in range(3):
        reader.search(q, 5)
    assert calls == [None]
    assert {h.common_name for row in expected for h in row} == {None}
    assert {h.venomous for row in expected for h in row} == {True, False}
    # another process adds a species: its rows are not in the scan, so they are looked up by id
    rng = np.random.default_rng(1)
    centre = rng.standard_normal(DIM)
    gallery.add(_records("Vipera latastei", 4, venomous=True, common_name="Lataste's viper"),
                [f"v{j}" for j in range(4)], _unit(rng, 4, centre))
    reader.refresh(force=True)
    hits = reader.search((centre / np.linalg.norm(centre))[None].astype(np.float32), 4)[0]
    assert [h.species for h in hits] == ["Vipera latastei"] * 4 and hits[0].common_name == "Lataste's viper"
    assert len(calls) == 2 and sorted(calls[1]) == sorted(h.id for h in hits)


def test_preload_metadata_reads_every_row_unless_the_gallery_is_over_the_cap(gallery, monkeypatch):
    from index.store import ReferenceStore

    reader = Gallery.open(gallery.root)
    assert reader.preload_metadata(max_rows=5) == 0  # 12 references: over the cap, nothing read
    assert reader.preload_metadata() == 12
    monkeypatch.setattr(ReferenceStore, "metadata", lambda *a, **k: pytest.fail("no lookup after the preload"))
    q = gallery.centres["Natrix maura"] / np.linalg.norm(gallery.centres["Natrix maura"])
    hits = reader.search(q[None].astype(np.float32), 12)[0]
    assert len(hits) == 12 and hits[0].species == "Natrix maura" and hits[0].family == "Natricidae"


def test_the_metadata_cache_of_a_gallery_too_big_to_keep_whole_restarts_instead_of_growing(gallery, monkeypatch):
    import index.gallery as gallery_module

    monkeypatch.setattr(gallery_module, "META_LOOKUP_ROWS", 0)  # looked up per answer, as a big gallery is
    monkeypatch.setattr(gallery_module, "META_CACHE_ROWS", 8)
    reader = Gallery.open(gallery.root)
    for species, centre in gallery.centres.items():
        q = (centre / np.linalg.norm(centre))[None].astype(np.float32)
        hits = reader.search(q, 6)[0]
        assert [h.species for h in hits] == [species] * 6  # every answer fully dressed
        assert len(reader._meta_cache) <= 8


def test_a_batch_of_answers_reads_the_metadata_in_one_scan_when_that_is_cheaper(gallery, monkeypatch):
    """A gallery too big to be read at its first answer is read whole for a batch whose lookups would cost more."""
    import index.gallery as gallery_module
    from index.store import ReferenceStore

    monkeypatch.setattr(gallery_module, "META_LOOKUP_ROWS", 5)  # 12 references: 3 answers' lookups cost a scan
    calls = []
    original = ReferenceStore.metadata
    monkeypatch.setattr(ReferenceStore, "metadata", lambda self, ids=None, **kw: calls.append(ids) or original(
        self, ids, **kw))
    q = np.stack([c / np.linalg.norm(c) for c in gallery.centres.values()]).astype(np.float32)
    ident = Identifier(FakeEncoder(), Gallery.open(gallery.root))
    ident.identify_embeddings(q)  # 2 answers: 2 x 5 < 12, looked up
    assert calls and all(c is not None for c in calls)
    calls.clear()
    ident = Identifier(FakeEncoder(), Gallery.open(gallery.root))
    answers = ident.identify_embeddings(np.concatenate([q, q[:1]]))  # 3 answers: one scan
    assert calls == [None]
    assert [a.predictions[0].species for a in answers] == [*gallery.centres, next(iter(gallery.centres))]


def test_one_off_target_reference_does_not_set_the_far_threshold(tmp_path):
    """The noise reference's own nearest-other cosine, far below the rest, is set aside by the fence; and as the
    same-species references are alike but no near-copies (the shared fixture's are, cosine ~0.99), the noise is
    nobody's nearest other: the threshold stays exactly what it was."""
    from retrieval.identify import NEAR_COPY_COSINE, far_threshold

    rng = np.random.default_rng(0)
    gallery = Gallery.create(tmp_path / "g", ENC)
    for sp in ("Naja haje", "Natrix maura"):
        gallery.add(_records(sp, 6), [f"{sp}-{j}" for j in range(6)], _unit(rng, 6, rng.standard_normal(DIM), 0.6))
    vectors = gallery.reference_vectors(list(gallery.index.ids))
    cos = vectors @ vectors.T
    assert cos[~np.eye(len(cos), dtype=bool)].max() < NEAR_COPY_COSINE  # no near-copies among them
    before = far_threshold(gallery)
    rng = np.random.default_rng(9)
    noise = _unit(rng, 1, rng.standard_normal(DIM), noise=5.0)
    gallery.add(_records("Natrix maura", 1), ["noise"], noise)
    assert float((vectors @ noise[0]).max()) < before  # counted, the noise's own would set it lower
    assert far_threshold(gallery) == before


def test_a_non_finite_embedding_is_refused_before_anything_is_committed(gallery):
    """A NaN / inf row in the store would leave a gallery that no command can open, not even to delete it."""
    before = len(gallery)
    bad = np.full((1, DIM), np.inf, dtype=np.float32)
    with pytest.raises(ValueError, match="embeddings contain NaN or inf"):
        gallery.add(_records("Naja haje", 1), ["f" * 64], bad)
    with pytest.raises(ValueError, match="one of each per photo"):
        gallery.add(_records("Naja haje", 2), ["e" * 64], np.ones((2, DIM), dtype=np.float32))
    assert len(gallery) == before and gallery.store.count(include_excluded=True) == before
    assert len(Gallery.open(gallery.root)) == before


def test_an_id_given_again_is_never_shown_with_the_deleted_rows_metadata(gallery):
    """A folder whose ids.json fell behind (a stale copy, a restored backup) can give a deleted id again: a long
    running reader must then show the new row, not what it cached for the deleted one."""
    rng = np.random.default_rng(5)
    vec = _unit(rng, 1, rng.standard_normal(DIM))
    (old,) = gallery.add(_records("Naja haje", 1), ["a" * 64], vec)
    assert gallery.search(vec, 1)[0][0].species == "Naja haje"  # its metadata is now cached
    gallery.delete([old])
    gallery.layout.ids.write_text(json.dumps({"next": old}))  # the copy's high-water mark, behind
    (again,) = Gallery.open(gallery.root).add(_records("Natrix maura", 1), ["b" * 64], vec)
    assert again == old
    gallery.refresh(force=True)
    assert gallery.search(vec, 1)[0][0].species == "Natrix maura"


def test_a_photo_the_encoder_embeds_as_nan_is_skipped_and_the_rest_stored(tmp_path):
    from PIL import Image

    from retrieval.encoders import create_encoder
    from retrieval.pipeline import add_references

    enc = create_encoder("timm:test_vit@random", precision="fp32", runtime="torch")
    real = enc.encode_batch

    def one_nan(batch):
        out = real(batch)
        out[0] = np.nan
        return out

    enc.encode_batch = one_nan
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    g = Gallery.create(tmp_path / "g", enc.describe())
    report = add_references(g, enc, [ReferenceRecord(path=p, species="Naja haje") for p in paths], progress=False,
                            workers=1)
    assert report.added == 2 and report.skipped == [(str(paths[0]), "the encoder gave a non-finite embedding (NaN or inf)")]
    assert len(Gallery.open(g.root)) == 2


def test_building_into_a_gallery_keeps_its_index_kind(tmp_path, capsys):
    """A later `index build` without --index-kind keeps the kind the gallery was made with (it was replaced by
    auto, that is flat at this size, while gallery.json still said hnsw)."""
    from PIL import Image

    from api.cli import main

    for i in range(6):
        folder = tmp_path / "photos" / ("Naja haje" if i % 2 else "Natrix maura")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    args = ["index", "build", "--dataset", "folder", "--root", str(tmp_path / "photos"), "--index",
            str(tmp_path / "g"), "--encoder", "timm:test_vit@random", "--precision", "fp32", "-q"]
    assert main([*args, "--index-kind", "hnsw"]) == 0
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
        tmp_path / "photos" / "Naja haje" / "more.png")
    assert main(args) == 0 and "7 references" in capsys.readouterr().out
    assert Gallery.open(tmp_path / "g").index.kind == "hnsw"
    # a kind asked for explicitly is the gallery's from then on, not for that build only
    assert main([*args, "--index-kind", "flat"]) == 0 and main(args) == 0
    assert Gallery.open(tmp_path / "g").index.kind == "flat"
    # --index-kind changes the kind only: settings edited into gallery.json (docs/scale.md) stay
    info_path = tmp_path / "g" / "gallery.json"
    info = json.loads(info_path.read_text())
    info["index"]["hnsw_ef_search"] = 77
    info_path.write_text(json.dumps(info))
    assert main([*args, "--index-kind", "hnsw"]) == 0
    assert json.loads(info_path.read_text())["index"] == {**info["index"], "kind": "hnsw"}


def test_adding_again_a_photo_a_clean_run_excluded_says_it_stays_unsearchable(tmp_path, capsys):
    from PIL import Image

    from api.cli import main

    folder = tmp_path / "photos" / "Naja haje"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    index = tmp_path / "g"
    assert main(["index", "build", "--dataset", "folder", "--root", str(tmp_path / "photos"), "--index", str(index),
                 "--encoder", "timm:test_vit@random", "--precision", "fp32", "-q"]) == 0
    g = Gallery.open(index)
    (hidden,) = [int(i) for i in g.store.metadata().query("source_path.str.endswith('0.png')")["id"]]
    g.set_excluded([hidden])
    capsys.readouterr()
    code = main(["references", "add", str(folder / "0.png"), "--index", str(index), "--species", "Naja haje",
                 "--precision", "fp32"])
    out = capsys.readouterr().out
    assert code == 1 and f"not searchable: {folder / '0.png'} is already reference {hidden}, excluded" in out, out
    assert f"already in the gallery: {folder / '0.png'}" not in out, out  # listed once, under its reason
    assert main(["index", "info", "--index", str(index)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["references"] == 2 and info["excluded"] == 1


def test_a_photo_stored_under_another_species_is_listed_once_as_not_added(tmp_path, capsys):
    """Walk chaos #4: a photo already a reference of another species was listed twice by 'references add': as
    'already in the gallery' and as 'not added ... of another species'. It is now listed once, under the latter;
    a plain duplicate of the same species is still listed as already in the gallery."""
    from _cli_support import ENCODER, _run, folder_gallery

    index = folder_gallery(tmp_path, capsys, ("Naja haje", "Natrix maura"), 4)
    photos = tmp_path / "photos"
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje",
                          photos / "Natrix maura" / "1.png", photos / "Naja haje" / "0.png", *ENCODER)
    ids = {Path(p).name: int(i) for i, p in Gallery.open(index).store.metadata()["source_path"].items()}
    assert code == 1, (out, err)
    assert out.count("1.png") == 1 and (f"not added: {photos / 'Natrix maura' / '1.png'} is already reference "
                                        f"{ids['1.png']} of Natrix maura") in out, out
    assert f"already in the gallery: {photos / 'Naja haje' / '0.png'} (same bytes as reference {ids['0.png']})" \
        in out and "2 already in the gallery" in out, out


def test_a_store_holding_an_id_twice_still_opens_searches_and_can_be_repaired(tmp_path, caplog):
    """Two machines writing one S3 store can give an id twice; the gallery must still open (before: every open,
    even 'references delete', failed on the duplicate id)."""
    from retrieval.workflows import delete_references

    g = Gallery.create(tmp_path / "g", ENC)
    rng = np.random.default_rng(3)
    vec = _unit(rng, 3, rng.standard_normal(DIM))
    (first, second) = g.add(_records("Naja haje", 2), ["a" * 64, "b" * 64], vec[:2])
    g.store.add(_records("Natrix maura", 1), ["c" * 64], vec[2:], g.fingerprint, [second])  # the other writer's row
    (g.root / "vectors.faiss").unlink()  # rebuilt from the store on open
    with caplog.at_level("ERROR"):
        again = Gallery.open(g.root)
    assert f"the store holds 1 id more than once ([{second}]" in caplog.text
    assert sorted(again.index.ids.tolist()) == [first, second]
    assert {n.id for n in again.search(vec[1:2], 2)[0]} == {first, second}
    assert delete_references(again, [second]) == [second]
    assert again.store.count(include_excluded=True) == 1 and len(Gallery.open(g.root)) == 1


def test_a_write_removes_what_writes_killed_mid_way_left(gallery):
    import os
    import time

    old = gallery.root / f".vectors.faiss.{'a' * 32}.tmp.faiss"
    fresh = gallery.root / f".gallery.json.{'b' * 32}.tmp.json"
    mine = gallery.root / ".my-notes.tmp"  # not a temporary name of index.atomic: never touched
    for f in (old, fresh, mine):
        f.write_bytes(b"x" * 100)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(mine, (time.time() - 3600, time.time() - 3600))
    rng = np.random.default_rng(8)
    gallery.add(_records("Naja haje", 1), ["9" * 64], _unit(rng, 1, rng.standard_normal(DIM)))
    assert not old.exists() and fresh.exists() and mine.exists()


def test_one_lock_per_gallery_and_process(gallery, tmp_path):
    """Two Gallery objects of one folder (or of a link to it) share the process's lock: a write nested in the
    other's `writing()` is re-entrance, not a wait for itself; a no-wait hold from another thread gives up at once."""
    import threading

    link = tmp_path / "link"
    link.symlink_to(gallery.root)
    other = Gallery.open(link)
    assert other._writer is gallery._writer
    rng = np.random.default_rng(11)
    with gallery.writing():
        (new,) = other.add(_records("Naja haje", 1), ["7" * 64], _unit(rng, 1, rng.standard_normal(DIM)))
        failed = []

        def no_wait() -> None:
            try:
                with gallery._writer.hold(timeout=0.0):
                    failed.append(False)
            except TimeoutError:
                failed.append(True)

        t = threading.Thread(target=no_wait)
        t.start()
        t.join(10)
        assert failed == [True]
    assert new in Gallery.open(gallery.root).store.ids().tolist()


def _as_if_killed_in_create(root: Path) -> None:
    """Leave a created gallery's folder as a create killed before its table's first commit leaves it: no saved
    vector index (written only once a table version is committed), no id mark."""
    for name in ("vectors.faiss", "vectors.faiss.json", "ids.json"):
        (root / name).unlink(missing_ok=True)


_KILLED_IN_CREATE = """
import os, signal, sys
import lancedb.db

def killed(self, name, *args, **kwargs):  # what a kill inside Lance's table creation leaves: no version committed
    table = os.path.join(sys.argv[1], "store", name + ".lance")
    os.makedirs(os.path.join(table, "_versions"))
    os.makedirs(os.path.join(table, "_transactions"))
    open(os.path.join(table, "_transactions", "0-unfinished.txn"), "wb").close()
    os.kill(os.getpid(), signal.SIGKILL)

lancedb.db.LanceDBConnection.create_table = killed
from index.gallery import Gallery
Gallery.create(sys.argv[1], {"spec": "test:synthetic", "fingerprint": "test:synthetic#abc", "dim": 16})
"""


def test_a_create_killed_inside_the_table_creation_is_made_whole_by_the_next_open(tmp_path, caplog):
    """A create SIGKILLed inside LanceDB's table creation leaves gallery.json and a table folder with no version:
    the next writer's open (or create) removes that empty folder under the write lock and makes the table again; a
    reader's open (index info, identify, serve) says so and changes nothing."""
    from index.store import HalfCreatedStoreError

    root = tmp_path / "g"
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _KILLED_IN_CREATE, str(root)], cwd=repo, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(repo)}, timeout=120)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    table = root / "store" / "references.lance"
    assert (root / "gallery.json").is_file() and (table / "_versions").is_dir()
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(HalfCreatedStoreError, match="build into the gallery or add references to it"):
        Gallery.open(root)  # a reader
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing made, nothing removed
    g = Gallery.open(root, make_table=True)
    assert len(g) == 0 and "left half-created by an interrupted create" in caplog.text
    rng = np.random.default_rng(3)
    (new,) = g.add(_records("Naja haje", 1), ["1" * 64], _unit(rng, 1, rng.standard_normal(DIM)))
    assert Gallery.create(root, ENC).store.ids().tolist() == [new]  # create again: the same gallery, opened


def test_a_half_created_table_holding_data_or_out_of_reach_is_never_deleted(tmp_path, monkeypatch):
    """A half-created table with files in it is not removed: the error names the folder and what to do; a gallery
    whose lock cannot be taken (read-only) is not repaired either, and says how."""
    from index.locks import WriteLock
    from index.store import HalfCreatedStoreError

    root = tmp_path / "g"
    Gallery.create(root, ENC)
    _as_if_killed_in_create(root)
    table = root / "store" / "references.lance"
    shutil.rmtree(table)
    (table / "_versions").mkdir(parents=True)
    (table / "data").mkdir()
    (table / "data" / "rows.lance").write_bytes(b"x" * 100)
    for attempt in (lambda: Gallery.open(root), lambda: Gallery.create(root, ENC)):
        with pytest.raises(HalfCreatedStoreError, match="left half-created by an interrupted create") as exc:
            attempt()
        assert f"move {table} aside" in str(exc.value) and "data/rows.lance" in str(exc.value)
        assert "Nothing was deleted" in str(exc.value)
        assert (table / "data" / "rows.lance").read_bytes() == b"x" * 100
    (table / "data" / "rows.lance").unlink()

    def read_only(self, timeout):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(WriteLock, "_acquire", read_only)
    with pytest.raises(HalfCreatedStoreError, match="add references to it, with write access"):
        Gallery.open(root, make_table=True)
    assert (table / "data").is_dir()
    monkeypatch.undo()
    assert len(Gallery.open(root, make_table=True)) == 0 and not (table / "data").exists()


def test_the_table_is_made_only_under_the_lock_and_a_lock_timeout_is_not_read_only(tmp_path, monkeypatch):
    """A plain open that found gallery.json and no table made the table without the lock (the premise of the
    half-created repair is that a creator at work holds it); a lock that timed out was reported as a read-only
    gallery ("open the gallery with write access"); an object store's half-created table was said to lose
    nothing when deleted, unchecked."""
    from index.locks import WriteLock
    from index.store import HalfCreatedStoreError

    root = tmp_path / "g"
    Gallery.create(root, ENC)
    _as_if_killed_in_create(root)
    table = root / "store" / "references.lance"
    shutil.rmtree(table)  # gallery.json, no table: as between a creator's two steps

    def busy(self, timeout):
        raise TimeoutError(f"another process has been writing this gallery for over 600 s (lock {self.path}); try "
                           "again when it is done")

    monkeypatch.setattr(WriteLock, "_acquire", busy)
    with pytest.raises(TimeoutError, match=r"for over 600 s .*is not made yet, and is made only under that lock"):
        Gallery.open(root, make_table=True)
    assert not table.exists()  # not made behind the lock holder's back
    (table / "_versions").mkdir(parents=True)  # half-created, holding no data, and the lock busy
    with pytest.raises(TimeoutError, match="another process has been writing this gallery"):
        Gallery.open(root, make_table=True)
    monkeypatch.undo()
    assert len(Gallery.open(root, make_table=True)) == 0 and (table / "_versions").is_dir()
    said = str(HalfCreatedStoreError("s3://bucket/g/references.lance", None))
    assert "nothing committed is lost" not in said
    assert ("if it holds nothing but _versions/ and _transactions/ objects (no data/ objects), nothing was committed: "
            "delete it") in said and "If it holds data/ objects, do not delete it" in said


@pytest.mark.parametrize(("text", "says"), [
    ("{not json", "speciesid writes it whole (atomically), so it was changed or damaged by something else: check its "
                  "permissions, restore it from a backup, or rebuild the gallery into a new folder with 'speciesid "
                  "index build --index NEW_DIR ...'"),
    ("[1, 2]", "(a JSON list, not an object)"),
    ('{"format": 99}', "gallery.json was written by a newer speciesid (format 99): upgrade speciesid (this is "),
    ('{"format": 0}', "has format 0; this speciesid reads format 1: rebuild the gallery into a new folder with "
                      "'speciesid index build --index NEW_DIR ...'"),
])
def test_an_unreadable_or_foreign_gallery_json_says_what_to_do(tmp_path, text, says):
    from index.gallery import read_gallery_info

    (tmp_path / "gallery.json").write_text(text)
    with pytest.raises(ValueError) as err:
        read_gallery_info(tmp_path)
    assert says in str(err.value), err.value


def test_ids_given_counts_every_id_ever_given_deleted_ones_too(gallery, tmp_path):
    """``Gallery.ids_given``: the ids.json mark (re-read s57 core #5: retrieval.galleries read the file itself)."""
    assert gallery.ids_given() == 12
    gallery.delete([1, 2])
    assert len(gallery) == 10 and gallery.ids_given() == 12
    assert Gallery.create(tmp_path / "new", ENC).ids_given() == 0
