"""An exported encoder's check and int8 calibration photos include the uploads a gallery on S3 keeps in its store
(``<store>/_speciesid/uploads/``), read through the store, only those sampled (moto's S3 server on 127.0.0.1; the
tiny random ``timm:test_vit@random`` encoder, random photos: no shared assets)."""

from __future__ import annotations

import io
import logging
import types

import numpy as np
import pytest
from _cli_support import _photo
from PIL import Image
from test_object_store import BUCKET, s3_endpoint, s3_env  # noqa: F401 - the fixtures, reused


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def s3_gallery(request, tmp_path):
    """A gallery on S3 built from 2 photo files, then 8 uploads kept in its store: (folder, the boto3 client)."""
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import add_photos, build_gallery, open_gallery

    _, client = request.getfixturevalue("s3_env")  # test_object_store's moto server and AWS_* environment
    root = tmp_path / "photos"
    for i, species in enumerate(("Naja haje", "Natrix maura")):
        _photo(root / species / f"{i}.png", i)
    index = tmp_path / "g"
    build_gallery(index, "folder", root, encoder=EncoderConfig(spec="timm:test_vit@random", precision="fp32"),
                  store=f"s3://{BUCKET}/cal-{tmp_path.name}", progress=False)
    gallery, enc = open_gallery(index, EncoderConfig(precision="fp32"))
    res = add_photos(gallery, enc, "Naja haje", [(f"u{i}.png", _png(100 + i)) for i in range(8)])
    assert len(res.report.ids) == 8
    return index, client


def test_the_photos_an_export_is_calibrated_on_include_the_uploads_kept_in_the_s3_store(s3_gallery, monkeypatch,
                                                                                          caplog):
    """Stop 48's note: reference_sources left the S3-kept uploads out, so a gallery grown through the API had only
    its build photos (here 2: too few, the check fell back to synthetic images and int8 was not calibrated)."""
    import retrieval.galleries
    from index.gallery import Gallery
    from retrieval.encoders import EncoderConfig
    from retrieval.runtimes.select import _Photos

    index, client = s3_gallery
    offered: list = []
    real = retrieval.galleries.create_encoder_from_config

    def offering(config, *, photos=None):
        offered.append(photos)
        return real(config, photos=photos)

    monkeypatch.setattr(retrieval.galleries, "create_encoder_from_config", offering)
    retrieval.galleries.open_gallery(index, EncoderConfig(precision="fp32"))
    (photos,) = offered
    reads: list[str] = []
    read_photo = Gallery.read_photo
    monkeypatch.setattr(Gallery, "read_photo", lambda self, src: reads.append(str(src)) or read_photo(self, src))
    items = photos()
    assert len(items) == 10 and reads == []  # listed, nothing read yet
    kinds = sorted(type(items[i]).__name__ for i in range(len(items)))
    assert kinds == ["PosixPath"] * 2 + ["bytes"] * 8 and len(reads) == 8  # an upload is read when taken
    assert {items[i] for i in range(len(items)) if isinstance(items[i], bytes)} == {_png(100 + i) for i in range(8)}
    reference = types.SimpleNamespace(input_size=32, preprocess=lambda image: np.zeros(3, dtype=np.float32))
    sample = _Photos(photos, reference)
    assert len(sample.check) + len(sample.calibration) == 10 and sample.real  # was synthetic: 2 photos < 8
    # an upload the store cannot serve is skipped, as an unreadable file is
    stored = Gallery.open(index).store.metadata()["source_path"]
    gone = next(str(s) for s in stored if str(s).startswith("s3://"))
    client.delete_object(Bucket=BUCKET, Key=gone.removeprefix(f"s3://{BUCKET}/"))
    with caplog.at_level(logging.DEBUG, logger="retrieval.runtimes.select"):
        sample = _Photos(photos, reference)
        assert len(sample.check) + len(sample.calibration) == 9 and sample.real  # read here
    # the photo skipped is named (re-read finding: the line gave its position alone)
    (skipped,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped.startswith(f"check photo {gone} skipped: "), skipped


def test_only_the_sampled_photos_of_a_long_list_are_taken():
    from retrieval.runtimes import CALIBRATION_PHOTOS, CHECK_PHOTOS
    from retrieval.runtimes.select import _Photos

    class Photos(list):
        taken: list[int] = []

        def __getitem__(self, i):
            self.taken.append(i)
            return _png(i % 7)

    many = Photos(range(10 * (CHECK_PHOTOS + CALIBRATION_PHOTOS)))
    reference = types.SimpleNamespace(input_size=32, preprocess=lambda image: np.zeros(3, dtype=np.float32))
    sample = _Photos(lambda: many, reference)
    assert sample.check is not None and sample.real and len(Photos.taken) == CHECK_PHOTOS + CALIBRATION_PHOTOS  # not every item (was: list())
