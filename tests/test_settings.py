"""The server's settings (``SPECIESID_*``, or a ``.env`` file): every variable read through them, unknown names
warned about, bounds enforced, and a refused value said in one line naming the variable."""

from __future__ import annotations

import subprocess
import sys
from unittest import mock

from conftest import REPO
from test_object_store import BUCKET, s3_endpoint, s3_env  # noqa: F401 - moto's S3 server, as fixtures


def test_the_lease_ttl_is_a_setting_read_from_dotenv_and_passed_to_the_gallery(tmp_path, monkeypatch, s3_env):  # noqa: F811
    """SPECIESID_LEASE_TTL_S from a .env file reaches the S3 lease of the server's gallery (not through os.environ),
    and the lease's S3 client too: its timeouts (a sixth of the TTL) were fixed when the gallery's open made it,
    from the environment's TTL, and are now the setting's."""
    from api.service import SpeciesService
    from api.settings import Settings
    from index.gallery import Gallery
    from index.lease import S3Lease, lease_ttl, request_timeout

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPECIESID_LEASE_TTL_S", raising=False)
    assert Settings().lease_ttl_s == 30.0
    (tmp_path / ".env").write_text("SPECIESID_LEASE_TTL_S=7\n")
    settings = Settings()
    assert settings.lease_ttl_s == 7.0
    Gallery.create(tmp_path / "g", {"spec": "t", "fingerprint": "t#0", "dim": 8}, store=f"s3://{BUCKET}/ttl")
    gallery = Gallery.open(tmp_path / "g")
    lease = gallery._writer.remote
    assert lease is not None and lease.ttl == lease_ttl() == 30.0
    assert lease._client is not None  # made already, by the create's and open's requests, with their TTL's timeouts
    opened_with = lease.client.meta.config.connect_timeout
    assert opened_with == request_timeout(30.0)
    identifier, sentinel = mock.MagicMock(), object()
    identifier.gallery = gallery
    service = SpeciesService(settings, identifier=identifier)
    try:
        assert lease.ttl == 7.0
        config = lease.client.meta.config
        assert config.connect_timeout == config.read_timeout == request_timeout(7.0) != opened_with
    finally:
        service.close()
    passed_in = S3Lease(f"s3://{BUCKET}/ttl", client=sentinel)
    passed_in.set_ttl(9)
    assert passed_in.ttl == 9.0 and passed_in.client is sentinel  # a client given to the lease is its caller's


def test_unknown_speciesid_variables_are_named_with_the_closest_setting(tmp_path):
    from api.settings import Settings

    env = tmp_path / ".env"
    env.write_text("SPECIESID_LEASE_TTL=5\nSPECIESID_INDEX=g\n")
    lines = Settings.unknown_variables({"SPECIESID_MAX_IMAGE": "3", "SPECIESID_CACHE": "/c", "HOME": "/root",
                                        "SPECIESID_WHATEVER_ELSE": "1"}, env_file=env)
    assert lines == [
        "SPECIESID_LEASE_TTL is set but is not a setting of speciesid: it is ignored (did you mean "
        "SPECIESID_LEASE_TTL_S?)",
        "SPECIESID_MAX_IMAGE is set but is not a setting of speciesid: it is ignored (did you mean "
        "SPECIESID_MAX_IMAGES?)",
        "SPECIESID_WHATEVER_ELSE is set but is not a setting of speciesid: it is ignored (the settings: docs/api.md, "
        "'Settings')",
    ]


