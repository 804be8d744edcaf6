"""What an answer advises about venom, and which checklist species a gallery cannot name: one rule, which the CLI,
the API and the web page only show (docs/identification.md, "Venom advice").

The advice (:func:`venom_advice`), in order:

- ``cannot_tell``, treat as venomous: the photo is unlike every reference (``far``: its scores say nothing);
- ``possibly_venomous``, treat as venomous: at least :data:`VENOM_WARN_AT` of the probability is on medically
  important venomous species or on species whose venom status is not recorded (10% of the venomous ph-snakes val
  photos get a harmless top-1: docs/identification.md);
- ``cannot_tell``, treat as venomous: the answer is ``unknown`` (no species supported strongly enough);
- ``unlikely``: a species is named and under 10% (as printed) is on venomous or unrecorded species; said with the
  caveat that only the gallery's own species can be named;
- ``cannot_tell``, treat as venomous, instead of the two above where the gallery holds one species (``one_species``):
  it cannot tell species apart, so its 100% and its venomous share say nothing of the photo
  (:func:`one_species_note`).

Every gallery gets the advice, named answers included (a gallery none of whose species records a venom status:
"venom status not recorded ... treat as venomous"), unless its ``gallery.json`` records that it gives no venom
advice (:data:`VENOM_ADVICE_KEY` false: ``index build --no-venom-advice``, ``index venom-advice off``): safe by
default, never guessed from names (a folder ``Puff adder`` reads as a scientific name; a snake genus the shipped
taxonomy lacks, ``Cryptelytrops``, is no less a snake). Such a gallery gets no advice for any answer, unless a
species of it is recorded medically important venomous (:func:`venom_applies`).

A species whose venom status is not recorded counts as possibly venomous (its share warns as a venomous one's
does), whatever its name: a harmless species of a mixed gallery (a toad beside a cobra) is recorded so with
``speciesid species set-venom NAME no``. The shipped snake taxonomy is only a hint (:func:`venom_advice_hint`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from index.gallery import Gallery
from index.photos import first_few
from index.taxonomy import (
    TaxonInfo,
    advice_off_snakes_note,
    known_snake,
    moroccan_checklist,
    unrecorded_snake,
)

if TYPE_CHECKING:
    from index.store import SpeciesSummary


class HasVenomous(Protocol):
    """Anything with a venomous flag (a species' summary, an answer's neighbour)."""

    venomous: bool | None

logger = logging.getLogger(__name__)

#: The share of the probability on venomous (or unrecorded) species from which the advice is to treat a bite as
#: venomous: 10% of the venomous ph-snakes val photos get a harmless top-1 from the blend (docs/identification.md).
VENOM_WARN_AT = 0.10

FAR_TEXT = "This photo cannot be identified: if someone was bitten, treat the bite as venomous and seek medical care."
UNKNOWN_TEXT = ("This photo cannot be identified with confidence (no species is supported strongly enough), so its "
                "venom status cannot be told: if someone was bitten, treat the bite as venomous and seek medical care.")
#: The advice of a gallery of one species (``{species}``: its name) for any answer not far.
ONE_SPECIES_TEXT = ("This gallery holds one species ({species}), so it cannot tell species apart and the photo's "
                    "venom status cannot be told: if someone was bitten, treat the bite as venomous and seek medical "
                    "care.")
#: The caveat of an "unlikely" answer: the gallery names none but its own species.
ONLY_OWN = "among this gallery's own species only (a snake of another species is shown as the closest of them)"
#: Said of a far answer's candidates (the CLI's heading over them, the API's note, the page's line).
NOT_MEANINGFUL = "not meaningful: the photo is unlike every reference"


@dataclass(frozen=True)
class VenomAdvice:
    """What to do about a bite, from one answer."""

    level: str  # "cannot_tell", "possibly_venomous" or "unlikely"
    treat_as_venomous: bool  # the advice is to treat a bite as venomous
    text: str  # one sentence for people (the CLI prints it, the page shows it)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


#: Where ``gallery.json`` records whether the gallery's answers give venom advice: false turns it off; absent (or
#: true), on.
VENOM_ADVICE_KEY = "venom_advice"


def venom_advice_on(info: Mapping[str, object]) -> bool:
    """Whether a gallery's ``gallery.json`` (``info``) leaves venom advice on: only a recorded false turns it off."""
    return info.get(VENOM_ADVICE_KEY) is not False


