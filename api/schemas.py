"""Response and request models of the HTTP API (they make the OpenAPI schema)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool


def _null_is_nan(value: object) -> object:
    """The library's plain answer (``Answer.to_dict``) holds None where a score was NaN or infinite; the field takes
    it back as NaN, which the answer writes as null, as it did before that answer went through ``to_dict``."""
    return math.nan if value is None else value


#: A score: a number, and null in the rare answer where it is not finite. The schema says so (number or null); the
#: value is always a float (None taken back as NaN), which the answer writes as null.
Score = Annotated[float | None, BeforeValidator(_null_is_nan)]


class NeighbourOut(BaseModel):
    """A reference photo near the query."""

    id: int = Field(description="stable reference id")
    similarity: float = Field(description="cosine similarity to the query")
    vote_similarity: float | None = Field(None, description="the similarity the vote weighed: the same, unless the "
                                          "gallery's probe chose the whitened metric (docs/identification.md)")
    species: str
    genus: str | None = None
    family: str | None = None
    common_name: str | None = None
    venomous: bool | None = None
    thumbnail_url: str = Field(description="the reference photo's thumbnail: GET /v1/references/{id}/image")
    dataset: str | None = None


class ResultOut(BaseModel):
    """One ranked candidate (a species, or a genus/family with rank=genus|family)."""

    name: str = Field(description="species binomial, genus or family name")
    rank: str
    score: Score = Field(description="probability in [0, 1]")
    species: str | None = None
    common_name: str | None = None
    genus: str | None = None
    family: str | None = None
    venomous: bool | None = Field(None, description="medically important venomous (for a group: any member)")
    neighbours: list[NeighbourOut] = Field(default_factory=list, description="evidence (with neighbours=true)")


class VenomAdviceOut(BaseModel):
    """What to do about a bite, from the answer (one rule for the CLI, the API and the page: retrieval.advice)."""

    level: str = Field(description="cannot_tell (far or unknown: treat a bite as venomous), possibly_venomous (10% "
                       "or more on venomous or unrecorded species: treat as venomous) or unlikely")
    treat_as_venomous: bool = Field(description="the advice is to treat a bite as venomous and seek medical care")
    text: str = Field(description="the advice in one sentence, to show as it is")


class IdentifyOut(BaseModel):
    """The answer for one observation (1-5 photos of one animal). Its fields are declared, and so serialised, verdict
    first: ``venom_advice``, then ``unknown`` and ``far``, the candidates (``results``) last, so a person reading the
    raw JSON (the web page's form with its script off) sees what to do about a bite before any name or score."""

    venom_advice: VenomAdviceOut | None = Field(None, description="what to do about a bite: safe (treat as "
                                                "venomous) whenever the answer is unknown or far; null only for the "
                                                "answers of a gallery whose venom advice is off (venom_applies "
                                                "false)")
    unknown: bool = Field(description="true when no candidate is supported strongly enough, or the photo is unlike "
                          "every reference (far)")
    far: bool = Field(False, description="the photo is unlike every reference photo (its nearest one is less similar "
                      "than 99.9% of references are to theirs): nothing like the gallery's photos, or too small / "
                      "blank")
    venom_applies: bool = Field(True, description="answers give venom advice: true unless the gallery records it off "
                                "('speciesid index venom-advice off', 'index build --no-venom-advice': birds, "
                                "plants) and no species of it is recorded venomous (docs/identification.md, 'Venom "
                                "advice'); false: nothing about venom belongs beside the answer")
    venomous_score: float | None = Field(None, description="probability that it is medically important venomous "
                                         "(null when far: the photo says nothing, treat a bite as venomous; or when no "
                                         "candidate's venom status is recorded)")
    venom_unknown_score: Score = Field(0.0, description="probability on species whose venom status the gallery does "
                                       "not record, whatever their names (docs/identification.md, 'Venom "
                                       "advice'): not a harmless share (treat as possibly venomous). With a "
                                       "country, this and venomous_score are each the larger of the answer with and "
                                       "without the country: separate upper bounds, which may sum to more than 1")
    country_applied: bool | None = Field(None, description="null without a country; false when it changed nothing: "
                                         "every candidate recorded there, or none, or none in the country table "
                                         "(snakes only) or the gallery's photo countries; notes then say which")
    nearest_similarity: float | None = Field(None, description="cosine similarity of the nearest reference photo")
    near_copy: int | None = Field(None, description="the reference (id) this photo is a near-copy of (cosine >= "
                                  "0.95, the 'clean' leak rule), when all such references are of one species, else "
                                  "null: information only, it changes nothing (unknown, scores and venom advice are "
                                  "the blend's); a note names it and its species")
    set_aside: list[int] = Field(default_factory=list, description="the photos (0-based positions, in the order "
                                 "sent) set aside as unlike every reference while another photo was not: the answer "
                                 "is the others'; empty when every photo counted (or every one was far: then far)")
    notes: list[str] = Field(default_factory=list, description="what to know of the gallery that answered: a build "
                             "into it is running now (until it ends, some of its species may not be in yet); the "
                             "last build into it was interrupted (its species may not all be in it: run the build "
                             "again; or, every photo in, the step it was in: run it again to finish); it holds too "
                             "few references to mark a photo unlike every reference (far); it cannot name some "
                             "medically important venomous species of the checklist it was built from; its probe is "
                             "older than its references (how many were added and deleted since; run 'speciesid "
                             "probe train'); and, of this answer, that a far photo's candidate scores are not "
                             "meaningful, that the photo is a near-copy of a reference (naming it and its species), "
                             "and that an animated photo (GIF, WebP, APNG) was read from its first frame only "
                             "(naming the photo)")
    images: int = Field(description="photos sent (those in set_aside included)")
    encoder: str = Field(description="the encoder that built the gallery")
    results: list[ResultOut]


#: Search's ``k``: neighbours to return (query string, form field or JSON body), and its default.
def _not_a_boolean(value: object) -> object:
    """``true`` is not a number of neighbours (pydantic would take it as 1)."""
    if isinstance(value, bool):
        raise ValueError("k is a whole number of neighbours, e.g. 10, not true or false")
    return value


SearchK = Annotated[int, Field(ge=1, le=1000), BeforeValidator(_not_a_boolean)]
SEARCH_K_DEFAULT = 10


class SearchVectorIn(BaseModel):
    """Search by an embedding computed elsewhere (with the gallery's encoder)."""

    embedding: list[float] = Field(description="the query embedding, gallery width")
    k: SearchK = SEARCH_K_DEFAULT


class SearchOut(BaseModel):
    """Raw nearest reference photos."""

    neighbours: list[NeighbourOut]
    encoder: str


class SpeciesOut(BaseModel):
    """A species in the gallery."""

    species: str
    common_name: str | None = None
    genus: str | None = None
    family: str | None = None
    venomous: bool | None = None
    count: int = Field(description="reference photos")


class VenomousIn(BaseModel):
    """The body of PUT /v1/species/{name}/venomous: the species' medically important venomous flag, set on every one
    of its references (the CLI's ``speciesid species set-venom NAME yes|no``). A key it does not know is refused
    (a misspelt ``distinct_from_venomous`` would else be dropped unread)."""

    model_config = ConfigDict(extra="forbid")

    venomous: StrictBool = Field(description="medically important venomous: JSON true or false, nothing else (no "
                                 "\"no\", 0 or 1: a safety flag is not guessed; there is no unknown to set back to)")
    distinct_from_venomous: StrictBool = Field(False, description="confirm venomous=false for a name that may be a "
                                         "medically important venomous species (the CLI's --distinct-from-venomous, "
                                         "the same rule as the add's form field): refused (400) without; a species "
                                         "the shipped taxonomy records venomous is refused whatever this says")


class VenomousOut(BaseModel):
    """What setting a species' venomous flag did."""

    species: SpeciesOut = Field(description="the species after the change, as GET /v1/species/{name} gives it")
    was: bool | None = Field(description="its flag before (null: not recorded)")
    found: int = Field(description="its references, excluded ones too: every one is set")
    changed: int = Field(description="of those, the ones that said otherwise and were set (0: nothing was written)")
    turned_off: int = Field(description="of those changed, the ones that said true: a false that makes answers "
                            "naming it stop advising on a bite")


class DuplicateOut(BaseModel):
    """An uploaded photo already in the gallery (same bytes), not stored again."""

    file: str
    id: int | None = Field(None, description="the reference that holds these bytes")
    species: str | None = Field(None, description="that reference's species: another species' when the photo is "
                                "already a reference of it (the photo is not added to this one)")
    excluded: bool = Field(False, description="that reference was excluded by a clean run: not searchable until "
                           "'speciesid clean --restore'")


class AddReferencesOut(BaseModel):
    """What adding reference photos did."""

    species: str
    created: bool = Field(description="the species was new to the gallery and this add made it")
    exists: bool = Field(description="the species is in the gallery after this add: false only when the name is new "
                         "and no photo was stored (every one a reference already, listed in duplicates), so nothing "
                         "was made; GET /v1/species/{name} then answers 404")
    ids: list[int]
    added: int
    duplicates: list[DuplicateOut]
    notes: list[str] = Field(default_factory=list, description="what to know of the add: a new name of which "
                             "nothing was stored, so that the species is not in the gallery; a new species confirmed "
                             "with new_species=true that is a near-spelling of the shipped taxonomy's species "
                             "(naming them); a new species of no venomous flag, whose venom status stays unknown "
                             "(answers count it as possibly venomous; in a gallery of no venom advice, one of a "
                             "snake genus: that its answers say nothing of a bite); a new species the probe cannot "
                             "name until it is retrained; a species "
                             "with too few photos for the probe (near-copies counted once); an upload that nearly "
                             "copies a reference held (cosine >= the near-copy threshold), naming that reference")


class ErrorOut(BaseModel):
    """Every 4xx carries this body."""

    detail: str | list[dict[str, Any]] = Field(
        description="what is wrong and what to do; a list of field errors when a request parameter is invalid")
    field: str | None = Field(None, description="the request parameter the error is about, where the server names "
                              "one (identify's unknown country: 'country'); absent otherwise")
