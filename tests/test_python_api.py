"""speciesid used as a Python library (a notebook, a script): what ``retrieval.workflows`` takes and refuses.

Uses the small real MobileNetV1 gallery of the API tests (4 ph-snakes species, 10 photos each).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _api_support import COBRA, SPECIES, base_gallery, binomial, gallery_copy, photos
from PIL import Image

from retrieval import workflows as wf
from retrieval.advice import far_note
from retrieval.encoders import EncoderConfig
from retrieval.pipeline import embed_photos
from retrieval.probe import PROBE_META, LinearProbe


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return base_gallery(tmp_path_factory)


@pytest.fixture(scope="module")
def ident(index):
    return wf.open_identifier(index, EncoderConfig(precision="fp32"))


def _shown(answers: list[wf.Answer]) -> list[tuple]:
    """What a user reads of each answer: the candidates and scores, and the unknown and far flags."""
    return [([(r.name, round(r.score, 4)) for r in a.results], a.identification.unknown, a.identification.far)
            for a in answers]


# ------------------------------------------------------------------------------ embeddings: scaled to unit length
def test_an_embedding_and_100_times_it_get_the_same_answer_votes_and_flags(ident):
    vals = [COBRA, *photos("val", SPECIES[2], 2), *photos("val", SPECIES[3], 1)]
    emb = embed_photos(vals, ident.encoder).embeddings
    blank = Image.new("RGB", (224, 224), "white")  # unlike every reference: far and unknown
    emb = np.vstack([emb, ident.encoder.encode_images([blank])])
    base = _shown(wf.identify(ident, embeddings=emb, method="knn"))
    assert any(unknown for _, unknown, _ in base) and any(far for *_, far in base)  # the flags are exercised
    for scale in (100.0, 0.01):
        assert _shown(wf.identify(ident, embeddings=emb * scale, method="knn")) == base
        assert _shown(wf.identify(ident, embeddings=emb * scale)) == _shown(wf.identify(ident, embeddings=emb))
        again = ident.identify_embeddings(emb * scale, method="knn")
        assert [round(a.nearest, 4) for a in again] == [round(a.identification.nearest, 4) for a in
                                                         wf.identify(ident, embeddings=emb, method="knn")]
        obs = wf.identify(ident, embeddings=emb[:3] * scale, observation=True)
        assert _shown(obs) == _shown(wf.identify(ident, embeddings=emb[:3], observation=True))
    one = emb[0]  # a 1-D vector: one photo
    assert _shown(wf.identify(ident, embeddings=one * 50)) == _shown(wf.identify(ident, embeddings=emb[:1]))
    near = [n.id for n in wf.search(ident, embedding=(one * 100).tolist(), k=3)]
    assert near == [n.id for n in wf.search(ident, embedding=one.tolist(), k=3)]


def test_a_zero_or_non_finite_embedding_row_is_refused_naming_the_row(ident):
    emb = embed_photos([COBRA], ident.encoder).embeddings
    zeros = np.vstack([emb, np.zeros_like(emb)])
    with pytest.raises(ValueError, match="embedding row 1 is all zeros: an embedding must be finite and not all "
                                         "zeros; drop that row, or embed its photo again"):
        wf.identify(ident, embeddings=zeros)
    nan = np.vstack([emb, emb, emb])
    nan[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"embedding row 2 is not finite \(NaN or inf\)"):
        wf.identify(ident, embeddings=nan)
    with pytest.raises(ValueError, match="embedding row 1 is all zeros"):
        ident.identify_embeddings(zeros)
    with pytest.raises(ValueError, match="embedding row 1 is all zeros"):
        ident.identify_observation(zeros)
    with pytest.raises(ValueError, match="the embedding is all zeros"):
        wf.search(ident, embedding=[0.0] * ident.gallery.dim)
    with pytest.raises(ValueError, match=rf"embeddings must be {ident.gallery.dim} numbers per row"):
        wf.identify(ident, embeddings=emb[:, :10])


def test_nearest_says_it_returns_inner_products_the_cosine_for_unit_queries(ident):
    emb = embed_photos([COBRA], ident.encoder).embeddings
    d1, i1 = ident.gallery.nearest(emb, 2)
    d10, i10 = ident.gallery.nearest(emb * 10, 2)
    assert (i1 == i10).all() and np.allclose(d10, 10 * d1, rtol=1e-4)  # what the docstring now says
    assert "cosine only for" in type(ident.gallery).nearest.__doc__


# ------------------------------------------------------------------------------ photos: a list, even for one
@pytest.mark.parametrize("one", [str(COBRA), COBRA, b"\xff\xd8 jpeg bytes"])
def test_one_photo_alone_is_refused_with_the_list_to_pass(ident, one):
    said = (r'got one (str|PosixPath|bytes): pass a list of photos, even for one: \["photo.jpg"\] '
            r'\(or \[photo_bytes\]\)')
    with pytest.raises(ValueError, match=said):
        wf.identify(ident, one)
    with pytest.raises(ValueError, match=said):
        embed_photos(one, ident.encoder)


def test_a_generator_of_photos_is_read_once_and_named(ident):
    got = wf.identify(ident, (p for p in [COBRA, photos("val", SPECIES[2], 1)[0]]))
    assert [a.source for a in got] == [str(COBRA), str(photos("val", SPECIES[2], 1)[0])]
    assert all(a.error is None and a.results for a in got)


def test_pil_images_arrays_and_none_are_refused_at_the_entry_saying_what_to_pass(ident):
    image = Image.open(COBRA)
    with pytest.raises(TypeError, match=r"photos\[0\] is a PIL image: pass its file's path or bytes.*"
                                        r"Identifier.identify_images\(\[image\]\)"):
        wf.identify(ident, [image])
    with pytest.raises(TypeError, match=r"photos\[1\] is a numpy array: .*Identifier.identify_images\(\[array\]\)"):
        wf.identify(ident, [COBRA, np.asarray(image)])
    with pytest.raises(TypeError, match=r"photos\[0\] is a NoneType: pass the photo's file path"):
        wf.identify(ident, [None])
    with pytest.raises(TypeError, match="photo is one photo, here a PIL image"):
        wf.search(ident, image)
    rgb = image.convert("RGB")
    by_pil = ident.identify_images([rgb])[0]  # the documented way for PIL images, and their pixels
    by_array = ident.identify_images([np.asarray(rgb)])[0]
    assert by_pil.scores and list(by_pil.scores) == list(by_array.scores)
    with pytest.raises(TypeError, match=r"images\[0\] is an array of shape \[4, 4\] and dtype float64: pass H x W"):
        ident.identify_images([np.zeros((4, 4))])
    with pytest.raises(TypeError, match=r"images\[0\] is a PosixPath: .*workflows.identify\(ident, \[path\]\)"):
        ident.identify_images([COBRA])


def test_add_photos_refuses_one_path_bare_bytes_a_folder_and_no_photos_before_any_work(tmp_path_factory, tmp_path):
    gallery, enc = wf.open_gallery(gallery_copy(tmp_path_factory, "add_args"), EncoderConfig(precision="fp32"))
    before = len(gallery)
    new = photos("val", SPECIES[1], 2)
    with pytest.raises(ValueError, match=r'pass a list of photos, even for one: \["photo.jpg"\]'):
        wf.add_photos(gallery, enc, binomial(SPECIES[1]), str(new[0]))
    with pytest.raises(TypeError, match=r'photos\[0\] is bytes: an upload is a \(name, bytes\) tuple'):
        wf.add_photos(gallery, enc, binomial(SPECIES[1]), [new[0].read_bytes()])
    with pytest.raises(ValueError, match=r"is a folder: pass the photos in it, e\.g\. index\.photos\.find_photos"):
        wf.add_photos(gallery, enc, binomial(SPECIES[1]), [tmp_path])
    with pytest.raises(TypeError, match="add_photos takes the gallery's loaded encoder, not a spec"):
        wf.add_photos(gallery, "timm:x", binomial(SPECIES[1]), new)
    empty = (r'photos is empty: no photos were given to add_photos; pass the photo files to store, e\.g\. '
             r'\["photo\.jpg"\] \(or uploads \[\("photo\.jpg", data\)\]\)')
    for nothing in ([], iter(())):  # not an add of nothing, answered as if every photo were a duplicate
        with pytest.raises(ValueError, match=empty):
            wf.add_photos(gallery, enc, "Naja nova", nothing)
    with pytest.raises(ValueError, match=empty):
        wf.add_photos(gallery, enc, binomial(SPECIES[1]), [], embeddings=np.zeros((0, gallery.dim), np.float32))
    assert len(gallery) == before
    done = wf.add_photos(gallery, enc, binomial(SPECIES[1]), iter(new))  # a generator: read once
    assert len(done.report.ids) == 2


# ------------------------------------------------------------------------------ an answer: unknown, plain data
def _blank_png() -> bytes:
    """A white frame: unlike every reference photo (far, so UNKNOWN)."""
    buf = io.BytesIO()
    Image.new("RGB", (224, 224), "white").save(buf, "PNG")
    return buf.getvalue()


def test_an_answer_says_whether_it_is_unknown_without_a_look_at_names(index):
    ident = wf.open_identifier(index, EncoderConfig(precision="fp32"))  # its own: its threshold is changed below
    cobra, blank, broken = wf.identify(ident, [COBRA, _blank_png(), b"not a photo"])
    assert (cobra.unknown, blank.unknown, broken.unknown) == (False, True, True)
    assert blank.identification.far and blank.results  # far: candidates listed all the same
    assert broken.error and not broken.results  # unreadable: nothing to trust
    ident.config = replace(ident.config, unknown_threshold=1.0)  # no score reaches it (the best: ~0.998)
    low = wf.identify(ident, [COBRA])[0]
    assert low.unknown and low.identification.unknown and not low.identification.far
    assert low.results[0].name == cobra.results[0].name  # the same best candidate: only the flag says UNKNOWN


def test_an_answer_to_dict_is_plain_json_under_the_http_api_names(ident):
    from api.schemas import IdentifyOut, NeighbourOut, ResultOut

    cobra, blank, broken = wf.identify(ident, [COBRA, _blank_png(), b"not a photo"], country="MA")
    for answer in (cobra, blank, broken):
        d = answer.to_dict()
        assert json.loads(json.dumps(d, allow_nan=False)) == d  # built-ins only: the same after a JSON round trip
    d = cobra.to_dict()
    assert list(d) == ["source", "error", *(k for k in IdentifyOut.model_fields if k not in ("encoder", "images"))]
    assert (d["source"], d["error"], d["unknown"], d["far"]) == (str(COBRA), None, False, False)
    assert d["nearest_similarity"] == cobra.identification.nearest
    assert d["venom_advice"] == cobra.identification.venom_advice.to_dict()
    assert d["country_applied"] is False and d["notes"] == [cobra.identification.country_note()]
    top, best = d["results"][0], cobra.results[0]
    assert list(top) == list(ResultOut.model_fields)
    assert (top["name"], top["score"], top["venomous"]) == (best.name, best.score, True)
    assert [n["id"] for n in top["neighbours"]] == [n.id for n in best.neighbours] and best.neighbours
    near = top["neighbours"][0]
    assert set(near) == set(NeighbourOut.model_fields) - {"thumbnail_url"} | {"path"}
    assert near["path"] == str(best.neighbours[0].path) and near["similarity"] == best.neighbours[0].plain_cosine
    assert all(r["neighbours"] == [] for r in cobra.to_dict(neighbours=False)["results"])
    far = blank.to_dict()
    assert (far["unknown"], far["far"], far["venomous_score"]) == (True, True, None)
    assert far["notes"][0] == far_note() and far["results"]
    assert broken.to_dict() == {"source": "image #2", "error": broken.error, "unknown": True, "notes": [],
                                "results": []}


def test_to_dict_makes_numpy_values_and_paths_plain(ident):
    answer = wf.identify(ident, [COBRA])[0]
    best = answer.results[0]
    near = replace(best.neighbours[0], id=np.int64(7), similarity=np.float32(0.5), path=Path("refs/a.jpg"))
    answer.results[0] = replace(best, score=np.float32(0.25), neighbours=[near])
    answer.identification.nearest = np.float32(0.5)
    answer.identification.set_aside = np.array([0, 2])
    d = answer.to_dict()
    json.dumps(d, allow_nan=False)
    top = d["results"][0]
    assert type(top["score"]) is float and top["score"] == 0.25 and type(d["nearest_similarity"]) is float
    assert top["neighbours"][0]["id"] == 7 and type(top["neighbours"][0]["id"]) is int
    assert top["neighbours"][0]["path"] == str(Path("refs/a.jpg")) and d["set_aside"] == [0, 2]


# ------------------------------------------------------------------------------ methods, top, names
def test_an_unknown_method_lists_the_choices(ident, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'bogus'; choose one of knn, probe, blend"):
        wf.identify(ident, [COBRA], method="bogus")
    with pytest.raises(ValueError, match="unknown method 'bogus'; choose one of knn, probe, blend"):
        wf.evaluate_dataset(ident, "folder", tmp_path, methods=["bogus"], report_dir=tmp_path / "r")
    with pytest.raises(ValueError, match=r"methods is a list, even for one method: pass \['knn'\]"):
        wf.evaluate_dataset(ident, "folder", tmp_path, methods="knn", report_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_top_below_1_and_names_of_the_wrong_length_are_refused_with_the_counts(ident):
    for top in (0, -1):
        with pytest.raises(ValueError, match=f"top must be a whole number >= 1 .*not {top}"):
            wf.identify(ident, [COBRA], top=top)
    three = [COBRA, *photos("val", SPECIES[2], 2)]
    with pytest.raises(ValueError, match="names must have one entry per photo: 3 photos, 1 names"):
        wf.identify(ident, three, names=["one"])
    with pytest.raises(ValueError, match="names must have one entry per photo: 2 photos, 3 names"):
        wf.identify(ident, three[:2], names=["a", "b", "c"])
    emb = embed_photos(three, ident.encoder).embeddings
    with pytest.raises(ValueError, match="names must have one entry per embedding row: 3 rows, 2 names"):
        wf.identify(ident, embeddings=emb, names=["a", "b"])
    with pytest.raises(ValueError, match=r"names is a list, one name per photo, even for one: pass \['a'\]"):
        wf.identify(ident, [COBRA], names="a")
    assert [a.source for a in wf.identify(ident, three[:1], names=["mine"])] == ["mine"]


# ------------------------------------------------------------------------------ the first argument's kind
def test_the_wrong_kind_of_first_argument_says_what_to_pass(index, ident, tmp_path):
    g = str(index)
    with pytest.raises(TypeError, match=rf"identify takes an Identifier, not a folder: open it once, ident = "
                                        rf"open_identifier\('{re.escape(g)}'\), then identify\(ident, \.\.\.\)"):
        wf.identify(g, [COBRA])
    with pytest.raises(TypeError, match=r"identify takes an Identifier, not a Gallery: ident = open_identifier"):
        wf.identify(ident.gallery, [COBRA])
    with pytest.raises(TypeError, match="search takes an Identifier, not a folder"):
        wf.search(g, COBRA)
    with pytest.raises(TypeError, match="evaluate_dataset takes an Identifier, not a folder"):
        wf.evaluate_dataset(g, "folder", tmp_path, report_dir=tmp_path / "r")
    with pytest.raises(TypeError, match=rf"add_photos takes an open Gallery, not a folder: gallery, encoder = "
                                        rf"open_gallery\('{re.escape(g)}'\)"):
        wf.add_photos(g, ident.encoder, "Naja samarensis", [COBRA])
    with pytest.raises(TypeError, match=r"add_photos takes a Gallery, not an Identifier: pass ident.gallery"):
        wf.add_photos(ident, ident.encoder, "Naja samarensis", [COBRA])
    with pytest.raises(TypeError, match=rf"train_gallery_probe takes the gallery's folder \(a str or Path\), not a "
                                        rf"Gallery: pass its folder: train_gallery_probe\('{re.escape(g)}'\)"):
        wf.train_gallery_probe(ident.gallery, progress=False)
    with pytest.raises(TypeError, match=r"open_gallery's encoder is an EncoderConfig, not a str: pass "
                                        r"encoder=EncoderConfig\(spec='timm:x'\)"):
        wf.open_gallery(g, "timm:x")
    with pytest.raises(TypeError, match=r"open_identifier takes the gallery's folder"):
        wf.open_identifier(ident)
    with pytest.raises(TypeError, match=r"build_gallery's encoder is an EncoderConfig, not a str"):
        wf.build_gallery(tmp_path / "new", "folder", tmp_path, encoder="timm:x")
    assert not (tmp_path / "new").exists()
    for func in (wf.restore_gallery_probe, wf.publish_gallery_probe, wf.withdraw_gallery_probe, wf.compact_gallery,
                 wf.restore_exclusions):
        with pytest.raises(TypeError, match=rf"{func.__name__} takes the gallery's folder \(a str or Path\), not an "
                                            rf"Identifier: pass its folder: {func.__name__}\('{re.escape(g)}'\)"):
            func(ident)
    with pytest.raises(TypeError, match="pass a Gallery, an Identifier or the gallery's folder .*not a int"):
        wf.list_species(3)
    assert [s.species for s in wf.list_species(ident)] == [s.species for s in wf.list_species(g)]


# ------------------------------------------------------------------------------ probe opened before it existed
def test_probe_method_without_a_probe_says_what_to_do_and_that_a_new_probe_needs_a_reopen(tmp_path_factory):
    folder = gallery_copy(tmp_path_factory, "late_probe")
    ident = wf.open_identifier(folder, EncoderConfig(precision="fp32"))
    f = re.escape(str(folder))
    with pytest.raises(ValueError, match=rf"no probe for this gallery: train one with 'speciesid probe train "
                                         rf"--index {f}' \(from Python: train_gallery_probe\('{f}'\)\), "
                                         "or use method knn"):
        wf.identify(ident, [COBRA], method="probe")
    (folder / PROBE_META).write_text("{}")  # a probe saved after the open: the Identifier does not reload it
    with pytest.raises(ValueError, match=rf"this Identifier has no probe, but gallery {f} has one now .*open "
                                         rf"it again with open_identifier\('{f}'\), or open it with "
                                         "follow_probe=True"):
        wf.identify(ident, [COBRA], method="probe")


# ------------------------------------------------------------------------------ reports leave pyplot alone
def test_a_report_leaves_the_process_matplotlib_backend_as_it_was(tmp_path):
    import matplotlib

    from retrieval.metrics import EvalItem, evaluate, write_report

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a notebook's own backend, as far as the report knows
    try:
        res = evaluate([EvalItem("A", {"A": 0.8, "B": 0.2}), EvalItem("B", {"A": 0.6, "B": 0.4})],
                       venomous={"A": True, "B": False})
        files = write_report(tmp_path, {"knn": res}, title="t")
        assert any(name.endswith(".png") for name in files)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_gallery_identifier_and_probe_print_short(ident):
    shown = repr(ident)
    assert shown.startswith("Identifier(") and str(ident.gallery.root) in shown and "references" in shown
    assert repr(ident.gallery).startswith("Gallery(") and len(repr(ident.gallery)) < 300
    probe = LinearProbe(species=["A", "B"], weight=np.ones((2, 512), np.float32), bias=np.zeros(2, np.float32),
                        fingerprint="x")
    shown = repr(probe)  # a ProbeResult prints its probe with it
    assert shown.startswith("LinearProbe(2 species, dim 512,") and "array" not in shown and len(shown) < 300
