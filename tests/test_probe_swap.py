"""``probe restore``'s swap of probe.* and probe.prev.* survives a crash at any of its steps: whichever file write
or removal fails, both probes are still whole on disk, and the next restore (or any probe write) finishes or undoes
the interrupted swap. No encoder, no gallery: the probe files of a plain folder."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from index.layout import (
    PROBE_META,
    PROBE_PREV_META,
    PROBE_PREV_WEIGHTS,
    PROBE_SWAP_META,
    PROBE_SWAP_WEIGHTS,
    PROBE_WEIGHTS,
)
from retrieval.probe import Calibration, LinearProbe, keep_previous, restore_previous


class Crash(OSError):
    """The process dying at one step (nothing after it in the swap runs)."""


def _probe(trained_on: int) -> LinearProbe:
    rng = np.random.default_rng(trained_on)
    return LinearProbe(species=["a a", "b b"], weight=rng.normal(size=(2, 4)).astype(np.float32),
                       bias=np.zeros(2, np.float32), fingerprint="enc#1", trained_on=trained_on)


def _two_probes(folder: Path) -> tuple[str, str]:
    """``folder`` with probe A as its probe and B kept as probe.prev.*: (A's, B's weights sha256)."""
    b, a = _probe(1), _probe(2)
    b.save(folder)
    keep_previous(folder)
    a.save(folder)
    return a.weights_sha256, b.weights_sha256


def _whole(folder: Path, meta: str, weights: str) -> str | None:
    """The pair's weights sha256 when it is one save's whole pair (LinearProbe.load's own check), else None."""
    try:
        import json

        recorded = json.loads((folder / meta).read_text())["weights_sha256"]
        return recorded if hashlib.sha256((folder / weights).read_bytes()).hexdigest() == recorded else None
    except (OSError, ValueError, KeyError):
        return None


def _on_disk(folder: Path) -> set[str]:
    """The probes (weights sha256) held whole by any pair in ``folder``."""
    pairs = ((PROBE_META, PROBE_WEIGHTS), (PROBE_PREV_META, PROBE_PREV_WEIGHTS), (PROBE_SWAP_META, PROBE_SWAP_WEIGHTS))
    return {d for pair in pairs if (d := _whole(folder, *pair))}


def test_a_restore_crashing_at_any_step_loses_neither_probe_and_the_next_restore_completes_it(tmp_path, monkeypatch):
    """Stop 48's note: the restore rewrote probe.prev.* and then probe.*, so a crash between the two writes of either
    pair lost a probe (at the second write, probe.prev.json still named B while probe.prev.npz held A's weights: B
    was gone). Each os.replace / os.unlink of the swap is made to fail in turn, as a crash there."""
    real_replace, real_unlink = os.replace, os.unlink
    crashed_at = []
    for step in range(1, 20):
        folder = tmp_path / f"crash-{step}"
        folder.mkdir()
        a, b = _two_probes(folder)
        calls = [0]

        def failing(real, *args, _step=step, _calls=calls, **kwargs):
            _calls[0] += 1
            if _calls[0] == _step:
                raise Crash(f"crash at file step {_step}")
            return real(*args, **kwargs)

        with monkeypatch.context() as patched:
            patched.setattr(os, "replace", lambda *x, **k: failing(real_replace, *x, **k))
            patched.setattr(os, "unlink", lambda *x, **k: failing(real_unlink, *x, **k))
            try:
                restore_previous(folder)
            except Crash:
                crashed_at.append(step)
            else:
                break  # the swap has fewer steps than this: every one was crashed at
        assert {a, b} <= _on_disk(folder), f"a probe lost by a crash at step {step}"
        if _whole(folder, PROBE_META, PROBE_WEIGHTS) is None:  # a reader caught mid-swap is told what to run
            with pytest.raises(ValueError, match="'probe restore' was interrupted: 'speciesid probe restore"):
                LinearProbe.load(folder)
        restore_previous(folder)  # again: the interrupted swap is finished (or undone, then done)
        assert _whole(folder, PROBE_META, PROBE_WEIGHTS) == b and _whole(folder, PROBE_PREV_META,
                                                                        PROBE_PREV_WEIGHTS) == a, step
        assert not (folder / PROBE_SWAP_META).exists() and not (folder / PROBE_SWAP_WEIGHTS).exists()
        restore_previous(folder)  # and back: both kept
        assert _whole(folder, PROBE_META, PROBE_WEIGHTS) == a and _whole(folder, PROBE_PREV_META,
                                                                        PROBE_PREV_WEIGHTS) == b
    assert len(crashed_at) >= 6  # every write of the swap's three pairs was crashed at


def test_a_train_after_an_interrupted_restore_keeps_the_probe_the_restore_left_current(tmp_path, monkeypatch):
    """A probe write after a crashed restore (a train's keep_previous, a follower's take) first makes the swap's
    pairs whole, so the probe it sets aside is a whole one and the stale swap copy is gone."""
    a, b = _two_probes(tmp_path)
    real_replace, calls = os.replace, []

    def crash_on_the_prev_json(src, dst, *args, **kwargs):  # the 6th write: probe.prev.json of the swap
        calls.append(dst)
        if len(calls) == 6:
            raise Crash("crash")
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", crash_on_the_prev_json)
        with pytest.raises(Crash):
            restore_previous(tmp_path)
    assert keep_previous(tmp_path)  # a new probe being saved: B (restored) set aside whole
    assert _whole(tmp_path, PROBE_PREV_META, PROBE_PREV_WEIGHTS) == b
    assert not (tmp_path / PROBE_SWAP_META).exists()


def test_a_restore_between_two_probes_of_the_same_weights_crashing_mid_write_is_not_taken_as_done(tmp_path,
                                                                                                  monkeypatch):
    """Re-read finding: the swap told "finished" from "undone" by the weights' sha256 alone. Two probes with the same
    weights and another probe.json (a retrain of the same gallery, other calibration settings) were confused: a crash
    between the restored probe's npz and json renames left the current json A's beside the (same) npz, which read as
    "finished"; A's copy was written over probe.prev.* and B, the probe asked for, was lost."""
    b = _probe(1)
    a = replace(b, calibration=Calibration(C=50.0, selected_on="cv:5-fold"), made_at="2026-12-06T21:01:00+00:00")
    b.save(tmp_path)
    keep_previous(tmp_path)
    a.save(tmp_path)
    assert a.weights_sha256 == b.weights_sha256
    real_replace = os.replace

    def crash_on_the_restored_json(src, dst, *args, **kwargs):  # probe.npz (same bytes) renamed in, its json not
        if Path(dst).name == PROBE_META:
            raise Crash("crash")
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", crash_on_the_restored_json)
        with pytest.raises(Crash):
            restore_previous(tmp_path)
    assert LinearProbe.load(tmp_path).calibration.C == 50.0  # still A: the restore had not got to its json
    restore_previous(tmp_path)  # undoes the swap, then restores: B is the probe now, A kept
    assert LinearProbe.load(tmp_path).calibration == b.calibration
    assert json.loads((tmp_path / PROBE_PREV_META).read_text())["made_at"] == a.made_at
    assert not (tmp_path / PROBE_SWAP_META).exists()
    restore_previous(tmp_path)  # and back
    assert LinearProbe.load(tmp_path).calibration.C == 50.0


@pytest.mark.parametrize("damaged", [b"not json", b"null", b"[]", b"{}"])
def test_a_damaged_swap_record_is_removed_with_a_warning_and_restore_and_train_go_on(tmp_path, caplog, damaged):
    """Stop 57's types walk: a probe.swap.json that did not parse, or was not an object, left the swap's target
    unbound, and every probe write (restore, a train's keep_previous) failed with a bare UnboundLocalError. It names
    no probe, so it can finish or undo nothing: removed with a warning, and the restore or train goes on."""
    for name, write in (("restore", restore_previous), ("train", keep_previous)):
        folder = tmp_path / name
        folder.mkdir()
        a, b = _two_probes(folder)
        (folder / PROBE_SWAP_META).write_bytes(damaged)
        (folder / PROBE_SWAP_WEIGHTS).write_bytes(b"half a copy")
        caplog.clear()
        write(folder)
        assert f"{PROBE_SWAP_META} in {folder} is not the record of an interrupted 'probe restore' that this " \
               "version can read: removed, the probe files beside it left as they are" in caplog.text
        assert not (folder / PROBE_SWAP_META).exists() and not (folder / PROBE_SWAP_WEIGHTS).exists()
        if name == "restore":  # B brought back, A kept
            assert _whole(folder, PROBE_META, PROBE_WEIGHTS) == b and _whole(folder, PROBE_PREV_META,
                                                                            PROBE_PREV_WEIGHTS) == a
        else:  # A, the current probe, set aside whole
            assert _whole(folder, PROBE_PREV_META, PROBE_PREV_WEIGHTS) == a
