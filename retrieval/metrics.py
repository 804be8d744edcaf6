"""Metrics and the report writer for ``speciesid evaluate``: pure functions over plain data, no model code.

Conventions used throughout (all items, whether or not the system declined to answer):

* An item's species are ranked by score, highest first, ties broken by species name; species missing from
  ``scores`` (and scores <= 0 or NaN) have probability 0 and are never ranked. The top-1 prediction is the first
  ranked species, or ``None`` when no species has a positive score (then every prediction metric counts it wrong).
* "Top-k correct" means the true species is among the first k ranked species (not scikit-learn's
  ``top_k_accuracy_score``, which would rank a species without a score among the zeros).
* The top-1 confidence is the score of the top-1 species (0 when there is none).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from index.atomic import atomic_write, fsync_dir, remove_leftovers
from index.formats import jsonable
from index.interrupts import held_interrupt

log = logging.getLogger(__name__)

#: Stands in for "no prediction" inside the sklearn calls; never part of ``labels``.
_NO_PREDICTION = "<no prediction>"
#: Equal-width bins of the top-1 confidence for the reliability diagram and ECE.
N_RELIABILITY_BINS = 10
#: Total probability on venomous species at or above which an item counts as flagged venomous.
VENOMOUS_MASS_THRESHOLD = 0.5
#: How many confident mistakes ``evaluate`` lists under ``worst_errors``.
N_WORST_ERRORS = 10


@dataclass
class EvalItem:
    """One evaluated photo: its true species and what the system said about it."""

    truth: str  # true species
    scores: dict[str, float] = field(
        default_factory=dict
    )  # probability per species; missing = 0; sums to <= 1
    unknown: bool = False  # the system declined to answer
    country: str | None = None  # where the photo was taken (for country-averaged macro-F1)
    image: str | None = None  # path, for the report's worst-errors list


@dataclass(frozen=True)
class _Pred:
    top1: str | None
    confidence: float
    correct: bool
    top5: bool
    venomous_mass: float


def _ranked(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """Species with a positive score, highest first, ties broken by name."""
    return sorted(((s, float(p)) for s, p in scores.items() if p > 0), key=lambda sp: (-sp[1], sp[0]))


def _predict(item: EvalItem, venomous: Mapping[str, bool | None]) -> _Pred:
    ranked = _ranked(item.scores)
    top1, conf = ranked[0] if ranked else (None, 0.0)
    mass = sum(p for s, p in ranked if venomous.get(s) is True)
    return _Pred(
        top1=top1,
        confidence=conf,
        correct=top1 == item.truth,
        top5=item.truth in {s for s, _ in ranked[:5]},
        venomous_mass=mass,
    )


def _mean(values: Sequence[bool] | Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _bin_index(confidence: float, n_bins: int = N_RELIABILITY_BINS) -> int:
    # The epsilon keeps values on an edge (0.7 * 10 = 7.000000000000001, 0.3 * 10 = 2.9999...) in the upper bin.
    return min(max(int(math.floor(confidence * n_bins + 1e-9)), 0), n_bins - 1)


def reliability(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = N_RELIABILITY_BINS
) -> tuple[list[dict], float | None]:
    """Equal-width bins [lo, hi) of the top-1 confidence (the last bin includes 1.0) and the count-weighted ECE.

    Each bin is {lo, hi, count, accuracy, confidence}; accuracy and confidence are None for an empty bin.
    Not ``sklearn.calibration.calibration_curve``: its bins are (lo, hi] (a confidence of 0.4 falls in
    0.3-0.4), and it returns neither the counts nor the empty bins this report and the ECE need.
    """
    buckets: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for c, ok in zip(confidences, correct, strict=True):
        buckets[_bin_index(c, n_bins)].append((c, ok))
    n = len(confidences)
    bins, ece = [], 0.0
    for i, b in enumerate(buckets):
        acc = _mean([ok for _, ok in b])
        conf = _mean([c for c, _ in b])
        bins.append(
            {
                "lo": round(i / n_bins, 10),
                "hi": round((i + 1) / n_bins, 10),
                "count": len(b),
                "accuracy": acc,
                "confidence": conf,
            }
        )
        if b:
            ece += len(b) / n * abs(acc - conf)
    return bins, (ece if n else None)


def macro_f1(y_true: Sequence, y_pred: Sequence, labels: Sequence) -> float:
    """Macro-F1 over ``labels`` (a label never predicted nor present counts 0, as a missed species should)."""
    return float(f1_score(y_true, y_pred, labels=list(labels), average="macro", zero_division=0))


def evaluate(
    items: list[EvalItem], *, venomous: dict[str, bool | None], labels: list[str] | None = None,
    scored: Collection[str] | None = None,
) -> dict:
    """All evaluation metrics for one method's answers, as a JSON-ready dict.

    ``venomous`` maps species to True (venomous), False (known harmless) or None (unknown); species absent from it
    count as None. ``labels`` (default: sorted union of true and top-1 predicted species) are the species that
    per-species scores, ROC-AUC and the confusion matrix range over; macro-F1 is over those of them that truly occur
    in the items (as SnakeCLEF's, and as the per-country figure: a gallery species absent from the evaluated photos
    adds no F1 of 0 when it is wrongly predicted); top-1/top-5 use every item.

    Venomous safety: an item is *flagged venomous* when its top-1 species is venomous OR the total probability
    on venomous species is >= 0.5. ``venomous_recall`` is the share of truly venomous items that are flagged,
    ``venomous_recall_top1`` the share whose top-1 species is venomous, and ``venomous_called_harmless`` the
    share whose top-1 species is known harmless (False). All three are None without truly venomous items.

    ``country_macro_f1`` is SnakeCLEF 2021's metric: per country, macro-F1 over the species that truly occur in
    that country's items; then the plain mean over countries (items without a country are left out).

    ``scored``: the species the answers can name (a gallery's, its probe's); a species of ``labels`` outside it (no
    reference in the gallery) gets no ROC-AUC, nor a share of ``roc_auc_macro``: no answer scores it, so its 0.5
    would be by construction. Those with photos are listed in ``roc_auc_unscored``.
    """
    if not items:
        raise ValueError("evaluate() needs at least one item")
    over = [i for i, it in enumerate(items) if sum(p for p in it.scores.values() if p > 0) > 1 + 1e-6]
    if over:
        log.warning(
            "%d of %d items have scores summing to more than 1 (first: item %d)",
            len(over),
            len(items),
            over[0],
        )

    preds = [_predict(it, venomous) for it in items]
    y_true = [it.truth for it in items]
    y_pred = [p.top1 if p.top1 is not None else _NO_PREDICTION for p in preds]
    if labels is None:
        labels = sorted(set(y_true) | {p.top1 for p in preds if p.top1 is not None})
    labels = list(labels)
    n = len(items)

    # Classification over labels.
    prec, rec, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_species = [
        {"species": s, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(k)}
        for s, p, r, f, k in zip(labels, prec, rec, f1, support, strict=True)
    ]
    if set(labels) & set(y_true):
        with warnings.catch_warnings():  # sklearn warns about a 1x1 matrix even when labels are given
            warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
            matrix = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    else:  # sklearn refuses labels that never occur as truth
        matrix = [[0] * len(labels) for _ in labels]

    # One-vs-rest ROC-AUC on the score matrix, for species with both positives and negatives.
    score_matrix = np.array(
        [[max(float(it.scores.get(s, 0.0)), 0.0) for s in labels] for it in items]
    ).reshape(n, len(labels))
    score_matrix = np.nan_to_num(score_matrix, nan=0.0)
    truth_arr = np.array(y_true, dtype=object)
    roc_auc: dict[str, float] = {}
    unscored = sorted({s for s in y_true if scored is not None and s not in scored})
    for j, s in enumerate(labels):
        y_bin = truth_arr == s
        if 0 < y_bin.sum() < n and (scored is None or s in scored):
            roc_auc[s] = float(roc_auc_score(y_bin, score_matrix[:, j]))

    # Venomous safety.
    ven_idx = [i for i, it in enumerate(items) if venomous.get(it.truth) is True]
    top1_ven = [venomous.get(preds[i].top1) is True for i in ven_idx] if ven_idx else []
    flagged = [
        t or preds[i].venomous_mass >= VENOMOUS_MASS_THRESHOLD for t, i in zip(top1_ven, ven_idx, strict=True)
    ]
    harmless = [venomous.get(preds[i].top1) is False for i in ven_idx]

    # Abstention.
    answered = [p.correct for p, it in zip(preds, items, strict=True) if not it.unknown]

    # Country-averaged macro-F1 (SnakeCLEF 2021).
    by_country: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.country is not None:
            by_country.setdefault(it.country, []).append(i)
    per_country = {}
    for c, idx in sorted(by_country.items()):
        ct = [y_true[i] for i in idx]
        per_country[c] = {"n": len(idx), "macro_f1": macro_f1(ct, [y_pred[i] for i in idx], sorted(set(ct)))}

    bins, ece = reliability([p.confidence for p in preds], [p.correct for p in preds])

    errors = sorted((i for i, p in enumerate(preds) if not p.correct), key=lambda i: -preds[i].confidence)
    worst = [
        {
            "image": items[i].image,
            "truth": items[i].truth,
            "predicted": preds[i].top1,
            "confidence": preds[i].confidence,
        }
        for i in errors[:N_WORST_ERRORS]
    ]

    return jsonable(
        {
            "n": n,
            "top1": _mean([p.correct for p in preds]),
            "top5": _mean([p.top5 for p in preds]),
            "macro_f1": macro_f1(y_true, y_pred, [s for s in labels if s in set(y_true)]) if labels else None,
            "labels": labels,
            "per_species": per_species,
            "roc_auc": roc_auc,
            "roc_auc_macro": _mean(list(roc_auc.values())),
            "roc_auc_unscored": unscored,
            "n_venomous": len(ven_idx),
            "venomous_recall": _mean(flagged),
            "venomous_recall_top1": _mean(top1_ven),
            "venomous_called_harmless": _mean(harmless),
            "coverage": len(answered) / n,
            "n_answered": len(answered),
            "accuracy_answered": _mean(answered),
            "country_macro_f1": _mean([v["macro_f1"] for v in per_country.values()]),
            "per_country": per_country,
            "confusion": {"labels": labels, "matrix": matrix},
            "reliability": bins,
            "ece": ece,
            "worst_errors": worst,
        }
    )


def precision_threshold(confidence: np.ndarray, correct: np.ndarray, target: float = 0.95) -> tuple[float, float, float]:
    """Smallest threshold t (0.00..1.00, step 0.01) on ``confidence`` whose answered set (conf >= t) reaches
    ``target`` precision (share of answered items that are ``correct``).

    Returns (t, precision, coverage), coverage being the answered share of all items; (1.0, nan, 0.0) if no
    threshold reaches the target. How many items answered is the caller's to weigh (:func:`min_answered`).
    """
    conf = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    for t in np.round(np.arange(101) / 100, 2):
        answered = conf >= t - 1e-12
        if answered.any():
            precision = float(correct[answered].mean())
            if precision >= target - 1e-12:
                return float(t), precision, float(answered.sum() / len(conf))
    return 1.0, float("nan"), 0.0


def min_answered(target: float = 0.95) -> int:
    """The fewest answered items a threshold's precision must rest on before it is trusted: the count at which one
    wrong answer can still meet ``target`` (20 for 95 %). Under it, "reaches 95 %" only means that no mistake was seen
    (one wrong answer in 19 is 94.7 %): 2 correct photos of 2 would set the threshold (walk s57, finding 3)."""
    return max(1, math.ceil(round(1 / max(1 - target, 1e-6), 6)))


# ---------------------------------------------------------------------------------------------------- report


def _save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|")


#: (column heading, key in an evaluate() dict) of the comparison table.
REPORT_COLUMNS: list[tuple[str, str]] = [
    ("Top-1", "top1"),
    ("Top-5", "top5"),
    ("Macro-F1", "macro_f1"),
    ("ROC-AUC", "roc_auc_macro"),
    ("Venomous recall", "venomous_recall"),
    ("Venomous called harmless", "venomous_called_harmless"),
    ("Coverage", "coverage"),
    ("Accuracy answered", "accuracy_answered"),
    ("Country macro-F1", "country_macro_f1"),
    ("ECE", "ece"),
]


def _best_method(results: Mapping[str, dict]) -> str:
    """Method with the highest macro-F1 (first listed on ties or when none has one)."""
    names = list(results)
    scored = [
        (results[m].get("macro_f1"), -i, m)
        for i, m in enumerate(names)
        if results[m].get("macro_f1") is not None
    ]
    return max(scored)[2] if scored else names[0]


def _markdown(results: Mapping[str, dict], title: str, notes: Sequence[str]) -> str:
    lines = [f"# {title}", "", "| Method | n | " + " | ".join(h for h, _ in REPORT_COLUMNS) + " |"]
    lines.append("|" + "---|" * (len(REPORT_COLUMNS) + 2))
    for m, r in results.items():
        lines.append(
            f"| {_md(m)} | {_fmt(r.get('n'))} | "
            + " | ".join(_fmt(r.get(k)) for _, k in REPORT_COLUMNS)
            + " |"
        )
    lines += [
        "",
        "Venomous recall: share of truly venomous photos flagged venomous (top-1 species venomous, or total "
        "probability on venomous species >= 0.5). Venomous called harmless: share of truly venomous photos whose "
        'top-1 species is known harmless. Coverage: share not answered "unknown". Country macro-F1: mean over '
        "countries of the macro-F1 over the species present in that country's photos (SnakeCLEF 2021's metric); the "
        "countries are the evaluated photos' own, from the dataset's metadata (its country column), '–' where none "
        "records one.",
    ]
    best = _best_method(results)
    r = results[best]
    lines += ["", f"## Per-species results: {_md(best)} (best macro-F1)", ""]
    lines += ["| Species | Precision | Recall | F1 | Support | ROC-AUC |", "|---|---|---|---|---|---|"]
    auc = r.get("roc_auc") or {}
    for row in r.get("per_species") or []:
        lines.append(
            f"| {_md(row['species'])} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | {_fmt(row['f1'])} "
            f"| {row['support']} | {_fmt(auc.get(row['species']))} |"
        )
    worst = r.get("worst_errors") or []
    if worst:
        lines += ["", f"## Most confident mistakes: {_md(best)}", ""]
        lines += ["| Image | Truth | Predicted | Confidence |", "|---|---|---|---|"]
        for w in worst:
            lines.append(
                f"| {_md(w.get('image') or '')} | {_md(w['truth'])} | {_md(w['predicted'])} | {_fmt(w['confidence'])} |"
            )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


#: The longest tick label of a confusion matrix, in characters: a longer species label (a folder taken whole, a
#: hybrid's) is cut with an ellipsis (report.md and report.json keep it whole).
TICK_LABEL_CHARS = 32


def tick_label(label: str, width: int = TICK_LABEL_CHARS) -> str:
    """``label`` cut to ``width`` characters, its end an ellipsis where it was cut."""
    return label if len(label) <= width else label[: width - 1].rstrip() + "\u2026"


def _figure(**kw: Any) -> Any:
    """A matplotlib Figure drawn on its own Agg canvas: no pyplot, so the process's backend (a notebook's) is left
    as it is."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _plot_confusion(method: str, confusion: Mapping[str, Any]) -> Any:
    labels = [tick_label(str(label)) for label in confusion.get("labels") or []]
    m = np.array(confusion.get("matrix") or [], dtype=float).reshape(len(labels), len(labels))
    k = len(labels)
    fontsize = max(2.0, min(9.0, 300.0 / max(k, 1)))
    # the tick labels' room (about 0.6 em a character) on top of the matrix's own
    room = 0.6 * fontsize / 72 * max((len(label) for label in labels), default=0)
    size = min(max(4.0, 0.4 * k + 2.5) + room, 44.0)
    fig = _figure(figsize=(size, size), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", interpolation="nearest")
    ax.set_xticks(range(k), labels=labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(k), labels=labels, fontsize=fontsize)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("truth")
    ax.set_title(f"Confusion matrix: {method}")
    if 0 < k <= 40:
        top = m.max() if m.size else 0
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(m[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color="white" if m[i, j] > top / 2 else "black",
                    )
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def _plot_reliability(results: Mapping[str, dict]) -> Any:
    fig = _figure(figsize=(5.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for m, r in results.items():
        pts = [(b["confidence"], b["accuracy"]) for b in r.get("reliability") or [] if b.get("count")]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=f"{m} (ECE {_fmt(r.get('ece'))})")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def write_report(
    out_dir: str | Path, results: dict[str, dict], *, title: str, notes: list[str] | None = None,
    embedding: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, confusion_<method>.png per method and reliability.png into ``out_dir``.

    The files are made in a hidden folder inside ``out_dir`` and moved in only once all are made (the moves with
    Ctrl-C held back: :func:`index.interrupts.held_interrupt`), with the plots of an earlier report that this one
    has not (a method it did not run, as the earlier report.json lists them) removed: a report cut short leaves the
    earlier one as it was, never new files beside old ones; no other file of the folder is touched. A staging folder
    that a killed run left is removed by the next report (after 10 minutes).

    ``results`` maps a method name ("knn", "probe", "blend", ...) to an :func:`evaluate` dict. report.json holds
    {title, notes, results}, and ``embedding`` when given (what embedded the photos:
    ``retrieval.protocol.embedding_setup``; the notes say it in words); report.md compares the methods, then gives
    per-species scores and the most confident mistakes of the method with the best macro-F1. Returns {file name:
    path} of the files written.
    """
    if not results:
        raise ValueError("write_report() needs at least one method's results")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)  # a staging folder of a run killed more than 10 minutes ago
    stage = out / f".report.{uuid.uuid4().hex}.tmp"  # a leftover's name (index.atomic.is_leftover)
    stage.mkdir()
    try:
        written = _write_files(stage, results, title=title, notes=list(notes or []), embedding=embedding)
        with held_interrupt():  # the earlier report replaced whole; a Ctrl-C meanwhile is raised once it is
            for name in _earlier_plots(out) - set(written):  # an earlier report's plot of a method this one has not
                (out / name).unlink(missing_ok=True)
            for name in sorted(written, key=lambda n: n == "report.json"):  # report.json last
                os.replace(written[name], out / name)
            fsync_dir(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("wrote evaluation report (%d files) to %s", len(written), out)
    return {name: out / name for name in written}


def _plot_names(methods: Iterable[str]) -> dict[str, str]:
    """The confusion plot's file name of each method (``confusion_<method>.png``, made a safe file name, numbered
    when two methods' names make the same one): method -> file name."""
    names: dict[str, str] = {}
    for method in methods:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", method).strip("._") or "method"
        name, i = f"confusion_{stem}.png", 2
        while name in names.values():
            name, i = f"confusion_{stem}_{i}.png", i + 1
        names[method] = name
    return names


def _earlier_plots(out: Path) -> set[str]:
    """The plots the report in ``out`` (its report.json) wrote: one per method of its ``results`` that holds a
    confusion matrix (as :func:`_write_files` writes them), and reliability.png. Nothing when there is none, or it
    cannot be read: a file of the folder that no report wrote (a user's own ``confusion_matrix_fig3.png``, or
    ``confusion_knn.png`` beside a report whose knn had no matrix) is never taken for one."""
    try:
        results = json.loads((out / "report.json").read_text(encoding="utf-8")).get("results")
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(results, dict):
        return set()
    names = _plot_names(str(method) for method in results)
    return {names[str(method)] for method, r in results.items() if isinstance(r, dict) and r.get("confusion")} | {
        "reliability.png"}


def _write_files(out: Path, results: dict[str, dict], *, title: str, notes: list[str],
                 embedding: dict[str, str] | None) -> dict[str, Path]:
    """:func:`write_report`'s files, written into ``out``: {file name: path}."""
    written: dict[str, Path] = {}

    path = out / "report.json"
    payload = {"title": title, "notes": notes, "results": jsonable(results)}
    if embedding:
        payload["embedding"] = dict(embedding)
    atomic_write(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    written[path.name] = path

    path = out / "report.md"
    atomic_write(path, _markdown(results, title, notes))
    written[path.name] = path

    for method, name in _plot_names(results).items():
        if (r := results[method]).get("confusion"):
            path = out / name
            _save_figure(_plot_confusion(method, r["confusion"]), path)
            written[name] = path

    path = out / "reliability.png"
    _save_figure(_plot_reliability(results), path)
    written[path.name] = path
    return written
