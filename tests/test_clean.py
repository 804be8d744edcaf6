"""Zero-shot cleaning, duplicates and leakage (``retrieval.clean`` and ``speciesid clean``).

Mechanics with a tiny random local open_clip (prompt files, ensembling, thresholds, apply/restore on a
small gallery) and a random image-only timm model; then the real leakage check on the shared ph-snakes
photos with the real MobileNetV1 weights.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import MOBILENET_SPEC, PH_SNAKES, needs_shared
from PIL import Image

from api.cli import main
from index.pairs import similar_pairs
from retrieval.clean_report import CSV_COLUMNS
from retrieval.findings import (
    CleanConfig,
    PhotoSet,
    ZeroShotResult,
    find_issues,
    off_target_probability,
)
from retrieval.prompts import DEFAULT_TEMPLATES, load_prompts, parse_prompts, taxon_group
from retrieval.zeroshot import class_embeddings, zero_shot_probabilities

IMAGE_ONLY = "timm:test_vit@random"  # a tiny random timm ViT: no text tower, no download


def _noise(path: Path, seed: int, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _photos(root: Path, per_species: int = 4) -> list[Path]:
    """Two species folders of distinct random photos (sorted like the folder loader sorts them)."""
    out = []
    for s, name in enumerate(("Naja haje", "Natrix maura")):
        for i in range(per_species):
            out.append(_noise(root / name / f"{i}.png", seed=100 * s + i))
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------ prompt files
PROMPTS = """
# comment
[templates]
a photo of {}.
a blurry photo of {}.   # trailing comment
[target]
a snake
a coiled snake
[off-target: drawing]
a drawing of a snake
"""


def test_prompt_file_parsing_and_errors():
    ps = parse_prompts(PROMPTS, "p.txt")
    assert ps.names == ["target", "drawing"] and ps.target_mask.tolist() == [True, False]
    assert ps.templates == ("a photo of {}.", "a blurry photo of {}.")
    assert ps.prompts(ps.classes[0]) == [
        "a photo of a snake.", "a blurry photo of a snake.", "a photo of a coiled snake.",
        "a blurry photo of a coiled snake.",
    ]
    assert parse_prompts("[target: snake]\na snake\n[off-target: map]\na map\n").templates == DEFAULT_TEMPLATES
    for text, msg in (
        ("a snake\n[target]\nx\n[off-target: d]\ny", "before any"),
        ("[target]\na snake\n", "no [off-target"),
        ("[off-target: map]\na map\n", "no [target]"),
        ("[target]\nx\n[off-target]\ny", "needs a name"),
        ("[templates]\nno placeholder\n[target]\nx\n[off-target: d]\ny", "exactly one {}"),
        ("[animals]\nx", "unknown section"),
        ("[target]\n[off-target: d]\ny", "without phrases"),
    ):
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("{", r"\{").replace("}", r"\}")):
            parse_prompts(text, "bad.txt")


def test_shipped_prompt_files_cover_the_off_target_kinds():
    for group in ("snakes", "animals"):
        ps = load_prompts(group)
        off = {c.name for c in ps.classes if not c.target}
        assert {"drawing", "map", "text or label", "skeleton", "preserved specimen", "egg", "person",
                "empty scene"} <= off
        assert any(c.target for c in ps.classes)
    assert "shed skin" in {c.name for c in load_prompts("snakes").classes}
    assert load_prompts("snakes").classes[0].phrases[0] == "a snake"
    with pytest.raises(ValueError, match="snakes, animals"):
        load_prompts("no-such-group")
    from retrieval.findings import CleanConfig

    with pytest.raises(ValueError, match="prompt file '/no/such.txt' not found"):  # at once, whatever the encoder
        CleanConfig(prompts="/no/such.txt")
    assert CleanConfig(prompts="/no/such.txt", zero_shot=False).prompts  # --no-zero-shot reads no prompts


def test_taxon_group_from_the_dataset():
    assert taxon_group("moroccan", []) == "snakes"
    assert taxon_group("snakeclef2021", ["Anything"]) == "snakes"
    assert taxon_group("folder", ["Naja philippinensis", "Lycodon capucinus", "cats"]) == "snakes"
    assert taxon_group("folder", ["cats", "dogs"]) == "animals"
    assert taxon_group("rare-species", ["Panthera leo", "Ara macao"]) == "animals"


def test_class_embedding_is_the_normalised_mean_of_its_template_prompts(tiny_clip_dir, tmp_path, monkeypatch):
    from retrieval.encoders import create_encoder
    from retrieval.zeroshot import cached_class_embeddings

    enc = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", precision="fp32")
    ps = parse_prompts(PROMPTS)
    emb = class_embeddings(enc, ps.class_prompts())
    assert emb.shape == (2, enc.dim)
    for i, cls in enumerate(ps.classes):
        manual = enc.encode_text(ps.prompts(cls)).mean(axis=0)
        np.testing.assert_allclose(emb[i], manual / np.linalg.norm(manual), atol=1e-5)
    assert not np.allclose(emb[0], emb[1])
    cached = cached_class_embeddings(enc, ps.class_prompts(), tmp_path / "cache")
    np.testing.assert_allclose(cached, emb, atol=1e-6)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    monkeypatch.setattr(enc, "encode_text", lambda texts: (_ for _ in ()).throw(AssertionError("not cached")))
    np.testing.assert_array_equal(cached_class_embeddings(enc, ps.class_prompts(), tmp_path / "cache"), cached)


# ------------------------------------------------------------------ scoring and thresholds
def test_zero_shot_probabilities_and_threshold_with_controlled_embeddings():
    classes = np.eye(3, dtype=np.float32)  # target, off-target A, off-target B
    images = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0], [0.8, 0, 0.6]], dtype=np.float32)
    probs = zero_shot_probabilities(images, classes, logit_scale=10.0)
    logits = 10.0 * images @ classes.T
    manual = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(probs, manual, rtol=1e-5)
    mask = np.array([True, False, False])
    off = off_target_probability(probs, mask)
    np.testing.assert_allclose(off, manual[:, 1:].sum(1), rtol=1e-5)
    assert off[0] < 0.01 and off[1] > 0.99  # a pure target photo, a pure off-target one

    ps = parse_prompts("[target: snake]\na\n[off-target: drawing]\nb\n[off-target: map]\nc\n")
    photos = PhotoSet([f"/p/{i}.jpg" for i in range(4)], [f"sha{i}" for i in range(4)], images,
                      [None] * 4, [10, 11, 12, 13])
    zs = ZeroShotResult(prompts=ps, probs=probs, off_target=off, logit_scale=10.0)

    def flagged(threshold: float) -> dict[str, float]:
        found = find_issues(photos, zero_shot=zs, threshold=threshold, duplicates=False)
        return {f.path: f.score for f in found if f.kind == "off-target"}

    assert flagged(0.5) == {"/p/1.jpg": pytest.approx(off[1]), "/p/2.jpg": pytest.approx(off[2])}
    assert set(flagged(float(off[2]))) == {"/p/1.jpg", "/p/2.jpg"}  # >= threshold is flagged
    assert set(flagged(float(off[2]) + 1e-4)) == {"/p/1.jpg"}
    # photo 3 reaches its own off-target sum, but its most likely class is the target: not flagged
    assert set(flagged(float(off[3]))) == {"/p/1.jpg", "/p/2.jpg"}
    top = find_issues(photos, zero_shot=zs, threshold=0.5, duplicates=False)[0]
    assert top.path == "/p/1.jpg" and top.reference_id == 11 and top.detail.startswith("drawing 1.00")


def test_a_photo_the_prompts_say_nothing_about_is_not_off_target():
    """The off-target sum grows with the number of off-target classes: with 9 of them to 1 target, a photo equally
    like every class sums to 0.9, and one whose best class is the target can still sum past 0.5. Neither is flagged."""
    classes = np.eye(10, dtype=np.float32)  # class 0 the target, 1-9 off-target
    images = np.zeros((3, 11), dtype=np.float32)
    images[0, 10] = 1.0  # equally far from every class
    images[1, :10] = [0.4] + [0.3] * 9  # the target is its best class
    images[2, :10] = [0.2, 0.9] + [0.1] * 8  # a drawing
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    probs = zero_shot_probabilities(images, np.pad(classes, ((0, 0), (0, 1))), logit_scale=10.0)
    mask = np.arange(10) == 0
    off = off_target_probability(probs, mask)
    assert off[0] == pytest.approx(0.9, abs=1e-5) and off[1] > 0.5  # both past the threshold by the sum alone
    names = "".join(f"[off-target: c{i}]\nx\n" for i in range(1, 10))
    ps = parse_prompts("[target: snake]\na\n" + names)
    photos = PhotoSet([f"/p/{i}.jpg" for i in range(3)], [f"sha{i}" for i in range(3)], images, [None] * 3, [0, 1, 2])
    zs = ZeroShotResult(prompts=ps, probs=probs, off_target=off, logit_scale=10.0)
    found = find_issues(photos, zero_shot=zs, threshold=0.5, duplicates=False)
    assert [f.path for f in found if f.kind == "off-target"] == ["/p/2.jpg"]


def test_similar_pairs_within_and_across_sets():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 16)).astype(np.float32)
    a[4] = a[1] + 0.05 * rng.standard_normal(16)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    within = similar_pairs(a, threshold=0.95)
    assert [(i, j) for i, j, _ in within] == [(1, 4)] and within[0][2] == pytest.approx(float(a[1] @ a[4]))
    b = np.stack([a[2], -a[0], a[4]])
    across = similar_pairs(b, a, threshold=0.95)
    assert {(i, j) for i, j, _ in across} == {(0, 2), (2, 4), (2, 1)}
    assert all(s >= 0.95 for _, _, s in across) and similar_pairs(b, a, threshold=1.01) == []


# ------------------------------------------------------------------ apply / restore on a gallery
def _stub_classes(monkeypatch, off_target_emb: np.ndarray, target_emb: np.ndarray) -> None:
    import retrieval.findings as rc

    monkeypatch.setattr(rc, "cached_class_embeddings",
                        lambda enc, classes, cache_dir, progress=False: np.stack([target_emb, off_target_emb]))


def test_apply_excludes_from_search_and_probe_then_restore(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    from index.exclusions import excluded_ids
    from index.gallery import Gallery
    from index.layout import CLEAN_LOG
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery, clean, train_gallery_probe

    spec = f"open_clip:local-dir:{tiny_clip_dir}"
    paths = _photos(tmp_path / "photos")
    index = tmp_path / "g"
    built = build_gallery(index, "folder", tmp_path / "photos", encoder=EncoderConfig(spec=spec, precision="fp32"),
                          progress=False)
    g = built.gallery
    ids, vectors = g.store.vectors()
    meta = g.store.metadata(ids)
    by_path = {meta.at[int(i), "source_path"]: (int(i), vectors[n]) for n, i in enumerate(ids)}
    bad_id, bad_emb = by_path[str(paths[5])]
    others = np.stack([v for p, (_, v) in by_path.items() if p != str(paths[5])])
    centroid = others.mean(0) / np.linalg.norm(others.mean(0))
    _stub_classes(monkeypatch, bad_emb, centroid)

    def expected(scale: float) -> np.ndarray:  # softmax(scale * cos) over [target centroid, off-target photo 5]
        logits = scale * vectors @ np.stack([centroid, bad_emb]).T
        return np.exp(logits[:, 1]) / np.exp(logits).sum(1)

    p = expected(100.0 / 7.0)  # the random tiny model's logit scale: open_clip's initial exp(log(1 / 0.07))
    assert int(np.argmax(p)) == list(ids).index(bad_id)
    threshold = float((np.sort(p)[-1] + np.sort(p)[-2]) / 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("[target: snake]\na snake\n[off-target: drawing]\na drawing of a snake\n")

    # report only: scores match the formula, nothing excluded
    res = clean(index=index, config=CleanConfig(prompts=str(prompts), threshold=threshold),
                report_dir=tmp_path / "r0", progress=False)
    assert res.photos.embedded == 0  # the gallery's stored embeddings were reused
    order = [res.photos.ids.index(int(i)) for i in ids]
    assert res.zero_shot.logit_scale == pytest.approx(100.0 / 7.0, rel=0.01)  # bf16 rounds it a little
    np.testing.assert_allclose(res.zero_shot.off_target[order], expected(res.zero_shot.logit_scale), atol=1e-5)
    assert [f.reference_id for f in res.findings if f.kind == "off-target"] == [bad_id]
    assert res.counts()["near-duplicate"] > 0  # a random model finds everything alike: --apply-to ignores it
    assert excluded_ids(Gallery.open(index)) == []

    # --apply through the CLI: excluded from search, species counts and probe training
    code, out, _ = _run(capsys, "clean", "--index", index, "--prompts", prompts, "--threshold", threshold,
                        "--report", tmp_path / "r1", "--apply", "--quiet")
    assert code == 0 and "applied: 1 references excluded" in out, out
    g = Gallery.open(index)
    assert excluded_ids(g) == [bad_id] and len(g) == 7
    assert bad_id not in [n.id for n in g.search(bad_emb[None], 8)[0]]
    assert {s.species: s.count for s in g.species()} == {"Naja haje": 4, "Natrix maura": 3}
    assert g.store.count(include_excluded=True) == 8  # nothing deleted
    from retrieval.probe import Calibration

    monkeypatch.setattr("retrieval.calibrate.select_settings", lambda *a, **k: Calibration(C=1.0))
    assert train_gallery_probe(index, progress=False).probe.trained_on == 7
    # a second run finds the same photo, already excluded: nothing new logged
    code, out, _ = _run(capsys, "clean", "--index", index, "--prompts", prompts, "--threshold", threshold,
                        "--report", tmp_path / "r2", "--apply", "--quiet")
    assert "applied: 0 references excluded (1 already excluded" in out

    # --restore: back in search
    code, out, _ = _run(capsys, "clean", "--restore", "--index", index)
    assert code == 0 and "restored 1 references" in out
    g = Gallery.open(index)
    assert excluded_ids(g) == [] and len(g) == 8
    assert g.search(bad_emb[None], 1)[0][0].id == bad_id
    code, _, err = _run(capsys, "clean", "--restore", "--index", index)
    assert code == 2 and "no clean run to restore" in err
    assert (index / CLEAN_LOG).is_file()

    # a dataset + the gallery: findings map to references by sha256; --restore all clears everything
    res = clean(dataset="folder", root=tmp_path / "photos", index=index, apply=True,
                config=CleanConfig(prompts=str(prompts), threshold=threshold), progress=False)
    assert res.applied.excluded == [bad_id] and res.photos.embedded == 0
    g = Gallery.open(index)
    g.set_excluded([by_path[str(paths[0])][0]], True)  # excluded by someone else
    code, out, _ = _run(capsys, "clean", "--restore", "all", "--index", index)
    assert "restored 2 references" in out and len(Gallery.open(index)) == 8


def test_index_build_clean_excludes_during_the_build(tiny_clip_dir, tmp_path, capsys):
    from index.gallery import Gallery

    _photos(tmp_path / "photos", per_species=2)
    index = tmp_path / "g"
    # threshold 1e-6 with every photo's best class off-target: all four are flagged, but no species is emptied
    import retrieval.findings as rc

    mp = pytest.MonkeyPatch()
    mp.setattr(rc, "top_class_off_target", lambda probs, mask: np.ones(len(probs), dtype=bool))
    try:
        code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", tmp_path / "photos",
                              "--index", index, "--encoder", f"open_clip:local-dir:{tiny_clip_dir}", "--precision",
                              "fp32", "--clean", "--prompts", "snakes", "--clean-threshold", "1e-6", "--quiet")
    finally:
        mp.undo()
    assert code == 0, err
    assert "off-target (p >= 1e-06, prompts" in out and "snakes.txt): 4 of 4 photos" in out
    assert "applied: 2 references excluded" in out and "kept: every reference of Naja haje, Natrix maura" in out
    g = Gallery.open(index)
    assert len(g) == 2 and {s.species for s in g.store.species()} == {"Naja haje", "Natrix maura"}
    assert (index / "clean-report" / "findings.csv").is_file()
    summary = json.loads((index / "clean-report" / "summary.json").read_text())
    assert summary["applied"]["kept_last"] == ["Naja haje", "Natrix maura"] and summary["seconds_report"] >= 0
    code, out, _ = _run(capsys, "clean", "--restore", "--index", index)
    assert "restored 2 references" in out and len(Gallery.open(index)) == 4


# ------------------------------------------------------- image-only encoder, duplicates, CSV, errors
def test_image_only_encoder_skips_zero_shot_but_finds_duplicates_and_leaks(tmp_path, capsys):
    paths = _photos(tmp_path / "photos", per_species=3)
    (tmp_path / "photos" / "Naja haje" / "copy.png").write_bytes(paths[0].read_bytes())  # same bytes
    twin = tmp_path / "photos" / "Natrix maura" / "resaved.png"
    Image.open(paths[4]).save(twin, pnginfo=_png_text("re-saved"))  # same pixels, other bytes
    (tmp_path / "photos" / "Natrix maura" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    val = tmp_path / "val"
    (val / "x").mkdir(parents=True)
    (val / "x" / "leaked.png").write_bytes(paths[2].read_bytes())
    Image.open(paths[3]).save(val / "x" / "near.png", pnginfo=_png_text("other bytes"))
    _noise(val / "x" / "new.png", seed=999)

    code, out, _ = _run(capsys, "clean", "--dataset", "folder", "--root", tmp_path / "photos", "--against", val,
                        "--encoder", IMAGE_ONLY, "--precision", "fp32", "--dup-threshold", "0.999",
                        "--report", tmp_path / "report", "--no-suspect-labels", "--quiet")  # random features
    assert code == 0, out
    assert "zero-shot filter skipped: encoder timm:test_vit@random is image-only" in out
    assert "duplicates: 1 same bytes, 1 near" in out and "leaks: 1 same bytes, 1 near-identical" in out
    rows = _read_csv(tmp_path / "report" / "findings.csv")
    assert tuple(rows[0].keys()) == CSV_COLUMNS == (
        "kind", "score", "path", "paired_path", "detail", "reference_id", "paired_reference_id", "suggested_species")
    found = {(r["kind"], Path(r["path"]).name, Path(r["paired_path"]).name if r["paired_path"] else "") for r in rows}
    assert found == {
        ("leak", "2.png", "leaked.png"),
        ("near-leak", "0.png", "near.png"),  # near.png re-saves paths[3] = Natrix maura/0.png
        ("duplicate", "copy.png", "0.png"),
        ("near-duplicate", "resaved.png", "1.png"),
        ("unreadable", "broken.jpg", ""),
    }
    scores = {r["kind"]: r["score"] for r in rows}
    assert scores["leak"] == "1.0000" and float(scores["near-leak"]) >= 0.999 and scores["unreadable"] == ""
    sheet = (tmp_path / "report" / "contact_sheet.html").read_text()
    assert sheet.count("data:image/jpeg;base64,") >= 8 and "resaved.png" in sheet and "Leaks" in sheet
    assert not (tmp_path / "report" / "zero_shot_scores.csv").exists()


def test_label_conflicts_unreadable_pairs_and_a_reused_report_folder(tmp_path, capsys):
    """The same photo under two species is a label conflict (not a duplicate an --apply would resolve by age);
    two empty files are unreadable, not copies of each other; a report folder holds one run's files."""
    paths = _photos(tmp_path / "photos", per_species=2)
    (tmp_path / "photos" / "Natrix maura" / "filed-twice.png").write_bytes(paths[0].read_bytes())  # Naja haje's
    for name in ("empty1.jpg", "empty2.jpg"):
        (tmp_path / "photos" / "Naja haje" / name).write_bytes(b"")
    report = tmp_path / "report"
    (report).mkdir()
    (report / "zero_shot_scores.csv").write_text("path,off_target\nold run,0.9\n")  # an earlier run's
    code, out, _ = _run(capsys, "clean", "--dataset", "folder", "--root", tmp_path / "photos", "--encoder",
                        IMAGE_ONLY, "--precision", "fp32", "--dup-threshold", "0.999", "--report", report, "--quiet")
    assert code == 0, out
    assert "label conflicts: 1 pair of photos filed under two species" in out and "duplicates: 0 same bytes, 0 near" in out
    rows = _read_csv(report / "findings.csv")
    assert sorted((r["kind"], Path(r["path"]).name) for r in rows) == [
        ("label-conflict", "filed-twice.png"), ("unreadable", "empty1.jpg"), ("unreadable", "empty2.jpg")]
    conflict = rows[0]
    assert "labelled Natrix maura here, Naja haje there" in conflict["detail"]
    assert not (report / "zero_shot_scores.csv").exists()  # not this run's: gone
    assert "seconds_report" in json.loads((report / "summary.json").read_text())


