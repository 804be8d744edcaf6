"""Evaluation metrics and the report writer, against values computed by hand on a small fixed example."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from retrieval.metrics import EvalItem, evaluate, precision_threshold, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A and D venomous, B known harmless, C venom status unknown.
VENOMOUS = {"A": True, "B": False, "C": None, "D": True}

# item  truth  top-1 (conf)  right?  top-5?  unknown  country  note
#  1     A      A  .80        yes     yes              X
#  2     A      B  .40        no      yes (A 2nd)      X        venomous mass A+D = .3+.3 = .6 >= .5
#  3     B      B  .90        yes     yes              Y
#  4     C      C  .70        yes     yes              Y
#  5     C      C  .45        yes     yes     yes      Y
#  6     B      A  .55        no      no (B missing)   X
#  7     D      D  .60        yes     yes              -
ITEMS = [
    EvalItem("A", {"A": 0.8, "B": 0.1, "C": 0.1}, country="X", image="1.jpg"),
    EvalItem("A", {"B": 0.4, "A": 0.3, "D": 0.3}, country="X", image="2.jpg"),
    EvalItem("B", {"B": 0.9, "A": 0.05}, country="Y", image="3.jpg"),
    EvalItem("C", {"C": 0.7, "A": 0.2, "B": 0.1}, country="Y", image="4.jpg"),
    EvalItem("C", {"C": 0.45, "B": 0.35, "A": 0.2}, unknown=True, country="Y", image="5.jpg"),
    EvalItem("B", {"A": 0.55, "C": 0.45}, country="X", image="6.jpg"),
    EvalItem("D", {"D": 0.6, "A": 0.4}, image="7.jpg"),
]


@pytest.fixture(scope="module")
def res() -> dict:
    return evaluate(ITEMS, venomous=VENOMOUS)


def test_accuracy_and_top5(res):
    assert res["n"] == 7
    assert res["top1"] == pytest.approx(5 / 7)  # right: 1, 3, 4, 5, 7
    assert res["top5"] == pytest.approx(6 / 7)  # all but item 6, whose true species has no score


def test_per_species_and_macro_f1(res):
    # labels = union of truths and predictions = A, B, C, D
    # A: predicted for 1 (right) and 6 (wrong) -> P = 1/2; true for 1 (found) and 2 (missed) -> R = 1/2; F1 = 1/2
    # B: predicted for 3 (right) and 2 (wrong) -> P = 1/2; true for 3 (found) and 6 (missed) -> R = 1/2; F1 = 1/2
    # C: predicted for 4, 5, both right; true for 4, 5 -> P = R = F1 = 1
    # D: item 7 only -> P = R = F1 = 1
    expected = {
        "A": (0.5, 0.5, 0.5, 2),
        "B": (0.5, 0.5, 0.5, 2),
        "C": (1.0, 1.0, 1.0, 2),
        "D": (1.0, 1.0, 1.0, 1),
    }
    got = {r["species"]: (r["precision"], r["recall"], r["f1"], r["support"]) for r in res["per_species"]}
    assert list(got) == ["A", "B", "C", "D"]
    for s, (p, r, f, k) in expected.items():
        assert got[s] == (pytest.approx(p), pytest.approx(r), pytest.approx(f), k), s
    assert res["macro_f1"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)  # 0.75


def test_macro_f1_over_given_labels():
    # Over A and B only: (1/2 + 1/2) / 2; a label no evaluated photo truly is adds nothing (SnakeCLEF's way, and
    # the per-country figure's): it stays in the per-species table and the confusion matrix
    assert evaluate(ITEMS, venomous=VENOMOUS, labels=["A", "B"])["macro_f1"] == pytest.approx(0.5)
    res = evaluate(ITEMS, venomous=VENOMOUS, labels=["A", "B", "E"])
    assert res["macro_f1"] == pytest.approx(0.5) and "E" in res["labels"]


def test_macro_f1_is_over_the_evaluated_species():
    """A gallery species wrongly predicted but absent from the evaluated photos used to add an F1 of 0."""
    items = [EvalItem(truth=t, scores={p: 0.9}) for t, p in (("A", "A"), ("A", "A"), ("B", "B"), ("B", "C"))]
    res = evaluate(items, venomous={})
    assert res["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # A: F1 1, B: precision 1, recall 1/2


def test_confusion_matrix(res):
    assert res["confusion"]["labels"] == ["A", "B", "C", "D"]
    assert res["confusion"]["matrix"] == [
        [1, 1, 0, 0],  # A: item 1 -> A, item 2 -> B
        [1, 1, 0, 0],  # B: item 6 -> A, item 3 -> B
        [0, 0, 2, 0],  # C: items 4, 5
        [0, 0, 0, 1],  # D: item 7
    ]


def test_venomous_safety(res):
    # Truly venomous: items 1, 2 (A) and 7 (D).
    assert res["n_venomous"] == 3
    # Flagged: 1 (top-1 A), 2 (top-1 B harmless, but venomous mass .6 >= .5), 7 (top-1 D) -> 3/3.
    assert res["venomous_recall"] == pytest.approx(1.0)
    # Top-1 venomous only: 1 and 7 -> 2/3.
    assert res["venomous_recall_top1"] == pytest.approx(2 / 3)
    # Top-1 known harmless: item 2 (B) -> 1/3.
    assert res["venomous_called_harmless"] == pytest.approx(1 / 3)


def test_venomous_none_without_venomous_truths():
    r = evaluate([EvalItem("B", {"B": 1.0})], venomous=VENOMOUS)
    assert (
        r["venomous_recall"] is None
        and r["venomous_recall_top1"] is None
        and r["venomous_called_harmless"] is None
    )


def test_coverage_and_accuracy_answered(res):
    assert res["coverage"] == pytest.approx(6 / 7)  # item 5 declined
    assert res["accuracy_answered"] == pytest.approx(4 / 6)  # answered 1, 2, 3, 4, 6, 7; right 1, 3, 4, 7


def test_country_macro_f1(res):
    # X = items 1, 2, 6: truth A, A, B; predicted A, B, A; species in X: A, B.
    #   A: P = 1/2 (1 right, 6 wrong), R = 1/2 (1 found, 2 missed) -> F1 1/2; B: predicted once (2), wrong -> F1 0.
    #   macro = (1/2 + 0) / 2 = 1/4
    # Y = items 3, 4, 5: truth B, C, C, all right -> macro 1.  Item 7 has no country.
    assert res["per_country"]["X"]["macro_f1"] == pytest.approx(0.25)
    assert res["per_country"]["Y"]["macro_f1"] == pytest.approx(1.0)
    assert res["country_macro_f1"] == pytest.approx((0.25 + 1.0) / 2)  # 0.625
    assert evaluate([EvalItem("A", {"A": 1.0})], venomous=VENOMOUS)["country_macro_f1"] is None


def test_reliability_and_ece(res):
    bins = res["reliability"]
    assert len(bins) == 10
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 2, 1, 1, 1, 1, 1]
    # [0.4, 0.5): items 2 (.40, wrong) and 5 (.45, right) -> accuracy 1/2, confidence .425
    b = bins[4]
    assert (b["lo"], b["hi"]) == (0.4, 0.5)
    assert b["accuracy"] == pytest.approx(0.5)
    assert b["confidence"] == pytest.approx(0.425)
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None
    # |acc - conf| per bin: .4-.5: .075 (x2 items), .5-.6: |0-.55|, .6-.7: |1-.6|, .7-.8: .3, .8-.9: .2, .9-1: .1
    ece = (2 * 0.075 + 0.55 + 0.4 + 0.3 + 0.2 + 0.1) / 7
    assert res["ece"] == pytest.approx(ece)  # 1.7 / 7


def test_roc_auc(res):
    # A: positives (items 1, 2) score .8, .3; negatives (3..7) score .05, .2, .2, .55, .4.
    #   .8 beats all 5; .3 beats .05, .2, .2 -> 8 of 10 pairs.
    assert res["roc_auc"]["A"] == pytest.approx(0.8)
    # D: positive .6 vs negatives .3 (item 2) and 0 x5 -> 1.
    assert res["roc_auc"]["D"] == pytest.approx(1.0)
    # B: positives .9, 0 (missing); negatives .1, .4, .1, .35, 0 -> 5 + 0.5 (tie 0 vs 0) = 5.5 / 10
    assert res["roc_auc"]["B"] == pytest.approx(0.55)
    # C: positives .7, .45; negatives .1, 0, 0, .45, 0 -> 5 + (4 + 0.5) = 9.5 / 10
    assert res["roc_auc"]["C"] == pytest.approx(0.95)
    assert res["roc_auc_macro"] == pytest.approx((0.8 + 0.55 + 0.95 + 1.0) / 4)


def test_roc_auc_skips_species_without_negatives():
    r = evaluate([EvalItem("A", {"A": 0.9}), EvalItem("A", {"A": 0.4, "B": 0.6})], venomous=VENOMOUS)
    assert r["roc_auc"] == {}  # A has no negatives, B no positives
    assert r["roc_auc_macro"] is None


def test_worst_errors(res):
    # Wrong items by confidence: 6 (.55), 2 (.40)
    assert [(w["image"], w["truth"], w["predicted"]) for w in res["worst_errors"]] == [
        ("6.jpg", "B", "A"),
        ("2.jpg", "A", "B"),
    ]


def test_precision_threshold():
    """The threshold calibration chooses (retrieval/calibrate.py), on ITEMS' top-1 confidences."""
    # Top-1 confidence (right?): .40 n, .45 y, .55 n, .60 y, .70 y, .80 y, .90 y
    # t <= .40: 5/7 = .714; .41-.45: 5/6 = .833; .46-.55: 4/5 = .8; .56-.60: 4/4 = 1
    conf = np.array([max(it.scores.values()) for it in ITEMS])
    correct = np.array([max(it.scores, key=it.scores.get) == it.truth for it in ITEMS])
    assert sorted(zip(conf.tolist(), correct.tolist(), strict=True)) == [
        (0.40, False), (0.45, True), (0.55, False), (0.60, True), (0.70, True), (0.80, True), (0.90, True)]
    assert precision_threshold(conf, correct, 0.95) == (
        pytest.approx(0.56),
        pytest.approx(1.0),
        pytest.approx(4 / 7),
    )
    assert precision_threshold(conf, correct, 0.8) == (
        pytest.approx(0.41),
        pytest.approx(5 / 6),
        pytest.approx(6 / 7),
    )
    assert precision_threshold(conf, correct, 0.7) == (
        pytest.approx(0.0),
        pytest.approx(5 / 7),
        pytest.approx(1.0),
    )
    t, p, cov = precision_threshold(np.array([0.9]), np.array([False]), 0.5)
    assert t == 1.0 and math.isnan(p) and cov == 0.0


