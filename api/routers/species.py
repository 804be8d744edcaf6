"""GET /v1/species, GET /v1/species/{name}, POST /v1/species/{name}/references, PUT
/v1/species/{name}/venomous."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Path, Response, UploadFile
from starlette.convertors import Convertor, register_url_convertor

from api.deps import ReadKey, Service, WriteKey
from api.routers._edge import edge, errors, read_uploads
from api.schemas import AddReferencesOut, DuplicateOut, SpeciesOut, VenomousIn, VenomousOut
from index.taxonomy import HARMLESS_RULE_HELP, InvalidNameError, check_name

router = APIRouter(prefix="/v1/species", tags=["species"])


@router.get("", response_model=list[SpeciesOut], responses=errors(401))
def list_species(service: Service, _: ReadKey) -> list[SpeciesOut]:
    """The gallery's species with reference counts and metadata."""
    return [SpeciesOut(**asdict(s)) for s in edge(service.species)]


@router.get("/{name}", response_model=SpeciesOut, responses=errors(401, 404, 422))
def get_species(service: Service, _: ReadKey, name: Annotated[str, Path(max_length=200)]) -> SpeciesOut:
    """One species (``Genus species``; ``_`` or ``-`` may stand for the space)."""
    return SpeciesOut(**asdict(edge(lambda: service.get_species(name))))


@router.post("/{name}/references", response_model=AddReferencesOut, status_code=201,
             responses={200: {"model": AddReferencesOut, "description": "nothing stored: every photo was a reference "
                              "already (listed in duplicates); a new name is then not made (exists: false)"},
                        **errors(400, 401, 409, 413, 415, 422, 500)})
def add_references(
    service: Service,
    _: WriteKey,
    name: Annotated[str, Path(max_length=200, description="binomial, e.g. Naja haje")],
    images: Annotated[list[UploadFile], File(description="reference photos of this species")],
    common_name: Annotated[str | None, Form(max_length=200)] = None,
    venomous: Annotated[bool | None, Form(description="medically important venomous")] = None,
    new_species: Annotated[bool, Form(description="confirm a new species whose name looks like a gallery "
                                      "species (a near-spelling, or its common name) or a species of the shipped "
                                      "taxonomy (a near-spelling), or is not written as a scientific name ('Genus "
                                      "species': a label such as 'cats'): refused (409) without")] = False,
    distinct_from_venomous: Annotated[bool, Form(description=f"confirm venomous=false for {HARMLESS_RULE_HELP}: "
                                                 "refused (400) without")] = False,
    *, response: Response,
) -> AddReferencesOut:
    """Add reference photos, creating the species if new; searchable by the very next request."""
    uploads = read_uploads(service, images, at_most=service.settings.max_add_images, references=True)
    result = edge(lambda: service.add_references(name, uploads, common_name=common_name, venomous=venomous,
                                                 new_species=new_species,
                                                 distinct_from_venomous=distinct_from_venomous))
    if not result.report.added:
        response.status_code = 200  # nothing stored (every photo a reference already): nothing was created
    return AddReferencesOut(species=result.species, created=result.created, exists=result.exists,
                            ids=result.report.ids,
                            added=result.report.added,
                            duplicates=[DuplicateOut(file=f, id=i, species=sp, excluded=i in result.excluded)
                                        for f, i, sp in result.duplicates],
                            notes=result.notes)


#: The set-venom route's path (the app's 422 of its body: :func:`venomous_body_error`).
VENOMOUS_ROUTE = "/v1/species/{name}/venomous"
#: What that route's body is, for a client that sent another.
VENOMOUS_BODY = ('send a JSON body {"venomous": true} or {"venomous": false} (with "distinct_from_venomous": true '
                 "to confirm a harmless flag refused without it)")