def record_venom_advice(gallery: Gallery, on: bool) -> None:
    """Record in the gallery's ``gallery.json`` whether its answers give venom advice (the folder's lock, the file
    re-read first, whatever this object read before: :meth:`index.gallery.Gallery.update_info`); a running server
    reads it at its next look. Nothing is written when it reads so already, on included where the file records
    nothing (its default)."""
    gallery.update_info(VENOM_ADVICE_KEY, lambda _: bool(on), absent=True)  # absent reads on: on writes nothing


def recorded_venomous(taxa: Iterable[SpeciesSummary]) -> list[str]:
    """The species of ``taxa`` recorded medically important venomous (sorted)."""
    return sorted(t.species for t in taxa if t.venomous)


def venom_applies(info: Mapping[str, object], taxa: Iterable[SpeciesSummary | HasVenomous] = ()) -> bool:
    """Whether venom advice applies to a gallery: on unless its ``gallery.json`` (``info``) records it off
    (:func:`venom_advice_on`), and on all the same while any of ``taxa`` (its species and its text prior's; an
    answer's neighbours too) is recorded medically important venomous: a declaration never silences a venomous
    species. The one rule of answers and ``/readyz`` (and an add's venom note); ``taxa`` is read only when recorded
    off."""
    return venom_advice_on(info) or any(t.venomous for t in taxa)


def venom_advice_hint(info: Mapping[str, object], taxa: Iterable[SpeciesSummary], root: str | Path) -> str | None:
    """What to tell about a gallery's venom advice (the end of ``index build``, ``index info``), None when nothing:

    - on, with species none of which the shipped snake taxonomy knows (by species, genus or family:
      :func:`index.taxonomy.known_snake`) and none recording a venom status (birds, plants): how to turn it off. A
      hint only: names decide nothing (a snake genus the 2021 table lacks, a common name), nothing is turned off;
    - off while a species is recorded venomous: the advice stays on for it;
    - off, with species of a snake genus or family the taxonomy knows that record no status: how to turn it on."""
    taxa = list(taxa)
    if not venom_advice_on(info):
        if venomous := recorded_venomous(taxa):
            return (f"this gallery records no venom advice, but it holds species recorded medically important "
                    f"venomous ({first_few(venomous)}): its answers give venom advice all the same")
        snakes = sorted(t.species for t in taxa if unrecorded_snake(t.species, t.venomous, t.genus, t.family))
        return advice_off_snakes_note(snakes, root) if snakes else None
    if not taxa or any(t.venomous is not None or known_snake(t.species, t.genus, t.family) for t in taxa):
        return None
    return (f"none of this gallery's species is in the shipped snake taxonomy (SnakeCLEF 2021) and none records a "
            f"venom status, so its answers advise on snakebite (treat as venomous when unsure): if it is not a "
            f"gallery of snakes, 'speciesid index venom-advice --index {root} off' turns that advice off")


def unrecorded_share(scores: Mapping[str, float], venomous: Mapping[str, bool | None]) -> float:
    """The probability of ``scores`` on species whose venom status is not recorded (``venomous``: species -> flag),
    whatever their names: not a harmless share, it warns as venomous species do."""
    return float(sum(p for s, p in scores.items() if venomous.get(s) is None))


