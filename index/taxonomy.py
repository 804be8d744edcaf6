"""Names and taxonomy: which names can be stored, what the shipped snake taxonomy knows of a species, how a name
joins a gallery's species, and species checklists (``moroccan`` or a file).

The taxonomy (``data/snake_taxonomy.csv``, SnakeCLEF 2021's species / family / venomous list, and
``data/moroccan.csv``, which wins on a conflict) is read once per process.
"""

from __future__ import annotations

import csv
import difflib
import logging
import re
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from index.photos import first_few
from index.records import ReferenceRecord
from index.text import FORMULA_STARTS

if TYPE_CHECKING:
    from index.store import SpeciesSummary

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
MOROCCAN_CSV = DATA_DIR / "moroccan.csv"
TAXONOMY_CSV = DATA_DIR / "snake_taxonomy.csv"


@dataclass(frozen=True)
class TaxonInfo:
    """What the shipped snake taxonomy knows about one species."""

    species: str
    genus: str | None
    family: str | None
    venomous: bool | None  # medically important venomous (SnakeCLEF "mivs"); None = unknown
    common_name: str | None = None  # English common name (``moroccan.csv``'s ``common_name``; None when not listed)


# --------------------------------------------------------------------------------------------------
# Names

#: Longest taxon or common name accepted (the longest binomials + authorities fit in well under this).
MAX_NAME_LENGTH = 120


class InvalidNameError(ValueError):
    """A species or common name that cannot be stored (empty, too long, control or bidi characters, not valid text,
    a leading spreadsheet formula character)."""


#: An example of each kind of name :func:`check_name` checks, for its messages.
NAME_EXAMPLES = {"species name": "Naja haje", "genus": "Naja", "family": "Elapidae", "common name": "Egyptian cobra",
                 "class folder name": "Naja haje"}
#: What replaces an undecodable byte when text is decoded leniently (a URL's ``%FF``): a name holding it was not text.
REPLACEMENT_CHARACTER = "\ufffd"


def check_name(value: str, what: str = "species name", *, stored: Collection[str] = ()) -> str:
    """``value`` with its spaces collapsed, in Unicode NFC, or :class:`InvalidNameError` saying what is wrong with it.

    NFC: a name typed on macOS or iOS often arrives decomposed (NFD: ``i`` + U+0308 for ``ï``); composed here, it is
    the same name as its composed spelling everywhere (stored, matched, looked up), not a second species that looks
    identical. A typographic apostrophe (:data:`APOSTROPHES`: ``’`` ``‘`` ``ʼ``, what a phone keyboard types) is the
    ASCII ``'`` for the same reason (``Cobra d’Égypte`` is ``Cobra d'Égypte``).

    Refused: empty names, names with no letter or digit, names over :data:`MAX_NAME_LENGTH` characters, any
    control, format (bidi overrides, zero-width), surrogate, private-use or unassigned character, or line
    separator: a name is shown in tables, files and web pages, where such characters hide or reorder text; the
    replacement character U+FFFD (what a lenient decoder makes of a byte that was not UTF-8: ``Naja%FFhaje`` in a
    URL); and a name starting with a spreadsheet formula character (:data:`FORMULA_STARTS`: ``=1+1``,
    ``@SUM(A1)``), which a spreadsheet opening a CSV export would run. A taxon name (anything but a common name)
    with a ``/`` or a ``\\`` is refused too: the HTTP API's ``/v1/species/{name}`` could not address the first,
    and the second is a path separator on Windows. ``stored``: names a gallery holds already (stored before the
    formula rule), taken with their leading formula character so that photos can still be added to them. The one
    rule of the CLI, the API and the dataset loaders; messages end with an example of ``what``.
    """
    text = unicodedata.normalize("NFC", " ".join(str(value).split()).translate(APOSTROPHES))
    example = f"give e.g. {NAME_EXAMPLES.get(what, NAME_EXAMPLES['species name'])!r}"
    if not text:
        raise InvalidNameError(f"the {what} is empty; {example}")
    if REPLACEMENT_CHARACTER in text:  # before the letters' check: '\ufffd\ufffd' is no name for that reason
        raise InvalidNameError(f"the {what} {text!r} is not valid text (U+FFFD, the replacement character: the name "
                               f"was not valid UTF-8); send it encoded as UTF-8, {example}")
    if not any(ch.isalnum() for ch in text):
        raise InvalidNameError(f"the {what} {text!r} has no letters or digits; {example}")
    if what != "common name":  # no taxon name holds either
        for sep, why in (("/", "the HTTP API could not address it"), ("\\", "a path separator on Windows")):
            if sep in text:
                raise InvalidNameError(f"the {what} {text!r} cannot contain '{sep}' ({why}); {example}")
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"the {what} is {len(text)} characters long; at most {MAX_NAME_LENGTH} are allowed")
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] == "C" or cat in ("Zl", "Zp"):
            code = f"U+{ord(ch):04X}"
            name = unicodedata.name(ch, "") if cat != "Cs" else "an undecodable byte"
            raise InvalidNameError(
                f"the {what} {text.encode('utf-8', 'backslashreplace').decode()!r} contains "
                f"{f'{name} ({code})' if name else f'the control character {code}'}; use printable letters only"
            )
    if text.startswith(FORMULA_STARTS) and text not in stored:  # a tab or CR cannot reach here: collapsed first
        raise InvalidNameError(
            f"the {what} {text!r} starts with {text[0]!r}, which a spreadsheet (Excel, LibreOffice) opening a CSV "
            f"export reads as a formula and runs; leave the {text[0]!r} out, {example}")
    return text


#: Typographic apostrophes (a phone keyboard's ``’``, ``‘``, the modifier letter ``ʼ``) read as the ASCII ``'``
#: wherever names are normalised (:func:`check_name`, :func:`species_key`, :func:`fold_name`).
APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
#: Arabic letters :func:`fold_name` writes one way (its hamza forms, ``أ`` ``إ`` ``آ`` ``ؤ`` ``ئ``, and vowel signs
#: are dropped marks after NFKD already): alef wasla as alef, alef maksura as yeh, teh marbuta as heh, no tatweel.
_ARABIC_FOLD = str.maketrans({"\u0671": "\u0627", "\u0649": "\u064a", "\u0629": "\u0647", "\u0640": None})


@lru_cache(maxsize=1 << 16)  # asked of every gallery species' names by each lookup and harmless flag's check
def fold_name(name: str) -> str:
    """``name`` as :func:`species_key` normalises it, in compatibility form (NFKD, so NFKC's folding: full-width
    ``Ｂｉｔｉｓ`` is ``bitis``, the ligature ``ﬁ`` is ``fi``), with accents and every other combining mark dropped
    (``Vipère`` is ``vipere``; the hamza of ``أفعى`` too, so it is ``افعى``'s fold) and the Arabic spellings of
    :data:`_ARABIC_FOLD` made one: the one folding of lookups and "did you mean" (:func:`find_species`,
    :func:`gallery_lookalikes`), of both halves of the harmless flag's rule (:func:`check_harmless_flag`: the
    shipped taxonomy's names and common names, and the gallery's) and of country names
    (:func:`index.geography.resolve_country`). For matching only: a stored name is not folded (:func:`check_name`
    stores it in NFC, its spaces collapsed and its typographic apostrophes as ``'``, nothing else changed)."""
    text = unicodedata.normalize("NFKD", species_key(name))
    return " ".join("".join(ch for ch in text if not unicodedata.combining(ch)).translate(_ARABIC_FOLD).split())


