"""Encoder factory: spec parsing, the open_clip and timm loading paths, fingerprints."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import MOBILENET_SPEC, needs_shared, save_tiny_open_clip
from PIL import Image

from retrieval.encoders import (
    ALIASES,
    ParsedSpec,
    create_encoder,
    list_encoders,
    parse_spec,
)


def _photos(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_bioclip_is_the_default_and_loads_from_the_hub_id():
    assert inspect.signature(create_encoder).parameters["spec"].default == "bioclip"
    assert parse_spec("bioclip") == ParsedSpec("open_clip", "hf-hub", "imageomics/bioclip")
    assert parse_spec("bioclip-2") == ParsedSpec("open_clip", "hf-hub", "imageomics/bioclip-2")
    assert ALIASES["bioclip"] == "open_clip:hf-hub:imageomics/bioclip"


def test_spec_forms_parse():
    assert parse_spec("open_clip:ViT-B-16@openai") == ParsedSpec("open_clip", "name", "ViT-B-16", "openai")
    assert parse_spec("open_clip:local-dir:/m") == ParsedSpec("open_clip", "local-dir", "/m")
    assert parse_spec("timm:efficientnet_b0") == ParsedSpec("timm", "name", "efficientnet_b0")
    assert parse_spec("timm:hf-hub:timm/resnet18.a1_in1k") == ParsedSpec("timm", "hf-hub", "timm/resnet18.a1_in1k")
    assert parse_spec("timm:local-dir:/x") == ParsedSpec("timm", "local-dir", "/x")
    assert set(list_encoders()) >= {"bioclip", "timm:local-dir:PATH", "open_clip:local-dir:PATH"}


@pytest.mark.parametrize("bad", ["", "clip", "tensorflow:resnet", "timm:", "open_clip:hf-hub:", "timm:resnet18@laion"])
def test_unknown_spec_lists_valid_forms(bad):
    with pytest.raises(ValueError) as err:
        parse_spec(bad)
    msg = str(err.value)
    assert "unknown encoder spec" in msg and "Valid forms" in msg and "timm:local-dir:PATH" in msg


def test_unknown_architecture_names_similar_ones():
    with pytest.raises(ValueError, match="timm has no model 'mobilenetv1_1000'"):
        create_encoder("timm:mobilenetv1_1000@random")
    with pytest.raises(ValueError, match="open_clip has no architecture"):
        create_encoder("open_clip:ViT-Q-99")


def test_open_clip_local_dir_loads_and_encodes_images_and_text(tiny_clip_dir):
    enc = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", device="cpu", precision="fp32")
    assert enc.supports_text and enc.dim == 32 and enc.input_size == 32
    emb = enc.encode_images(_photos(5))
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    txt = enc.encode_text(["a photo of Naja haje", "a photo of Natrix maura"])
    assert txt.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(txt[0], txt[1])
    # bare local-dir: is recognised as open_clip by its config file
    same = create_encoder(f"local-dir:{tiny_clip_dir}", device="cpu", precision="fp32")
    np.testing.assert_allclose(same.encode_images(_photos(5)), emb, atol=1e-5)


def test_fingerprint_follows_the_weights(tiny_clip_dir, tmp_path):
    a = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}")
    b = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}")
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("open_clip:local-dir:")
    other = save_tiny_open_clip(tmp_path / "other", seed=1)
    c = create_encoder(f"open_clip:local-dir:{other}")
    assert c.fingerprint.split("#")[1] != a.fingerprint.split("#")[1]


def test_batches_give_the_same_embeddings_as_one_by_one(tiny_clip_dir):
    enc = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", precision="fp32", batch_size=2)
    photos = _photos(5)
    batched = enc.encode_images(photos)
    single = np.concatenate([enc.encode_images([p]) for p in photos])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_image_only_encoder_refuses_text():
    enc = create_encoder("timm:test_efficientnet@random", precision="fp32")
    with pytest.raises(ValueError, match="image-only"):
        enc.encode_text(["a snake"])


def test_timm_weights_file_replaces_the_spec_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = timm.create_model("test_efficientnet", num_classes=5)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    enc = create_encoder("timm:test_efficientnet", weights=str(tmp_path / "w.safetensors"), precision="fp32",
                         pool="model")
    rand = create_encoder("timm:test_efficientnet@random", precision="fp32", pool="model")
    assert enc.fingerprint != rand.fingerprint
    model.reset_classifier(0)
    model.eval()
    x = torch.from_numpy(np.stack([enc.preprocess(p) for p in _photos(2)]))
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(model(x), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_batch(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match="does not exist"):
        create_encoder("timm:test_efficientnet", weights=str(tmp_path / "missing.safetensors"))
    other = dict(model.state_dict())  # weights of another shape (another model's): a clear refusal
    first = next(k for k, v in other.items() if v.ndim == 4)
    other[first] = torch.zeros(other[first].shape[0] + 1, *other[first].shape[1:])
    save_file(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"--weights .*other.safetensors does not load into timm:test_efficientnet: "
                       r".*size mismatch"):
        create_encoder("timm:test_efficientnet", weights=str(tmp_path / "other.safetensors"))


def test_a_relative_local_folder_or_weights_file_is_recorded_absolute(tmp_path, monkeypatch):
    from retrieval.encoders import EncoderConfig, portable

    monkeypatch.chdir(tmp_path)
    got = portable(EncoderConfig(spec="timm:local-dir:models/m", weights="w/x.safetensors"))
    assert got.spec == f"timm:local-dir:{tmp_path / 'models' / 'm'}" and got.weights == str(tmp_path / "w/x.safetensors")
    assert portable(EncoderConfig(spec="bioclip")).spec == "bioclip"
    assert portable(EncoderConfig(spec="local-dir:/abs/m")).spec == "local-dir:/abs/m"
    assert portable(EncoderConfig(spec="local-dir:m")).spec == f"local-dir:{tmp_path / 'm'}"
    assert portable(EncoderConfig(spec="open_clip:local-dir:m")).spec == f"open_clip:local-dir:{tmp_path / 'm'}"


def test_local_folder_is_the_folder_of_every_local_dir_form_whether_or_not_it_exists(tmp_path):
    from pathlib import Path

    from retrieval.encoders import local_folder

    missing = tmp_path / "gone"
    for prefix in ("local-dir:", "timm:local-dir:", "open_clip:local-dir:"):
        assert local_folder(f"{prefix}{missing}") == missing
    assert local_folder("timm:local-dir:rel/m") == Path("rel/m")
    for spec in ("bioclip", "timm:resnet18", "open_clip:hf-hub:imageomics/bioclip", "timm:hf-hub:org/local-dir:x"):
        assert local_folder(spec) is None


def test_real_mobilenet_local_dir(mobilenet_encoder):
    needs_shared()
    enc = mobilenet_encoder
    assert enc.dim == 1024 and enc.spec == MOBILENET_SPEC and not enc.supports_text
    emb = enc.encode_images(_photos(2))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_bf16_embeddings_stay_close_to_fp32(tiny_clip_dir):
    fp32 = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", precision="fp32")
    bf16 = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", precision="bf16")
    assert fp32.fingerprint == bf16.fingerprint  # same weights, different arithmetic
    cos = (fp32.encode_images(_photos(3)) * bf16.encode_images(_photos(3))).sum(1)
    assert cos.min() > 0.98


def test_an_unreachable_hub_says_how_to_work_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached: the hub would be asked
    with pytest.raises(ValueError, match="cannot download the weights of bioclip from the Hugging Face hub.*"
                                         "open_clip:local-dir:bioclip") as caught:
        create_encoder("bioclip", runtime="torch", device="cpu")
    # walk s51 #7: the README's download command itself, to run on a machine with network
    assert "(hf download imageomics/bioclip --local-dir bioclip), copy the folder here" in str(caught.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_fails_at_once_with_the_cause_whole(monkeypatch, tmp_path):
    import socket

    from huggingface_hub import constants

    port = _closed_port()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")  # no hub there: every request refused
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    attempts: list[tuple] = []  # the connections opened, by the hub check and by the libraries' HTTP clients
    connect = socket.create_connection

    def counted(address, *args, **kwargs):
        attempts.append(tuple(address))
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted)
    with pytest.raises(ValueError) as caught:
        create_encoder("timm:hf-hub:speciesid-tests/not-cached", runtime="torch", device="cpu")
    message = str(caught.value)
    # one refused connection, not the libraries' retries of every file (1+2+4+8+8 s each)
    assert attempts == [("127.0.0.1", port)], attempts
    assert message.startswith("cannot download the weights of timm:hf-hub:speciesid-tests/not-cached from the "
                              f"Hugging Face hub (no connection to 127.0.0.1:{port}: ")
    assert "hf download speciesid-tests/not-cached --local-dir not-cached" in message
    assert "timm:local-dir:not-cached" in message and "HF_HUB_OFFLINE=1 skips even the hub's connection check" in message
    cause = str(caught.value.__cause__).strip().splitlines()[0]
    assert message.endswith(f"The library said: {cause}")  # whole, not cut mid-sentence
    assert constants.HF_HUB_OFFLINE is False  # the offline mode was for that one load


def test_with_hf_hub_offline_set_the_message_does_not_ask_to_set_it(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"hub \(HF_HUB_OFFLINE is set\), and they are not in the local") as caught:
        create_encoder("bioclip", runtime="torch", device="cpu")
    assert "HF_HUB_OFFLINE=1" not in str(caught.value)


def test_the_cli_prints_each_huggingface_hub_line_once(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    code = ("import logging, huggingface_hub.utils.logging\n"  # the library puts a handler of its own on its logger
            "from api.cli import main\n"
            "main(['encoders', 'list'])\n"  # the CLI's logging set up
            "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Retrying in 1s [Retry 1/5].") == 1, done.stderr


def test_offline_a_failure_other_than_a_cache_miss_goes_up_as_it_came(monkeypatch):
    """HF_HUB_OFFLINE set (or the hub unreachable), weights cached, CUDA out of memory while loading: that error,
    not "download the weights elsewhere"."""
    from huggingface_hub import constants

    from retrieval import torch_encoders

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch_encoders.OpenClipEncoder, "__init__", out_of_memory)
    with pytest.raises(RuntimeError, match="^CUDA out of memory$"):
        create_encoder("bioclip", runtime="torch", device="cpu")


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "http_proxy", "ALL_PROXY"])
def test_a_proxy_for_the_hub_skips_the_direct_connection(monkeypatch, variable):
    """A proxy applying to HF_ENDPOINT: no direct connection tried, no offline mode forced (the download goes
    through the proxy); NO_PROXY naming the endpoint's host brings the direct check back."""
    import socket

    from huggingface_hub import constants

    from retrieval.torch_encoders import hub_unreachable

    scheme = "http" if variable == "http_proxy" else "https"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                 "no_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"{scheme}://hub.mirror.invalid:{_closed_port()}")
    monkeypatch.setenv(variable, "http://proxy.invalid:3128")
    tried = []

    def no_direct(address, *args, **kwargs):
        tried.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", no_direct)
    assert hub_unreachable() is None and tried == []
    monkeypatch.setenv("NO_PROXY", "hub.mirror.invalid")
    assert hub_unreachable() is not None and tried


