"""The cleaning report: ``findings.csv``, ``zero_shot_scores.csv``, ``contact_sheet.html`` and ``summary.json``."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from index.atomic import atomic_write, write_json_atomic
from index.sources import read_source
from index.store import source_text
from index.text import csv_dict, csv_row
from retrieval.findings import KINDS

if TYPE_CHECKING:
    from retrieval.clean import CleanResult
    from retrieval.findings import Finding, PhotoSet, ZeroShotResult

CSV_COLUMNS: tuple[str, ...] = (
    "kind", "score", "path", "paired_path", "detail", "reference_id", "paired_reference_id", "suggested_species",
)
FINDINGS_CSV = "findings.csv"
SCORES_CSV = "zero_shot_scores.csv"
CONTACT_SHEET = "contact_sheet.html"
SUMMARY_JSON = "summary.json"
#: Findings shown as thumbnails in the contact sheet (all of them are in the CSV).
MAX_SHEET_FINDINGS = 400
THUMB_SIZE = 160


def write_findings_csv(path: str | Path, findings: Sequence[Finding]) -> Path:
    """One row per finding, columns :data:`CSV_COLUMNS`. ``path`` and ``paired_path`` are written absolute, as a
    gallery stores its references' paths (:func:`index.store.source_text`; object-store URIs as they are): a photo
    of the gallery, the dataset or ``--against`` has one spelling, whatever folder the command was run from. A text
    cell a spreadsheet would run as a formula (a path or species name starting with ``=``) gets a ``'`` in front
    (:func:`index.text.csv_cell`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for f in findings:
        row = f.row()
        for column in ("path", "paired_path"):
            if row[column]:
                row[column] = source_text(str(row[column]))
        writer.writerow(csv_dict(row))
    return atomic_write(path, buf.getvalue())


def _write_scores_csv(path: Path, photos: PhotoSet, zs: ZeroShotResult) -> Path:
    names = zs.prompts.names
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_row(["path", "off_target", *[f"p_{n}" for n in names]]))
    for i, p in enumerate(photos.paths):
        if photos.errors[i] is None:
            writer.writerow(csv_row([p, f"{zs.off_target[i]:.4f}", *[f"{x:.4f}" for x in zs.probs[i]]]))
    return atomic_write(path, buf.getvalue())


def _thumbnail(path: str, cache: dict[str, str], read: Callable[[str], bytes] | None = None) -> str:
    """A flagged photo's preview tag; ``read``: its bytes from its path (a gallery's ``read_photo``: an upload kept
    in an S3 store too; by default a file)."""
    if path in cache:
        return cache[path]
    from retrieval.images import decode_image

    try:
        data = (read or read_source)(path)  # a regular file under the byte limit only
        img = decode_image(data, name=path, draft=2 * THUMB_SIZE)
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        tag = f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="">'
    except Exception as exc:  # noqa: BLE001 - a missing or broken photo must not stop the report
        tag = f'<div class="missing">no preview<br>{html.escape(str(exc)[:80])}</div>'
    cache[path] = tag
    return tag


_CSS = (
    """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ccc;border-radius:6px;padding:6px;width:W1px;font-size:11px;word-break:break-all}
.pair{width:W2px} .pair .imgs{display:flex;gap:4px}
.card img{display:block;max-width:TTpx;max-height:TTpx;margin:auto}
.score{font-weight:bold;font-size:13px} .missing{width:TTpx;height:60px;background:#eee;color:#777}
table.summary td{padding:2px 10px 2px 0}
"""
    .replace("W1", str(THUMB_SIZE + 14))
    .replace("W2", str(2 * THUMB_SIZE + 22))
    .replace("TT", str(THUMB_SIZE))
)

_TITLES = {
    "label-conflict": "Label conflicts: the same photo (or a near-identical one) filed under two species; one label "
                      "is wrong (never excluded automatically)",
    "suspect-label": "Suspect labels: photo | its nearest neighbour; its nearest other photos all carry another "
                     "species, named below with their mean cosine similarity (report only, never excluded)",
    "off-target": "Off-target photos (zero-shot): probability of the off-target classes",
    "leak": "Leaks: the same bytes in the gallery and in the other set",
    "near-leak": "Near-identical leaks: gallery photo | other-set photo, cosine similarity",
    "duplicate": "Duplicates in the set: the same bytes",
    "near-duplicate": "Near-duplicates in the set: cosine similarity",
    "unreadable": "Unreadable photos",
}