#: A scientific name's words: a capitalised genus, then one or two lower-case epithets (a subspecies' too), of
#: letters (``sp.``, ``cf.``: dots) and inner hyphens (``Polygonia c-album``).
_GENUS_RE = re.compile(r"^[A-Z][a-z]+$")
_EPITHET_RE = re.compile(r"^[a-z](?:[a-z.]|-(?=[a-z]))*$")
#: A subgenus in brackets after the genus (``Carabus (Megodontus) violaceus``).
_SUBGENUS_RE = re.compile(r"^\([A-Z][a-z]+\)$")
#: Rank markers before an infraspecific epithet (``Quercus robur subsp. robur``).
RANK_MARKERS = frozenset({"subsp.", "ssp.", "var.", "subvar.", "f.", "forma", "morph", "cv."})
#: ``sp.`` / ``spp.`` then a morphospecies' designation (``Phylloscopus sp. 2``, ``Carabus sp. A``).
_OPEN_NAMES = frozenset({"sp.", "spp.", "morphosp."})
_DESIGNATION_RE = re.compile(r"^[A-Za-z0-9]+$")
#: The hybrid sign (U+00D7), and the ``x`` written for it between two names.
HYBRID_SIGN = "\u00d7"
#: The form :func:`looks_scientific` accepts, for messages.
SCIENTIFIC_FORM = "'Genus species': a capitalised genus, then one or two lower-case epithets"
#: The example names of :func:`looks_scientific`'s refusals (a snake and a bird: any taxon is meant).
SCIENTIFIC_EXAMPLE = "e.g. 'Naja haje' or 'Parus major'"


def _plain_scientific(words: Sequence[str]) -> bool:
    """Whether ``words`` are one scientific name without a hybrid sign: :data:`SCIENTIFIC_FORM`, with a subgenus in
    brackets after the genus, a rank marker before a third epithet, or ``sp.`` and a designation."""
    words = list(words)
    if words and words[-1] in RANK_MARKERS:  # "Quercus robur subsp." names no subspecies
        return False
    if len(words) >= 3 and _SUBGENUS_RE.match(words[1]):
        words = [words[0], *words[2:]]
    if len(words) == 3 and words[1] in _OPEN_NAMES and _DESIGNATION_RE.match(words[2]):
        return bool(_GENUS_RE.match(words[0]))
    if len(words) == 4 and words[2] in RANK_MARKERS:
        words = [*words[:2], words[3]]
    return (2 <= len(words) <= 3 and bool(_GENUS_RE.match(words[0]))
            and all(_EPITHET_RE.match(w) for w in words[1:]))


def _hybrid_parts(words: Sequence[str]) -> list[list[str]] | None:
    """``words`` split at hybrid signs (``×``, attached or not, or a lone ``x`` between two words), or None when
    there is none."""
    tokens = " ".join(words).replace(HYBRID_SIGN, f" {HYBRID_SIGN} ").split()
    marks = [i for i, w in enumerate(tokens)
             if w == HYBRID_SIGN or (w == "x" and 0 < i < len(tokens) - 1)]
    if not marks:
        return None
    parts, start = [], 0
    for i in [*marks, len(tokens)]:
        parts.append(tokens[start:i])
        start = i + 1
    return parts


def looks_scientific(words: Sequence[str]) -> bool:
    """Whether ``words`` (a name split on spaces) are written as a scientific name (:data:`SCIENTIFIC_FORM`, with a
    subgenus in brackets, a rank marker such as ``subsp.``, ``Genus sp. 2``, or a hybrid formula): the one rule of
    the folder dataset's class names (``Common Name (Genus species)``, :mod:`index.datasets`) and of a new species'
    name added by the CLI or the API (:func:`new_species_references`).

    A hybrid formula: names or epithets joined by ``×`` (or ``x``): ``Larus argentatus × Larus fuscus``, ``Anas
    platyrhynchos x rubripes``, ``Anas ×platyrhynchos`` (a nothospecies: the genus, then epithets), ``×Chitalpa
    tashkentensis`` (a nothogenus)."""
    parts = _hybrid_parts(words)
    if parts is None:
        return _plain_scientific(words)
    first, rest = parts[0], parts[1:]
    if not first:  # a nothogenus: "×Chitalpa tashkentensis"
        return len(rest) == 1 and _plain_scientific(rest[0])
    if not (_plain_scientific(first) or (len(first) == 1 and _GENUS_RE.match(first[0]))):
        return False
    return all(_plain_scientific(p) or (1 <= len(p) <= 2 and all(_EPITHET_RE.match(w) for w in p)) for p in rest)


def split_authority(name: str) -> tuple[str, str] | None:
    """(the name, its author citation) of a scientific name written with its authority (``Parus major Linnaeus,
    1758``, ``Naja haje (Linnaeus, 1758)``, ``Vipera latastei Boscá``), else None."""
    words = name.split()
    for i in range(2, len(words)):
        head, tail = words[:i], " ".join(words[i:])
        if re.match(r"^\(?[A-Z\u00c0-\u024f]", tail) and re.fullmatch(r"[\w\s.,&'()\u2019-]+", tail) and (
                looks_scientific(head)):
            return " ".join(head), tail
    return None


def scientific_spelling(name: str) -> str | None:
    """``name`` typed all in lower or upper case, re-cased as a scientific name (``naja nova`` -> ``Naja nova``) when
    that is all it lacks, else None (``Common Wolf Snake``, capitalised word by word, is a common name)."""
    words = name.split()
    if not words or name not in (name.lower(), name.upper()):
        return None
    cased = [words[0].capitalize(), *(w.lower() for w in words[1:])]
    return " ".join(cased) if looks_scientific(cased) else None


def _odd_letter(name: str) -> tuple[str, str | None] | None:
    """(what is odd, what to give instead or None) of the first letter of ``name`` a scientific name cannot hold
    that looks like one it can: a letter of another script (a homoglyph: the Cyrillic ``а`` of ``Naja hаje`` looks
    like the Latin ``a``) or a full-width Latin one (``ｈ``); None when there is none (an accent is seen: ``Vipère
    aspic``'s ``è`` is no lookalike). A name all in another script (``Гадюка``) is told no more than to give the
    scientific name."""
    for ch in name:
        if not ch.isalpha() or ch.isascii():
            continue
        uname = unicodedata.name(ch, "")
        latin = "LATIN" in uname.split()
        if latin and not unicodedata.normalize("NFKC", ch).isascii():
            continue  # an accented Latin letter: visible, and no homoglyph
        odd = (f"{ch!r} (U+{ord(ch):04X} {uname or 'an unnamed letter'}) where a {'plain ' if latin else ''}Latin "
               "letter is expected")
        mixed = latin or any(c.isascii() and c.isalpha() for c in name)
        return odd, "type the name again in Latin letters" if mixed else None
    return None


