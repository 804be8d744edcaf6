"""Zero-shot prompt templates shared by the text prior and the cleaning filter (no heavy imports)."""

from __future__ import annotations

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