def test_broken_links_are_listed_as_unreadable_in_the_report(tmp_path, capsys):
    """A broken link among the photos (of the set, of --against, or a whole class folder) is an unreadable finding
    of the report and named in the summary: nothing the photo search skipped is lost silently."""
    _photos(tmp_path / "photos", per_species=2)
    (tmp_path / "photos" / "Naja haje" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "photos" / "Vipera latastei").symlink_to(tmp_path / "unmounted")
    _noise(tmp_path / "val" / "x" / "new.png", seed=7)
    (tmp_path / "val" / "x" / "dangling-val.png").symlink_to(tmp_path / "gone.png")
    report = tmp_path / "report"
    code, out, _ = _run(capsys, "clean", "--dataset", "folder", "--root", tmp_path / "photos", "--against",
                        tmp_path / "val", "--encoder", IMAGE_ONLY, "--precision", "fp32", "--report", report,
                        "--quiet")
    assert code == 0, out
    assert "unreadable: 3 (3 skipped by the photo search, e.g. broken links: " in out and "dangling.jpg" in out
    rows = {Path(r["path"]).name: r for r in _read_csv(report / "findings.csv") if r["kind"] == "unreadable"}
    assert sorted(rows) == ["Vipera latastei", "dangling-val.png", "dangling.jpg"]
    assert rows["dangling.jpg"]["detail"] == "broken symbolic link (its target does not exist)"
    assert rows["dangling-val.png"]["detail"] == "against: broken symbolic link (its target does not exist)"
    assert json.loads((report / "summary.json").read_text())["counts"]["unreadable"] == 3
    assert "dangling.jpg" in (report / "contact_sheet.html").read_text()