def test_evaluate_is_json_ready(res):
    assert json.loads(json.dumps(res, allow_nan=False)) == res


def test_evaluate_rejects_empty():
    with pytest.raises(ValueError):
        evaluate([], venomous=VENOMOUS)


def test_write_report(tmp_path, res):
    other = evaluate(
        [EvalItem(it.truth, {it.truth: 1.0}, country=it.country) for it in ITEMS], venomous=VENOMOUS
    )
    files = write_report(
        tmp_path / "out", {"knn": res, "probe": other}, title="Test report", notes=["a note"]
    )
    out = tmp_path / "out"
    assert set(files) == {
        "report.json",
        "report.md",
        "confusion_knn.png",
        "confusion_probe.png",
        "reliability.png",
    }
    assert all(p.parent == out and p.is_file() for p in files.values())

    data = json.loads((out / "report.json").read_text())
    assert data["title"] == "Test report"
    assert data["results"]["knn"]["top1"] == pytest.approx(5 / 7)
    assert data["results"]["probe"]["top1"] == 1.0

    md = (out / "report.md").read_text()
    # top1 5/7, top5 6/7, macro-F1 .75, ROC-AUC .825, venomous recall 1, called harmless 1/3, coverage 6/7,
    # accuracy answered 2/3, country macro-F1 .625, ECE 1.7/7
    assert "| knn | 7 | 0.714 | 0.857 | 0.750 | 0.825 | 1.000 | 0.333 | 0.857 | 0.667 | 0.625 | 0.243 |" in md
    assert "## Per-species results: probe (best macro-F1)" in md
    assert "a note" in md

    for name in ("confusion_knn.png", "confusion_probe.png", "reliability.png"):
        assert files[name].read_bytes()[:8] == PNG_SIGNATURE
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_precision_threshold_keeps_the_target_to_the_point():
    """A threshold whose answered set falls short of the target, even by a little (93 % for 95 %), is not taken; one
    that reaches it exactly is (walk s55, M37: a 5-point slack passed the test above)."""
    conf = np.array([0.30] + [0.50 + 0.01 * i for i in range(14)])  # the least confident answer is the one wrong
    correct = np.array([False] + [True] * 14)
    assert correct.mean() == pytest.approx(14 / 15)  # 0.933: under 0.95, within 5 points of it
    assert precision_threshold(conf, correct, 0.95) == (
        pytest.approx(0.31), pytest.approx(1.0), pytest.approx(14 / 15))
    exact = np.array([False] + [True] * 19)  # 19 / 20 = 0.95: the target reached exactly
    assert precision_threshold(np.linspace(0.3, 0.9, 20), exact, 0.95) == (
        pytest.approx(0.0), pytest.approx(0.95), pytest.approx(1.0))


