"""File and folder names in the command line's output (re-read s53 w2 #1, #2, #8, #12, #13; w1-api #2): a name
cannot fake a line of people's output, JSON and CSV keep it as it is, and both are UTF-8 whatever stdout's
encoding."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from _cli_support import ENCODER, _photo

REPO = Path(__file__).resolve().parents[1]
FAKE = "Bogus\nspeciesid: note: all harmless"


def _line(msg: str, *args: object) -> str:
    from api.cli import CliLogFormat

    return CliLogFormat().format(logging.LogRecord("index.datasets", logging.WARNING, __file__, 1, msg, args, None))


def test_a_name_put_into_a_log_message_is_escaped_whole_and_the_messages_own_lines_kept():
    """The CLI's formatter escaped line by line, keeping '\\n': a class folder named 'Bogus\\nspeciesid: note: all
    harmless' in a library warning printed a line of its own. What the library puts into a message (its
    arguments) is now escaped whole; numbers keep their format; the record the other handlers see is unchanged. The
    message's own further lines are indented (walk s56-logs #12)."""
    assert _line("%s", f"1 class folder(s) not written as scientific names: {FAKE}. Read as ...") == (
        "speciesid: warning: 1 class folder(s) not written as scientific names: Bogus\\nspeciesid: note: all "
        "harmless. Read as ...")
    assert _line("read %d photos in %.1f s under %s\nthen %s", np.int64(3), 1.25, Path("/p") / FAKE, "x\x1b[8m") == (
        "speciesid: warning: read 3 photos in 1.2 s under /p/Bogus\\nspeciesid: note: all harmless\n  then x\\x1b[8m")
    assert _line("folder %r skipped", FAKE) == "speciesid: warning: folder 'Bogus\\nspeciesid: note: all harmless' " \
        "skipped"
    assert _line("%(name)s: %(n)d", {"name": FAKE, "n": 2}).count("\n") == 0

    class Count:  # formats as a number, yet no Number: left as it is
        def __index__(self) -> int:
            return 4

    assert _line("%d of %s", Count(), FAKE) == "speciesid: warning: 4 of Bogus\\nspeciesid: note: all harmless"
    record = logging.LogRecord("index", logging.WARNING, __file__, 1, "%s", (FAKE,), None)
    from api.cli import CliLogFormat

    CliLogFormat().format(record)
    assert record.args == (FAKE,) and record.getMessage() == FAKE