def test_serve_help_lists_the_lease_ttl():
    out = subprocess.run([sys.executable, "-m", "api.cli", "serve", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60).stdout
    assert "SPECIESID_LEASE_TTL_S" in " ".join(out.split())


def test_values_that_would_break_the_server_are_refused():
    import pytest
    from pydantic import ValidationError

    from api.settings import Settings

    for field, value in {"thumbnail_px": 0, "max_upload_mb": 0, "max_images": 0, "max_add_images": 0,
                         "max_request_mb": 0, "max_pixels": 0, "batch_window_ms": -3, "max_batch": 0,
                         "lease_ttl_s": 0}.items():
        with pytest.raises(ValidationError):
            Settings(**{field: value})
    Settings(batch_window_ms=0, thumbnail_px=1, max_images=1, max_batch=1)  # the least each accepts


def test_a_refused_setting_is_one_line_naming_the_variable_and_its_value(monkeypatch, tmp_path, capsys):
    from api.cli import main

    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("SPECIESID_MAX_IMAGES", "abc")
    monkeypatch.setenv("SPECIESID_BATCH_WINDOW_MS", "-3")
    monkeypatch.setenv("SPECIESID_API_KEYS", "clé-secrète")
    code = main(["serve", "--index", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("speciesid: error: SPECIESID_API_KEYS: a key may hold printable ASCII"), err
    assert "SPECIESID_MAX_IMAGES=abc: input should be a valid integer" in err
    assert "SPECIESID_BATCH_WINDOW_MS=-3: input should be greater than or equal to 0" in err
    assert "secrète" not in err and "pydantic" not in err


BAD_SECONDS = ("inf", "-inf", "nan", "abc", "-5", "1e400")


def _refusals(name: str, values: tuple[str, ...], monkeypatch) -> dict[str, tuple[str, str]]:
    """For each value of ``name``: what the server's settings say, and what the command line's parser says."""
    from api.settings import Settings, SettingsError
    from index.lease import S3Lease
    from index.locks import default_wait

    said = {}
    for value in values:
        monkeypatch.setenv(name, value)
        try:
            Settings.load()
        except SettingsError as exc:
            server = str(exc)
        else:
            server = "accepted"
        try:
            default_wait() if name == "SPECIESID_WRITE_WAIT_S" else S3Lease("s3://b/g")
        except ValueError as exc:
            cli = str(exc)
        else:
            cli = "accepted"
        said[value] = (server, cli)
    return said


def test_the_write_wait_has_one_parser_for_the_server_and_the_command_line(monkeypatch, tmp_path):
    """`inf` once passed the server's settings, then every write was an OverflowError (a 500): the server and the
    command line now refuse the same values, in the same words."""
    from api.settings import Settings
    from index.locks import default_wait

    monkeypatch.chdir(tmp_path)  # no .env
    for value, (server, cli) in _refusals("SPECIESID_WRITE_WAIT_S", BAD_SECONDS, monkeypatch).items():
        assert server == cli, value
        assert cli.startswith(f"SPECIESID_WRITE_WAIT_S={value} is not a number of seconds"), cli
        assert "set it to how long a writer waits" in cli
    monkeypatch.setenv("SPECIESID_WRITE_WAIT_S", "0")  # do not wait at all
    assert Settings.load().write_wait_s == 0.0 == default_wait()
    monkeypatch.setenv("SPECIESID_WRITE_WAIT_S", " 12.5 ")
    assert Settings.load().write_wait_s == 12.5 == default_wait()


def test_the_lease_ttl_has_one_parser_for_the_server_and_the_command_line(monkeypatch, tmp_path):
    """The command line's lease once took `abc` as "could not convert string to float" without the variable's name,
    and 0, -5 or nan as a TTL; the server took inf (a lease never stale, never taken over)."""
    from api.settings import Settings
    from index.lease import S3Lease

    monkeypatch.chdir(tmp_path)
    for value, (server, cli) in _refusals("SPECIESID_LEASE_TTL_S", (*BAD_SECONDS, "0", "0.5"),
                                          monkeypatch).items():
        assert server == cli, value
        assert cli.startswith(f"SPECIESID_LEASE_TTL_S={value} is not a number of seconds from 1 to"), cli
        assert "set it to how long a write lease lasts unrenewed" in cli
    monkeypatch.setenv("SPECIESID_LEASE_TTL_S", "7")
    assert Settings.load().lease_ttl_s == 7.0 == S3Lease("s3://b/g").ttl


#: ``SPECIESID_*`` words in the code that are no variable: a Python name, and the misspellings the tests set on purpose.
NOT_VARIABLES = {"SPECIESID_KEY", "SPECIESID_LEASE_TTL", "SPECIESID_MAX_IMAGE", "SPECIESID_WHATEVER_ELSE"}


def test_every_speciesid_variable_the_code_names_is_a_setting_or_a_known_other_variable():
    """`serve` warned that SPECIESID_REQUIRE_ALL and SPECIESID_SHARED (the tests' own) are unknown: the hand-kept
    OTHER_VARIABLES had gone stale. Every name in the repository's Python is now checked against it."""
    import re

    from api.settings import OTHER_VARIABLES, Settings

    known = {f"SPECIESID_{name.upper()}" for name in Settings.model_fields} | set(OTHER_VARIABLES)
    named: dict[str, set[str]] = {}
    for folder in ("retrieval", "index", "finetune", "api", "tests", "benchmarks", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for name in re.findall(r"\bSPECIESID_[A-Z][A-Z0-9_]*\b", path.read_text(encoding="utf-8")):
                named.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert len(named) > 10, named  # the scan found the settings' own names
    unknown = {name: sorted(where) for name, where in named.items() if name not in known | NOT_VARIABLES}
    assert not unknown, f"add these to api.settings.OTHER_VARIABLES (or make them settings): {unknown}"
    assert Settings.unknown_variables({"SPECIESID_REQUIRE_ALL": "1", "SPECIESID_SHARED": "/x"}, env_file="/none") == []


def test_the_pixel_limit_over_the_stored_cap_is_refused_at_start(monkeypatch, tmp_path):
    """Walk s57 #5: SPECIESID_MAX_PIXELS=500000000 lifted the 256,000,000-pixel cap docs/api.md says no photo
    passes; the setting is now refused over it, in the words the command line uses for it."""
    import pytest

    from api.settings import Settings, SettingsError

    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("SPECIESID_MAX_PIXELS", "500000000")
    with pytest.raises(SettingsError) as refused:
        Settings.load()
    assert str(refused.value) == ("SPECIESID_MAX_PIXELS=500000000 is not a whole number of pixels from 1 to "
                                  "256,000,000: set the most pixels one photo may decode to (default 50000000), "
                                  "or unset it"), refused.value
    monkeypatch.setenv("SPECIESID_MAX_PIXELS", "256000000")
    assert Settings.load().max_pixels == 256_000_000
    monkeypatch.delenv("SPECIESID_MAX_PIXELS")
    from retrieval.images import PHOTO_MAX_PIXELS

    assert Settings.load().max_pixels == PHOTO_MAX_PIXELS  # the server's default is the command line's