def test_min_answered_is_where_one_wrong_answer_can_still_meet_the_target():
    """Walk s57, finding 3: under this count, reaching the target means no mistake was seen at all."""
    from retrieval.metrics import min_answered

    assert min_answered(0.95) == 20 and min_answered(0.9) == 10 and min_answered(0.99) == 100
    assert 19 / 20 >= 0.95 > 18 / 19  # 20 answers hold one mistake at 95 %, 19 do not


def test_a_species_no_answer_can_score_is_left_out_of_roc_auc():
    """Walk s57, finding 8: a species with no reference in the gallery got a per-species ROC-AUC of 0.5 (constant
    scores), which counted toward the macro ROC-AUC."""
    items = [EvalItem("A", {"A": 0.9, "B": 0.1}), EvalItem("B", {"A": 0.3, "B": 0.7}),
             EvalItem("C", {"A": 0.6, "B": 0.4}), EvalItem("A", {"A": 0.8, "B": 0.2})]
    before = evaluate(items, venomous={})
    assert before["roc_auc"]["C"] == 0.5 and before["roc_auc_unscored"] == []
    res = evaluate(items, venomous={}, scored={"A", "B"})
    assert set(res["roc_auc"]) == {"A", "B"} and res["roc_auc_unscored"] == ["C"]
    assert res["roc_auc_macro"] == pytest.approx((res["roc_auc"]["A"] + res["roc_auc"]["B"]) / 2)
    assert res["top1"] == before["top1"]  # nothing else moves
