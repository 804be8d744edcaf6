"""The blend's settings choice (retrieval.calibrate): behaviour of the default rule, not its speed."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.calibrate import RULES, SelectionGrid, blend_matrix, knn_matrix, plateau_pick, select_settings
from retrieval.probe import Calibration, LinearProbe, train_probe

GRID = SelectionGrid(Cs=(1.0, 5.0, 20.0), ks=(5, 10, 20), temperatures=(0.02, 0.05), weights=(0.0, 0.25, 0.5, 0.75, 1.0))


def _species(n_cls: int = 8, modes: int = 3, dim: int = 32, seed: int = 0):
    """Species made of a few sub-clusters (poses, colour morphs), noisy: kNN and probe both ~0.6 top-1 on
    16 photos a species, as hard and as ambiguous between the two as the real photos."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_cls, dim))
    offsets = 1.0 * rng.standard_normal((n_cls, modes, dim))

    def draw(n_per: int, rng: np.random.Generator):
        x, y = [], []
        for c in range(n_cls):
            m = rng.integers(0, modes, n_per)
            x.append(centres[c] + offsets[c, m] + 2.5 * rng.standard_normal((n_per, dim)))
            y += [f"Genus s{c}"] * n_per
        x = np.concatenate(x)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    return draw


def _blend_top1(cal: Calibration, refs, ref_y, queries, q_y) -> float:
    probe = train_probe(refs, ref_y, fingerprint="f", C=cal.C)
    species = probe.species
    idx = {s: i for i, s in enumerate(species)}
    yr, yq = np.array([idx[s] for s in ref_y]), np.array([idx[s] for s in q_y])
    kn = knn_matrix(queries, refs, yr, len(species), cal.k, cal.temperature)
    b = blend_matrix(kn, probe.predict_proba(queries), np.ones(len(species), bool), cal.blend_weight)
    return float((b.argmax(1) == yq).mean())


def test_default_rule_is_recorded_and_chooses_grid_values():
    draw = _species()
    x, y = draw(15, np.random.default_rng(1))
    s = select_settings(x, y, fingerprint="f", grid=GRID)
    assert s.rule == "seq-nll" == RULES[0] and s.selected_on == "cv:5-fold"
    assert s.C in GRID.Cs and s.k in GRID.ks and s.temperature in GRID.temperatures and s.blend_weight in GRID.weights
    assert s.metrics["queries"] == len(y) and 0.0 <= s.unknown_threshold <= 1.0
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_settings(x, y, fingerprint="f", grid=GRID, rule="best")