def test_files_of_the_against_folder_that_are_not_photos_are_named(tmp_path, capsys, caplog):
    """Walkthrough s48 #1: a file of --against that is not a photo is named in a warning, not dropped silently (its
    photos, a .jfif among them, are read as every photo search reads them: tests/test_photos.py)."""
    import logging

    _photos(tmp_path / "photos", per_species=2)
    _noise(tmp_path / "val" / "x" / "a.png", seed=7)
    Image.open(tmp_path / "val" / "x" / "a.png").save(tmp_path / "val" / "b.jfif", format="JPEG")
    (tmp_path / "val" / "notes.txt").write_text("not a photo")
    caplog.set_level(logging.WARNING, logger="retrieval.clean")
    code, out, _ = _run(capsys, "clean", "--dataset", "folder", "--root", tmp_path / "photos", "--against",
                        tmp_path / "val", "--encoder", IMAGE_ONLY, "--precision", "fp32", "--report",
                        tmp_path / "report", "--quiet")
    assert code == 0, out
    said = [r.getMessage() for r in caplog.records if r.name == "retrieval.clean"]
    assert any(m.startswith(f"skipped 1 file that is not a photo under {tmp_path / 'val'}: notes.txt. ") for m in said)


def test_apply_keeps_chains_of_look_alikes_and_never_resolves_label_conflicts(tmp_path):
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.clean import apply_exclusions
    from retrieval.findings import Finding

    g = Gallery.create(tmp_path / "g", {"spec": "test:x", "fingerprint": "test:x#1", "dim": 4})
    x = np.eye(4, dtype=np.float32)[[0, 0, 0, 1, 2, 2]]
    ids = g.add([ReferenceRecord(path=f"/p/{i}.jpg", species=s) for i, s in
                 enumerate(["A a", "A a", "A a", "B b", "C c", "C c"])], [f"d{i}" for i in range(6)], x)
    a0, a1, a2, b0, c0, c1 = ids

    def near(i: int, j: int, kind: str = "near-duplicate") -> Finding:
        return Finding(kind, 0.96, f"/p/{i}.jpg", f"/p/{j}.jpg", "", i, j)

    # a chain a0 ~ a1 ~ a2 where a0 and a2 are not copies of each other: only a1 (a copy of the kept a0) goes
    done = apply_exclusions(g, [near(a1, a0), near(a2, a1), near(b0, c0, "label-conflict")],
                            ("duplicate", "near-duplicate"))
    assert done.excluded == [a1] and done.kept_last == []
    # every reference of C c flagged (off-target): the oldest stays, so the species stays searchable
    off = [Finding("off-target", 0.9, f"/p/{i}.jpg", reference_id=i) for i in (c1, c0)]
    done = apply_exclusions(g, off, ("off-target",))
    assert done.excluded == [c1] and done.kept_last == ["C c"]
    assert {s.species: s.count for s in g.store.species()} == {"A a": 2, "B b": 1, "C c": 1}


