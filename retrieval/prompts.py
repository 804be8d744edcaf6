"""Zero-shot prompts: the templates, and the prompt-file format of the cleaning filter (no heavy imports).

Templates serve the text prior (species names) and the cleaning filter (target / off-target phrases).
A prompt file (``index/data/prompts/<group>.txt`` or ``--prompts FILE``) holds::

    [target: snake]          # what a usable reference photo shows; one phrase a line
    a snake
    [off-target: drawing]    # what to flag
    a drawing of a snake
    [templates]              # optional: one template with {} a line (default: ARTICLE_TEMPLATES)
    a photo of {}.

``#`` starts a comment. At least one target and one off-target class are required.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.taxonomy import DATA_DIR, lookup_taxon

#: Templates, after open_clip's ImageNet zero-shot set (the ones that suit field photos).
TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a good photo of {}.",
    "a close-up photo of {}.",
    "a cropped photo of {}.",
    "a bright photo of {}.",
    "a dark photo of {}.",
    "a blurry photo of {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a low resolution photo of {}.",
)

#: The templates that read well with a phrase that has its own article ("a drawing of a snake"):
#: "a photo of the small {}" does not.
ARTICLE_TEMPLATES: tuple[str, ...] = tuple(t for t in TEMPLATES if "the " not in t)

PROMPTS_DIR = DATA_DIR / "prompts"
#: Shipped prompt files (``index/data/prompts/<group>.txt``).
PROMPT_GROUPS: tuple[str, ...] = ("snakes", "animals")
#: Prompt templates for the off-target phrases, which carry their own article ("a drawing of a snake").
DEFAULT_TEMPLATES: tuple[str, ...] = ARTICLE_TEMPLATES
#: Datasets that only hold snakes (folder datasets are snakes when most of their species are known snakes).
SNAKE_DATASETS = frozenset({"moroccan", "snakeclef2021"})


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

    def class_prompts(self) -> list[list[str]]:
        """The prompts of every class, in class order (what :mod:`retrieval.zeroshot` embeds)."""
        return [self.prompts(c) for c in self.classes]


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