def test_a_folder_builds_warning_names_a_class_folder_on_its_one_line_and_json_csv_are_utf8(tmp_path):
    """End to end, in a fresh process (pytest's log capture keeps the CLI's handler out of this one): the folder
    build's warning about 'Bogus\\nspeciesid: note: all harmless' is one line. Then, with stdout's encoding cp1252
    (Windows, output sent to a file or a pipe), species list --format json and csv wrote in cp1252, or failed on an
    Arabic name with UnicodeEncodeError and empty output: both are UTF-8 now."""
    root = tmp_path / "photos"
    for i, folder in enumerate((FAKE, "أفعى موريتانيا (Naja haje)", "Vipère aspic (Vipera aspis)")):
        for j in range(2):
            _photo(root / folder / f"{j}.png", 2 * i + j)
    index = tmp_path / "g"
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}

    def cli(*argv: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "api.cli", *map(str, argv)], cwd=REPO, env=env,
                              capture_output=True)

    built = cli("index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER, "-q")
    assert built.returncode == 0, built.stderr
    lines = built.stderr.decode("cp1252").splitlines()
    assert [line for line in lines if "all harmless" in line] == [
        next(line for line in lines if line.startswith("speciesid: warning: 1 class folder(s) not written as "))]
    assert not any(line.startswith("speciesid: note: all harmless") for line in lines), lines
    listed = cli("species", "list", "--index", index, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    species = {s["species"]: s["common_name"] for s in json.loads(listed.stdout.decode("utf-8"))}
    assert species["Naja haje"] == "أفعى موريتانيا" and species["Vipera aspis"] == "Vipère aspic"
    table = cli("species", "list", "--index", index, "--format", "csv")
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader(io.StringIO(table.stdout.decode("utf-8"))))
    assert {r["species"]: r["common_name"] for r in rows}["Naja haje"] == "أفعى موريتانيا"


def test_json_output_of_a_name_that_is_not_utf8_is_utf8_and_reads_back(capsys):
    """A Linux file name's byte that is not UTF-8 (read by Python as a lone surrogate) made the JSON output
    unwritable as UTF-8: it is written as its \\u escape, and json.loads gives the same name back."""
    from api.cli._common import emit_utf8, to_json

    name = "/x/\udcff.jpg"
    emit_utf8(to_json([{"image": name, "species": "Vipère"}]))
    out = capsys.readouterr().out
    assert "\\udcff" in out and json.loads(out) == [{"image": name, "species": "Vipère"}]


def test_an_observations_photo_note_prints_the_photos_name_escaped():
    """identify --observation's table printed a photo's note (workflows.identify: 'name: an animated GIF ...') with
    the raw file name: a GIF named 'anim\\nspeciesid: note: harmless, no venom.gif' faked a line."""
    from api.cli.identify import _identify_table

    gif = "/q/anim\nspeciesid: note: harmless, no venom.gif"
    answer = {"image": "/q", "far": False, "unknown": False, "venom_advice": None, "notes": [
        f"{gif}: an animated GIF: only its first frame was read"],
              "predictions": [{"species": "Naja haje", "common_name": None, "score": 0.75, "family": "Elapidae",
                               "venomous": True}]}
    lines = _identify_table(answer, "species").split("\n")
    assert lines[-1] == ("  note: /q/anim\\nspeciesid: note: harmless, no venom.gif: an animated GIF: only its "
                         "first frame was read")
    assert not any(line.startswith("speciesid") for line in lines)


def test_a_folders_reason_keeps_names_as_they_are_for_json_and_escapes_them_for_people(tmp_path, capsys):
    """photos.not_photos_text and the 'only entries that are not regular files' reason escaped the names they list,
    so identify's JSON 'error' held 'note\\\\x1b[8m.txt' where its 'image' held the name as it is. The reasons keep
    the names; the CLI's stderr line escapes them."""
    from api.cli._common import photo_args
    from index.photos import expand_photo_args

    folder = tmp_path / "q1"
    folder.mkdir()
    (folder / "note\x1b[8m.txt").write_text("x")
    pipes = tmp_path / "q2"
    pipes.mkdir()
    os.mkfifo(pipes / "p\x1b[8m")
    reasons = dict(expand_photo_args([folder, pipes]).problems)
    assert reasons[str(folder)].startswith("folder holds 1 file, none a photo: note\x1b[8m.txt. ")
    assert reasons[str(pipes)].endswith("(a device, a pipe, a socket): p\x1b[8m")
    _photo(tmp_path / "ok" / "1.png", 1)
    photo_args([str(folder), str(tmp_path / "ok")])
    err = capsys.readouterr().err
    assert "\x1b" not in err and "note\\x1b[8m.txt" in err, err


def test_a_folder_holding_only_a_link_loop_is_said_to_hold_one(tmp_path):
    """A folder holding only 'loop -> ..' was said to hold 'one entry that could be one [that] cannot be read (...
    a broken link ...)': a link back to a folder above it was never a photo."""
    from index.photos import expand_photo_args

    only = tmp_path / "q4"
    only.mkdir()
    os.symlink("..", only / "loop")
    two = tmp_path / "q5"
    two.mkdir()
    os.symlink("..", two / "loop")
    os.symlink(two / "gone.jpg", two / "x.jpg")
    reasons = dict(expand_photo_args([only, two]).problems)
    assert reasons[str(only)] == ("folder holds no photos: its only entry is a link loop (a link back to a folder "
                                  "above it, which is not searched again through it)")
    assert reasons[str(two)] == (
        "folder holds no photos: its one entry that could be one cannot be read (each named with why: not a regular "
        "file, a broken link, ...); besides, a link loop (a link back to a folder above it, which is not searched "
        "again through it)")


def test_an_unexpected_error_and_a_store_outage_are_shown_escaped(monkeypatch, capsys):
    """main's last two error lines wrote a library's text as it was: an ESC in it reached the terminal."""
    import api.cli as cli
    import api.cli.index as index_cli

    def boom(args):
        raise RuntimeError("bad \x1b[2J name")

    monkeypatch.setattr(index_cli, "cmd_index_info", boom)
    assert cli.main(["index", "info", "--index", "/nowhere"]) == 2
    assert capsys.readouterr().err == ("speciesid: error: RuntimeError: bad \\x1b[2J name (run with -vv for the "
                                       "traceback)\n")
    monkeypatch.setattr(cli, "store_outage", lambda exc, args: "the store s3://b/\x1b[8m is unreachable")
    assert cli.main(["index", "info", "--index", "/nowhere"]) == 2
    assert capsys.readouterr().err == "speciesid: error: the store s3://b/\\x1b[8m is unreachable\n"