def test_no_threshold_reaching_the_target_precision_keeps_the_default(caplog):
    from retrieval.vote import DEFAULT_UNKNOWN_THRESHOLD

    rng = np.random.default_rng(3)  # labels that nothing predicts: no threshold answers at 95% precision
    x = rng.standard_normal((60, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = [f"Genus s{i % 4}" for i in rng.permutation(60)]
    s = select_settings(x, y, fingerprint="f", grid=GRID)
    assert s.metrics["unknown_coverage"] == 0.0  # was: threshold 1.0, every later answer "unknown"
    assert s.unknown_threshold == DEFAULT_UNKNOWN_THRESHOLD and "the default 0.56 is kept" in caplog.text


def test_rule_survives_save_and_load(tmp_path):
    draw = _species()
    x, y = draw(10, np.random.default_rng(2))
    probe = train_probe(x, y, fingerprint="f")
    probe.calibration = select_settings(x, y, fingerprint="f", grid=GRID)
    probe.save(tmp_path)
    assert LinearProbe.load(tmp_path).calibration.rule == "seq-nll"


def test_plateau_pick_prefers_the_prior_within_noise():
    rng = np.random.default_rng(0)
    base = rng.exponential(1.0, 400)
    losses = [base + 0.002 + 0.1 * rng.standard_normal(400), base, base + 0.5]
    # the best mean is candidate 1, candidate 0 is within noise of it and nearer the prior (value 10)
    choice, i = plateau_pick([10.0, 50.0, 1.0], losses, lambda v: abs(np.log(v / 10.0)))
    assert (choice, i) == (10.0, 0)
    choice, _ = plateau_pick([10.0, 50.0, 1.0], [base + 0.3, base, base + 0.5], lambda v: abs(np.log(v / 10.0)))
    assert choice == 50.0  # a clear winner is not overruled by the prior


def test_chosen_settings_are_stable_under_fold_reshuffles():
    draw = _species(seed=3)
    x, y = draw(16, np.random.default_rng(4))
    chosen = {rule: {(s.C, s.k, s.temperature, s.blend_weight) for s in (
        select_settings(x, y, fingerprint="f", grid=GRID, seed=seed, rule=rule) for seed in range(4))}
        for rule in RULES}
    assert len(chosen["seq-nll"]) == 1, chosen
    assert len(chosen["argmax"]) > 1, chosen  # the old rule moves with the folds (here 4 settings in 4 reshuffles)


def test_more_reference_photos_do_not_make_the_chosen_blend_worse():
    """The issue's symptom: the old rule's blend got worse with a bigger gallery. Same held-out queries,
    gallery A (8 photos a species) inside gallery B (16 a species), averaged over 3 draws."""
    small, big = [], []
    for seed in range(3):
        draw = _species(seed=10 + seed)
        rng = np.random.default_rng(100 + seed)
        xb, yb = draw(16, rng)
        xq, yq = draw(40, rng)
        keep = np.concatenate([np.arange(c * 16, c * 16 + 8) for c in range(8)])
        xa, ya = xb[keep], [yb[i] for i in keep]
        small.append(_blend_top1(select_settings(xa, ya, fingerprint="f", grid=GRID), xa, ya, xq, yq))
        big.append(_blend_top1(select_settings(xb, yb, fingerprint="f", grid=GRID), xb, yb, xq, yq))
    assert np.mean(big) >= np.mean(small), (small, big)


def test_near_duplicates_stay_in_one_fold():
    from retrieval.calibrate import cv_splits

    draw = _species()
    x, y = draw(10, np.random.default_rng(5))
    x = np.concatenate([x, x[:8] + 1e-4])  # 8 near-copies of gallery photos
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.array([int(s[len("Genus s"):]) for s in y + y[:8]])
    for rest, held in cv_splits(x, y, 5, seed=0):
        for i in range(8):
            n = len(x) - 8 + i
            assert (i in held) == (n in held) and (i in rest) == (n in rest)


def test_cv_counts_distinct_photos_not_near_copies():
    """Folds hold near-copies together, so a species needs 2 distinct photos (not 2 photos) to be held out and
    still voted for: one whose photos are all near-copies of one is named, with what to do (it was scikit-learn's
    "Cannot have number of splits n_splits=5 greater than the number of groups: 3", or 5 folds, one holding every
    photo of the species, the others none); the fold count follows the distinct photos."""
    rng = np.random.default_rng(0)

    def near_copies(n: int) -> np.ndarray:
        x = rng.standard_normal(32) + 1e-3 * rng.standard_normal((n, 32))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    x = np.vstack([near_copies(6) for _ in range(3)])
    with pytest.raises(ValueError, match=r"3 have one: Genus a \(6 photos, all near-copies of one\), Genus b \(6 "
                       r"photos, all near-copies of one\), Genus c .*: add other photos of them, or choose the "
                       r"settings on other photos \(--val-root\)"):
        select_settings(x, ["Genus a"] * 6 + ["Genus b"] * 6 + ["Genus c"] * 6, fingerprint="f", grid=GRID)
    xd, yd = _species(n_cls=3)(6, rng)
    # one such species among others: left out of the choice (the kNN vote alone answers it), not a refusal
    s = select_settings(np.vstack([xd, near_copies(6)]), yd + ["Genus c"] * 6, fingerprint="f", grid=GRID)
    assert s.left_out == {"Genus c": 6} and s.metrics["queries"] == 18
    # 3 distinct photos a species, each twice: 3 folds (it was 5, by the 6 photos)
    twice = np.vstack([xd[::2], xd[::2] + 1e-4])
    twice /= np.linalg.norm(twice, axis=1, keepdims=True)
    s = select_settings(twice, yd[::2] * 2, fingerprint="f", grid=GRID)
    assert s.selected_on == "cv:3-fold"


def test_fewer_folds_than_asked_is_a_warning(caplog):
    """--folds above what the photos allow is reduced, and said at WARNING (shown without -v), not silently."""
    import logging

    x, y = _species(n_cls=3)(4, np.random.default_rng(1))
    with caplog.at_level(logging.WARNING, logger="retrieval.calibrate"):
        s = select_settings(x, y, fingerprint="f", grid=GRID, folds=1000)
    assert s.selected_on == "cv:4-fold"
    assert "cross-validation in 4 folds, not 1000: Genus s0 has 4 distinct photos" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrieval.calibrate"):
        select_settings(x, y, fingerprint="f", grid=GRID, folds=3)
    assert "folds, not" not in caplog.text  # what was asked: nothing to say


def test_evaluation_protocol_says_which_photos_chose_the_settings(tmp_path):
    from retrieval.images import sha256_bytes
    from retrieval.protocol import Protocol, settings_origin

    draw = _species()
    x, y = draw(6, np.random.default_rng(6))
    probe = train_probe(x, y, fingerprint="f")
    assert settings_origin(None, tmp_path) == (
        "kNN only: k, T and the unknown threshold are defaults (nothing was chosen)", False)
    probe.calibration = Calibration(selected_on="cv:5-fold", rule="seq-nll")
    text, chose = settings_origin(probe, tmp_path)
    assert "5-fold cross-validation inside the gallery, rule seq-nll" in text and not chose
    probe.calibration = Calibration(selected_on="cv:5-fold (head fixed; it was trained on these photos)")
    assert "chosen by 5-fold cross-validation inside the gallery (head fixed; it was trained on these photos)" in \
        settings_origin(probe, tmp_path)[0]  # the note after the phrase, not inside it
    one = ["Genus a"] * 3 + ["Genus b"]  # a species with one photo: no folds for it
    with pytest.raises(ValueError, match=r"1 have one: Genus b \(1 photo\): add other photos of them, or choose the "
                       r"settings on other photos \(--val-root\)"):
        select_settings(draw(2, np.random.default_rng(1))[0][:4], one, fingerprint="f")
    probe.calibration = Calibration(selected_on="cv:5-fold", rule="seq-nll")
    (tmp_path / "val").mkdir()
    probe.calibration = Calibration(selected_on=f"val:{tmp_path / 'val'}", rule="argmax")
    assert settings_origin(probe, tmp_path / "other")[1] is False
    text, chose = settings_origin(probe, tmp_path / "val" / ".")
    assert chose and "= the evaluated photos" in text
    # the same photos in another folder (a copy, a subset, another path) are recognised by content
    (tmp_path / "val" / "a.jpg").write_bytes(b"photo a")
    (tmp_path / "val" / "b.jpg").write_bytes(b"photo b")
    text, chose = settings_origin(probe, tmp_path / "copy", evaluated=[sha256_bytes(b"photo b"), sha256_bytes(b"x")])
    assert chose and ("(1 of the evaluated photos are among them; matched by the photos in that folder now: their "
                      "digests were not recorded when they chose)") in text
    # digests recorded with the settings: the photos that chose, not those in the folder now (nor its path)
    probe.calibration.selection_sha256 = [sha256_bytes(b"photo a")]
    text, chose = settings_origin(probe, tmp_path / "val", evaluated=[sha256_bytes(b"photo b")])
    assert not chose and text.endswith(f"{tmp_path / 'val'} (not the evaluated photos), rule argmax")
    text, chose = settings_origin(probe, tmp_path / "copy", evaluated=[sha256_bytes(b"photo a")])
    assert chose and "(1 of the evaluated photos are among them), rule argmax" in text
    probe.calibration.selection_sha256 = []
    assert settings_origin(None, tmp_path, overridden=True)[0].startswith(
        "kNN only: k, T and the unknown threshold set on the command line")
    probe.trained_on = 12  # a probe trained here on references the gallery no longer holds all of
    assert ("3 reference photos fewer than when the probe was trained (net change of the counts): photos that left "
            "it may have trained it (retrain: speciesid probe train)") in settings_origin(
        probe, tmp_path / "other", gallery_size=9)[0]
    lines = Protocol(text, chose, [3, 7], {"same bytes": 1, "near-copy": 1}).lines()
    assert lines[1].startswith("evaluated photos used to choose settings: YES")
    assert lines[2] == ("evaluated photos already in the gallery: 2 (1 same bytes, 1 near-copy); left out of the "
                        "figures (--keep-duplicates to count them)")
    probe.calibration = Calibration(selected_on="val:heldout:140 photos listed in OUT/heldout.csv", rule="seq-nll")
    text, chose = settings_origin(probe, tmp_path / "val")
    assert not chose and "chosen on the photos the fine-tuning run held out of its training photos (140 photos " \
        "listed in OUT/heldout.csv; the head never trained on them" in text


def test_blend_weight_fixed_keeps_the_other_choices():
    draw = _species()
    x, y = draw(12, np.random.default_rng(7))
    chosen = select_settings(x, y, fingerprint="f", grid=GRID)
    fixed = select_settings(x, y, fingerprint="f", grid=GRID, blend_weight=0.4)  # 0.4 is not on the grid
    assert fixed.blend_weight == 0.4
    assert (fixed.C, fixed.k, fixed.temperature, fixed.metric) == (chosen.C, chosen.k, chosen.temperature,
                                                                   chosen.metric)  # seq-nll: chosen before w
    with pytest.raises(ValueError, match=r"a blend weight is the probe's share, from 0 \(kNN only\) to 1 \(probe "
                       r"only\), not -0.1"):
        select_settings(x, y, fingerprint="f", grid=GRID, blend_weight=-0.1)


def test_an_imported_heads_weight_is_fixed_where_its_photos_favour_the_head(tmp_path):
    import json

    from retrieval.probe_flows import _weight_bias, import_weight, parse_weight_rule

    assert parse_weight_rule("auto") == "auto" and parse_weight_rule("choose") == "choose"
    assert parse_weight_rule("0.25") == 0.25 and parse_weight_rule(1) == 1.0
    for bad in ("half", "1.01", "nan", "-1"):
        with pytest.raises(ValueError, match=f"blend weight: give auto, choose or a number .* not '{bad}'"):
            parse_weight_rule(bad)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"speciesid": {"val_source": f"val:{tmp_path / 'val'}"}}))
    (tmp_path / "val").mkdir()
    (tmp_path / "fresh").mkdir()
    assert _weight_bias(None, "heldout:140 photos listed in run/heldout.csv", run) == (
        "the photos the run held out also chose its epoch and test size")
    assert _weight_bias(tmp_path / "val" / ".", str(tmp_path / "val"), run) == (
        "these validation photos also chose the fine-tuning run's epoch")
    assert _weight_bias(None, "None", run).startswith("no fresh photos to choose it on (no --val-root")
    assert _weight_bias(tmp_path / "fresh", str(tmp_path / "fresh"), run) == ""
    assert import_weight("auto", "") == (None, "")  # fresh photos: chosen
    assert import_weight("auto", "X") == (0.5, "fixed at the prior 0.5: X")
    assert import_weight("choose", "X") == (None, "")
    assert import_weight("0.7", "") == (0.7, "fixed at 0.7 by the caller")


