"""What an answer advises about venom, and which checklist species a gallery cannot name: one rule, which the CLI,
the API and the web page only show (docs/identification.md, "Venom advice").

The advice (:func:`venom_advice`), in order:

- ``cannot_tell``, treat as venomous: the photo is unlike every reference (``far``: its scores say nothing);
- ``possibly_venomous``, treat as venomous: at least :data:`VENOM_WARN_AT` of the probability is on medically
  important venomous species or on species whose venom status is not recorded (10% of the venomous ph-snakes val
  photos get a harmless top-1: docs/identification.md);
- ``cannot_tell``, treat as venomous: the answer is ``unknown`` (no species supported strongly enough);
- ``unlikely``: a species is named and under 10% (as printed) is on venomous or unrecorded species; said with the
  caveat that only the gallery's own species can be named.

A gallery that records no venom status at all gets no advice (None) for a named answer: birds, plants. A gallery
that is not of snakes (:func:`venom_applies` false: birds, plants) gets none for any answer, far and unknown too;
every gallery that is or may be of snakes gets the safe advice on a far or unknown answer.

Which species' missing venom status counts as possibly venomous (:func:`may_be_snake`, :func:`not_snakes`): one
that is, or may be, a snake (of the shipped snake taxonomy by species, genus or family, or a label whose name cannot
be checked). A scientific name of no snake genus or family with no status (``Bufo bufo`` beside a cobra) is no
snake: its share is not "unrecorded venom"; and a named answer of a species of such a name (whatever its status)
with nothing on venomous or unrecorded species gets no advice of its own (``top_applies``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from index.gallery import Gallery
from index.taxonomy import TaxonInfo, known_snake, looks_scientific, moroccan_checklist

if TYPE_CHECKING:
    from index.store import SpeciesSummary

logger = logging.getLogger(__name__)

#: The share of the probability on venomous (or unrecorded) species from which the advice is to treat a bite as
#: venomous: 10% of the venomous ph-snakes val photos get a harmless top-1 from the blend (docs/identification.md).
VENOM_WARN_AT = 0.10

FAR_TEXT = "This photo cannot be identified: if someone was bitten, treat the bite as venomous and seek medical care."
UNKNOWN_TEXT = ("This photo cannot be identified with confidence (no species is supported strongly enough), so its "
                "venom status cannot be told: if someone was bitten, treat the bite as venomous and seek medical care.")
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


def may_be_snake(species: str, genus: str | None = None, family: str | None = None) -> bool:
    """Whether ``species`` is, or may be, a snake: known to the shipped snake taxonomy by its species, genus or family
    (:func:`index.taxonomy.known_snake`), or a label not written as a scientific name (``cobra``, ``cats``: nothing
    tells what it is). False only for a scientific name of no snake genus or family (``Bufo bufo``, ``Parus
    major``). The one rule of :func:`venom_applies`, :func:`not_snakes` and the add warning of a species of unknown
    venom status (:func:`index.taxonomy.new_species_references`, which cannot import this module: same test)."""
    return not looks_scientific(species.split()) or known_snake(species, genus, family)


def not_snakes(taxa: Iterable[SpeciesSummary]) -> frozenset[str]:
    """The species of ``taxa`` with no venom status recorded that are no snake (:func:`may_be_snake` false: a toad
    beside a cobra): venom advice does not apply to them, their probability is no "unrecorded venom" share
    (:func:`unrecorded_share`), and a named answer of one gets no advice of its own. A species with a recorded status
    is never in it, nor one that is or may be a snake (its missing status stays "treat as venomous")."""
    return frozenset(t.species for t in taxa if t.venomous is None and not may_be_snake(t.species, t.genus, t.family))


def venom_applies(taxa: Iterable[SpeciesSummary]) -> bool:
    """Whether venom advice applies to a gallery of ``taxa`` (its species, and its text prior's): whether it is, or
    may be, of snakes (or holds an animal recorded venomous). True when any species :func:`may_be_snake` (known to
    the shipped snake taxonomy by its species, genus or family, or a label not written as a scientific name), or is
    recorded venomous whatever its name; True for no species. False when every species is a scientific name of no
    snake genus or family and none is recorded venomous: birds, plants, and birds one of which a curator flagged
    "no" (a harmless flag on a bird says nothing of snakes: walk s52 #2b)."""
    taxa = list(taxa)
    return not taxa or any(t.venomous or may_be_snake(t.species, t.genus, t.family) for t in taxa)


def unrecorded_share(scores: Mapping[str, float], venomous: Mapping[str, bool | None],
                     no_snakes: Collection[str] = frozenset()) -> float:
    """The probability of ``scores`` on species whose venom status is not recorded (``venomous``: species -> flag)
    and that may be snakes (not in ``no_snakes``, :func:`not_snakes`): not a harmless share, it warns as venomous
    species do."""
    return float(sum(p for s, p in scores.items() if venomous.get(s) is None and s not in no_snakes))


def venom_advice(*, unknown: bool, far: bool, venomous_score: float | None, venom_unknown_score: float,
                 venomous_names: Sequence[str] = (), unrecorded_names: Sequence[str] = (),
                 applies: bool = True, top_applies: bool = True) -> VenomAdvice | None:
    """The advice of an answer (the module's rule); ``venomous_names``: its venomous candidates of at least
    :data:`VENOM_WARN_AT`, named in the warning; ``unrecorded_names``: its candidates of unrecorded venom status
    that may be snakes, named when the warning comes from them alone; ``venom_unknown_score``: their share
    (:func:`unrecorded_share`); ``applies``: :func:`venom_applies` of the gallery (False: no advice at all, None);
    ``top_applies``: False when the top candidate is no snake (:func:`may_be_snake` false, whatever its recorded
    status): a named answer of it with nothing (0.0% as printed) on venomous or unrecorded species gets no advice
    of its own (None)."""
    if not applies:
        return None  # not a gallery of snakes (birds): no bite to advise on, far and unknown answers included
    if far:
        return VenomAdvice("cannot_tell", True, FAR_TEXT)
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
    if venomous_score is None and not venom_unknown_score:
        return None  # the gallery records no venom status at all (birds): far and unknown were told above
    if not top_applies and f"{share:.1%}" == f"{0.0:.1%}":
        return None  # a toad beside a cobra, nothing on venomous or unrecorded snakes: no bite advice of its own
    unflagged = (f" (and {venom_unknown_score:.1%} on species of unknown venom status)"
                 if venom_unknown_score >= 0.005 else "")
    return VenomAdvice("unlikely", False, f"Probability medically important venomous: {venomous:.1%}{unflagged}, "
                       f"{ONLY_OWN}; when in doubt, treat a bite as venomous.")


def far_note() -> str:
    """The note of a far answer: its candidates' scores are shares among the gallery's species, not a match."""
    return (f"the candidates' scores are {NOT_MEANINGFUL} photo (they are shares among the gallery's species, not "
            "a match)")


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
