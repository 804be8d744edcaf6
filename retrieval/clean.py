"""Clean a gallery: off-target photos (zero-shot text prompts), duplicates, and leakage into another set.

Three checks, one report (``findings.csv`` + ``contact_sheet.html`` + ``summary.json``):

- **Zero-shot filter** (text-capable encoders only, e.g. BioCLIP): every photo is scored against prompt
  classes read from a prompt file (``index/data/prompts/<group>.txt`` or ``--prompts FILE``): target
  classes ("a snake") and off-target ones (drawings, maps, labels, skeletons, jars, shed skins, eggs,
  people, empty scenes...). A class embedding is the normalised mean of its prompts (every phrase in
  every template, as :mod:`retrieval.textprior` does for species); the class probabilities are
  ``softmax(logit_scale * cos(image, class))`` and the off-target probability is their sum over the
  off-target classes. A photo is flagged when it reaches ``threshold``.
- **Duplicates** in the set: same bytes (sha256), or embeddings with cosine >= ``dup_threshold``.
- **Leakage** against another set (``against``, e.g. the evaluation photos): the same two tests across sets.

Nothing is deleted. :func:`apply_exclusions` marks findings' references as *excluded* in the gallery's
store (left out of search and of probe training), logs which ids each run excluded in
``<index>/clean_log.json``, and :func:`restore_exclusions` brings them back.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import html
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from index.datasets import DATA_DIR, IMAGE_EXTENSIONS, load_dataset, lookup_taxon
from retrieval.encoders import DEFAULT_ENCODER, Encoder, EncoderConfig, create_encoder_from_config
from retrieval.prompts import ARTICLE_TEMPLATES

if TYPE_CHECKING:  # the store (lancedb) loads only when a gallery is touched: the CLI parser imports this module
    from index.gallery import Gallery

logger = logging.getLogger(__name__)

PROMPTS_DIR = DATA_DIR / "prompts"
#: Shipped prompt files (``index/data/prompts/<group>.txt``).
PROMPT_GROUPS: tuple[str, ...] = ("snakes", "animals")
#: Prompt templates for the off-target phrases, which carry their own article ("a drawing of a snake").
DEFAULT_TEMPLATES: tuple[str, ...] = ARTICLE_TEMPLATES
DEFAULT_THRESHOLD = 0.5
#: Chosen on the real ph-snakes val-vs-train pairs with MobileNetV1 (docs/cleaning.md): the same photo
#: re-encoded, re-cropped or with its watermark cut off scored 0.959-1.000; different photos of the same
#: animal (burst shots, same scene) 0.93 and below, with a few bursts at 0.95-0.96.
DEFAULT_DUP_THRESHOLD = 0.95
#: Datasets that only hold snakes (folder datasets are snakes when most of their species are known snakes).
SNAKE_DATASETS = frozenset({"moroccan", "snakeclef2021"})

KINDS: tuple[str, ...] = ("off-target", "leak", "near-leak", "duplicate", "near-duplicate", "unreadable")
#: Kinds ``apply_exclusions`` can act on (unreadable photos are never in a store).
APPLY_KINDS: tuple[str, ...] = ("off-target", "leak", "near-leak", "duplicate", "near-duplicate")
CSV_COLUMNS: tuple[str, ...] = (
    "kind", "score", "path", "paired_path", "detail", "reference_id", "paired_reference_id",
)
FINDINGS_CSV = "findings.csv"
SCORES_CSV = "zero_shot_scores.csv"
CONTACT_SHEET = "contact_sheet.html"
SUMMARY_JSON = "summary.json"
CLEAN_LOG = "clean_log.json"
#: Folder of a gallery where the prompt class embeddings are cached.
PROMPT_CACHE = "clean_prompt_cache"
#: Findings shown as thumbnails in the contact sheet (all of them are in the CSV).
MAX_SHEET_FINDINGS = 400
THUMB_SIZE = 160


# ------------------------------------------------------------------------------------------ prompts
@dataclass
class PromptClass:
    """One class of the zero-shot classifier: a name and the phrases that describe it."""

    name: str  # e.g. "snake", "drawing"
    target: bool  # True: what a reference photo should show; False: flag it
    phrases: list[str]  # filled into every template


@dataclass
class PromptSet:
    """Target and off-target prompt classes plus the templates their phrases are filled into."""

    classes: list[PromptClass]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    source: str = "<text>"  # file it was read from

    @property
    def names(self) -> list[str]:
        """Class names, in order."""
        return [c.name for c in self.classes]

    @property
    def target_mask(self) -> np.ndarray:
        """(n_classes,) bool: True for target classes."""
        return np.array([c.target for c in self.classes], dtype=bool)

    def prompts(self, cls: PromptClass) -> list[str]:
        """Every template filled with every phrase of ``cls``."""
        return [t.format(p) for p in cls.phrases for t in self.templates]


def parse_prompts(text: str, source: str = "<text>") -> PromptSet:
    """Read the prompt-file format (see ``index/data/prompts/snakes.txt``).

    ``[target]`` / ``[target: NAME]`` and ``[off-target: NAME]`` sections hold one phrase a line, an
    optional ``[templates]`` section one template with ``{}`` a line; ``#`` starts a comment. At least
    one target and one off-target class are required.
    """
    classes: list[PromptClass] = []
    templates: list[str] = []
    section: str | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        if line.startswith("[") and line.endswith("]"):
            head, _, name = line[1:-1].partition(":")
            head, name = head.strip().lower(), " ".join(name.split())
            if head == "templates":
                section = "templates"
            elif head in ("target", "off-target", "offtarget", "off_target"):
                target = head == "target"
                name = name or ("target" if target else "")
                if not name:
                    raise ValueError(f"{where}: an off-target section needs a name, e.g. [off-target: drawing]")
                if name in {c.name for c in classes}:
                    raise ValueError(f"{where}: class {name!r} appears twice")
                classes.append(PromptClass(name=name, target=target, phrases=[]))
                section = "class"
            else:
                raise ValueError(
                    f"{where}: unknown section {line!r}; use [target], [target: NAME], [off-target: NAME] "
                    "or [templates]"
                )
            continue
        if section is None:
            raise ValueError(f"{where}: {line!r} comes before any [target] / [off-target: NAME] section")
        if section == "templates":
            if line.count("{}") != 1:
                raise ValueError(f"{where}: a template needs exactly one {{}} where the phrase goes, got {line!r}")
            templates.append(line)
        else:
            classes[-1].phrases.append(line)
    empty = [c.name for c in classes if not c.phrases]
    if empty:
        raise ValueError(f"{source}: class(es) without phrases: {', '.join(empty)}")
    if not any(c.target for c in classes):
        raise ValueError(f"{source}: no [target] section (what a usable photo shows, e.g. 'a snake')")
    if all(c.target for c in classes):
        raise ValueError(f"{source}: no [off-target: NAME] section (what to flag, e.g. 'a drawing of a snake')")
    return PromptSet(classes=classes, templates=tuple(templates) or DEFAULT_TEMPLATES, source=source)


def load_prompts(name_or_path: str | Path) -> PromptSet:
    """A shipped prompt group (``snakes``, ``animals``) or a prompt file."""
    key = str(name_or_path)
    path = PROMPTS_DIR / f"{key}.txt" if key in PROMPT_GROUPS else Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"prompt file {name_or_path!r} not found; give a file or one of the shipped groups: "
            + ", ".join(PROMPT_GROUPS)
        )
    return parse_prompts(path.read_text(encoding="utf-8"), source=str(path))


def taxon_group(dataset: str | None, species: Iterable[str | None]) -> str:
    """Which shipped prompt file suits a set: ``snakes`` for snake datasets, else ``animals``.

    A ``folder`` (or store) whose species are mostly known snakes (the shipped snake taxonomy) is
    ``snakes`` too, so the target prompt is "a snake" rather than any animal.
    """
    if dataset in SNAKE_DATASETS:
        return "snakes"
    names = {s for s in species if s}
    if names and sum(lookup_taxon(s) is not None for s in names) * 2 >= len(names):
        return "snakes"
    return "animals"


def prompt_class_embeddings(encoder: Encoder, prompts: PromptSet) -> np.ndarray:
    """(n_classes, dim): each class's normalised prompt embeddings averaged, then re-normalised."""
    texts = [prompts.prompts(c) for c in prompts.classes]
    flat = encoder.encode_text([t for group in texts for t in group])
    out = np.zeros((len(texts), flat.shape[1]), dtype=np.float32)
    start = 0
    for i, group in enumerate(texts):
        mean = flat[start : start + len(group)].mean(axis=0)
        out[i] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        start += len(group)
    return out