def test_choosing_settings_shows_a_bar_over_the_folds_settings_unless_quiet(capsys):
    """`probe train` chose its settings for minutes with no sign of life; a bar now counts each fold's settings."""
    draw = _species(n_cls=4)
    x, y = draw(6, np.random.default_rng(1))
    grid = SelectionGrid(Cs=(1.0, 5.0), ks=(5, 10), temperatures=(0.02, 0.05), weights=(0.0, 0.5, 1.0),
                         metrics=("cosine",))
    select_settings(x, y, fingerprint="f", grid=grid, folds=3, progress=True)
    err = capsys.readouterr().err
    total = 3 * (2 * 2 + 2)  # per fold: each (k, T) of the kNN vote, each C of the probe
    assert "choosing settings (3 folds)" in err and f"{total}/{total}" in err, err
    select_settings(x, y, fingerprint="f", grid=grid, folds=3)
    assert capsys.readouterr().err == ""


def test_the_settings_bar_is_closed_on_an_error_and_warnings_are_written_above_it(monkeypatch):
    """Review s48 #12: a probe that failed to train left the bar half-drawn (closed only at the end), and the
    warnings logged while it ran were written through it."""
    import logging

    import tqdm.auto

    import retrieval.calibrate as calibrate

    closed, handlers = [], []

    class Bar(tqdm.auto.tqdm):
        def close(self):
            closed.append(True)
            super().close()

    def failing_probe(*args, **kw):
        handlers.append([type(h).__name__ for h in logging.getLogger().handlers])
        raise RuntimeError("the probe could not be trained")

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(calibrate, "train_probe", failing_probe)
    draw = _species(n_cls=4)
    x, y = draw(6, np.random.default_rng(1))
    grid = SelectionGrid(Cs=(1.0,), ks=(5,), temperatures=(0.05,), weights=(0.5,), metrics=("cosine",))
    with pytest.raises(RuntimeError, match="could not be trained") as caught:
        select_settings(x, y, fingerprint="f", grid=grid, folds=3, progress=True)
    assert caught.value and closed == [True]
    assert "_TqdmLoggingHandler" in handlers[0], handlers  # logging goes through tqdm.write while the bar is up
    assert "_TqdmLoggingHandler" not in [type(h).__name__ for h in logging.getLogger().handlers]