def venom_advice(*, unknown: bool, far: bool, venomous_score: float | None, venom_unknown_score: float,
                 venomous_names: Sequence[str] = (), unrecorded_names: Sequence[str] = (),
                 applies: bool = True, one_species: str | None = None) -> VenomAdvice | None:
    """The advice of an answer (the module's rule); ``venomous_names``: its venomous candidates of at least
    :data:`VENOM_WARN_AT`, named in the warning; ``unrecorded_names``: its candidates of unrecorded venom status,
    named when the warning comes from them alone; ``venom_unknown_score``: their share (:func:`unrecorded_share`);
    ``applies``: :func:`venom_applies` of the gallery (False: no advice at all, None); ``one_species``: the species
    of a gallery that holds only it (cannot tell, treat as venomous: never "unlikely")."""
    if not applies:
        return None  # recorded off (birds): no bite to advise on, far and unknown answers included
    if far:
        return VenomAdvice("cannot_tell", True, FAR_TEXT)
    if one_species is not None:  # its 100% is no match: a cobra is answered as the one harmless species it holds
        return VenomAdvice("cannot_tell", True, ONE_SPECIES_TEXT.format(species=one_species))
    venomous = venomous_score or 0.0
    share = venomous + venom_unknown_score
    # compared as printed too: a share that prints as 10.0% warns, as 10% does
    if share >= VENOM_WARN_AT or f"{share:.1%}" == f"{VENOM_WARN_AT:.1%}":
        if venomous < 0.005:  # from species of unrecorded venom status alone: no "probability 0.0%"
            whom = ", ".join(unrecorded_names) or "the species this answer names"
            return VenomAdvice("possibly_venomous", True,
                               f"Venom status not recorded for {whom} ({venom_unknown_score:.1%} of the "
                               "probability): treat as venomous and seek medical care.")
        names = f" ({', '.join(venomous_names)})" if venomous_names else ""
        unflagged = (f", and {venom_unknown_score:.1%} on species whose venom status is not recorded"
                     if venom_unknown_score >= 0.01 else "")
        return VenomAdvice("possibly_venomous", True,
                           f"Possibly MEDICALLY IMPORTANT VENOMOUS{names} — probability {venomous:.1%}"
                           f"{unflagged}. Treat as venomous and seek medical care.")
    if unknown:
        return VenomAdvice("cannot_tell", True, UNKNOWN_TEXT)
    unflagged = (f" (and {venom_unknown_score:.1%} on species of unknown venom status)"
                 if venom_unknown_score >= 0.005 else "")
    return VenomAdvice("unlikely", False, f"Probability medically important venomous: {venomous:.1%}{unflagged}, "
                       f"{ONLY_OWN}; when in doubt, treat a bite as venomous.")


def far_note() -> str:
    """The note of a far answer: its candidates' scores are shares among the gallery's species, not a match."""
    return (f"the candidates' scores are {NOT_MEANINGFUL} photo (they are shares among the gallery's species, not "
            "a match)")


# ------------------------------------------------------------------------------------------ the gallery's species
#: The imbalance note (:func:`imbalance_note`): the largest species holds more than this many times the photos of
#: the smallest...
IMBALANCE_RATIO = 10
#: ... and at least this many (a gallery of 1 and 11 photos is small rather than skewed: the few-photos notes say so).
IMBALANCE_MIN_PHOTOS = 20


def add_how(api: bool) -> str:
    """How to add reference photos: the API's route for an HTTP client (``api``), else the CLI command."""
    return "POST /v1/species/{name}/references" if api else "speciesid references add"


def one_species_note(species: str, *, api: bool = False) -> str:
    """What a gallery holding one species (``species``) is to be shown with: it cannot tell species apart."""
    return (f"this gallery holds one species ({species}): it cannot tell species apart, so every photo it does not "
            f"mark far or UNKNOWN is answered as {species} at 100%, whatever animal it shows, and its venom advice "
            f"is 'cannot tell, treat as venomous'; add reference photos of other species ({add_how(api)})")


def imbalance_note(counts: Mapping[str, int], *, api: bool = False) -> str:
    """What a gallery whose species' photo counts (``counts``: species -> searchable photos) differ a lot is to be
    shown with (more than :data:`IMBALANCE_RATIO` times, the largest of at least :data:`IMBALANCE_MIN_PHOTOS`):
    the kNN vote favours the large species; "" otherwise."""
    held = {s: n for s, n in counts.items() if n > 0}
    if len(held) < 2:
        return ""
    big = max(sorted(held), key=lambda s: held[s])
    small = sorted((s for s in held if held[big] > IMBALANCE_RATIO * held[s]), key=lambda s: (held[s], s))
    if held[big] < IMBALANCE_MIN_PHOTOS or not small:
        return ""
    few = f"{small[0]} {held[small[0]]}" + (f"; {len(small)} species have under a tenth of that ({first_few(small)})"
                                            if len(small) > 1 else "")
    return (f"photo counts per species differ a lot ({big} has {held[big]} reference photos, {few}): the kNN vote "
            "counts each neighbouring photo, so it favours species with many photos (a photo of a small species "
            f"is often answered as a large one); add photos of the small species ({add_how(api)}), and 'speciesid "
            "probe train' (its probe weighs every species alike, blended with the vote) lessens it")


