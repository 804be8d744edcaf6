"""The phone walk of stop 53 (a ranger in Morocco: phone photos, galleries named in French and Arabic): machine
outputs in UTF-8, HEIC and animated GIF photos said for what they are, labels at genus rank, the moroccan loader's
folder names, and what a build says of the folders it joins and of a species' several common names."""

from __future__ import annotations

import json
import os
import sys

from _cli_support import _run, folder_gallery

VIPER = "Vipère de Lataste (Vipera latastei)"
COBRA_AR = "كوبرا مصرية (Naja haje)"


def test_json_outputs_write_french_and_arabic_as_themselves(tmp_path, capsys):
    """Walk s53 #9: --format json (species list, index info, identify) wrote "\\u0643\\u0648..." for every letter
    not ASCII; now UTF-8, as the API writes it."""
    index = folder_gallery(tmp_path, capsys, (VIPER, COBRA_AR))
    code, out, err = _run(capsys, "species", "list", "--index", index, "--format", "json")
    assert code == 0, err
    assert '"common_name": "Vipère de Lataste"' in out and '"common_name": "كوبرا مصرية"' in out, out
    assert "\\u" not in out
    assert {s["common_name"] for s in json.loads(out)} == {"Vipère de Lataste", "كوبرا مصرية"}
    code, out, err = _run(capsys, "index", "info", "--index", index)
    assert code == 0 and "\\u" not in out, out
    photo = next((tmp_path / "photos" / COBRA_AR).iterdir())
    code, out, err = _run(capsys, "identify", "--index", index, photo, "--format", "json", "-q")
    assert code == 0, err
    assert "\\u" not in out and "كوبرا مصرية" in out, out


def _csv_to(stdout, capsys, index) -> None:
    """``species list --format csv`` run with ``stdout`` as sys.stdout."""
    from api.cli import main

    saved, sys.stdout = sys.stdout, stdout
    try:
        assert main(["species", "list", "--index", str(index), "--format", "csv"]) == 0
    finally:
        sys.stdout = saved
        stdout.close()


def test_a_csv_written_to_a_file_starts_with_a_byte_order_mark_for_excel_and_a_pipe_gets_none(tmp_path, capsys):
    """Walk s53 #9: Excel on a Windows PC opened the CSV's "Vipère" as "VipÃ¨re" (no BOM: read in the PC's code
    page). A CSV that goes to a new file (``> out.csv``) now starts with the UTF-8 byte-order mark; one that goes
    down a pipe, or is appended to a file that holds something, has none (a program reads plain UTF-8 as before)."""
    index = folder_gallery(tmp_path, capsys, (VIPER, COBRA_AR))
    out = tmp_path / "species.csv"
    _csv_to(open(out, "w", encoding="utf-8"), capsys, index)  # noqa: SIM115 (closed by _csv_to)
    data = out.read_bytes()
    assert data.startswith(b"\xef\xbb\xbfspecies,common_name,"), data[:40]
    assert "Vipère de Lataste" in data.decode("utf-8-sig") and data.count(b"\xef\xbb\xbf") == 1
    _csv_to(open(out, "a", encoding="utf-8"), capsys, index)  # noqa: SIM115 appended: no mark in the middle
    assert out.read_bytes().count(b"\xef\xbb\xbf") == 1
    read, write = os.pipe()
    _csv_to(os.fdopen(write, "w", encoding="utf-8"), capsys, index)
    with os.fdopen(read, "rb") as pipe:
        piped = pipe.read()
    assert piped.startswith(b"species,common_name,") and "كوبرا مصرية".encode() in piped, piped[:40]
    code, printed, _ = _run(capsys, "species", "list", "--index", index, "--format", "csv")  # captured: as is
    assert code == 0 and printed.startswith("species,common_name,")
