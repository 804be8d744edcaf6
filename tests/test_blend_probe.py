"""Probe, open-world blend, country prior, settings selection and the zero-shot text prior."""

from __future__ import annotations

import numpy as np
import pytest

from index.layout import EncoderMismatchError
from index.store import SpeciesSummary
from retrieval.blend import apply_country, blend_knn_probe, mix_text_prior, text_weight
from retrieval.calibrate import SelectionGrid, blend_matrix, knn_matrix, select_settings
from retrieval.probe import LinearProbe, has_probe, train_probe


def test_blend_redistributes_only_the_mass_on_probe_species():
    knn = {"A a": 0.5, "B b": 0.2, "New n": 0.3}  # "New n" was added after the probe was trained
    probe = {"A a": 0.1, "B b": 0.9}
    out = blend_knn_probe(knn, probe, 0.5)
    mass = 0.7
    assert out["New n"] == pytest.approx(0.3)  # untouched: new species keep their kNN evidence
    assert out["A a"] == pytest.approx(0.5 * 0.5 + 0.5 * mass * 0.1)
    assert out["B b"] == pytest.approx(0.5 * 0.2 + 0.5 * mass * 0.9)
    assert sum(out.values()) == pytest.approx(1.0)
    assert blend_knn_probe(knn, probe, 0.0) == pytest.approx(knn)
    # a probe species the neighbours missed still gets some of the probe's share
    assert blend_knn_probe({"A a": 1.0}, {"A a": 0.5, "C c": 0.5}, 0.5)["C c"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="blend weight must be in"):
        blend_knn_probe(knn, probe, 1.5)


def test_matrix_blend_matches_dict_blend():
    knn = np.array([[0.5, 0.2, 0.3]])
    probe = np.array([[0.1, 0.9, 0.0]])
    known = np.array([True, True, False])
    b = blend_matrix(knn, probe, known, 0.5)[0]
    d = blend_knn_probe({"a": 0.5, "b": 0.2, "n": 0.3}, {"a": 0.1, "b": 0.9}, 0.5)
    assert b == pytest.approx([d["a"], d["b"], d["n"]])


def test_country_prior_and_text_mixing():
    scores = {"Naja haje": 0.5, "Naja philippinensis": 0.3, "Mystery m": 0.2}
    present = {"Naja haje": True, "Naja philippinensis": False}
    out = apply_country(scores, present)  # not recorded there: down-weighted (x0.1), not removed
    assert out["Naja philippinensis"] == pytest.approx(0.03 / 0.73)
    assert out["Naja haje"] == pytest.approx(0.5 / 0.73) and out["Mystery m"] == pytest.approx(0.2 / 0.73)
    assert apply_country(scores, present, absent_weight=0.0).keys() == {"Naja haje", "Mystery m"}
    weighted = apply_country(scores, present, absent_weight=0.5)
    assert weighted["Naja philippinensis"] == pytest.approx(0.15 / 0.85)
    all_absent = apply_country({"Naja philippinensis": 1.0}, present)
    assert all_absent == {"Naja philippinensis": 1.0}  # better an answer outside the range than none
    assert text_weight(0, 1.0) == 1.0 and text_weight(70, 1.0) == pytest.approx(1 / 71)
    assert text_weight(10, 0.0) == 0.0
    mixed = mix_text_prior({"A a": 1.0}, {"A a": 0.5, "C c": 0.5}, 0.2)
    assert mixed == pytest.approx({"A a": 0.9, "C c": 0.1})


