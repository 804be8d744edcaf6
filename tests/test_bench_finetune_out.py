"""benchmarks/bench_finetune.py never deletes a folder it did not make: its settings and ``--out`` are checked before
anything is written, a folder holding files that is not one of its runs is refused (exit 2) unless ``--overwrite``,
and its default ``--out`` is no folder a README command writes (walk-docs stop 54, finding 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_finetune.py"


@pytest.fixture
def fake_shared(tmp_path: Path) -> Path:
    """A SPECIESID_SHARED the script's ``require_shared`` accepts (the folders, no photo, no weights): whatever the
    script does with --out happens before it could read a photo."""
    shared = tmp_path / "shared"
    for folder in ("data/ph-snakes/train", "data/ph-snakes/val", "models/mobilenetv1_100.coral_in1k"):
        (shared / folder).mkdir(parents=True)
    return shared


def _run(shared: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPECIESID_SHARED": str(shared)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def _user_folder(tmp_path: Path) -> Path:
    """A folder of someone's work: what a finished `speciesid finetune --out runs/ft-ph` leaves, and a note."""
    folder = tmp_path / "ft-ph"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text(json.dumps({"architecture": "mobilenetv1_100", "speciesid": {"epochs": 3}}))
    return folder


def test_a_bad_set_is_refused_before_out_is_touched(tmp_path: Path, fake_shared: Path) -> None:
    """The walk's command (`--out runs/ft-ph --set not_a_field=1`) deleted the folder, then raised a TypeError."""
    out = _user_folder(tmp_path)
    done = _run(fake_shared, "--protocol", "val", "--out", str(out), "--set", "not_a_field=1")
    assert done.returncode == 2, done.stderr
    assert "--set not_a_field: not a FinetuneConfig field" in done.stderr
    assert "Traceback" not in done.stderr
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "model.safetensors").is_file()


def test_a_folder_of_other_work_is_refused_and_kept(tmp_path: Path, fake_shared: Path) -> None:
    """Good settings, an --out holding files and no marker: refused (exit 2) naming --overwrite; nothing removed."""
    out = _user_folder(tmp_path)
    done = _run(fake_shared, "--out", str(out), "--set", "epochs=1")
    assert done.returncode == 2, done.stderr
    assert f"--out {out} holds files and is not a bench_finetune run (no bench_finetune.json in it)" in done.stderr
    assert "pass --overwrite" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]


def test_an_overwrite_run_that_fails_before_writing_leaves_no_marker(tmp_path: Path, fake_shared: Path) -> None:
    """Re-read stop 54: `--overwrite` into a folder of other work, the run failing on the data (no photos in the fake
    shared folder) before writing anything, left bench_finetune.json there: the next run, without --overwrite,
    trained into the folder. Now the marker goes again and that run is refused."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    done = _run(fake_shared, "--out", str(out), "--overwrite", "--set", "epochs=1")
    assert done.returncode != 0 and "no photos" in done.stderr, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    done = _run(fake_shared, "--out", str(out), "--set", "epochs=1")
    assert done.returncode == 2 and "pass --overwrite" in done.stderr, done.stderr


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch, fake_shared: Path):
    """The script imported as a module (benchmarks/ on the path, SPECIESID_SHARED at the fake)."""
    monkeypatch.setenv("SPECIESID_SHARED", str(fake_shared))
    return bench_script(monkeypatch, "bench_finetune")


def test_out_checks_marked_runs_overwrite_and_the_default(tmp_path: Path, bench) -> None:
    """A marked folder (one of its runs) and --overwrite pass the check; a marker written for a run that failed before
    adding anything is taken away again, with the folder it made; the default --out is not the README's
    runs/ft-ph."""
    assert bench.DEFAULT_OUT == "runs/bench-finetune"
    out = _user_folder(tmp_path)
    config = bench.build_config(out, "split", ["epochs=1"])
    assert config.resume == "no"  # nothing to resume: afresh, only an earlier run's own files removed
    with pytest.raises(ValueError, match="pass --overwrite"):
        bench.check_out(out, config, overwrite=False)
    bench.check_out(out, config, overwrite=True)
    mark = bench.mark_out(out)
    assert not mark.made and mark.wrote and (out / bench.MARKER).is_file()
    bench.check_out(out, config, overwrite=False)  # marked: one of its runs
    # an --overwrite run that failed before adding anything: its marker goes, the user's folder is refused again
    # without --overwrite (before, the marker stayed: the folder was trained into without --overwrite from then on)
    bench.unmark_out(out, mark)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    with pytest.raises(ValueError, match="pass --overwrite"):
        bench.check_out(out, config, overwrite=False)
    mark = bench.mark_out(out)  # one that added a file keeps its marker: the folder holds a run's files now
    (out / "training_log.csv").write_text("epoch\n")
    bench.unmark_out(out, mark)
    assert (out / bench.MARKER).is_file()
    again = bench.mark_out(out)  # a marker already there (an earlier run's) is not this run's to take away
    assert not again.wrote
    (out / "training_log.csv").unlink()
    bench.unmark_out(out, again)
    assert (out / bench.MARKER).is_file()
    (out / "config.json").unlink()  # model.safetensors no run wrote: `finetune`'s own check refuses it, even so
    with pytest.raises(ValueError, match="not written by a speciesid fine-tuning run"):
        bench.check_out(out, config, overwrite=True)
    fresh = tmp_path / "new" / "run"
    mark = bench.mark_out(fresh)
    assert mark.made and mark.wrote
    bench.unmark_out(fresh, mark)
    assert not fresh.exists() and (tmp_path / "new").is_dir()
    with pytest.raises(ValueError, match="augment"):
        bench.build_config(out, "split", ["augment.not_a_field=1"])


def test_a_setting_the_run_refuses_is_one_error_line(tmp_path: Path, bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """finetune's ValueError (a --time-budget that fits no epoch) ends the script with its message as one line, not a
    traceback, and the marker this run wrote is taken away (walk-bench finding 12)."""
    import finetune.train

    def refused(config, **kw) -> None:  # noqa: ANN001, ANN003 - finetune's signature
        raise ValueError("--time-budget 1 min fits no epoch on this machine: give a bigger --time-budget")

    monkeypatch.setattr(finetune.train, "finetune", refused)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["bench_finetune.py", "--out", str(out), "--set", "time_budget=1"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == "bench_finetune: --time-budget 1 min fits no epoch on this machine: give a bigger " \
                              "--time-budget"
    assert not out.exists()
