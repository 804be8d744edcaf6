"""Work done once (stop 54's leftovers of the final read): a photo's header opened once for its decode and its
animation note, a clean's applied lines from its own fields, one walk of an exception's chain, one taxon look-up a
harmless-flag check, one "had finished when the interrupt came" hold. (text_prior.json read once by ``index info``:
tests/test_venom_applies.py, beside its gallery.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from retrieval.images import ANIMATED_NOTE, decode_image, photo_note, to_rgb
from retrieval.pipeline import prepare


class _Stub:
    """The little of an encoder :func:`retrieval.pipeline.prepare` asks of one when it decodes a photo."""

    input_size = 32

    def preprocess_views(self, image: Image.Image) -> np.ndarray:
        """The photo's pixels, as they are."""
        return np.asarray(image)


def _animated(fmt: str) -> bytes:
    """A photo of three different frames in ``fmt``."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "words"), [("GIF", "GIF"), ("PNG", "PNG (APNG)"), ("WEBP", "WebP")])
def test_an_animated_photo_is_opened_once_for_its_decode_and_its_note(monkeypatch, fmt, words):
    """The note of an animated photo (only its first frame read) came from a second open of its header after the
    decode had opened it; the decode makes it from the photo it opened, and the first frame decodes as before."""
    data = _animated(fmt)
    first = to_rgb(Image.open(io.BytesIO(data)).convert("RGB"))  # the first frame, no look for a second one
    opens = []
    real = Image.open

    def counting(*args, **kwargs):
        opens.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    got = prepare(0, data, _Stub())
    assert got.error is None and got.note == ANIMATED_NOTE.format(format=words)
    assert len(opens) == 1, f"the photo was opened {len(opens)} times"
    image = decode_image(data)
    assert photo_note(image) == got.note and np.array_equal(np.asarray(image), np.asarray(first))


def test_a_still_photo_has_no_note():
    """A still GIF (one frame) and a JPEG: no note."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(buf, "GIF")
    assert photo_note(decode_image(buf.getvalue())) is None
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(buf, "JPEG")
    assert prepare(0, buf.getvalue(), _Stub()).note is None


def test_a_cleans_applied_lines_come_from_its_own_fields(monkeypatch):
    """CleanResult.applied_lines (what an interrupted ``clean --apply`` prints) parsed :meth:`summary`'s text back
    (the lines from "applied: " on); it builds them from the result's fields now, as the summary's last lines."""
    from retrieval.clean import ApplyResult, CleanResult
    from retrieval.findings import CleanConfig

    result = CleanResult(findings=[], photos=None, against=None, encoder="test", zero_shot=None,  # type: ignore
                         zero_shot_notice=None, config=CleanConfig(), index="g", notes=["retrain the probe"],
                         applied=ApplyResult(excluded=[3, 4], already=1, kept_last=["Naja haje"]))

    def no_summary(self):
        raise AssertionError("applied_lines read the summary")

    monkeypatch.setattr(CleanResult, "summary", no_summary)
    assert result.applied_lines() == [
        "applied: 2 references excluded (1 already excluded, 0 findings not in the gallery); undo with "
        "'speciesid clean --restore --index g'",
        "kept: every reference of Naja haje was flagged; the oldest of each is kept so no species disappears (check "
        "those findings by hand)",
        "note: retrain the probe"]
    result.applied = None
    assert result.applied_lines() == ["note: retrain the probe"]


def _raised(inner: BaseException, outer: BaseException, *, cause: bool) -> BaseException:
    """``outer`` raised from ``inner`` (``cause``) or while handling it."""
    try:
        try:
            raise inner
        except type(inner) as exc:
            if cause:
                raise outer from exc
            raise outer  # noqa: B904 - raised while handling, on purpose
    except type(outer) as got:
        return got


def test_one_walk_of_an_exceptions_chain_follows_causes_or_contexts_as_asked():
    """index.errors.exception_chain: the one walk of an exception's chain (the store's error checks follow causes
    only; the API's form refusals and the encoders' hub checks causes, else contexts), each exception once."""
    from index.errors import exception_chain

    inner = OSError("disk full")
    by_cause = _raised(inner, RuntimeError("lance error"), cause=True)
    while_handling = _raised(OSError("disk full"), RuntimeError("lance error"), cause=False)
    assert list(exception_chain(by_cause)) == [by_cause, inner]
    assert list(exception_chain(while_handling)) == [while_handling]
    assert [type(e) for e in exception_chain(while_handling, context=True)] == [RuntimeError, OSError]
    assert list(exception_chain(None)) == []
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a  # a chain that loops back: each once, then the walk ends
    assert list(exception_chain(a)) == [a, b] and list(exception_chain(a, context=True)) == [a, b]


def test_chained_finds_the_first_exception_of_a_type_in_the_chain():
    """index.errors.chained: the one search of a chain for a type (the app's spool failure and multipart reason)."""
    from index.errors import chained

    inner = OSError("disk full")
    outer = _raised(inner, RuntimeError("while writing"), cause=False)  # a context, no cause
    assert chained(outer, OSError, context=True) is inner and chained(outer, OSError) is None
    assert chained(outer, RuntimeError) is outer and chained(None, OSError) is None


def test_the_hub_checks_end_on_a_chain_that_loops():
    """The encoders' checks of a failed weights download walked ``__cause__ or __context__`` without noting what they
    had seen: a chain that loops back never ended; they walk exception_chain now (each exception once)."""
    from retrieval.torch_encoders import _cache_miss, _hub_unreachable

    a, b = RuntimeError("weights not found"), RuntimeError("no such file")
    a.__cause__, b.__cause__ = b, a
    assert _cache_miss(a) is False and _hub_unreachable(a) is False
    b.args = ("Connection refused",)
    assert _hub_unreachable(a) is True


@pytest.mark.parametrize(("name", "common"), [("Xus nova", "grass snake"), ("Natrix maura", None),
                                              ("Bitis nova", None), ("Naja haje", None)])
def test_a_harmless_flag_check_looks_its_name_up_once(name, common):
    """check_harmless_flag looked ``name`` up in the shipped taxonomy in each of its rules (5 or 6 times a check);
    lookup_taxon is cached now: one look-up a name, the same answers (tests/test_venom_*.py)."""
    from index.taxonomy import check_harmless_flag, lookup_taxon

    lookup_taxon.cache_clear()
    try:
        check_harmless_flag(name, common)
    except ValueError:
        pass
    info = lookup_taxon.cache_info()
    assert info.misses == 1, info


def test_the_finished_when_interrupted_line_is_worded_in_one_place():
    """``index build`` and ``references add`` each held their summary's Ctrl-C and worded "the ... had finished
    when the interrupt came" in their own copies (and ``main`` a third); one helper now (api.cli._finish:
    held_summary, said_finished), the wording the interrupt walk's tests assert unchanged."""
    from pathlib import Path

    import api.cli

    cli = Path(api.cli.__file__).parent
    wording = [p.name for p in sorted(cli.glob("*.py")) if "had finished when the interrupt came" in p.read_text()]
    assert wording == ["_finish.py"], wording