def _clusters(n_per: int, n_cls: int, dim: int = 24, noise: float = 0.6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_cls, dim))
    x = np.concatenate([c + noise * rng.standard_normal((n_per, dim)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [f"Genus s{i}" for i in range(n_cls) for _ in range(n_per)]
    return x.astype(np.float32), labels


def test_probe_trains_saves_loads_and_refuses_other_encoders(tmp_path):
    x, y = _clusters(30, 4)
    probe = train_probe(x, y, fingerprint="enc#1", C=10.0)
    assert probe.species == sorted(set(y)) and probe.weight.shape == (4, 24)
    acc = np.mean([max(s, key=s.get) == t for s, t in zip(probe.scores(x), y, strict=True)])
    assert acc > 0.95
    np.testing.assert_allclose(probe.predict_proba(x).sum(1), 1.0, rtol=1e-5)
    probe.save(tmp_path)
    assert has_probe(tmp_path)
    loaded = LinearProbe.load(tmp_path, expected_fingerprint="enc#1")
    np.testing.assert_allclose(loaded.predict_proba(x), probe.predict_proba(x), rtol=1e-6)
    with pytest.raises(EncoderMismatchError, match=r"built with encoder 'enc' \(fingerprint enc#1\), not with the encoder given \(other#2\)"):
        LinearProbe.load(tmp_path, expected_fingerprint="other#2")
    with pytest.raises(EncoderMismatchError, match=r"but the weights that spec names have changed since \(now enc#3\)"):
        LinearProbe.load(tmp_path, expected_fingerprint="enc#3")  # the same spec, its weights replaced
    with pytest.raises(FileNotFoundError, match="speciesid probe train"):
        LinearProbe.load(tmp_path / "none")
    with pytest.raises(ValueError, match="at least 2 species"):
        train_probe(x[:5], ["Genus s0"] * 5, fingerprint="enc#1")


def test_binary_probe_is_a_proper_softmax():
    x, y = _clusters(20, 2)
    probe = train_probe(x, y, fingerprint="f", C=10.0)
    assert probe.weight.shape[0] == 2
    acc = np.mean([max(s, key=s.get) == t for s, t in zip(probe.scores(x), y, strict=True)])
    assert acc > 0.95


def test_select_settings_by_cv_returns_a_grid_point_and_a_calibrated_threshold():
    x, y = _clusters(12, 5, noise=1.2, seed=3)
    grid = SelectionGrid(Cs=(1.0, 10.0), ks=(3, 9), temperatures=(0.05,), weights=(0.0, 0.5, 1.0))
    s = select_settings(x, y, fingerprint="f", folds=3, grid=grid, rule="argmax")
    assert s.selected_on == "cv:3-fold" and s.rule == "argmax"
    assert s.C in grid.Cs and s.k in grid.ks and s.blend_weight in grid.weights
    assert s.metrics["queries"] == 60
    assert s.metrics["blend_top1"] >= max(s.metrics["knn_top1"], s.metrics["probe_top1"]) - 1e-9
    assert 0.0 <= s.unknown_threshold <= 1.0


def test_knn_matrix_matches_hand_vote():
    refs = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 1, 1])
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    m = knn_matrix(q, refs, labels, 2, k=2, temperature=0.1)[0]
    w0, w1 = 1.0, np.exp((0.8 - 1.0) / 0.1)
    assert m == pytest.approx([w0 / (w0 + w1), w1 / (w0 + w1)])


# ------------------------------------------------------------------ text prior (tiny local CLIP)
def test_text_prior_ensembles_caches_and_predicts_photo_less_species(tiny_clip_dir, tmp_path, monkeypatch):
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.encoders import create_encoder
    from retrieval.identify import Identifier
    from retrieval.textprior import TEMPLATES, build_text_prior, prompts_for
    from retrieval.zeroshot import class_embeddings

    enc = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", precision="fp32")
    taxa = [
        SpeciesSummary("Naja haje", "Naja", "Elapidae", "Egyptian cobra", True, 1),
        SpeciesSummary("Natrix maura", "Natrix", "Natricidae", None, False, 1),
        SpeciesSummary("Vipera monticola", "Vipera", "Viperidae", "Atlas viper", True, 0),  # no photos
    ]
    prompts = prompts_for(taxa[0])
    assert len(prompts) == 3 * len(TEMPLATES)
    assert "a photo of Egyptian cobra (Naja haje)." in prompts and "a photo of Elapidae Naja haje." in prompts
    emb = class_embeddings(enc, [prompts])[0]
    manual = enc.encode_text(prompts).mean(0)
    np.testing.assert_allclose(emb, manual / np.linalg.norm(manual), atol=1e-5)

    cache = tmp_path / "cache"
    prior = build_text_prior(enc, taxa, cache, strength=1000.0)
    assert len(list(cache.glob("*.npy"))) == 1
    monkeypatch.setattr(enc, "encode_text", lambda texts: (_ for _ in ()).throw(AssertionError("not cached")))
    again = build_text_prior(enc, taxa, cache, strength=1000.0)  # served from the cache
    np.testing.assert_array_equal(again.embeddings, prior.embeddings)
    monkeypatch.undo()

    gallery = Gallery.create(tmp_path / "g", enc.describe())
    rng = np.random.default_rng(0)
    photos = rng.standard_normal((2, enc.dim)).astype(np.float32)
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    recs = [ReferenceRecord(path=f"/p/{i}.jpg", species=t.species, family=t.family, venomous=t.venomous)
            for i, t in enumerate(taxa[:2])]
    gallery.add(recs, ["d0", "d1"], photos)
    ident = Identifier(enc, gallery, text_prior=prior)
    viper_text = prior.embeddings[prior.species.index("Vipera monticola")]
    answer = ident.identify_embeddings(viper_text[None], top=3)[0]
    top = answer.predictions[0]
    assert top.species == "Vipera monticola" and top.family == "Viperidae" and top.venomous is True
    assert top.common_name == "Atlas viper"
    assert sum(answer.scores.values()) == pytest.approx(1.0)


# ------------------------------------------------------------------ probe train: bad input refused before any work
def _noise_gallery(tmp_path, spec: str):
    """A fp32 gallery of two species, three random photos each, built with ``spec``."""
    from PIL import Image

    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery

    rng = np.random.default_rng(0)
    for species in ("Naja haje", "Natrix maura"):
        (tmp_path / "photos" / species).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / species / f"{i}.png")
    index = tmp_path / "g"
    build_gallery(index, "folder", tmp_path / "photos", encoder=EncoderConfig(spec=spec, precision="fp32"),
                  progress=False)
    return index