def zero_shot_probabilities(image_emb: np.ndarray, class_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    """(N, n_classes) softmax over classes of ``logit_scale * cos(image, class)``."""
    logits = float(logit_scale) * (np.asarray(image_emb, np.float32) @ np.asarray(class_emb, np.float32).T)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def off_target_probability(probs: np.ndarray, target_mask: np.ndarray) -> np.ndarray:
    """(N,) probability mass on the off-target classes."""
    return probs[:, ~np.asarray(target_mask, dtype=bool)].sum(axis=1)


@dataclass
class ZeroShotResult:
    """Zero-shot class probabilities of every photo of a set."""

    prompts: PromptSet
    probs: np.ndarray  # (N, n_classes); rows of unreadable photos are NaN
    off_target: np.ndarray  # (N,) off-target probability (NaN where unreadable)
    logit_scale: float
    seconds_text: float = 0.0  # encoding the prompts

    def describe(self, i: int) -> str:
        """'drawing 0.71; snake 0.20': the best off-target class and the best target class of photo ``i``."""
        mask = self.prompts.target_mask
        p = self.probs[i]
        off = int(np.argmax(np.where(mask, -1.0, p)))
        tgt = int(np.argmax(np.where(mask, p, -1.0)))
        names = self.prompts.names
        return f"{names[off]} {p[off]:.2f}; target {names[tgt]} {p[tgt]:.2f}"


def cached_class_embeddings(encoder: Encoder, prompts: PromptSet, cache_dir: str | Path | None = None) -> np.ndarray:
    """:func:`prompt_class_embeddings`, kept in ``cache_dir`` per (encoder, precision, prompts, templates).

    Encoding the ~400 prompts of a shipped file costs ~20 s on a CPU with BioCLIP's ViT-B-16 (bf16).
    """
    if cache_dir is None:
        return prompt_class_embeddings(encoder, prompts)
    payload = json.dumps(
        [encoder.fingerprint, str(encoder.dtype), [[c.name, c.target, c.phrases] for c in prompts.classes],
         list(prompts.templates)], ensure_ascii=True,
    )
    path = Path(cache_dir) / f"{hashlib.sha256(payload.encode()).hexdigest()[:24]}.npy"
    if path.is_file():
        emb = np.load(path)
        if emb.shape == (len(prompts.classes), encoder.dim):
            return emb
    emb = prompt_class_embeddings(encoder, prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy")
    os.close(fd)
    np.save(tmp, emb)
    os.replace(tmp, path)
    return emb


def score_zero_shot(
    encoder: Encoder, embeddings: np.ndarray, ok: np.ndarray, prompts: PromptSet,
    *, cache_dir: str | Path | None = None,
) -> ZeroShotResult:
    """Class probabilities and off-target probability of each photo (``ok``: rows that have an embedding).

    ``cache_dir``: where the prompt class embeddings are cached (``None``: computed every time).
    """
    t0 = time.perf_counter()
    class_emb = cached_class_embeddings(encoder, prompts, cache_dir)
    t1 = time.perf_counter()
    scale = float(getattr(encoder, "logit_scale", 100.0))
    probs = np.full((len(embeddings), len(prompts.classes)), np.nan, dtype=np.float32)
    if ok.any():
        probs[ok] = zero_shot_probabilities(embeddings[ok], class_emb, scale)
    off = np.full(len(embeddings), np.nan, dtype=np.float32)
    if ok.any():
        off[ok] = off_target_probability(probs[ok], prompts.target_mask)
    return ZeroShotResult(prompts=prompts, probs=probs, off_target=off, logit_scale=scale, seconds_text=t1 - t0)


# --------------------------------------------------------------------------------------- duplicates
def similar_pairs(
    a: np.ndarray, b: np.ndarray | None = None, *, threshold: float = DEFAULT_DUP_THRESHOLD
) -> list[tuple[int, int, float]]:
    """Every pair with cosine similarity >= ``threshold`` (rows L2-normalised), exact (FAISS range search).

    ``b is None``: pairs (i, j, sim) within ``a`` with i < j. Otherwise pairs (i in a, j in b).
    """
    import faiss

    a = np.ascontiguousarray(a, dtype=np.float32)
    base = a if b is None else np.ascontiguousarray(b, dtype=np.float32)
    if not len(a) or not len(base):
        return []
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    out: list[tuple[int, int, float]] = []
    radius = float(threshold) - 1e-5  # FAISS keeps similarities strictly above the radius
    for start in range(0, len(a), 4096):
        lims, sims, ids = index.range_search(a[start : start + 4096], radius)
        for q in range(len(lims) - 1):
            i = start + q
            for j, s in zip(ids[lims[q] : lims[q + 1]], sims[lims[q] : lims[q + 1]], strict=True):
                j = int(j)
                if (b is None and j <= i) or s < threshold - 1e-6:
                    continue
                out.append((i, j, min(float(s), 1.0)))
    out.sort(key=lambda t: (-t[2], t[0], t[1]))
    return out


# ------------------------------------------------------------------------------------------ photos
@dataclass
class PhotoSet:
    """Photos with their content digests and embeddings (zero rows where unreadable)."""

    paths: list[str]
    sha256: list[str | None]
    embeddings: np.ndarray  # (N, dim) float32
    errors: list[str | None]  # why a photo has no embedding
    ids: list[int | None]  # gallery reference id, where the photo is in the gallery
    species: list[str | None] = field(default_factory=list)
    embedded: int = 0  # photos run through the encoder (the rest came from the gallery's store)

    @property
    def ok(self) -> np.ndarray:
        """(N,) bool: photos that have an embedding."""
        return np.array([e is None for e in self.errors], dtype=bool)

    def __len__(self) -> int:
        return len(self.paths)


def embed_photos(
    paths: Sequence[str | Path],
    encoder: Encoder,
    *,
    cache: tuple[Sequence[str], np.ndarray] | None = None,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "embedding",
) -> tuple[np.ndarray, list[str | None], list[str | None], int]:
    """Embed photos, taking the embedding of any photo whose sha256 is in ``cache`` (digests, embeddings).

    Returns (embeddings, sha256s, errors, number embedded by the encoder).
    """
    from retrieval.pipeline import iter_embeddings, iter_prepared

    known: dict[str, int] = {}
    if cache is not None:
        known = {sha: i for i, sha in enumerate(cache[0])}
    out = np.zeros((len(paths), encoder.dim), dtype=np.float32)
    shas: list[str | None] = [None] * len(paths)
    errors: list[str | None] = [None] * len(paths)
    fresh = 0
    prepared = iter_prepared(list(paths), encoder, known=known, workers=workers)
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for items, emb in iter_embeddings(prepared, encoder):
            row = 0
            for item in items:
                shas[item.position] = item.sha256
                if item.duplicate_of is not None:
                    out[item.position] = cache[1][item.duplicate_of]  # type: ignore[index]
                elif item.tensor is None:
                    errors[item.position] = item.error or "unreadable"
                else:
                    out[item.position] = emb[row]
                    row += 1
                    fresh += 1
            bar.update(len(items))
    return out, shas, errors, fresh


def find_photos(folder: str | Path) -> list[Path]:
    """Photo files under ``folder`` (any layout, recursive, sorted); hidden files and folders skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder of photos")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # symlinked class folders too
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if not found:
        raise ValueError(f"no photos ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return found


# ----------------------------------------------------------------------------------------- findings
@dataclass
class Finding:
    """One row of the report."""

    kind: str  # one of KINDS
    score: float  # off-target probability, or cosine similarity (1.0 for same bytes); NaN for unreadable
    path: str  # the photo of the cleaned set (the one an --apply would exclude)
    paired_path: str | None = None  # the other photo of a duplicate / leak pair
    detail: str = ""  # best classes (off-target), or why unreadable
    reference_id: int | None = None  # gallery reference id of ``path``, when in the gallery
    paired_reference_id: int | None = None  # gallery reference id of ``paired_path``, when in the gallery

    def row(self) -> dict[str, object]:
        """CSV row."""
        return {
            "kind": self.kind,
            "score": "" if math.isnan(self.score) else f"{self.score:.4f}",
            "path": self.path,
            "paired_path": self.paired_path or "",
            "detail": self.detail,
            "reference_id": "" if self.reference_id is None else self.reference_id,
            "paired_reference_id": "" if self.paired_reference_id is None else self.paired_reference_id,
        }


def find_issues(
    photos: PhotoSet,
    *,
    against: PhotoSet | None = None,
    zero_shot: ZeroShotResult | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    dup_threshold: float = DEFAULT_DUP_THRESHOLD,
    duplicates: bool = True,
) -> list[Finding]:
    """All findings: off-target photos, duplicates within ``photos``, leaks from ``against``, unreadable ones."""
    findings: list[Finding] = []
    if zero_shot is not None:
        for i in np.flatnonzero(photos.ok & (np.nan_to_num(zero_shot.off_target, nan=-1.0) >= threshold)):
            findings.append(
                Finding("off-target", float(zero_shot.off_target[i]), photos.paths[i],
                        detail=zero_shot.describe(int(i)), reference_id=photos.ids[i])
            )
    if duplicates:
        findings.extend(_duplicates(photos, dup_threshold))
        if against is not None:
            findings.extend(_leaks(photos, against, dup_threshold))
    for s, name in ((photos, ""), (against, "against: ")):
        if s is None:
            continue
        for i, err in enumerate(s.errors):
            if err is not None:
                findings.append(Finding("unreadable", float("nan"), s.paths[i], detail=name + err))
    order = {k: n for n, k in enumerate(KINDS)}
    findings.sort(key=lambda f: (order[f.kind], -(0.0 if math.isnan(f.score) else f.score), f.path))
    return findings


def _duplicates(photos: PhotoSet, dup_threshold: float) -> list[Finding]:
    out: list[Finding] = []
    first: dict[str, int] = {}
    for i, sha in enumerate(photos.sha256):
        if sha is None:
            continue
        if sha in first:
            j = first[sha]
            out.append(Finding("duplicate", 1.0, photos.paths[i], photos.paths[j], "same bytes (sha256)",
                               photos.ids[i], photos.ids[j]))
        else:
            first[sha] = i
    ok = np.flatnonzero(photos.ok)
    for a, b, sim in similar_pairs(photos.embeddings[ok], threshold=dup_threshold):
        i, j = int(ok[a]), int(ok[b])  # i < j: report the later photo, paired with the earlier one
        if photos.sha256[i] is not None and photos.sha256[i] == photos.sha256[j]:
            continue  # already reported as the same bytes
        out.append(Finding("near-duplicate", sim, photos.paths[j], photos.paths[i], "",
                           photos.ids[j], photos.ids[i]))
    return out


def _leaks(photos: PhotoSet, against: PhotoSet, dup_threshold: float) -> list[Finding]:
    out: list[Finding] = []
    by_sha: dict[str, list[int]] = {}
    for i, sha in enumerate(photos.sha256):
        if sha is not None:
            by_sha.setdefault(sha, []).append(i)
    for j, sha in enumerate(against.sha256):
        for i in by_sha.get(sha or "", []):
            out.append(Finding("leak", 1.0, photos.paths[i], against.paths[j], "same bytes (sha256)",
                               photos.ids[i], against.ids[j]))
    ok_g, ok_a = np.flatnonzero(photos.ok), np.flatnonzero(against.ok)
    for a, g, sim in similar_pairs(against.embeddings[ok_a], photos.embeddings[ok_g], threshold=dup_threshold):
        i, j = int(ok_g[g]), int(ok_a[a])
        if photos.sha256[i] is not None and photos.sha256[i] == against.sha256[j]:
            continue
        out.append(Finding("near-leak", sim, photos.paths[i], against.paths[j], "", photos.ids[i], against.ids[j]))
    return out


# ------------------------------------------------------------------------------------------- report
def write_findings_csv(path: str | Path, findings: Sequence[Finding]) -> Path:
    """One row per finding, columns :data:`CSV_COLUMNS`."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(f.row() for f in findings)
    return path


def _write_scores_csv(path: Path, photos: PhotoSet, zs: ZeroShotResult) -> Path:
    names = zs.prompts.names
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "off_target", *[f"p_{n}" for n in names]])
        for i, p in enumerate(photos.paths):
            if photos.errors[i] is None:
                writer.writerow([p, f"{zs.off_target[i]:.4f}", *[f"{x:.4f}" for x in zs.probs[i]]])
    return path


