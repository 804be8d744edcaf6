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