def _gallery_files(index) -> dict[str, bytes]:
    return {str(p.relative_to(index)): p.read_bytes() for p in sorted(index.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("encoder", ["image-only", "clip"])
def test_probe_train_refuses_bad_input_before_any_work_and_leaves_the_gallery(encoder, tiny_clip_dir, tmp_path,
                                                                               monkeypatch, capsys):
    """A checklist that cannot be read, a --checklist on an image-only encoder (no text prior can take it) and a
    negative --text-strength are refused before the settings are chosen, with the earlier probe left in place."""
    import retrieval.calibrate
    from api.cli import main
    from retrieval.probe import Calibration

    spec = "timm:test_vit@random" if encoder == "image-only" else f"open_clip:local-dir:{tiny_clip_dir}"
    index = _noise_gallery(tmp_path, spec)
    monkeypatch.setattr(retrieval.calibrate, "select_settings", lambda *a, **k: Calibration(C=1.0))
    assert main(["probe", "train", "--index", str(index), "--precision", "fp32", "-q"]) == 0  # an earlier probe
    capsys.readouterr()
    before = _gallery_files(index)
    assert "probe.json" in before

    def no_work(*a, **k):
        raise AssertionError("the settings were chosen before the input was checked")

    monkeypatch.setattr(retrieval.calibrate, "select_settings", no_work)
    refusals = [(["--checklist", str(tmp_path / "nosuch.txt")], "is neither 'moroccan' nor a readable text file"),
                (["--text-strength", "-1"], "argument --text-strength: '-1' is not a number of at least 0; see "
                 "'speciesid probe train --help'")]  # refused by the parser
    if encoder == "image-only":
        refusals.append((["--checklist", "moroccan"], "--checklist adds species to the text prior, which needs an "
                         "encoder that reads text (a CLIP-style encoder such as bioclip)"))
    for extra, message in refusals:
        try:
            code = main(["probe", "train", "--index", str(index), "--precision", "fp32", "-q", *extra])
        except SystemExit as stop:  # the parser's refusal exits as argparse does
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert _gallery_files(index) == before, extra
    if encoder == "clip":  # a readable checklist on a text encoder: the prior takes its species (ours are in it)
        monkeypatch.setattr(retrieval.calibrate, "select_settings", lambda *a, **k: Calibration(C=1.0))
        code = main(["probe", "train", "--index", str(index), "--precision", "fp32", "-q",
                     "--checklist", "moroccan"])
        out = capsys.readouterr().out
        assert code == 0 and "text prior: 26 species (gallery + checklist)" in out, out


# ------------------------------------------------------------------ the probe's calibration is what answers use
def test_answers_use_the_probes_calibrated_unknown_threshold_and_blend_weight(tmp_path):
    """An Identifier with a probe answers with the probe's calibration, not the defaults: its blend weight (0.8 here,
    not 0.5) and its UNKNOWN threshold (0.8, not the default 0.56): a 0.72 answer is UNKNOWN (walk s55, M49/M50)."""
    from _cli_support import DIM, ENC, FakeEncoder

    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.identify import Identifier
    from retrieval.probe import Calibration
    from retrieval.vote import VoteConfig

    harmless, venomous = "Natrix maura", "Naja haje"
    rng = np.random.default_rng(0)
    g = Gallery.create(tmp_path / "g", ENC)
    centres = {s: rng.standard_normal(DIM) for s in (harmless, venomous)}
    for s in (harmless, venomous):
        x = centres[s] + 0.3 * rng.standard_normal((10, DIM))
        g.add([ReferenceRecord(path=f"/p/{s[:4]}{i}.jpg", species=s) for i in range(10)],
              [f"{s}-{i}" for i in range(10)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    species = sorted(centres)
    probs = np.array([0.1 if s == harmless else 0.9 for s in species])  # the probe: 10 % harmless, whatever the photo
    probe = LinearProbe(species=species, weight=np.zeros((2, DIM), np.float32), bias=np.log(probs).astype(np.float32),
                        fingerprint=ENC["fingerprint"], trained_on=len(g),
                        calibration=Calibration(blend_weight=0.8, k=5, temperature=0.03, unknown_threshold=0.8),
                        reference_ids=np.sort(np.asarray(g.index.ids, dtype=np.int64)))
    ident = Identifier(FakeEncoder(), g, probe=probe)
    q = (centres[harmless] / np.linalg.norm(centres[harmless]))[None]
    (answer,) = ident.identify_embeddings(q)
    # kNN: all harmless; blend 0.2 * 1.0 + 0.8 * 0.1 = 0.28 harmless, 0.72 venomous: under 0.8, so UNKNOWN
    assert answer.scores == pytest.approx({harmless: 0.28, venomous: 0.72}, abs=1e-3)
    assert answer.predictions[0].species == venomous and answer.unknown
    assert ident.config == VoteConfig(k=5, temperature=0.03, unknown_threshold=0.8) and ident.blend_weight == 0.8
    ident.config = VoteConfig(k=5, temperature=0.03, unknown_threshold=0.7)  # a caller's own settings still win
    assert not ident.identify_embeddings(q)[0].unknown