def _thumbnail(path: str, cache: dict[str, str]) -> str:
    if path in cache:
        return cache[path]
    from retrieval.images import decode_image

    try:
        img = decode_image(Path(path).read_bytes(), name=path, draft=2 * THUMB_SIZE)
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
    "off-target": "Off-target photos (zero-shot): probability of the off-target classes",
    "leak": "Leaks: the same bytes in the gallery and in the other set",
    "near-leak": "Near-identical leaks: gallery photo | other-set photo, cosine similarity",
    "duplicate": "Duplicates in the set: the same bytes",
    "near-duplicate": "Near-duplicates in the set: cosine similarity",
    "unreadable": "Unreadable photos",
}


def write_contact_sheet(
    path: str | Path, findings: Sequence[Finding], *, title: str, summary: dict[str, object],
    limit: int = MAX_SHEET_FINDINGS,
) -> Path:
    """A self-contained HTML page: thumbnails (base64 JPEG) of flagged photos and duplicate pairs, with scores."""
    path = Path(path)
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
            score = "" if math.isnan(f.score) else f"{f.score:.3f}"
            ref = f" #{f.reference_id}" if f.reference_id is not None else ""
            if f.paired_path:
                parts.append(
                    f"<div class='card pair'><div class='score'>{score}{ref}</div><div class='imgs'>"
                    f"{_thumbnail(f.path, thumbs)}{_thumbnail(f.paired_path, thumbs)}</div>"
                    f"<div>{html.escape(f.path)}</div><div>&harr; {html.escape(f.paired_path)}</div></div>"
                )
            else:
                img = _thumbnail(f.path, thumbs) if kind != "unreadable" else ""
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
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ running
@dataclass
class CleanConfig:
    """What ``clean`` checks and with which thresholds."""

    prompts: str | None = None  # prompt file or shipped group; None = chosen from the dataset's taxon group
    threshold: float = DEFAULT_THRESHOLD  # off-target probability at which a photo is flagged
    dup_threshold: float = DEFAULT_DUP_THRESHOLD  # cosine similarity of near-duplicates / near-leaks
    zero_shot: bool = True  # run the zero-shot filter (when the encoder reads text)
    duplicates: bool = True  # look for duplicates and leaks

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"--threshold is a probability in (0, 1], got {self.threshold}")
        if not -1.0 <= self.dup_threshold <= 1.0:
            raise ValueError(f"--dup-threshold is a cosine similarity in [-1, 1], got {self.dup_threshold}")


