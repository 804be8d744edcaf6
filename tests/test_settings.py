"""The server's settings (``SPECIESID_*``, or a ``.env`` file): every variable read through them, unknown names
warned about, bounds enforced, and a refused value said in one line naming the variable."""

from __future__ import annotations

import subprocess
import sys
from unittest import mock

from conftest import REPO


def test_the_lease_ttl_is_a_setting_read_from_dotenv_and_passed_to_the_gallery(tmp_path, monkeypatch):
    from api.service import SpeciesService
    from api.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPECIESID_LEASE_TTL_S", raising=False)
    assert Settings().lease_ttl_s == 30.0
    (tmp_path / ".env").write_text("SPECIESID_LEASE_TTL_S=7\n")
    settings = Settings()
    assert settings.lease_ttl_s == 7.0
    identifier = mock.MagicMock()
    service = SpeciesService(settings, identifier=identifier)
    try:
        identifier.gallery.set_lease_ttl.assert_called_once_with(7.0)  # not through os.environ
    finally:
        service.close()


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