def species_notes(counts: Mapping[str, int], *, api: bool = False) -> list[str]:
    """What a gallery of these species (``counts``: species -> searchable photos) is to be shown with at a build, an
    add or a delete and beside its answers: one species (:func:`one_species_note`), or photo counts that differ a
    lot (:func:`imbalance_note`); [] otherwise."""
    held = sorted(s for s, n in counts.items() if n > 0)
    if len(held) == 1:
        return [one_species_note(held[0], api=api)]
    return [note] if (note := imbalance_note(counts, api=api)) else []


# ------------------------------------------------------------------------------------------ checklist coverage
#: The checklists a gallery can be built from (``--dataset NAME``) -> their species.
CHECKLISTS: dict[str, Callable[[], Sequence[TaxonInfo]]] = {"moroccan": moroccan_checklist}
#: Where gallery.json records the checklist the gallery was built from.
CHECKLIST_KEY = "checklist"


def record_checklist(gallery: Gallery, dataset: str) -> None:
    """Record in the gallery's ``gallery.json`` that it is built from the checklist ``dataset`` (nothing for a
    dataset that is not a checklist, or when recorded already)."""
    if dataset in CHECKLISTS:
        gallery.record_info(CHECKLIST_KEY, dataset)


@dataclass(frozen=True)
class ChecklistCoverage:
    """Which species of a checklist a gallery can name (photos, or its text prior) and which it cannot."""

    checklist: str  # its name (``moroccan``)
    species: int  # species on the checklist
    with_photos: int  # of them, held with searchable photos
    missing: tuple[str, ...]  # checklist species the gallery cannot name (no photos, not in its text prior)
    venomous: int  # medically important venomous species on the checklist
    venomous_missing: tuple[str, ...]  # of them, those it cannot name
    venomous_text_only: tuple[str, ...] = ()  # of them, those with no photos, named by the text prior alone

    def note(self) -> str:
        """What an answer says of it ("" when every venomous checklist species has photos)."""
        said = []
        if self.venomous_missing:
            n = len(self.venomous_missing)
            said.append(
                f"this gallery cannot name {n} of the {self.venomous} medically important venomous species of the "
                f"{self.checklist} checklist ({', '.join(self.venomous_missing)}): it has no photos of "
                f"{'it' if n == 1 else 'them'}, so a snake of {'that species' if n == 1 else 'those'} is answered "
                f"as the closest species it holds (it holds photos of {self.with_photos} of the checklist's "
                f"{self.species} species); add their photos")
        if self.venomous_text_only:
            n = len(self.venomous_text_only)
            said.append(
                f"{n} medically important venomous species of the {self.checklist} checklist "
                f"({', '.join(self.venomous_text_only)}) {'is' if n == 1 else 'are'} named only by "
                f"{'its' if n == 1 else 'their'} text description, accuracy not measured (no photos of "
                f"{'it' if n == 1 else 'them'}); add their photos")
        return "; ".join(said)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict (``index info``), with the note."""
        return {**asdict(self), "missing": list(self.missing), "venomous_missing": list(self.venomous_missing),
                "venomous_text_only": list(self.venomous_text_only), "note": self.note()}


def gallery_checklist(info: dict) -> str | None:
    """The checklist a gallery is built from, as its ``gallery.json`` (``info``) records it (:func:`record_checklist`);
    None for another dataset, or a gallery built before it was recorded (the same build run again records it)."""
    recorded = info.get(CHECKLIST_KEY)
    return str(recorded) if recorded in CHECKLISTS else None


def checklist_coverage(info: dict, held: Iterable[str], nameable: Iterable[str] = ()) -> ChecklistCoverage | None:
    """What of its checklist a gallery can name: ``held`` (species with photos) and ``nameable`` (its text prior's
    species); None for a gallery of no checklist."""
    held = set(held)
    name = gallery_checklist(info)
    if name is None:
        return None
    taxa = CHECKLISTS[name]()
    can = held | set(nameable)
    missing = tuple(t.species for t in taxa if t.species not in can)
    venomous = [t.species for t in taxa if t.venomous]
    return ChecklistCoverage(name, len(taxa), sum(t.species in held for t in taxa), missing, len(venomous),
                             tuple(s for s in venomous if s in missing),
                             tuple(s for s in venomous if s not in held and s not in missing))
