"""scripts/make_package_data.py rebuilds index/data/ from the shared reference files, byte for byte."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED, needs_shared

SCRIPT = REPO / "scripts" / "make_package_data.py"
DATA = REPO / "index" / "data"
OUTPUTS = ("snake_taxonomy.csv", "moroccan.csv", "snake_countries.csv")


def _script():
    spec = importlib.util.spec_from_file_location("make_package_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _needs_reference() -> None:
    script = _script()
    needs_shared(*(SHARED / name for name in (script.MEDICAL_FILE, script.MOROCCAN_FILE, script.COUNTRIES_FILE)))


def test_rebuilds_the_shipped_csvs_byte_for_byte(tmp_path: Path) -> None:
    """Broke unseen when index.geography re-keyed 'st kitts' / 'st vincent' (the script looked names up raw)."""
    _needs_reference()
    shutil.copy(DATA / "moroccan.csv", tmp_path / "moroccan.csv")
    assert _script().main(["--shared", str(SHARED), "--out", str(tmp_path)]) == 0
    for name in OUTPUTS:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_a_new_out_folder_keeps_the_shipped_common_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--out NEWDIR wrote moroccan.csv with blank common names, silently: they come from the shipped file."""
    _needs_reference()
    out = tmp_path / "new"
    assert _script().main(["--shared", str(SHARED), "--out", str(out)]) == 0
    assert (out / "moroccan.csv").read_bytes() == (DATA / "moroccan.csv").read_bytes()
    assert "warning" not in capsys.readouterr().err


def test_country_columns_resolve_as_the_package_does() -> None:
    """SnakeCLEF's 'st kitts and nevis' spelling resolves through index.geography (no shared files needed)."""
    script = _script()
    assert script.country_code("st kitts and nevis") == "KN"
    assert script.country_code("St  Vincent and the Grenadines") == "VC"
    assert script.country_code("n cyprus") == "CY"
    with pytest.raises(LookupError, match="unknown country"):
        script.country_code("atlantis")


def test_a_species_with_no_curated_row_is_written_blank_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """No silent blank: a checklist species that neither moroccan.csv has a row for is named in a warning."""
    _needs_reference()
    script = _script()
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    lines = (DATA / "moroccan.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (shipped / "moroccan.csv").write_text("".join(line for line in lines if not line.startswith("Naja haje,")),
                                          encoding="utf-8")
    monkeypatch.setattr(script, "OUT_DIR", shipped)
    assert script.main(["--shared", str(SHARED), "--out", str(tmp_path / "new")]) == 0
    assert "Naja haje,Naja,Elapidae,1,\n" in (tmp_path / "new" / "moroccan.csv").read_text(encoding="utf-8")
    err = capsys.readouterr().err
    assert "1 Moroccan species have no row in moroccan.csv (Naja haje)" in err
    assert "add it by hand" in err