def _unscientific(name: str) -> SpeciesNameConflictError:
    """The refusal of a new species ``name`` not written as a scientific name: confirmed, it is taken (a gallery of
    labels, a folder dataset's ``cats``), as a near-spelling is; no gallery species is meant. A letter of another
    script, or an accented one, is named with its code point (:func:`_odd_letter`); a name with its author citation
    is told to leave it out; one capitalised word, that a genus alone is no species."""
    if odd := _odd_letter(name):
        return SpeciesNameConflictError(name, None, f"is not written as a scientific name: {odd[0]} "
                                        f"({SCIENTIFIC_FORM}; {SCIENTIFIC_EXAMPLE})", hint=odd[1])
    if cited := split_authority(name):
        return SpeciesNameConflictError(name, None, f"ends with an author citation ({cited[1]!r})",
                                        hint=f"give the name without it, {cited[0]!r}")
    if len(name.split()) == 1 and _GENUS_RE.match(name):
        return SpeciesNameConflictError(name, None, "is one word: a genus alone is not a species",
                                        hint="give the species' full name (genus and epithet)")
    spelled = scientific_spelling(name)
    example = f"did you mean {spelled!r}?" if spelled else SCIENTIFIC_EXAMPLE
    return SpeciesNameConflictError(name, None, f"is not written as a scientific name ({SCIENTIFIC_FORM}; {example})")


# --------------------------------------------------------------------------------------------------
# Taxonomy lookups


def species_key(name: str) -> str:
    """Normalise a taxon name for matching: ``-``/``_`` as spaces, single spaces, Unicode NFC, case-folded (a name
    stored decomposed before names were composed on entry matches its composed spelling too), typographic apostrophes
    as ``'`` (:data:`APOSTROPHES`: a name stored with ``’`` before they were folded on entry is found), a hybrid's
    sign one word whether attached or not, and an ``x`` between two words as that sign (``Anas platyrhynchos x
    rubripes`` is ``Anas platyrhynchos × rubripes``)."""
    text = name.replace("_", " ").replace("-", " ").replace(HYBRID_SIGN, f" {HYBRID_SIGN} ").translate(APOSTROPHES)
    text = unicodedata.normalize("NFC", text)
    words = text.casefold().split()
    words = [HYBRID_SIGN if w == "x" and 0 < i < len(words) - 1 else w for i, w in enumerate(words)]
    return unicodedata.normalize("NFC", " ".join(words))


def _read_taxon_csv(path: Path) -> list[TaxonInfo]:
    rows: list[TaxonInfo] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            species = " ".join((row.get("species") or "").split())
            if not species:
                continue
            flag = (row.get("venomous") or "").strip()
            rows.append(
                TaxonInfo(
                    species=species,
                    genus=(row.get("genus") or "").strip() or species.split(" ", 1)[0],
                    family=(row.get("family") or "").strip() or None,
                    venomous=True if flag == "1" else False if flag == "0" else None,
                    common_name=" ".join((row.get("common_name") or "").split()) or None,
                )
            )
    return rows


@lru_cache(maxsize=1)
def _taxonomy() -> dict[str, TaxonInfo]:
    table: dict[str, TaxonInfo] = {}
    for path in (TAXONOMY_CSV, MOROCCAN_CSV):  # the Moroccan checklist wins on a conflict
        for info in _read_taxon_csv(path):
            table[species_key(info.species)] = info
    logger.debug("loaded %d taxa from %s", len(table), DATA_DIR)
    return table


@lru_cache(maxsize=1)
def _genera() -> dict[str, str]:
    """Known genera (species_key) -> one species of each, for examples."""
    return {species_key(info.genus): info.species for info in reversed(_taxonomy().values()) if info.genus}


@lru_cache(maxsize=1)
def moroccan_checklist() -> tuple[TaxonInfo, ...]:
    """The 26 native snake species of Morocco (``data/moroccan.csv``), in its order."""
    return tuple(_read_taxon_csv(MOROCCAN_CSV))


@lru_cache(maxsize=1)
def _families() -> frozenset[str]:
    """The snake families of the shipped taxonomy (species_key)."""
    return frozenset(species_key(info.family) for info in _taxonomy().values() if info.family)


def known_snake(species: str, genus: str | None = None, family: str | None = None) -> bool:
    """Whether the shipped snake taxonomy knows ``species``, its genus (``genus``, else the name's first word) or
    ``family``: the species is a snake, or of a snake genus or family (a hint only, never a rule of venom advice:
    ``retrieval.advice.venom_advice_hint``; a 2021 table lacks newer genera and common names)."""
    if lookup_taxon(species) is not None:
        return True
    first = species.split(" ", 1)[0] if species.strip() else ""
    return (any(g and known_genus(g) for g in (genus, first))
            or (family is not None and species_key(family) in _families()))


#: How many names :func:`lookup_taxon` keeps the answer of (the shipped table never changes in a process).
LOOKUP_CACHE = 4096


@lru_cache(maxsize=LOOKUP_CACHE)
def lookup_taxon(species: str) -> TaxonInfo | None:
    """Genus, family and venomous flag of a snake species, or None when it is not a known snake.

    Matching ignores case and treats ``-``/``_`` as spaces. A trinomial (subspecies) that is not
    listed falls back to its species (first two words). Cached (:data:`LOOKUP_CACHE` names): one check of a
    harmless flag (:func:`check_harmless_flag`) asks it of one name in each of its rules, looked up once.
    """
    table = _taxonomy()
    key = species_key(species)
    info = table.get(key)
    if info is None:
        words = key.split(" ")
        if len(words) == 3:
            info = table.get(" ".join(words[:2]))
    return info


#: How alike (difflib's ratio, 0 to 1, of :func:`species_key` spellings) a new species name must be to a gallery species
#: or to a taxon of the shipped taxonomy to be refused as a near-spelling of it without ``new_species``: a one-letter
#: typo of a binomial (a letter missing, added, changed or two swapped) is above it.
NEAR_SPELLING = 0.9
#: How alike a name the shipped taxonomy does not know must be to a taxon there to be told "did you mean" (the log,
#: an add's note).
SUGGESTION = 0.85


def taxonomy_lookalikes(name: str, cutoff: float = NEAR_SPELLING) -> list[TaxonInfo]:
    """The taxa of the shipped taxonomy (3 at most, closest first) that ``name`` looks like a misspelling of, at
    ``cutoff`` (:data:`NEAR_SPELLING`, :data:`SUGGESTION`); [] when the taxonomy knows ``name`` itself."""
    if lookup_taxon(name) is not None:
        return []
    table = _taxonomy()
    key = fold_name(name)  # the table's keys are ASCII: their folds are themselves ('Ｎａｊａ ｎｉｖａｅ' is a typo too)
    return [table[k] for k in difflib.get_close_matches(key, list(table), n=3, cutoff=cutoff)
            if not _numbered_apart(key, k)]