def test_a_new_alias_is_listed_everywhere_the_forms_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """ALIASES and SPEC_FORMS were two hand-kept lists: a name added to ALIASES worked with --encoder but was missing
    from `encoders list`, the --encoder help and the "Valid forms" of an error. SPEC_FORMS now lists ALIASES: the
    module, with one alias added as a newcomer adds it, lists it in all three."""
    import sys
    import types
    from pathlib import Path

    import retrieval.encoders

    source = Path(retrieval.encoders.__file__).read_text(encoding="utf-8")
    anchor = '    "bioclip-2": "open_clip:hf-hub:imageomics/bioclip-2",\n'
    assert anchor in source
    source = source.replace(anchor, anchor + '    "test-resnet": "timm:local-dir:/models/test_resnet",\n', 1)
    module = types.ModuleType("retrieval._encoders_with_an_alias")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # its dataclasses look their module up there
    exec(compile(source, retrieval.encoders.__file__, "exec"), module.__dict__)  # noqa: S102 - the module's own text
    assert module.list_encoders()[:3] == ["bioclip", "bioclip-2", "test-resnet"]  # `encoders list`
    assert "test-resnet" in module.SPEC_FORMS  # what every --encoder help joins (api.cli._common.spec_help)
    assert "\n  test-resnet\n" in str(module.spec_error("nope", "no such encoder"))
    assert module.parse_spec("test-resnet") == module.ParsedSpec("timm", "local-dir", "/models/test_resnet")
    assert tuple(ALIASES) == retrieval.encoders.SPEC_FORMS[: len(ALIASES)]


