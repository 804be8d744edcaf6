"""Encoder options: GeM pooling and test-time views (what they compute, and that galleries remember them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.encoders import SCALE_VIEW, EncoderConfig, create_encoder, stack_views
from retrieval.preprocess import preprocess_image, squash_config

SPEC = "timm:test_efficientnet@random"


def _photos(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)) for _ in range(n)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_gem3_pooling_is_the_generalised_mean_of_the_feature_map():
    plain = create_encoder(SPEC, runtime="torch", precision="fp32", pool="model")
    gem = create_encoder(SPEC, runtime="torch", precision="fp32", pool="gem3")
    assert create_encoder(SPEC, runtime="torch", precision="fp32", pool="auto").pool == "gem3"  # a timm CNN
    assert create_encoder(SPEC, runtime="torch", precision="fp32").pool == "model"  # the default
    assert gem.fingerprint == plain.fingerprint + "+pool=gem3"  # same weights, other embeddings
    x = torch.from_numpy(np.stack([plain.preprocess(p) for p in _photos()]))
    with torch.inference_mode():
        fmap = plain.model.forward_features(x)
        manual = fmap.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
    np.testing.assert_allclose(gem.encode_batch(x.numpy()), _unit(manual.numpy()), atol=1e-5)
    assert not np.allclose(gem.encode_batch(x.numpy()), plain.encode_batch(x.numpy()), atol=1e-3)


def test_views_average_the_l2_normalised_embeddings_of_flips_and_scales():
    single = create_encoder(SPEC, runtime="torch", precision="fp32")
    flip = create_encoder(SPEC, runtime="torch", precision="fp32", views="flip")
    ms = create_encoder(SPEC, runtime="torch", precision="fp32", views="flipms")
    photos = _photos()
    base = np.stack([single.preprocess(p) for p in photos])
    e0 = single.encode_batch(base)
    e1 = single.encode_batch(np.ascontiguousarray(base[:, :, :, ::-1]))
    np.testing.assert_allclose(flip.encode_images(photos), _unit(e0 + e1), atol=1e-5)
    big = np.stack([preprocess_image(p, squash_config(single.preprocess_config, SCALE_VIEW)) for p in photos])
    e2 = single.encode_batch(big)
    e3 = single.encode_batch(np.ascontiguousarray(big[:, :, :, ::-1]))
    np.testing.assert_allclose(ms.encode_images(photos), _unit(e0 + e1 + e2 + e3), atol=1e-5)
    # batched through stack_views (the pipeline's and the HTTP service's path) = one by one
    one = np.concatenate([ms.encode_batch(stack_views([ms.preprocess_views(p)])) for p in photos])
    np.testing.assert_allclose(ms.encode_batch(stack_views([ms.preprocess_views(p) for p in photos])), one, atol=1e-5)
    assert flip.fingerprint.endswith("+views=flip") and ms.fingerprint.endswith("+views=flipms")


def test_unknown_options_and_gem_on_a_model_without_pooling_are_refused(tiny_clip_dir):
    with pytest.raises(ValueError, match="unknown pooling"):
        create_encoder(SPEC, runtime="torch", pool="gem9")
    with pytest.raises(ValueError, match="unknown views"):
        create_encoder(SPEC, runtime="torch", views="crops")
    with pytest.raises(ValueError, match="timm CNNs"):
        create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", runtime="torch", pool="gem3")
    with pytest.raises(ValueError, match="torch only"):
        create_encoder(SPEC, runtime="onnx", views="ms")


def test_a_gallery_built_with_views_refuses_queries_without_them(tmp_path):
    from index.gallery import Gallery
    from index.layout import EncoderMismatchError
    from retrieval.workflows import open_gallery

    enc = create_encoder(SPEC, runtime="torch", precision="fp32", pool="gem3", views="flip")
    Gallery.create(tmp_path / "g", enc.describe())
    _, again = open_gallery(tmp_path / "g", EncoderConfig(runtime="torch"))  # no options given: the gallery's own
    assert (again.pool, again.views) == ("gem3", "flip") and again.fingerprint == enc.fingerprint
    for kw in ({"views": "single"}, {"pool": "model"}, {"views": "flipms"}):
        with pytest.raises(EncoderMismatchError, match=r"with options .*give the gallery's own \(--pool gem3 "
                           r"--views flip: queries take them"):
            open_gallery(tmp_path / "g", EncoderConfig(runtime="torch", **kw))


def test_the_encoder_choice_check_resolves_the_config_it_is_given(tmp_path):
    """Stop 57's types walk: check_encoder_choice, public and typed to take any EncoderConfig, failed with an
    AttributeError on one not resolved (spec None). It resolves it with the gallery's record now, as its callers do:
    unset options are the gallery's, and one set otherwise is refused as before."""
    from index.layout import EncoderMismatchError
    from retrieval.galleries import check_encoder_choice

    info = {"encoder": {"spec": "timm:mobilenetv1_100", "pool": "model", "views": "single",
                        "fingerprint": "timm:mobilenetv1_100#abc"}}
    check_encoder_choice(tmp_path, info, EncoderConfig())  # the gallery's own
    check_encoder_choice(tmp_path, info, EncoderConfig(pool="model"))
    with pytest.raises(EncoderMismatchError, match=r"with options 'pool=model\+views=single', not with the "
                       r"options given \('pool=gem3'\)"):
        check_encoder_choice(tmp_path, info, EncoderConfig(pool="gem3"))