def taxa_text(taxa: Iterable[TaxonInfo]) -> str:
    """``'Naja nivea' (venomous) and 'Naja nubiae'``: taxa named for a message, the venomous ones flagged."""
    names = [f"{t.species!r}{' (venomous)' if t.venomous else ''}" for t in taxa]
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1] if names else ""


#: How ``species set-venom NAME no`` and ``references add --venomous no`` confirm that a name like a venomous
#: taxon (:func:`venomous_lookalike`) is another, harmless species (the API's add: the form field
#: ``distinct_from_venomous``).
DISTINCT_OPTION = "--distinct-from-venomous"

#: Words of a name that name a kind of venomous snake, in English, French and Arabic (whole words, any case, accents
#: and hamza folded as :func:`fold_name` folds them, an ``s`` plural, an Arabic word its article ``ال`` too): a
#: harmless flag for a name holding one (``King cobra``, ``Russell's viper``, ``Vipère à cornes``, ``أفعى``) asks for
#: :data:`DISTINCT_OPTION`, since the shipped lists give a common name to the Moroccan checklist's species only (in
#: English). A hint list, not a taxonomy: a harmless snake named so (``False cobra``) needs the option too, and a
#: venomous one named otherwise (``Eastern brown snake``) is not caught by it; a gallery's own venomous species are
#: caught by their names (:func:`check_harmless_flag`), and a genus all of whose species are venomous (``Vipera``,
#: ``Bitis``, ``Echis``) by :func:`venomous_genus`, not by a word here. ``pit viper`` and ``sea krait`` are
#: caught by ``viper`` and ``krait``.
VENOMOUS_KIND_WORDS = ("cobra", "viper", "krait", "mamba", "adder", "taipan", "rattlesnake", "rattler", "sea snake",
                       "coral snake", "boomslang", "lancehead", "fer-de-lance", "bushmaster", "keelback",
                       "copperhead", "cottonmouth", "water moccasin", "habu", "jararaca", "tiger snake", "asp",
                       # French
                       "vipère", "aspic", "crotale", "naja", "céraste", "échide", "bongare", "trigonocéphale",
                       "serpent corail", "serpent de mer", "serpent marin",
                       # Arabic (Darija: لفعة)
                       "أفعى", "أفاعي", "كوبرا", "الصل", "لفعة", "مامبا")
#: Each word's fold (:func:`fold_name`) -> the word as listed, for messages.
_KIND_FOLDS = {fold_name(w): w for w in VENOMOUS_KIND_WORDS}
_KIND_WORD = re.compile(r"(?<!\w)(?:ال)?(" + "|".join(re.escape(w).replace(r"\ ", r"[\s_-]+") for w in _KIND_FOLDS)
                        + r")s?(?!\w)")


#: What a harmless flag is refused for without :data:`DISTINCT_OPTION` (the CLI's help, the API's form field).
HARMLESS_RULE_HELP = ("a name that looks like a medically important venomous species of the shipped taxonomy (a "
                      "near-spelling; its common name, which only the Moroccan checklist's species have; its epithet "
                      "in whatever genus, one of no other genus there; a genus all of whose species there are, "
                      "Vipera, Bitis, Echis, Naja...) or like a species this gallery records as venomous (its name "
                      "or a common name its references carry, or a near-spelling of one: case, accents, hamza, "
                      "apostrophes and full-width letters aside; a genus all of whose species it holds are), or "
                      "whose name or any of its common names holds a venomous snake "
                      "kind's word in English, French or Arabic (cobra, viper, krait, mamba, vipère, aspic, naja, "
                      "أفعى...: a hint list; a venomous snake named otherwise is not caught)")


def venomous_kind_word(name: str, common_name: str | None = None) -> str | None:
    """The word of :data:`VENOMOUS_KIND_WORDS` that ``name`` or ``common_name`` holds, as listed (``cobra`` for ``King
    cobra``, ``vipère`` for ``Vipere a cornes``: matched folded, :func:`fold_name`), None when neither holds one or
    the shipped taxonomy lists ``name`` itself (its own flag decides)."""
    if lookup_taxon(name) is not None:
        return None
    for given in (name, common_name):
        if given and (found := _KIND_WORD.search(fold_name(given))):
            return _KIND_FOLDS[found.group(1)]
    return None


@lru_cache(maxsize=1)
def _venomous_by_epithet() -> dict[str, TaxonInfo]:
    """The specific epithet (species_key) of each medically important venomous taxon whose epithet no other genus of
    the shipped taxonomy has -> that taxon (``albolabris``: Trimeresurus only; not ``viridis``, an adjective of five
    genera, ``Crotalus viridis`` beside ``Morelia viridis``: no sign of a synonym)."""
    genera: dict[str, set[str]] = {}
    for info in _taxonomy().values():
        words = species_key(info.species).split(" ")
        if len(words) > 1:
            genera.setdefault(words[1], set()).add(words[0])
    out: dict[str, TaxonInfo] = {}
    for info in _taxonomy().values():
        words = species_key(info.species).split(" ")
        if info.venomous and len(words) > 1 and len(genera[words[1]]) == 1:
            out.setdefault(words[1], info)
    return out


@lru_cache(maxsize=1)
def _venomous_by_common() -> dict[str, TaxonInfo]:
    """The common name (folded: :func:`fold_name`) of each medically important venomous taxon -> that taxon."""
    return {fold_name(t.common_name): t for t in _taxonomy().values() if t.common_name and t.venomous}


@lru_cache(maxsize=1)
def _venomous_genera() -> dict[str, tuple[TaxonInfo, int]]:
    """Each genus (folded) all of whose species in the shipped taxonomy are medically important venomous (Vipera,
    Bitis, Echis, Daboia, Crotalus, Naja...) -> (one of them, how many there are)."""
    genera: dict[str, list[TaxonInfo]] = {}
    for info in _taxonomy().values():
        if info.genus:
            genera.setdefault(fold_name(info.genus), []).append(info)
    return {genus: (taxa[0], len(taxa)) for genus, taxa in genera.items() if all(t.venomous for t in taxa)}


@lru_cache(maxsize=1)
def _folded_genera() -> frozenset[str]:
    """Every genus (folded) of the shipped taxonomy."""
    return frozenset(fold_name(info.genus) for info in _taxonomy().values() if info.genus)