def test_the_runtimes_a_command_takes_are_the_runtimes_there_are() -> None:
    """--runtime's choices (RUNTIMES) and what each runtime runs (RUNTIME_PRECISIONS) are two tables: a runtime added
    to one alone is refused by every command, or offered and then unknown (docs/architecture.md, "A runtime")."""
    from retrieval.encoders import RUNTIMES
    from retrieval.runtimes import RUNTIME_PRECISIONS

    assert RUNTIMES == ("auto", *RUNTIME_PRECISIONS)


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory: pytest.TempPathFactory):
    """A timm local-dir folder made as README says (``timm.models.save_for_hf``): a random ``test_resnet``."""
    import timm

    folder = tmp_path_factory.mktemp("test_resnet")
    timm.models.save_for_hf(timm.create_model("test_resnet", num_classes=0), folder, safe_serialization=True)
    return folder


def test_a_timm_folder_made_with_save_for_hf_loads(timm_folder):
    assert sorted(p.name for p in timm_folder.iterdir()) == ["config.json", "model.safetensors"]
    enc = create_encoder(f"timm:local-dir:{timm_folder}", device="cpu", runtime="torch", precision="fp32")
    assert enc.dim == 96 and enc.encode_images(_photos(2)).shape == (2, 96)


def _broken_copy(timm_folder, tmp_path, *, config: str | None = None, weights: bool = True):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(timm_folder, folder)
    if config is not None:
        (folder / "config.json").write_text(config, encoding="utf-8")
    if not weights:
        (folder / "model.safetensors").unlink()
    return folder