@dataclass
class ApplyResult:
    """What ``apply_exclusions`` did."""

    excluded: list[int] = field(default_factory=list)  # ids newly excluded
    already: int = 0  # flagged references that were excluded before
    not_in_gallery: int = 0  # findings of the chosen kinds whose photo is not a reference of the gallery


@dataclass
class CleanResult:
    """What a cleaning run found (and did)."""

    findings: list[Finding]
    photos: PhotoSet
    against: PhotoSet | None
    encoder: str  # spec of the encoder used
    zero_shot: ZeroShotResult | None
    zero_shot_notice: str | None  # why the zero-shot filter did not run
    config: CleanConfig
    seconds_embed: float = 0.0
    seconds_rest: float = 0.0  # prompts, zero-shot scoring, duplicate search, --apply
    seconds_report: float = 0.0  # writing the CSV, contact sheet (thumbnails) and summary
    files: dict[str, Path] = field(default_factory=dict)
    applied: ApplyResult | None = None

    def counts(self) -> dict[str, int]:
        """Findings per kind (every kind listed)."""
        return {k: sum(f.kind == k for f in self.findings) for k in KINDS}

    def summary(self) -> str:
        """A human-readable paragraph."""
        c = self.counts()
        n = len(self.photos)
        embedded = self.photos.embedded + (self.against.embedded if self.against is not None else 0)
        total = n + (len(self.against) if self.against is not None else 0)
        failed = sum(e is not None for e in self.photos.errors) + (
            sum(e is not None for e in self.against.errors) if self.against is not None else 0
        )
        reused = total - embedded - failed
        lines = []
        if self.zero_shot_notice:
            lines.append(f"notice: {self.zero_shot_notice}")
            if not self.config.duplicates:
                return lines[0]  # nothing ran
        lines.append(
            f"cleaned {n} photos" + (f" against {len(self.against)} others" if self.against is not None else "")
            + f" with {self.encoder} in {self.seconds_embed + self.seconds_rest:.1f} s "
            f"(embedding {self.seconds_embed:.1f} s: {embedded} photos through the encoder"
            + (f", {reused} from the gallery's store)" if reused else ")")
        )
        if self.zero_shot is not None:
            lines.append(
                f"off-target (p >= {self.config.threshold:g}, prompts {self.zero_shot.prompts.source}): "
                f"{c['off-target']} of {int(self.photos.ok.sum())} photos"
            )
        if self.config.duplicates:
            lines.append(
                f"duplicates: {c['duplicate']} same bytes, {c['near-duplicate']} near "
                f"(cosine >= {self.config.dup_threshold:g})"
            )
            if self.against is not None:
                near = [f.score for f in self.findings if f.kind == "near-leak"]
                span = f", similarity {min(near):.3f}-{max(near):.3f}" if near else ""
                lines.append(f"leaks: {c['leak']} same bytes, {c['near-leak']} near-identical{span}")
        if c["unreadable"]:
            lines.append(f"unreadable: {c['unreadable']}")
        if self.files:
            lines.append("report: " + ", ".join(str(p) for p in self.files.values()))
        if self.applied is not None:
            a = self.applied
            lines.append(
                f"applied: {len(a.excluded)} references excluded ({a.already} already excluded, "
                f"{a.not_in_gallery} findings not in the gallery); undo with 'speciesid clean --restore --index DIR'"
            )
        return "\n".join(lines)