def venomous_lookalike(name: str, common_name: str | None = None) -> tuple[TaxonInfo, str] | None:
    """(a medically important venomous taxon of the shipped taxonomy that ``name`` may be, how it looks so), None
    when none: a near-spelling (:data:`SUGGESTION`: ``Daboia russellii`` for ``Daboia russelii``), its common name
    (``name`` or ``common_name``: ``Puff adder`` for ``Bitis arietans``), or, for a name the taxonomy does not
    list, the same specific epithet, one no other genus of the taxonomy has, in whatever genus (``Cryptelytrops
    albolabris`` for ``Trimeresurus albolabris``, ``Vipera russelii`` for ``Daboia russelii``: synonyms, older or
    newer genera, known to the table or not; not ``Bufo viridis`` for ``Crotalus viridis``). Compared folded
    (:func:`fold_name`: case, accents, full-width letters aside: ``Ｂｉｔｉｓ ａｒｉｅｔａｎｓ`` is ``Bitis
    arietans``). The taxon itself (:func:`lookup_taxon`) is not looked for here: :func:`check_harmless_flag`, the
    one rule of a harmless flag, refuses it outright."""
    if (taxon := lookup_taxon(name)) is not None and taxon.venomous:
        return None
    for given in (name, common_name):
        if given and (found := _venomous_by_common().get(fold_name(given))):
            return found, f"{given!r} is its common name" + ("" if fold_name(given) == species_key(given) else
                                                              f" {found.common_name!r} (case, accents aside)")
    if taxon is None:
        close = [t for t in taxonomy_lookalikes(name, SUGGESTION) if t.venomous]
        if close:
            same = fold_name(name) == fold_name(close[0].species)  # full-width letters, accents: the name itself
            return close[0], (f"{name!r} is its name (case, accents, full-width letters aside)" if same else
                              f"{name!r} is a near-spelling of it")
        words = fold_name(name).split(" ")
        if len(words) > 1 and (found := _venomous_by_epithet().get(words[1])):
            return found, (f"{name!r} has its specific epithet, one no other genus of the taxonomy has (it may be a "
                           "synonym: an older or newer genus)")
    return None


def venomous_genus(name: str) -> tuple[TaxonInfo, str] | None:
    """(a species of the genus ``name`` is of, how it is), when that genus is one all of whose species in the
    shipped taxonomy are medically important venomous (``Vipera nova``, ``Ｂｉｔｉｓ nova``, ``Echis (juvenile)``:
    :func:`_venomous_genera`) and the taxonomy does not list ``name`` itself; else None. The genus is any whole
    word of the name (:func:`name_words`) up to the first genus of the taxonomy: a qualifier in front (``cf. Bitis
    nova``, ``juvenile Bitis nova``, ``(Bitis) nova``) does not hide it; an epithet after a genus is not one."""
    if lookup_taxon(name) is not None:
        return None
    genera = _venomous_genera()
    for word in genus_words(name, _folded_genera()):  # "cf. Bitis nova", "juvenile Bitis nova", "Echis.nova"
        if (genus := genera.get(word)) is not None:
            example, n = genus
            return example, (f"{name!r} is of the genus {example.genus!r}, all {n} of whose species in the taxonomy "
                             "are medically important venomous")
    return None


def genus_words(name: str, genera: Collection[str]) -> list[str]:
    """The words of ``name`` (:func:`name_words`) that may be its genus: each up to the first one that is a genus of
    ``genera`` (folded), that one included: a qualifier in front (``cf. Bitis nova``) does not hide the genus, and the
    epithets after a known genus are not genera (``Lycodon ophiophagus`` is not of *Ophiophagus*)."""
    words = []
    for word in name_words(name):
        words.append(word)
        if word in genera:
            break
    return words


def name_words(name: str) -> list[str]:
    """The whole words of ``name`` folded (:func:`fold_name`), split on everything but letters: ``cf. Bitis nova``,
    ``(Bitis) nova``, ``Echis.nova`` hold ``bitis`` / ``echis``, which the harmless flag's genus rules look at
    (a qualifier in front does not hide the genus)."""
    return re.findall(r"[^\W\d_]+", fold_name(name))


def gallery_venomous_lookalike(name: str, common_name: str | Iterable[str] | None,
                               gallery_species: Iterable[SpeciesSummary],
                               common_names: Mapping[str, Iterable[str]] | None = None
                               ) -> tuple[SpeciesSummary, str] | None:
    """(a species of ``gallery_species`` recorded venomous that ``name`` may be, how it looks so), None when none:
    ``name`` or ``common_name`` (one name, or several: every common name ``name``'s references carry) is its name or
    one of its common names (its summary's, and every one its references carry: ``common_names``, species ->
    names), or a near-spelling of one (:data:`NEAR_SPELLING`), compared folded (:func:`fold_name`: case, accents,
    hamza, apostrophes and full-width letters aside): ``Vipère de Lataste`` for a gallery's venomous ``Vipera
    latastei`` of that common name, ``افعى موريتانيا`` for ``أفعى موريتانيا``; or ``name`` is of a genus all of whose
    species the gallery holds are recorded venomous (``Xus mitis`` beside the venomous ``Xus venenatus`` alone) and
    the shipped taxonomy does not list it harmless (``Rhabdophis nigrocinctus`` beside ``Rhabdophis subminiatus``).
    Only ``name``'s own species (:func:`species_key`: the species an add joins, set-venom sets) is not looked at:
    its recorded flag is its own to change; a fold-twin (``Elaps tachete`` beside ``Élaps tacheté``) is another."""
    own = species_key(name)
    commons = [common_name] if common_name is None or isinstance(common_name, str) else list(common_name)
    givens = [(given, fold_name(given)) for given in dict.fromkeys([name, *commons]) if given]
    words = name_words(name)  # a word of it up to its genus may be the genus: "cf. Xus nova", "Xus.nova"
    others: dict[str, list[SpeciesSummary]] = {}  # genus (one of name's words) -> the gallery's species of it
    for held in gallery_species:
        if species_key(held.species) == own:
            continue
        genus = name_words(held.genus or held.species)[:1]
        if genus and genus[0] in words and looks_scientific(held.species.split()):
            others.setdefault(genus[0], []).append(held)  # a species of a genus name names
        if not held.venomous:
            continue
        names = [held.common_name, *((common_names or {}).get(held.species, ()))]
        known = [(held.species, "its name")] + [(c, "its common name") for c in dict.fromkeys(names) if c]
        for given, key in givens:
            for spelled, what in known:
                if key == fold_name(spelled):
                    how = f"{given!r} is {what}" + (f" {spelled!r} (case, accents, hamza or apostrophes aside)"
                                                     if given != spelled else "")
                    return held, how
                match = difflib.SequenceMatcher(None, key, fold_name(spelled))  # the cheap bounds first, as
                if (match.real_quick_ratio() >= NEAR_SPELLING and match.quick_ratio() >= NEAR_SPELLING  # difflib's
                        and match.ratio() >= NEAR_SPELLING):  # get_close_matches
                    return held, f"{given!r} is a near-spelling of {what} {spelled!r}"
    maybe_genus = genus_words(name, _folded_genera() | others.keys())  # not "Lycodon ophiophagus"'s epithet
    if len(words) < 2 or ((listed := lookup_taxon(name)) is not None and listed.venomous is False):
        maybe_genus = []  # a species the taxonomy lists harmless (Rhabdophis nigrocinctus) is no unknown of the genus
    for held_of_genus in (held for genus, held in others.items() if genus in maybe_genus):
        # unrecorded (None) is possibly venomous, as answers take it: only a species recorded harmless breaks "all"
        if all(held.venomous is not False for held in held_of_genus) and \
                (venomous := [held for held in held_of_genus if held.venomous]):
            unrecorded = len(held_of_genus) - len(venomous)
            return venomous[0], (f"{name!r} is of its genus, all of whose {len(held_of_genus)} species this gallery "
                                 "holds are recorded venomous" + (f" or not recorded ({unrecorded})" if unrecorded
                                                                  else ""))
    return None