def venomous_body_error(errors: Sequence[Mapping], content_type: str) -> str:
    """The 422 of a set-venom request that is not a species name and a :class:`VenomousIn` (FastAPI's ``errors``), in
    one line: an error of the path's name said as the name's, then the body's: what to send, then what is wrong with
    each field (``body`` for the body itself: not JSON, not an object, missing). A body sent without a JSON
    ``content_type`` (curl's ``-d`` alone sends a form) is told to name it."""
    def where(e: Mapping) -> str:
        return ".".join(x for x in e.get("loc", ())[1:] if isinstance(x, str)) or "body"  # a decode error: a position

    path = [e for e in errors if e.get("loc", ("",))[0] == "path"]
    body = [e for e in errors if e.get("loc", ("",))[0] != "path"]
    said = [f"the species name in the path: {e.get('msg', 'invalid')} (a gallery species, e.g. Bufo_bufo; "
            "GET /v1/species lists them)" for e in path]
    kind = content_type.split(";")[0].strip().lower()
    if body and kind != "application/json" and not kind.endswith("+json"):
        said.append(f"{VENOMOUS_BODY}, with Content-Type: application/json (curl -H 'Content-Type: "
                    f"application/json' -d '{{\"venomous\": true}}', or curl --json '{{\"venomous\": true}}'), not "
                    f"{kind or 'a request without a Content-Type'}")
    elif body:
        said.append(f"{VENOMOUS_BODY}: " + "; ".join(f"{where(e)}: {e.get('msg', 'invalid')}" for e in body))
    return "; ".join(said)


@router.put(VENOMOUS_ROUTE.removeprefix(router.prefix), response_model=VenomousOut,
            responses=errors(400, 401, 404, 409, 413, 422, 500))
def set_venomous(
    service: Service,
    _: WriteKey,
    name: Annotated[str, Path(max_length=200, description="a gallery species, e.g. Bufo bufo (any case; _ or - "
                              "for the space)")],
    body: VenomousIn,
) -> VenomousOut:
    """Set whether a gallery species is medically important venomous, on every one of its references, with no photo
    (the CLI's ``speciesid species set-venom``, the same rule): answers see it from the next request on."""
    done, summary = edge(lambda: service.set_venomous(name, body.venomous,
                                                      distinct_from_venomous=body.distinct_from_venomous))
    return VenomousOut(species=SpeciesOut(**asdict(summary)), was=done.was, found=done.references,
                       changed=done.changed, turned_off=done.turned_off)


class _SlashedName(Convertor):
    """A path part that holds a ``/`` inside a name (``Naja/haje``): what ``Naja%2Fhaje`` arrives as, or ``/tmp/abs``
    (``%2Ftmp%2Fabs``, a leading ``/``). Not a name followed by ``/references`` (that is the references route, or
    its 405)."""

    regex = "[^/]*/(?!references$).+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("slashed", _SlashedName())


@router.post("/{name:slashed}/references", include_in_schema=False)
def add_under_a_name_with_a_slash(_: WriteKey, name: str) -> None:
    """A name with ``/`` in it matches no route above: say why (after the key), instead of a bare 404."""
    raise _slashed(name)


@router.put("/{name:slashed}/venomous", include_in_schema=False)
def set_venomous_of_a_name_with_a_slash(_: WriteKey, name: str) -> None:
    """As above, for the venomous flag."""
    raise _slashed(name)


@router.get("/{name:slashed}", include_in_schema=False)
def get_a_name_with_a_slash(_: ReadKey, name: str) -> None:
    """As above, for a read."""
    raise _slashed(name)


def _slashed(name: str) -> HTTPException:
    """The 422 of a species name with a ``/`` in it: the naming rule's own message (:func:`check_name`, which the
    CLI applies too)."""
    try:
        check_name(name.replace("_", " "))  # refuses it: the path matched a '/'
    except InvalidNameError as exc:
        return HTTPException(422, str(exc))
    raise AssertionError(f"check_name took a name with '/': {name!r}")