def _resolve_encoder(
    index: str | Path | None, config: EncoderConfig | Encoder | None
) -> tuple[Gallery | None, Encoder, bool]:
    """(gallery or None, encoder, whether the gallery's stored embeddings are this encoder's)."""
    from index.gallery import Gallery, read_gallery_info

    if isinstance(config, Encoder):
        enc = config
    elif index is None:
        config = config or EncoderConfig()
        enc = create_encoder_from_config(replace(config, spec=config.spec or DEFAULT_ENCODER))
    else:
        config = config or EncoderConfig(spec="")
        built = read_gallery_info(index)["encoder"]
        if not config.spec:
            config = replace(config, spec=built["spec"], weights=config.weights or built.get("weights"))
        enc = create_encoder_from_config(config)
    if index is None:
        return None, enc, False
    gallery = Gallery.open(index)  # any encoder may clean a gallery; only the gallery's own reuses its store
    reuse = enc.fingerprint == gallery.fingerprint
    if not reuse:
        logger.info("encoder %s is not the gallery's (%s): every photo is embedded again", enc.spec,
                    gallery.encoder_spec)
    return gallery, enc, reuse


def clean(
    *,
    dataset: str | None = None,
    root: str | Path | None = None,
    metadata: str | Path | None = None,
    index: str | Path | None = None,
    against: str | Path | None = None,
    encoder: EncoderConfig | Encoder | None = None,
    config: CleanConfig | None = None,
    report_dir: str | Path | None = None,
    apply: bool = False,
    apply_kinds: Sequence[str] = ("off-target",),
    workers: int | None = None,
    progress: bool = True,
) -> CleanResult:
    """Check a dataset (``dataset`` + ``root``) or a gallery's references (``index`` alone) and report.

    ``encoder`` is a config or a loaded encoder. With ``index``, findings map to the gallery's
    references by sha256; without ``encoder.spec`` the gallery's own encoder is used and its stored
    embeddings are reused. ``against`` is a folder of
    photos (any layout) checked for leakage into the set. ``apply`` excludes the references of the
    findings of ``apply_kinds`` from the gallery (reversible with :func:`restore_exclusions`).
    """
    config = config or CleanConfig()
    if (dataset is None) != (root is None):
        raise ValueError("--dataset and --root go together (or give neither and --index to clean a gallery)")
    if dataset is None and index is None:
        raise ValueError("say what to clean: --dataset and --root, or --index DIR (a gallery's references)")
    if apply and index is None:
        raise ValueError("--apply needs --index DIR: the gallery whose references are to be excluded")
    bad = [k for k in apply_kinds if k not in APPLY_KINDS]
    if bad:
        raise ValueError(f"unknown finding kind(s) {', '.join(bad)} for --apply-to; choose from {', '.join(APPLY_KINDS)}")
    against_paths = find_photos(against) if against is not None else None

    gallery, enc, reuse = _resolve_encoder(index, encoder)
    t0 = time.perf_counter()
    cache = None
    known: dict[str, int] = {}
    if gallery is not None:
        ids_all, vec_all = gallery.store.vectors(include_excluded=True)
        meta = gallery.store.metadata(ids_all)
        shas_all = [str(meta.at[int(i), "sha256"]) for i in ids_all]
        known = dict(zip(shas_all, (int(i) for i in ids_all), strict=True))
        if reuse:
            cache = (shas_all, vec_all)
    dataset_name: str | None
    if dataset is not None:
        scan = load_dataset(dataset, root, metadata=metadata)  # type: ignore[arg-type]
        for warning in scan.warnings:
            logger.warning("%s", warning)
        if not scan.records:
            raise ValueError(f"no photos found under {root} for dataset {dataset!r}")
        paths = [str(r.path) for r in scan.records]
        emb, shas, errors, fresh = embed_photos(paths, enc, cache=cache, workers=workers, progress=progress,
                                                desc="cleaning: embedding")
        photos = PhotoSet(paths, shas, emb, errors, [known.get(s or "") for s in shas],
                          [r.species for r in scan.records], fresh)
        dataset_name = scan.name
    else:
        assert gallery is not None
        paths = [str(meta.at[int(i), "source_path"]) for i in ids_all]
        if reuse:
            photos = PhotoSet(paths, list(shas_all), vec_all, [None] * len(paths), [int(i) for i in ids_all],
                              [str(meta.at[int(i), "species"]) for i in ids_all], 0)
        else:
            emb, shas, errors, fresh = embed_photos(paths, enc, workers=workers, progress=progress,
                                                    desc="cleaning: embedding")
            photos = PhotoSet(paths, shas, emb, errors, [int(i) for i in ids_all],
                              [str(meta.at[int(i), "species"]) for i in ids_all], fresh)
        datasets = meta["dataset"].dropna()
        dataset_name = str(datasets.mode().iloc[0]) if len(datasets) else None
    other = None
    if against_paths is not None:
        emb, shas, errors, fresh = embed_photos(against_paths, enc, cache=cache, workers=workers, progress=progress,
                                                desc="cleaning: against")
        other = PhotoSet([str(p) for p in against_paths], shas, emb, errors, [known.get(s or "") for s in shas],
                         [], fresh)
    t1 = time.perf_counter()

    zs, notice = None, None
    if config.zero_shot:
        if enc.supports_text:
            prompts = load_prompts(config.prompts or taxon_group(dataset_name, photos.species))
            zs = score_zero_shot(enc, photos.embeddings, photos.ok, prompts,
                                 cache_dir=Path(index) / PROMPT_CACHE if index is not None else None)
        else:
            notice = (
                f"zero-shot filter skipped: encoder {enc.spec} is image-only (it needs a text-capable encoder "
                "such as bioclip); duplicate and leakage detection still ran"
            )
            logger.info("%s", notice)
    findings = find_issues(photos, against=other, zero_shot=zs, threshold=config.threshold,
                           dup_threshold=config.dup_threshold, duplicates=config.duplicates)
    result = CleanResult(findings=findings, photos=photos, against=other, encoder=enc.spec, zero_shot=zs,
                         zero_shot_notice=notice, config=config, seconds_embed=t1 - t0)
    if apply:
        assert gallery is not None
        result.applied = apply_exclusions(gallery, findings, apply_kinds, report=report_dir)
    result.seconds_rest = time.perf_counter() - t1
    if report_dir is not None:
        title = "speciesid clean: " + (f"{dataset} {root}" if dataset else f"gallery {index}")
        result.files = write_report(report_dir, result, title=title)
        result.seconds_report = time.perf_counter() - t1 - result.seconds_rest
    return result