#: How a refused harmless flag is told to confirm, by default (:func:`check_harmless_flag`'s ``confirm``).
CONFIRM_HARMLESS = f"add {DISTINCT_OPTION} (the API's add: distinct_from_venomous=true)"


class HarmlessFlagRefused(ValueError):
    """:func:`check_harmless_flag`'s refusal (the API answers it 400 on the add and the set-venom alike)."""


def check_harmless_flag(name: str, common_name: str | None = None, *, distinct: bool = False,
                        gallery_species: Iterable[SpeciesSummary] = (),
                        common_names: Mapping[str, Iterable[str]] | None = None,
                        confirm: str = CONFIRM_HARMLESS, status: str | None = None) -> None:
    """Refuse (ValueError) recording ``name`` harmless (venomous no) when it may be a medically important venomous
    taxon (:func:`venomous_lookalike`), a species of ``gallery_species`` recorded venomous
    (:func:`gallery_venomous_lookalike`; ``common_names``: every common name of a species' references), or holds a
    venomous snake kind's word (:func:`venomous_kind_word`), or is of a genus all of whose species are venomous
    there (:func:`venomous_genus`), unless ``distinct``: the user confirmed it is another
    species (:data:`DISTINCT_OPTION`); refused outright, whatever ``distinct``, when the shipped taxonomy records
    ``name`` itself venomous. Every common name is looked at: ``common_name`` and every one ``name``'s references
    carry (``common_names[name]``), not only the one its summary shows. The one rule of ``species set-venom NAME
    no`` (the API's ``PUT /v1/species/{name}/venomous``) and ``references add --venomous no``. Refused:
    :class:`HarmlessFlagRefused`, whose message says how to confirm in ``confirm``'s words, then what else to do: an
    add's "leave the flag out" (its status stays unrecorded), or, given the species' recorded ``status`` (a
    set-venom's: ``recorded venomous``), that it stays as it is."""
    stays = (f"its flag stays as it is ({status})" if status is not None else
             "its flag stays yes (an add with no venomous flag takes it from there)")
    otherwise = (f"else leave it as it is ({status})" if status is not None else
                 "else leave the flag out (its status stays unrecorded: answers treat it as possibly venomous)")
    if (listed := lookup_taxon(name)) is not None and listed.venomous:
        raise HarmlessFlagRefused(f"{listed.species!r} is medically important venomous in the shipped taxonomy "
                                  f"(SnakeCLEF's list): {stays}; a harmless answer for a venomous snake is the "
                                  "costly error")
    commons = [c for c in dict.fromkeys([common_name, *((common_names or {}).get(name, ()))]) if c] or [None]
    if not distinct and (held := gallery_venomous_lookalike(name, commons, gallery_species, common_names)):
        species, how = held
        raise HarmlessFlagRefused(f"{name!r} may be {species.species!r}, which this gallery records as medically "
                                  f"important venomous: {how}; a harmless answer for a venomous snake is the costly "
                                  f"error. If you are sure it is another, harmless species, {confirm}; {otherwise}")
    found = None if distinct else next(filter(None, (venomous_lookalike(name, c) for c in commons)), None)
    if found is None:
        word = None if distinct else next(
            ((c, w) for c in commons if (w := venomous_kind_word(name, c))), None)  # not a lookalike: a kind's name
        if word is not None:
            common_name, word = word
            raise HarmlessFlagRefused(f"{name!r}{f' ({common_name!r})' if common_name else ''} holds {word!r}, a "
                                      "kind of venomous snake: it may be medically important venomous (the shipped "
                                      "taxonomy gives common names to the Moroccan checklist's species only, so it "
                                      "cannot tell which); a harmless answer for a venomous snake is the costly "
                                      f"error. If you are sure it is a harmless species, {confirm}; {otherwise}")
        found = None if distinct else venomous_genus(name)  # after the words: 'Naja nova' is told of 'naja'
        if found is None:
            return
    taxon, how = found
    raise HarmlessFlagRefused(f"{name!r} may be {taxon.species!r}, medically important venomous in the shipped "
                              f"taxonomy (SnakeCLEF's list): {how}; a harmless answer for a venomous snake is the "
                              f"costly error. If you are sure it is another, harmless species, {confirm}; "
                              f"{otherwise}")


def unrecorded_venom_note(species: str, venomous: bool | None, *, genus: str | None = None,
                          family: str | None = None, advice_on: bool = True, root: str | Path = "DIR",
                          api: bool = False) -> str:
    """What to tell of a new species ``species`` whose flag ``venomous`` (as stored) is None, '' when nothing:
    advice on (``advice_on``: :func:`retrieval.advice.venom_applies` of the gallery), one the shipped taxonomy does
    not list: its status stays unknown and answers count it as possibly venomous; advice off, one of a snake genus
    or family the taxonomy knows (:func:`known_snake`): its answers give no bite advice, and how to turn it on. The
    add's warning (the CLI's log, the API's ``notes``: ``api`` words it for an HTTP client; ``root``: the gallery
    the CLI commands name)."""
    if venomous is not None:
        return ""
    record = (f"{venom_route(species)} with {{\"venomous\": true}} (or false) and an "
              "API key records it" if api else
              f"'speciesid species set-venom --index {root} \"{species}\" yes' (or no) records it")
    if advice_on:
        if lookup_taxon(species) is not None:
            return ""
        close = taxonomy_lookalikes(species, SUGGESTION)
        return (f"{species!r} is not in the shipped snake taxonomy (snakes only) and no venomous flag was given: its "
                f"venom status stays unknown (answers count it as possibly venomous; {record})"
                + (f"; did you mean {', '.join(repr(t.species) for t in close)}?" if close else ""))
    if not unrecorded_snake(species, venomous, genus, family):
        return ""
    return advice_off_snakes_note([species], root, api=api)


def unrecorded_snake(species: str, venomous: bool | None, genus: str | None = None, family: str | None = None
                     ) -> bool:
    """Whether ``species``, of no recorded venom status (``venomous`` None), is of a snake genus or family the
    shipped taxonomy knows (:func:`known_snake`): what a gallery of no venom advice is told of (a hint only)."""
    return venomous is None and known_snake(species, genus, family)


def venom_route(species: str) -> str:
    """The API's route that records ``species``' venom status, as notes and errors name it."""
    return f"PUT /v1/species/{species.replace(' ', '_')}/venomous"