def _tight(n_cls: int, per: int, seed: int = 0):
    """Species far apart, their photos near each other (not near-copies): every held-out photo is answered right."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_cls, 64))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.concatenate([centres[c] + 0.1 * rng.standard_normal((per, 64)) for c in range(n_cls)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"Genus s{c}" for c in range(n_cls) for _ in range(per)]


def test_a_threshold_resting_on_too_few_photos_keeps_the_default(caplog):
    """Walk s57, finding 3: a threshold that 'reaches 95 % precision' on a handful of photos was taken (2 correct
    photos of 10 set 0.42, reported as precision 1.000; 63 % on held-out photos). Under 20 answered photos (one
    wrong answer in 19 already misses 95 %) the default is kept and the log says why."""
    from retrieval.vote import DEFAULT_UNKNOWN_THRESHOLD

    x, y = _tight(4, 4)  # 16 photos, all answered right: every threshold 'reaches' 100 %
    s = select_settings(x, y, fingerprint="f", grid=GRID, folds=3)
    assert s.unknown_threshold == DEFAULT_UNKNOWN_THRESHOLD
    assert s.metrics["unknown_coverage"] == 0.0 and np.isnan(s.metrics["unknown_precision"])
    assert s.metrics["unknown_answered"] == 16 and s.metrics["unknown_min_answered"] == 20
    assert ("on these 16 photos, but only 16 photos answered above it: too few to trust (at least 20, so that one "
            "wrong answer can show): the default 0.56 is kept") in caplog.text


def test_a_threshold_resting_on_enough_photos_is_taken(caplog):
    x, y = _tight(8, 5)  # 40 photos, all answered right
    s = select_settings(x, y, fingerprint="f", grid=GRID)
    assert s.metrics["unknown_answered"] == 40 and s.metrics["unknown_coverage"] == 1.0
    assert s.unknown_threshold == 0.0 and "too few to trust" not in caplog.text


def test_a_figure_not_measured_is_written_as_null_and_read_back_as_nan(tmp_path):
    """Walk s57, finding 10: probe.json held `"unknown_precision": NaN` (no threshold reached the target), which
    strict JSON parsers (jq, JavaScript, Go) refuse. It is written as null and read back as NaN."""
    import json
    import math

    draw = _species()
    x, y = draw(10, np.random.default_rng(2))
    probe = train_probe(x, y, fingerprint="f")
    probe.calibration = Calibration(metrics={"unknown_precision": float("nan"), "unknown_coverage": 0.0})
    probe.save(tmp_path)

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    meta = json.loads((tmp_path / "probe.json").read_text(encoding="utf-8"), parse_constant=refuse)
    assert meta["settings"]["metrics"] == {"unknown_precision": None, "unknown_coverage": 0.0}
    metrics = LinearProbe.load(tmp_path).calibration.metrics
    assert math.isnan(metrics["unknown_precision"]) and metrics["unknown_coverage"] == 0.0