# ------------------------------------------------------------------------------ suspect labels
def _clusters(per_species: int = 8, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Three species, each a cluster of unit vectors around its own random centre (cosine ~0.75 within)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, dim))
    x = np.concatenate([c + 0.6 * rng.standard_normal((per_species, dim)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [s for s in ("A a", "B b", "C c") for _ in range(per_species)]


def _set(x: np.ndarray, species: list[str], sha: list[str] | None = None) -> PhotoSet:
    n = len(x)
    return PhotoSet([f"/p/{i}.jpg" for i in range(n)], sha or [f"d{i}" for i in range(n)], x, [None] * n,
                    list(range(100, 100 + n)), list(species))


def test_suspect_label_flags_a_planted_mislabel_with_its_suggestion():
    from retrieval.findings import suspect_labels

    x, species = _clusters()
    assert [f for f in find_issues(_set(x, species), suspect_k=5, duplicates=False) if f.kind == "suspect-label"] == []
    planted = 10  # a B b photo filed under A a
    wrong = list(species)
    wrong[planted] = "A a"
    found = suspect_labels(_set(x, wrong), 5)
    assert [(f.path, f.suggested_species, f.reference_id) for f in found] == [("/p/10.jpg", "B b", 110)]
    sims = x[planted] @ x.T
    sims[planted] = -np.inf
    nearest = np.argsort(-sims)[:5]
    assert found[0].score == pytest.approx(float(sims[nearest].mean()), abs=1e-5)
    assert found[0].paired_path == f"/p/{nearest[0]}.jpg" and found[0].paired_reference_id == 100 + nearest[0]
    assert "labelled A a; its 5 nearest other photos are all B b" in found[0].detail
    assert found[0].row()["suggested_species"] == "B b"
    # through find_issues, sorted with the other kinds
    assert [f.kind for f in find_issues(_set(x, wrong), suspect_k=5, duplicates=False)] == ["suspect-label"]


def test_suspect_label_rules_copies_small_species_and_k():
    from retrieval.findings import suspect_labels

    x, species = _clusters()
    # the mislabelled photo filed twice under the wrong species: its copy is not its evidence
    x2 = np.concatenate([x, x[10:11]])
    wrong = [*species, "A a"]
    wrong[10] = "A a"
    sha = [f"d{i}" for i in range(len(x))] + ["d10"]
    found = suspect_labels(_set(x2, wrong, sha), 5)
    assert sorted(f.path for f in found) == ["/p/10.jpg", "/p/24.jpg"]
    assert all(f.paired_path not in ("/p/10.jpg", "/p/24.jpg") for f in found)
    # a near-identical copy (cosine >= dup_threshold) is left out the same way; below it, it counts
    x3 = x2.copy()
    x3[24] = x[10] + 0.01 * np.random.default_rng(1).standard_normal(x.shape[1])
    x3[24] /= np.linalg.norm(x3[24])
    assert len(suspect_labels(_set(x3, wrong), 5, dup_threshold=0.95)) == 2
    assert suspect_labels(_set(x3, wrong), 1, dup_threshold=1.0) == []  # each one's nearest is the other, also A a
    # a species with fewer than k other photos has no neighbourhood to lose: not judged
    lone = [*species[:-1], "D d"]
    assert suspect_labels(_set(x, lone), 5) == []
    # k: every one of the k nearest must agree; the planted photo has only 7 other B b photos around it
    planted = list(species)
    planted[10] = "A a"
    assert [[f.path for f in suspect_labels(_set(x, planted), k)] for k in (1, 3, 7, 8)] == [["/p/10.jpg"]] * 3 + [[]]
    # unreadable photos are neither judged nor neighbours
    ps = _set(x, wrong[:-1])
    ps.errors[10] = "cannot decode"
    assert suspect_labels(ps, 5) == []
    with pytest.raises(ValueError, match="at least 1"):
        suspect_labels(ps, 0)
    with pytest.raises(ValueError, match="--suspect-k"):
        CleanConfig(suspect_k=0)


def test_suspect_label_counts_a_burst_of_copies_as_one_photo():
    """Near-copies (cosine >= --dup-threshold) are one photo: a species that is one burst has no other photo of its
    own to lose (every photo of it was flagged), and a burst of another species is one neighbour, not k."""
    from retrieval.findings import suspect_labels

    rng = np.random.default_rng(0)

    def unit(v: np.ndarray) -> np.ndarray:
        return (v / np.linalg.norm(v)).astype(np.float32)

    def flagged(x: list[np.ndarray], species: list[str]) -> list[str]:
        return [f.path for f in suspect_labels(_set(np.stack(x), species), 3)]

    centre = rng.standard_normal(64)
    burst = [unit(centre + 0.01 * rng.standard_normal(64)) for _ in range(4)]  # A a: 4 near-copies of one shot
    spread = [unit(centre + 0.9 * rng.standard_normal(64)) for _ in range(6)]  # B b: 6 photos around it
    assert float((np.stack(burst) @ np.stack(burst).T).min()) > 0.95 > float((np.stack(burst) @ np.stack(spread).T).max())
    assert flagged(burst + spread, ["A a"] * 4 + ["B b"] * 6) == []
    b = [unit(rng.standard_normal(64)) for _ in range(4)]  # B b: 4 unrelated photos
    near_b0 = unit(b[0] + 0.25 * rng.standard_normal(64))
    c = [unit(near_b0 + 0.01 * rng.standard_normal(64)) for _ in range(3)]  # C c: a burst of 3 nearest to b0
    c += [unit(rng.standard_normal(64)) for _ in range(3)]
    assert float(max(b[0] @ x for x in b[1:])) < float(min(b[0] @ x for x in c[:3]))
    assert "/p/0.jpg" not in flagged(b + c, ["B b"] * 4 + ["C c"] * 6)


def test_apply_never_excludes_a_suspect_label(tmp_path, capsys):
    """A gallery (image-only encoder, stored embeddings reused) with one photo filed under the wrong species: the
    CLI reports it with its suggestion, --apply leaves it searchable, and --apply-to suspect-label is refused."""
    from index.exclusions import excluded_ids
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.clean import apply_exclusions
    from retrieval.encoders import create_encoder

    enc = create_encoder(IMAGE_ONLY, precision="fp32")
    x, species = _clusters(per_species=7, dim=enc.dim)
    species[3] = "B b"  # an A a photo filed under B b
    g = Gallery.create(tmp_path / "g", enc.describe())
    ids = g.add([ReferenceRecord(path=str(tmp_path / f"{i}.png"), species=s) for i, s in enumerate(species)],
                [f"d{i}" for i in range(len(species))], x)
    index = tmp_path / "g"
    code, out, _ = _run(capsys, "clean", "--index", index, "--report", tmp_path / "r", "--apply", "--apply-to",
                        "off-target,duplicate,near-duplicate,leak,near-leak", "--quiet")
    assert code == 0, out
    assert "suspect labels: 1 photo whose 3 nearest other photos all carry one other species" in out
    assert "applied: 0 references excluded" in out
    rows = [r for r in _read_csv(tmp_path / "r" / "findings.csv") if r["kind"] == "suspect-label"]
    assert [(Path(r["path"]).name, r["suggested_species"], r["reference_id"]) for r in rows] == [
        ("3.png", "A a", str(ids[3]))]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["counts"]["suspect-label"] == 1
    assert "Suspect labels" in (tmp_path / "r" / "contact_sheet.html").read_text()
    g = Gallery.open(index)
    assert excluded_ids(g) == [] and len(g) == len(species)
    assert ids[3] in [n.id for n in g.search(x[3][None], 1)[0]]
    code, _, err = _run(capsys, "clean", "--index", index, "--report", tmp_path / "r2", "--apply", "--apply-to",
                        "suspect-label", "--quiet")
    assert code == 2 and "suspect-label findings are report only" in err
    from retrieval.findings import Finding

    with pytest.raises(ValueError, match="report only"):
        apply_exclusions(g, [Finding("suspect-label", 0.9, "x", reference_id=ids[3])], ("suspect-label",))
    assert excluded_ids(Gallery.open(index)) == []
    # --no-suspect-labels: not looked for; an image-only encoder with --no-duplicates still checks labels
    code, out, _ = _run(capsys, "clean", "--index", index, "--report", tmp_path / "r3", "--no-suspect-labels",
                        "--quiet")
    assert code == 0 and "suspect labels" not in out
    code, out, _ = _run(capsys, "clean", "--index", index, "--report", tmp_path / "r4", "--no-duplicates",
                        "--suspect-k", "5", "--quiet")
    assert code == 0 and "suspect labels: 1 photo whose 5 nearest" in out and "duplicates:" not in out, out
    assert "suspect labels still ran" in out


def test_an_apply_that_cannot_act_is_refused_and_one_that_excluded_nothing_offers_no_undo(tmp_path, capsys):
    """--apply whose kinds this run cannot find (off-target with an image-only encoder, leaks without --against) is
    refused before any work; some of them: a note says which. A run that excluded nothing logs no run, so it
    prints no "undo with" (--restore would undo an earlier run)."""
    from index.exclusions import excluded_ids
    from index.gallery import Gallery
    from index.layout import CLEAN_LOG
    from index.records import ReferenceRecord
    from retrieval.encoders import create_encoder

    enc = create_encoder(IMAGE_ONLY, precision="fp32")
    x, species = _clusters(per_species=4, dim=enc.dim)
    x = np.vstack([x, x[1:2]])  # a near-copy of the second A a photo (other bytes): a near-duplicate
    species.append("A a")
    index = tmp_path / "g"
    ids = Gallery.create(index, enc.describe()).add(
        [ReferenceRecord(path=str(tmp_path / f"{i}.png"), species=s) for i, s in enumerate(species)],
        [f"d{i}" for i in range(len(species))], x)
    base = ["clean", "--index", index, "--no-suspect-labels", "--quiet", "--apply"]
    for extra, message in (
        ([], "--apply would exclude nothing: it acts on off-target findings (--apply-to, default off-target), "
         "which this run cannot find: off-target: encoder timm:test_vit@random is image-only, and the zero-shot "
         "filter that finds them needs one that reads text (--encoder bioclip); what it finds: --apply-to "
         "duplicate,near-duplicate"),
        (["--apply-to", "leak,near-leak"], "leak, near-leak: leaks are photos also in the --against DIR set, and "
         "none was given"),
        (["--apply-to", "off-target", "--no-zero-shot"], "--no-zero-shot turns off the zero-shot filter"),
    ):
        code, _, err = _run(capsys, *base, "--report", tmp_path / "refused", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "refused").exists() and not (index / CLEAN_LOG).exists()
    code, out, _ = _run(capsys, *base, "--report", tmp_path / "r1", "--apply-to", "near-duplicate")
    assert code == 0 and f"applied: 1 references excluded (0 already excluded, 0 findings not in the gallery); " \
        f"undo with 'speciesid clean --restore --index {index}'" in out, out
    assert excluded_ids(Gallery.open(index)) == [ids[-1]]
    # the same again, with off-target too: nothing new, and no "undo with" (that would undo the first run)
    code, out, _ = _run(capsys, *base, "--report", tmp_path / "r2", "--apply-to", "off-target,near-duplicate")
    assert code == 0 and "applied: 0 references excluded (1 already excluded" in out and "undo with" not in out
    assert "nothing to undo (no run logged: --restore would undo an earlier one)" in out
    assert "note: --apply-to off-target excluded nothing, this run cannot find them (off-target: encoder " in out
    assert len(json.loads((index / CLEAN_LOG).read_text())["runs"]) == 1


def test_clean_with_the_gallerys_own_encoder_keeps_its_pool_and_views_and_reuses_its_embeddings(tmp_path, capsys,
                                                                                                monkeypatch):
    """``clean --index G --encoder <G's spec>`` (clean has no --pool / --views) on a gallery built with --pool gem3
    --views flip: the gallery's options, so its stored embeddings are read, not every photo embedded again."""
    import retrieval.clean

    spec = "timm:test_efficientnet@random"  # a tiny random timm CNN (gem3 pools CNNs)
    _photos(tmp_path / "photos")
    index = tmp_path / "g"
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", tmp_path / "photos", "--index",
                        index, "--encoder", spec, "--pool", "gem3", "--views", "flip", "--precision", "fp32", "-q")
    assert code == 0, err
    monkeypatch.setattr(retrieval.clean, "embed_photos", lambda *a, **k: pytest.fail("embedded the photos again"))
    code, out, err = _run(capsys, "clean", "--index", index, "--encoder", spec, "--precision", "fp32", "--report",
                          tmp_path / "r", "-q")
    assert code == 0, err
    assert f"with {spec} in" in out and "0 photos through the encoder, 8 read from the gallery's store" in out, out


def test_clean_with_another_encoder_than_the_gallerys_takes_a_new_gallerys_options(tiny_clip_dir, tmp_path, capsys,
                                                                                     monkeypatch):
    """docs/cleaning.md: another encoder may clean a gallery (an open_clip model's zero-shot on a timm CNN's
    gallery). On a gallery built with --pool gem3 --views flip it keeps none of them (gem3 is for timm CNNs; clean
    has no --pool / --views to undo them): model pooling, one view, every photo embedded again."""
    import retrieval.clean
    from retrieval.encoders import EncoderConfig
    from retrieval.galleries import build_encoder

    _photos(tmp_path / "photos")
    index = tmp_path / "g"
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", tmp_path / "photos", "--index",
                        index, "--encoder", "timm:test_efficientnet@random", "--pool", "gem3", "--views", "flip",
                        "--precision", "fp32", "-q")
    assert code == 0, err
    made = []
    real = retrieval.clean.create_encoder_from_config
    monkeypatch.setattr(retrieval.clean, "create_encoder_from_config", lambda c, **k: made.append(c) or real(c, **k))
    other = f"open_clip:local-dir:{tiny_clip_dir}"
    code, out, err = _run(capsys, "clean", "--index", index, "--encoder", other, "--precision", "fp32", "--report",
                          tmp_path / "r", "-q")
    assert code == 0, err
    assert [(c.spec, c.weights, c.pool, c.views) for c in made] == [(other, None, "model", "single")]
    assert "8 photos through the encoder" in out, out
    # the same rule everywhere a config meets a gallery; the gallery's own spec, by another path, keeps its options
    assert (build_encoder(index, EncoderConfig(spec=other)).pool, build_encoder(index).pool) == ("model", "gem3")
    assert EncoderConfig(spec=f"local-dir:{tiny_clip_dir}/.").resolved(
        {"spec": other, "pool": "gem3", "views": "flip", "weights": "w"}) == EncoderConfig(
        spec=f"local-dir:{tiny_clip_dir}/.", weights="w", pool="gem3", views="flip")



def test_a_copy_of_the_gallerys_model_folder_keeps_its_pooling_and_views(tmp_path):
    """A gallery used on another machine names its model by the first machine's folder; a copy of that folder
    elsewhere (same library) keeps the gallery's pooling and views (the fingerprint check says whether the weights
    are the same), without the gallery's weights file; a folder of another library takes a new gallery's."""
    import shutil

    from retrieval.encoders import EncoderConfig

    first, copy = tmp_path / "machine-a" / "cnn", tmp_path / "machine-b" / "cnn"
    first.mkdir(parents=True)
    (first / "config.json").write_text("{}")  # a timm folder, as parse_spec tells them
    shutil.copytree(first, copy)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "open_clip_config.json").write_text("{}")
    built = {"spec": f"timm:local-dir:{first}", "pool": "gem3", "views": "flip", "weights": "w.safetensors"}
    assert EncoderConfig(spec=f"timm:local-dir:{copy}").resolved(built) == EncoderConfig(
        spec=f"timm:local-dir:{copy}", pool="gem3", views="flip")
    assert EncoderConfig(spec=f"local-dir:{clip}").resolved(built) == EncoderConfig(
        spec=f"local-dir:{clip}", pool="model", views="single")
    assert EncoderConfig(spec="timm:mobilenetv1_100").resolved(built).pool == "model"  # a named model: its own