def advice_off_snakes_note(snakes: Sequence[str], root: str | Path = "DIR", *, api: bool = False) -> str:
    """What to tell of ``snakes`` (:func:`unrecorded_snake`) in a gallery that records no venom advice: their answers
    say nothing of a bite, and how to turn it on. The one wording of an add's note (:func:`unrecorded_venom_note`)
    and ``index info`` / ``index build``'s hint (:func:`retrieval.advice.venom_advice_hint`); ``api`` words it for
    an HTTP client, ``root``: the gallery the CLI commands name."""
    one = len(snakes) == 1
    turn_on = ("the gallery's operator turns it on with 'speciesid index venom-advice on'" if api else
               f"'speciesid index venom-advice --index {root} on' turns it on")
    name = f'"{snakes[0]}"' if one else "NAME"
    route = venom_route(snakes[0] if one else "{name}")
    record = (f"{route} with {{\"venomous\": true}} (or false) and an API key records a species' status" if api else
              f"'speciesid species set-venom --index {root} {name} yes' (or no) records a species' status")
    return (f"this gallery records no venom advice, but {first_few(list(snakes))} {'is' if one else 'are'} of a "
            f"snake genus or family the shipped snake taxonomy knows, with no venom status recorded: "
            f"{'its' if one else 'their'} answers say nothing of a bite; if it holds snakes, {turn_on} ({record})")


def new_species_references(
    name: str,
    gallery_species: Iterable[SpeciesSummary],
    paths: Iterable[str | Path],
    *,
    dataset: str,
    common_name: str | None = None,
    venomous: bool | None = None,
    genus: str | None = None,
    family: str | None = None,
    new_species: bool = False,
    distinct_from_venomous: bool = False,
    root: str | Path = "DIR",
    common_names: Mapping[str, Iterable[str]] | None = None,
    api: bool = False,
) -> tuple[str, list[ReferenceRecord], SpeciesSummary | None]:
    """(species name used, records for ``paths``, the gallery species they join or None when new).

    ``name`` in another spelling (case, ``_``, ``-``) of a gallery species or a known taxon takes that
    spelling, so "naja-haje" joins "Naja haje" instead of starting a second species; a new name is kept as
    :func:`check_name` gives it (NFC, spaces collapsed, typographic apostrophes as ``'``; a hyphen kept: some
    epithets hold one). Unset fields come from the gallery species, then the taxonomy (a new
    species' family from its genus). A new name the taxonomy does not know that is a near-spelling of a gallery
    species, a gallery species' common name, or a near-spelling of a taxon of the shipped taxonomy
    (:func:`taxonomy_lookalikes`: ``Naja nivae`` for the venomous ``Naja nivea``) is refused
    (:class:`SpeciesNameConflictError`) unless ``new_species``, and so is a new name not written as a scientific
    name (:func:`looks_scientific`: ``x``, ``cobra``, one capitalised word, a name with its author citation; a
    label, ``cats``, is taken confirmed), while a genus alone, one the shipped snake taxonomy knows or a gallery
    species' written as a scientific name (``Parus`` beside ``Parus major``; not ``dogs`` beside the label ``dogs
    small``), is refused either way: the one rule of the CLI and the API (a dataset's folder names are not checked
    by it: :mod:`index.datasets`). ``venomous`` False for a venomous taxon is refused, and for a name like one
    unless ``distinct_from_venomous`` (:func:`check_harmless_flag`). What a new name leaves unknown (its venom status)
    is the add's to say (:func:`unrecorded_venom_note`). A common name for a gallery species is taken when it is one
    its references carry (its summary's or ``common_names``: species -> every common name of its references, a
    species built from folders in several languages has several), compared folded (:func:`fold_name`), and stored
    as they carry it; another is refused.
    ``root``: the gallery the commands its messages name take (``DIR`` when not known); ``api``: they name the HTTP
    route instead (an API client's add). Every name is checked by
    :func:`check_name` first, confirmed or not (a gallery species' own name is taken with a leading formula
    character it was stored with before that rule).
    """
    gallery_species = list(gallery_species)
    species = check_name(name.replace("_", " "), stored={s.species for s in gallery_species})  # one stored before
    common_name = check_name(common_name, "common name") if common_name is not None else None
    genus = check_name(genus, "genus") if genus else genus
    family = check_name(family, "family") if family else family
    taxon = lookup_taxon(species)
    if taxon is None and " " not in species and not find_species(gallery_species, species) and (
            example := _genus_example(species, gallery_species)):
        raise ValueError(f"{species!r} is a genus, not a species: give the species' full name, e.g. {example!r}")
    prior = find_species(gallery_species, species) or (find_species(gallery_species, taxon.species) if taxon
                                                         else None)  # "Naja haje legionis" joins "Naja haje"
    species = prior.species if prior else (taxon.species if taxon else species)
    if prior is None and taxon is None and not new_species and (like := _gallery_lookalike(gallery_species, species)):
        raise like
    if prior is None and taxon is None and not new_species and (meant := taxonomy_lookalikes(species)):
        raise SpeciesNameConflictError(species, meant[0].species, "is not in the gallery or the shipped snake "
                                       f"taxonomy, which has {taxa_text(meant)}")
    if prior is None and taxon is None and not new_species and not looks_scientific(species.split()):
        raise _unscientific(species)  # 'x', 'cobra', 'Najahaje', 'naja nova': confirmed, a label ('cats') is taken
    if venomous is False and prior is not None and prior.venomous:
        raise ValueError(
            f"{prior.species!r} is recorded as venomous, and a species stays venomous while any of its reference "
            "photos says so: leave the venomous flag out to add these photos; if that flag is wrong, set it first "
            + (f"with {venom_route(prior.species)} and {{\"venomous\": false}}" if api
               else f"with 'speciesid species set-venom --index {root} \"{prior.species}\" no'"))
    if venomous is False:  # a venomous taxon, or its near-spelling, common name or synonym unless confirmed
        check_harmless_flag(species, common_name or (prior.common_name if prior else None),
                            distinct=distinct_from_venomous or (prior is not None and prior.venomous is False),
                            gallery_species=gallery_species, common_names=common_names)
    for what, given, have in (("genus", genus, prior.genus if prior else None),
                              ("family", family, prior.family if prior else None)):
        if given and have and given.casefold() != have.casefold():
            raise ValueError(f"{prior.species!r} is recorded with {what} {have!r}, not {given!r}: leave the {what} "
                             "out to add these photos under the species' own")
    if common_name and prior is not None:
        common_name = _recorded_common_name(prior, common_name, common_names)
    if genus and len(species.split()) > 1 and species.split()[0].casefold() != genus.casefold():
        raise ValueError(f"the genus {genus!r} does not match the species name {species!r}; leave --genus out "
                         "(the first word of the name is the genus)")
    if venomous is None:
        venomous = prior.venomous if prior else (taxon.venomous if taxon else None)
    genus = genus or (prior.genus if prior else None) or (taxon.genus if taxon else None)
    family = family or (prior.family if prior else None) or (taxon.family if taxon else None) or genus_family(
        genus or species.split(" ")[0])
    common_name = common_name or (prior.common_name if prior else None)
    records = [ReferenceRecord(path=p, species=species, genus=genus, family=family, common_name=common_name,
                               venomous=venomous, dataset=dataset) for p in paths]
    return species, records, prior