def write_report(report_dir: str | Path, result: CleanResult, *, title: str) -> dict[str, Path]:
    """findings.csv, contact_sheet.html, summary.json (and zero_shot_scores.csv when the filter ran)."""
    from index.gallery import write_json_atomic

    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": write_findings_csv(out / FINDINGS_CSV, result.findings)}
    if result.zero_shot is not None:
        files["scores"] = _write_scores_csv(out / SCORES_CSV, result.photos, result.zero_shot)
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
        "counts": result.counts(),
        "seconds_embed": round(result.seconds_embed, 3),
        "seconds_rest": round(result.seconds_rest, 3),
        "applied": (
            {"excluded": result.applied.excluded, "already": result.applied.already,
             "not_in_gallery": result.applied.not_in_gallery} if result.applied is not None else None
        ),
    }
    shown = {k: v for k, v in summary.items() if k not in ("applied",)}
    shown["zero_shot"] = (
        f"{result.zero_shot.prompts.source}, flagged at p >= {result.config.threshold:g}"
        if result.zero_shot is not None else result.zero_shot_notice
    )
    files["sheet"] = write_contact_sheet(out / CONTACT_SHEET, result.findings, title=title, summary=shown)
    write_json_atomic(out / SUMMARY_JSON, summary)
    files["summary"] = out / SUMMARY_JSON
    return files