def test_nothing_to_check_is_refused_before_any_photo_is_embedded(tmp_path, capsys, monkeypatch):
    import retrieval.clean

    _photos(tmp_path / "photos", per_species=1)
    monkeypatch.setattr(retrieval.clean, "embed_photos", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    base = ["clean", "--dataset", "folder", "--root", tmp_path / "photos", "--report", tmp_path / "r",
            "--encoder", IMAGE_ONLY, "--precision", "fp32"]
    for extra, msg in ((["--no-duplicates", "--no-suspect-labels"],
                        "nothing to check: encoder timm:test_vit@random is image-only"),
                       (["--prompts", "snakes"], "--prompts needs an encoder that reads text"),
                       (["--no-duplicates", "--no-zero-shot", "--no-suspect-labels"],
                        "nothing to check: --no-zero-shot, --no-duplicates and --no-suspect-labels")):
        code, _, err = _run(capsys, *base, *extra)
        assert code == 2 and msg in err, (extra, err)


def _png_text(text: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("comment", text)
    return info


def test_clean_errors_are_clear(tmp_path, capsys):
    _photos(tmp_path / "photos", per_species=1)
    root = tmp_path / "photos"
    for argv, msg in (
        (["--dataset", "folder", "--root", root, "--report", tmp_path / "r", "--apply"], "--apply needs --index"),
        (["--restore"], "--restore needs --index"),
        (["--report", tmp_path / "r"], "say what to clean"),
        (["--dataset", "folder", "--root", root], "--report DIR is required"),
        (["--dataset", "folder", "--report", tmp_path / "r"], "--dataset and --root go together"),
        (["--index", tmp_path, "--report", tmp_path / "r"], "is not a speciesid gallery"),
        (["--dataset", "folder", "--root", root, "--report", tmp_path / "r", "--against", tmp_path / "nope"],
         "is not a folder"),
        (["--index", tmp_path, "--report", tmp_path / "r", "--apply-to", "duplicate"], "add --apply"),
    ):
        code, _, err = _run(capsys, "clean", *argv)
        assert code == 2 and msg in err, (argv, err)
    with pytest.raises(SystemExit) as exc:  # a value out of range: the parser's line, with the --help to read
        main(["clean", "--dataset", "folder", "--root", str(root), "--report", str(tmp_path / "r"), "--threshold", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("speciesid clean: error: argument --threshold: '0' is not a number in (0, 1]; "
                                       "see 'speciesid clean --help'\n")
    for bad in ("-1", "0.5", "0.79", "1.5", "nan"):  # from MIN_DUP_THRESHOLD to 1
        with pytest.raises(SystemExit) as exc:
            main(["clean", "--dataset", "folder", "--root", str(root), "--report", str(tmp_path / "r"),
                  "--dup-threshold", bad])
        assert exc.value.code == 2
        assert capsys.readouterr().err == (f"speciesid clean: error: argument --dup-threshold: '{bad}' is not a number "
                                           "in [0.8, 1]; see 'speciesid clean --help'\n"), bad
    with pytest.raises(SystemExit) as exc:
        main(["clean", "--help"])
    help_text = capsys.readouterr().out
    with pytest.raises(SystemExit) as bad_k:
        main(["clean", "--dataset", "folder", "--root", str(root), "--report", str(tmp_path / "r"), "--suspect-k", "0"])
    assert bad_k.value.code == 2 and "--suspect-k: '0' is not a whole number of at least 1" in capsys.readouterr().err
    assert exc.value.code == 0 and "--dup-threshold" in help_text
    assert "--suspect-k" in help_text and "--no-suspect-labels" in help_text


# ------------------------------------------------------------------ real photos: leakage val vs train
#: Checked by eye (side-by-side images, docs/cleaning.md): each val photo is the same photo as its train
#: twin (same bytes; or re-encoded, re-cropped, watermark cut off). MobileNetV1 cosine as measured.
LEAKS = {
    ("philippine_rat_snake__coelognathus_erythrurus__val_0001.jpg",
     "philippine_rat_snake__coelognathus_erythrurus__train_0068.jpg"): ("leak", 1.0),
    ("south_philippine_temple_pit_viper__tropidolaemus_philippensis__val_0004.jpg",
     "south_philippine_temple_pit_viper__tropidolaemus_philippensis__train_0066.jpg"): ("near-leak", 0.9909),
    ("philippine_rat_snake__coelognathus_erythrurus__val_0010.jpeg",
     "philippine_rat_snake__coelognathus_erythrurus__train_0045.jpeg"): ("near-leak", 0.9844),
    ("philippine_rat_snake__coelognathus_erythrurus__val_0003.jpeg",
     "philippine_rat_snake__coelognathus_erythrurus__train_0011.jpeg"): ("near-leak", 0.9592),
}
#: The leaks' two species folders (the full 980 x 210 run takes ~40 s; the four pairs all sit in these).
LEAK_SPECIES = ("Philippine Rat Snake (Coelognathus erythrurus)",
                "South Philippine Temple Pit Viper (Tropidolaemus philippensis)")


@pytest.mark.slow
def test_real_leakage_val_against_train(tmp_path, capsys, memo_real_forward):
    needs_shared()
    for split in ("train", "val"):
        for name in LEAK_SPECIES:
            (tmp_path / split).mkdir(exist_ok=True)
            os.symlink(PH_SNAKES / split / name, tmp_path / split / name)  # linked, never copied
    code, out, _ = _run(capsys, "clean", "--dataset", "folder", "--root", tmp_path / "train", "--against",
                        tmp_path / "val", "--encoder", MOBILENET_SPEC, "--precision", "fp32",
                        "--report", tmp_path / "report", "--quiet")
    assert code == 0, out
    rows = _read_csv(tmp_path / "report" / "findings.csv")
    leaks = {(Path(r["paired_path"]).name, Path(r["path"]).name): (r["kind"], float(r["score"]))
             for r in rows if r["kind"] in ("leak", "near-leak")}
    assert set(leaks) == set(LEAKS), leaks
    for pair, (kind, sim) in LEAKS.items():
        assert leaks[pair][0] == kind and leaks[pair][1] == pytest.approx(sim, abs=2e-3)
    # a different photo of the same animal (val_0002 vs train_0008, cosine 0.922) is not a leak
    assert not any("val_0002" in p for p, _ in leaks)
    # within train: the four rat-snake files stored twice, and re-cropped copies in the pit viper folder
    dups = [r for r in rows if r["kind"] == "duplicate"]
    assert len(dups) == 4 and all("philippine_rat_snake" in r["path"] for r in dups)
    near = {Path(r["path"]).name[-14:]: float(r["score"]) for r in rows if r["kind"] == "near-duplicate"}
    assert {"train_0050.png", "train_0025.jpg"} <= set(near) and all(s >= 0.95 for s in near.values())


def test_clean_of_a_dataset_against_a_gallery_reads_only_the_references_it_shares(tmp_path, capsys, monkeypatch):
    """``clean --dataset D --index G``: the dataset's digests are looked up (and only their stored vectors read), never
    the gallery's whole table; the findings and the embeddings reused are those of the whole-table read."""
    from index.store import ReferenceStore

    paths = _photos(tmp_path / "photos", per_species=3)
    index = tmp_path / "g"
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", tmp_path / "photos", "--index",
                        index, "--encoder", IMAGE_ONLY, "--precision", "fp32", "-q")
    assert code == 0, err
    ds = tmp_path / "ds"
    (ds / "Naja haje").mkdir(parents=True)
    (ds / "Naja haje" / "stored.png").write_bytes(paths[0].read_bytes())  # in the gallery: its vector is reused
    (ds / "Naja haje" / "copy.png").write_bytes(paths[0].read_bytes())
    _noise(ds / "Naja haje" / "new.png", seed=777)
    reads = []
    vectors, metadata = ReferenceStore.vectors, ReferenceStore.metadata
    monkeypatch.setattr(ReferenceStore, "vectors", lambda self, **kw: reads.append(("vectors", kw)) or vectors(self, **kw))
    monkeypatch.setattr(ReferenceStore, "metadata",
                        lambda self, *a, **kw: reads.append(("metadata", a, kw)) or metadata(self, *a, **kw))
    code, out, err = _run(capsys, "clean", "--dataset", "folder", "--root", ds, "--index", index, "--encoder",
                          IMAGE_ONLY, "--precision", "fp32", "--report", tmp_path / "r", "--no-suspect-labels", "-q")
    assert code == 0, err
    assert not [r for r in reads if r[0] == "metadata" or r[1].get("ids") is None], reads  # no whole-table read
    assert "1 photos through the encoder, 2 read from the gallery's store" in out, out
    found = {(r["kind"], Path(r["path"]).name, r["reference_id"]) for r in _read_csv(tmp_path / "r" / "findings.csv")}
    assert ("duplicate", "stored.png", "1") in found, found  # the same bytes: the gallery's reference 1 named