def _recorded_common_name(prior: SpeciesSummary, given: str,
                          common_names: Mapping[str, Iterable[str]] | None) -> str:
    """The common name of ``prior``'s references that ``given`` spells (folded, :func:`fold_name`), as they carry it;
    ``given`` when they carry none; else ValueError naming the names they carry."""
    recorded = [n for n in dict.fromkeys([prior.common_name, *((common_names or {}).get(prior.species, ()))]) if n]
    if not recorded:
        return given
    if (same := next((n for n in recorded if fold_name(n) == fold_name(given)), None)) is not None:
        return same
    names = " or ".join(repr(n) for n in recorded)
    raise ValueError(f"{prior.species!r} is recorded with common name{'s' if len(recorded) > 1 else ''} {names}, "
                     f"not {given!r}: leave the common name out to add these photos under the species' own")


class SpeciesNameConflictError(ValueError):
    """A new species name that looks like a mistake: for a gallery species (a near-spelling, or its common name), or
    for no species (not written as a scientific name: ``meant`` None).

    ``name``: the name given; ``meant``: the gallery species it looks like; ``found``: what the gallery holds
    (``'Naja samarensis' (10 references) is``); ``hint``: what to give instead where no species is meant. What to
    do is the caller's to word (:meth:`advice`): a command line and an HTTP API confirm a new species differently.
    The message itself names no option of either."""

    def __init__(self, name: str, meant: str | None, found: str, hint: str | None = None) -> None:
        self.name, self.meant, self.found, self.hint = name, meant, found, hint
        super().__init__(self.advice())

    def __reduce__(self):  # pickled with its fields, not its message (another process may raise it on)
        return type(self), (self.name, self.meant, self.found, self.hint)

    def advice(self, use: str | None = None, confirm: str | None = None) -> str:
        """The message, with ``use`` (how to add to the gallery species ``meant``; not used where none is meant) and
        ``confirm`` (how to say ``name`` is a new species) as the caller words them; where no species is meant, what
        to give instead (``hint``: the name without its author citation), the same for every caller."""
        use = (self.hint or "give the species' scientific name") if self.meant is None else use or \
            f"add the photos to {self.meant!r}"
        confirm = confirm or f"confirm that {self.name!r} is a new species"
        return f"{self.name!r} {self.found}: {use}, or {confirm}"


def _genus_example(name: str, gallery_species: Iterable[SpeciesSummary]) -> str | None:
    """A species of genus ``name`` (one word), from the gallery first, then the shipped snake taxonomy; None when
    neither knows ``name`` as a genus: a genus alone is no species, whatever the taxon. Only a gallery species
    written as a scientific name has a genus here: a label's first word (``dogs`` of ``dogs small``) is none."""
    key = species_key(name)
    held = next((s.species for s in gallery_species if species_key(s.genus or s.species.split(" ")[0]) == key
                 and species_key(s.species) != key and looks_scientific(s.species.split())), None)
    return held or _genera().get(key)


def _numbered_apart(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ in their digits alone (``Phylloscopus sp. 2``, ``Phylloscopus sp.``,
    ``Phylloscopus sp. 3``): morphospecies numbered apart, never near-spellings of one another."""
    return (any(ch.isdigit() for ch in a + b)
            and " ".join(re.sub(r"\d+", "", a).split()) == " ".join(re.sub(r"\d+", "", b).split()))


def _gallery_lookalike(gallery_species: list[SpeciesSummary], name: str) -> SpeciesNameConflictError | None:
    """The error for a new species ``name`` that is a gallery species' common name or a near-spelling of one (a
    one-letter typo), naming that species and its reference count; None when it is neither."""
    same_common, close = gallery_lookalikes(gallery_species, name)
    found = same_common[:1] or close
    if not found:
        return None
    names = " and ".join(f"{s.species!r} ({s.count} reference{'' if s.count == 1 else 's'})" for s in found)
    how = (f"is the common name of {names}" if same_common else
           f"is not in the gallery, but {names} {'is' if len(found) == 1 else 'are'}")
    return SpeciesNameConflictError(name, found[0].species, how)


def gallery_lookalikes(gallery_species: Iterable[SpeciesSummary],
                       name: str) -> tuple[list[SpeciesSummary], list[SpeciesSummary]]:
    """(gallery species whose common name ``name`` is, gallery species ``name`` is a near-spelling of: 3 at most,
    closest first, at :data:`NEAR_SPELLING`), compared folded (:func:`fold_name`: ``cobra d'egypte`` is the common
    name ``Cobra d'Égypte``, ``Vipere a cornes`` a spelling of ``Vipère à cornes``); ``name`` itself is not looked
    for (:func:`find_species`). Species whose names fold alike (``Élaps tacheté``, ``Elaps tachéte``) are each
    named: a near spelling of one is a spelling of every one of them."""
    gallery_species = list(gallery_species)
    key = fold_name(name)
    same_common = [s for s in gallery_species if s.common_name and fold_name(s.common_name) == key]
    by_key: dict[str, list[SpeciesSummary]] = {}
    for held in gallery_species:
        by_key.setdefault(fold_name(held.species), []).append(held)
    close = [held for k in difflib.get_close_matches(key, list(by_key), n=3, cutoff=NEAR_SPELLING)
             if not _numbered_apart(key, k) for held in by_key[k]]
    return same_common, close


def known_genus(genus: str) -> bool:
    """Whether the shipped snake taxonomy knows ``genus`` (any case)."""
    return species_key(genus) in _genera()


def genus_family(genus: str | None) -> str | None:
    """The family of a genus the shipped snake taxonomy knows, else None."""
    example = _genera().get(species_key(genus)) if genus else None
    taxon = lookup_taxon(example) if example else None
    return taxon.family if taxon else None


def find_species(gallery_species: Iterable[SpeciesSummary], name: str, *, folded: bool = False
                 ) -> SpeciesSummary | None:
    """The gallery species ``name`` spells (case, ``_``, ``-``, the apostrophe's form ignored on both sides), or
    None. ``folded`` (a lookup: ``species set-venom``, the API's ``GET /v1/species/{name}``): else the one gallery
    species ``name`` spells with accents and hamza aside too (:func:`fold_name`: ``Vipere a cornes`` finds ``Vipère
    à cornes``), none when two do. An add does not fold: a new name spelled so is refused as a near-spelling."""
    gallery_species = list(gallery_species)
    key = species_key(name)
    found = next((s for s in gallery_species if species_key(s.species) == key), None)
    if found is None and folded:
        key = fold_name(name)
        alike = [s for s in gallery_species if fold_name(s.species) == key]
        found = alike[0] if len(alike) == 1 else None
    return found


def load_checklist(name_or_path: str | Path) -> list[TaxonInfo]:
    """A species checklist: ``moroccan`` (shipped, 26 species) or a text file with one binomial a line.

    Species found in the shipped snake taxonomy get their genus, family and venomous flag.
    """
    if str(name_or_path).lower() == "moroccan":
        return list(moroccan_checklist())
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"checklist {name_or_path!r} is neither 'moroccan' nor a readable text file")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name = " ".join(line.split("#", 1)[0].replace("_", " ").split())
        if name:
            out.append(lookup_taxon(name) or TaxonInfo(name, name.split(" ")[0], None, None))
    if not out:
        raise ValueError(f"checklist {path} names no species (one binomial a line, # for comments)")
    return out