# -------------------------------------------------------------------------------- apply and restore
def _read_log(root: Path) -> dict:
    path = root / CLEAN_LOG
    if not path.is_file():
        return {"runs": []}
    return json.loads(path.read_text(encoding="utf-8"))


def apply_exclusions(
    gallery: Gallery,
    findings: Sequence[Finding],
    kinds: Sequence[str] = ("off-target",),
    *,
    report: str | Path | None = None,
) -> ApplyResult:
    """Exclude the references of the findings of ``kinds`` (searchable again after ``restore_exclusions``).

    Duplicates and near-duplicates: each group of copies keeps its oldest reference (lowest id) and the
    others are excluded; leaks and off-target photos exclude the gallery's reference. The ids newly excluded are logged as
    one run in ``<gallery>/clean_log.json``.
    """
    wanted: set[int] = set()
    result = ApplyResult()
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for f in findings:
        if f.kind not in kinds:
            continue
        if f.reference_id is None:
            result.not_in_gallery += 1
        elif f.kind in ("duplicate", "near-duplicate"):
            if f.paired_reference_id is None:
                result.not_in_gallery += 1  # its twin is not a reference: this is the gallery's only copy
            elif f.paired_reference_id != f.reference_id:  # two files with the same bytes are one reference
                parent[find(f.reference_id)] = find(f.paired_reference_id)
        else:
            wanted.add(f.reference_id)
    groups: dict[int, list[int]] = {}
    for rid in list(parent):
        groups.setdefault(find(rid), []).append(rid)
    for members in groups.values():
        wanted.update(sorted(members)[1:])  # each group of copies keeps its oldest reference
    if not wanted:
        return result
    meta = gallery.store.metadata(sorted(wanted))
    before = {int(i) for i, ex in zip(meta["id"], meta["excluded"].fillna(False), strict=True) if bool(ex)}
    new = sorted(wanted - before)
    result.already = len(wanted & before)
    if new:
        from index.gallery import write_json_atomic

        gallery.set_excluded(new, True)
        log = _read_log(gallery.root)
        log["runs"].append({
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "kinds": list(kinds),
            "excluded": new,
            "report": str(report) if report is not None else None,
        })
        write_json_atomic(gallery.root / CLEAN_LOG, log)
    result.excluded = new
    return result