def test_a_broken_timm_folder_is_refused_naming_it_and_what_is_missing(timm_folder, tmp_path):
    """timm's own words came through ("RuntimeError: No suitable checkpoints found in DIR.", "Unknown model (X)"),
    and a folder that does not exist was said to lack its config.json."""
    import json

    def refused(folder) -> str:
        with pytest.raises(ValueError) as err:
            create_encoder(f"timm:local-dir:{folder}", device="cpu", runtime="torch", precision="fp32")
        return str(err.value)

    made = "make one with timm.models.save_for_hf(model, DIR, safe_serialization=True)"
    message = refused(tmp_path / "nowhere")
    assert message.startswith(f"timm folder {tmp_path / 'nowhere'} does not exist: give the folder that holds "
                              "config.json and model.safetensors") and made in message
    (tmp_path / "empty").mkdir()
    empty = tmp_path / "empty"
    assert refused(empty).startswith(f"{empty} is not a timm folder: config.json is missing")
    message = refused(_broken_copy(timm_folder, tmp_path, weights=False))
    assert message.startswith(f"{tmp_path / 'broken'} holds config.json but no weights: model.safetensors (or "
                              "pytorch_model.bin) is missing") and made in message
    cfg = json.loads((timm_folder / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "broken" / "config.json").write_text(json.dumps({**cfg, "architecture": "test_resnett"}))
    (tmp_path / "broken" / "model.safetensors").symlink_to(timm_folder / "model.safetensors")
    message = refused(tmp_path / "broken")
    assert message.startswith(f"{tmp_path / 'broken' / 'config.json'}: architecture 'test_resnett' is not a timm "
                              "model (similar: test_resnet")
    (tmp_path / "broken" / "config.json").write_text("{}")
    assert 'names no "architecture" (the timm model the folder holds' in refused(tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text('{"architecture": ')
    assert "config.json cannot be read as JSON" in refused(tmp_path / "broken")
    with pytest.raises(ValueError, match=r"^encoder folder \S+ does not exist: give local-dir: a folder holding "):
        parse_spec(f"local-dir:{tmp_path / 'nowhere'}")