def write_contact_sheet(
    path: str | Path, findings: Sequence[Finding], *, title: str, summary: dict[str, object],
    limit: int = MAX_SHEET_FINDINGS, progress: bool = False, read: Callable[[str], bytes] | None = None,
) -> Path:
    """A self-contained HTML page: thumbnails (base64 JPEG) of flagged photos and duplicate pairs, with scores
    (``read``: a photo's bytes from its path, :func:`_thumbnail`)."""
    from tqdm import tqdm

    bar = tqdm(total=min(limit, len(findings)), desc="cleaning: contact sheet", unit="finding",
               disable=not progress)
    thumbs: dict[str, str] = {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><table class='summary'>",
    ]
    for key, value in summary.items():
        parts.append(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table>")
    shown = 0
    for kind in KINDS:
        group = [f for f in findings if f.kind == kind]
        if not group:
            continue
        parts.append(f"<h2>{html.escape(_TITLES[kind])} ({len(group)})</h2><div class='grid'>")
        for f in group:
            if shown >= limit:
                break
            shown += 1
            bar.update()
            score = "" if math.isnan(f.score) else f"{f.score:.3f}"
            ref = f" #{f.reference_id}" if f.reference_id is not None else ""
            if f.paired_path:
                parts.append(
                    f"<div class='card pair'><div class='score'>{score}{ref}</div><div class='imgs'>"
                    f"{_thumbnail(f.path, thumbs, read)}{_thumbnail(f.paired_path, thumbs, read)}</div>"
                    f"<div>{html.escape(f.path)}</div><div>&harr; {html.escape(f.paired_path)}</div>"
                    + (f"<div>{html.escape(f.detail)}</div>" if f.detail else "") + "</div>"
                )
            else:
                img = _thumbnail(f.path, thumbs, read) if kind != "unreadable" else ""
                parts.append(
                    f"<div class='card'><div class='score'>{score}{ref}</div>{img}"
                    f"<div>{html.escape(f.detail)}</div><div>{html.escape(f.path)}</div></div>"
                )
        parts.append("</div>")
    if shown < len(findings):
        parts.append(f"<p>{len(findings) - shown} more findings are in {FINDINGS_CSV}.</p>")
    if not findings:
        parts.append("<p>Nothing found.</p>")
    parts.append("</body></html>")
    bar.close()
    return atomic_write(path, "\n".join(parts))


def write_report(report_dir: str | Path, result: CleanResult, *, title: str, progress: bool = False) -> dict[str, Path]:
    """findings.csv, contact_sheet.html, summary.json (and zero_shot_scores.csv when the filter ran; an earlier
    run's is removed otherwise, so a folder never mixes two runs). summary.json is written last."""
    t0 = time.perf_counter()
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": write_findings_csv(out / FINDINGS_CSV, result.findings)}
    if result.zero_shot is not None:
        files["scores"] = _write_scores_csv(out / SCORES_CSV, result.photos, result.zero_shot)
    else:
        (out / SCORES_CSV).unlink(missing_ok=True)
    summary: dict[str, object] = {
        "encoder": result.encoder,
        "photos": len(result.photos),
        "against": len(result.against) if result.against is not None else None,
        "zero_shot": (
            {"prompts": result.zero_shot.prompts.source, "classes": result.zero_shot.prompts.names,
             "templates": list(result.zero_shot.prompts.templates), "threshold": result.config.threshold,
             "logit_scale": result.zero_shot.logit_scale}
            if result.zero_shot is not None else result.zero_shot_notice
        ),
        "dup_threshold": result.config.dup_threshold if result.config.duplicates else None,
        "suspect_k": result.config.suspect_k if result.config.suspect_labels else None,
        "counts": result.counts(),
        "seconds_embed": round(result.seconds_embed, 3),
        "seconds_rest": round(result.seconds_rest, 3),
        "applied": (
            {"excluded": result.applied.excluded, "already": result.applied.already,
             "not_in_gallery": result.applied.not_in_gallery, "kept_last": result.applied.kept_last}
            if result.applied is not None else None
        ),
    }
    shown = {k: v for k, v in summary.items() if k not in ("applied",)}
    shown["zero_shot"] = (
        f"{result.zero_shot.prompts.source}, flagged at p >= {result.config.threshold:g}"
        if result.zero_shot is not None else result.zero_shot_notice
    )
    files["sheet"] = write_contact_sheet(out / CONTACT_SHEET, result.findings, title=title, summary=shown,
                                         progress=progress, read=result.read)
    summary["seconds_report"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out / SUMMARY_JSON, summary)
    files["summary"] = out / SUMMARY_JSON
    return files