def excluded_ids(gallery: Gallery) -> list[int]:
    """Ids of the gallery's excluded references."""
    meta = gallery.store.metadata()
    return sorted(int(i) for i, ex in zip(meta["id"], meta["excluded"].fillna(False), strict=True) if bool(ex))


def restore_exclusions(gallery: Gallery, which: str = "last") -> int:
    """Bring excluded references back into search; returns how many.

    ``last``: those excluded by the last applied clean run (runs can be undone one by one);
    ``all``: every excluded reference of the gallery, whoever excluded it, and the log is cleared.
    """
    if which not in ("last", "all"):
        raise ValueError(f"--restore takes 'last' or 'all', not {which!r}")
    log = _read_log(gallery.root)
    if which == "all":
        ids = excluded_ids(gallery)
        log["runs"] = []
    else:
        if not log["runs"]:
            raise ValueError(f"gallery {gallery.root} has no clean run to restore (see {CLEAN_LOG})")
        ids = log["runs"].pop()["excluded"]
    found = gallery.set_excluded(ids, False) if ids else 0
    from index.gallery import write_json_atomic

    write_json_atomic(gallery.root / CLEAN_LOG, log)
    return found


def clean_built_gallery(
    gallery: Gallery,
    encoder: Encoder,
    *,
    dataset: str | None,
    species: Sequence[str],
    config: CleanConfig | None = None,
    report_dir: str | Path | None = None,
) -> CleanResult:
    """The zero-shot filter over a gallery just built (``index build --clean``): score its searchable
    references from the store, exclude the off-target ones, write the report."""
    config = replace(config or CleanConfig(), duplicates=False)
    t0 = time.perf_counter()
    ids, vectors = gallery.store.vectors()
    meta = gallery.store.metadata(ids)
    photos = PhotoSet([str(meta.at[int(i), "source_path"]) for i in ids], [str(meta.at[int(i), "sha256"]) for i in ids],
                      vectors, [None] * len(ids), [int(i) for i in ids], [str(meta.at[int(i), "species"]) for i in ids])
    zs, notice = None, None
    if encoder.supports_text:
        prompts = load_prompts(config.prompts or taxon_group(dataset, species))
        zs = score_zero_shot(encoder, vectors, photos.ok, prompts, cache_dir=gallery.root / PROMPT_CACHE)
    else:
        notice = (f"--clean skipped: encoder {encoder.spec} is image-only; the zero-shot filter needs a "
                  "text-capable encoder such as bioclip")
        logger.info("%s", notice)
    findings = find_issues(photos, zero_shot=zs, threshold=config.threshold, duplicates=False)
    result = CleanResult(findings=findings, photos=photos, against=None, encoder=encoder.spec, zero_shot=zs,
                         zero_shot_notice=notice, config=config)
    if zs is not None:
        result.applied = apply_exclusions(gallery, findings, ("off-target",), report=report_dir)
    result.seconds_rest = time.perf_counter() - t0
    if report_dir is not None and zs is not None:
        result.files = write_report(report_dir, result, title=f"speciesid index build --clean: {gallery.root}")
    return result


__all__ = [
    "APPLY_KINDS",
    "CSV_COLUMNS",
    "DEFAULT_DUP_THRESHOLD",
    "DEFAULT_TEMPLATES",
    "DEFAULT_THRESHOLD",
    "KINDS",
    "ApplyResult",
    "CleanConfig",
    "CleanResult",
    "Finding",
    "PhotoSet",
    "PromptClass",
    "PromptSet",
    "ZeroShotResult",
    "apply_exclusions",
    "cached_class_embeddings",
    "clean",
    "clean_built_gallery",
    "embed_photos",
    "excluded_ids",
    "find_issues",
    "find_photos",
    "load_prompts",
    "off_target_probability",
    "parse_prompts",
    "prompt_class_embeddings",
    "restore_exclusions",
    "score_zero_shot",
    "similar_pairs",
    "taxon_group",
    "zero_shot_probabilities",
]
