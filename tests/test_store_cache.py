"""The store's LanceDB caches are capped: every connection of a process shares one session whose size stays under
SPECIESID_STORE_METADATA_CACHE_MB + SPECIESID_STORE_INDEX_CACHE_MB, however many versions the adds commit (with
LanceDB's own caps, 1 GiB + 6 GiB, a server's memory grew ~150 kB per add)."""

from __future__ import annotations

import os
from unittest import mock

import lancedb
import numpy as np
import pytest

from api.settings import Settings, SettingsError
from index import store as store_module
from index.gallery import Gallery
from index.records import ReferenceRecord
from index.store import ReferenceStore, store_session
from index.store_cache import INDEX_ENV, METADATA_ENV, cache_bytes, parse_cache_mb, set_cache_mb

DIM = 8
ENC = {"spec": "test:synthetic", "fingerprint": "test:synthetic#abc", "dim": DIM}


@pytest.fixture(autouse=True)
def _environment_caps(monkeypatch):
    """Each test reads the caps from its own environment (a server's settings elsewhere may have set them)."""
    set_cache_mb()
    monkeypatch.delenv(METADATA_ENV, raising=False)
    monkeypatch.delenv(INDEX_ENV, raising=False)
    yield
    set_cache_mb()


def _add_one_by_one(g: Gallery, start: int, n: int, rng: np.random.Generator) -> None:
    for i in range(start, start + n):
        x = rng.standard_normal((1, DIM)).astype(np.float32)
        g.add([ReferenceRecord(path=f"/photos/{i}.jpg", species=f"Genus s{i % 3}")], [f"{i:064x}"],
              x / np.linalg.norm(x))


def test_sixty_adds_leave_the_shared_session_under_the_caps_the_variables_set(tmp_path, monkeypatch):
    """60 single-photo adds are 60 versions: with LanceDB's default caps the session held ~3.4 MB of them after
    60 adds (~45 kB each, never evicted); capped at 1 MiB + 1 MiB through the variables, it stays under 2 MiB."""
    monkeypatch.setenv(METADATA_ENV, "1")
    monkeypatch.setenv(INDEX_ENV, "1")
    g = Gallery.create(tmp_path / "g", ENC, refresh_s=0.0)
    session = store_session()
    assert session is not None
    assert g.store._db.session is session
    rng = np.random.default_rng(0)
    for start in (0, 20, 40):
        _add_one_by_one(g, start, 20, rng)
        g.store.count()
        g.species()
    assert g.store.count() == 60
    assert session.size_bytes <= sum(cache_bytes()) == 2 << 20
    assert store_session() is session  # one session for the process while the caps stay


def test_views_and_stores_opened_alone_share_the_session(tmp_path):
    """The version views (whitening's sync) and every other store the process opens use the same capped session,
    not a 1 GiB + 6 GiB one each."""
    g = Gallery.create(tmp_path / "g", ENC, refresh_s=0.0)
    _add_one_by_one(g, 0, 3, np.random.default_rng(1))
    view = g.store.at_version(g.store.version - 1)
    alone = ReferenceStore(g.store.root, DIM, refresh_s=None, create=False)
    assert view._db.session is alone._db.session is g.store._db.session is store_session()
    assert view.count() == 2


def test_new_caps_make_a_new_session_for_the_stores_opened_after():
    first = store_session()
    set_cache_mb(metadata=3, index=5)
    assert cache_bytes() == (3 << 20, 5 << 20)
    assert store_session() is not first
    set_cache_mb()
    assert cache_bytes() == (64 << 20, 256 << 20)


def test_a_lancedb_without_sessions_keeps_its_own_caches(tmp_path, monkeypatch):
    """An older LanceDB (no ``lancedb.Session``): stores open and write as before, on LanceDB's own caches."""
    monkeypatch.delattr(lancedb, "Session")
    assert store_session() is None
    store = ReferenceStore(tmp_path / "s", DIM, refresh_s=None)
    x = np.ones((1, DIM), np.float32) / np.sqrt(DIM)
    store.add([ReferenceRecord(path="/p/1.jpg", species="Genus s")], ["0" * 64], x, "e", [1])
    assert store.count() == 1
    assert store_module._connect(str(tmp_path / "t"), None, {}).session is None


def test_a_bad_cap_is_refused_naming_the_variable(monkeypatch):
    with pytest.raises(ValueError, match=rf"^{METADATA_ENV}=0 is not a whole number of MiB from 1 to 16777216: set "
                                         r"the cap of the store's cache in MiB \(default 64\), or unset it$"):
        parse_cache_mb(METADATA_ENV, "0")
    monkeypatch.setenv(INDEX_ENV, "lots")
    with pytest.raises(ValueError, match=rf"^{INDEX_ENV}=lots is not a whole number of MiB.*\(default 256\)"):
        cache_bytes()
    with pytest.raises(SettingsError, match=f"{INDEX_ENV}=lots"):
        Settings.load()


def test_the_server_settings_set_the_caps(tmp_path, monkeypatch):
    """The server's settings (a .env file included) reach the stores it opens: the service sets them before its
    gallery connects."""
    from api.service import SpeciesService

    class _Identifier:  # the service reads these before anything else; the caps are set before it is asked
        def __init__(self) -> None:
            raise RuntimeError("opened")

    monkeypatch.setattr("api.service.open_identifier", lambda *a, **k: _Identifier())
    with pytest.raises(RuntimeError, match="opened"):
        SpeciesService(Settings(index=str(tmp_path), store_metadata_cache_mb=7, store_index_cache_mb="9"))
    assert cache_bytes() == (7 << 20, 9 << 20)


def test_a_cap_too_big_for_lancedb_is_refused_as_a_bad_one(tmp_path, monkeypatch):
    """s56 re-read core #2: a huge cap passed every check, then failed at the first store open with a bare
    OverflowError (LanceDB takes bytes as a u64). Now it gets the same one-line refusal, at start for a server."""
    assert parse_cache_mb(INDEX_ENV, str(1 << 24)) == 1 << 24  # 16 TiB: taken
    monkeypatch.setenv(INDEX_ENV, "99999999999999999")
    with pytest.raises(ValueError, match=rf"^{INDEX_ENV}=99999999999999999 is not a whole number of MiB from 1 to "
                                         r"16777216: set the cap of the store's cache in MiB \(default 256\)"):
        ReferenceStore(tmp_path / "s", DIM, refresh_s=None)
    with pytest.raises(SettingsError, match=f"{INDEX_ENV}=99999999999999999 is not a whole number"):
        Settings.load()


def test_the_session_check_is_made_once_not_at_every_connect(tmp_path, monkeypatch):
    """s56 re-read core #6: every connect looked at lancedb.connect's signature again (~30 µs each)."""
    import inspect

    store_module._connect_takes_session.cache_clear()
    session = store_session()
    monkeypatch.setattr(inspect, "signature", mock.Mock(side_effect=AssertionError("looked at again")))
    assert store_session() is session
    store = ReferenceStore(tmp_path / "s", DIM, refresh_s=None)
    assert store._db.session is session


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
def test_a_forked_child_gets_a_free_session_lock(monkeypatch):
    """s56 re-read core #5: the module's lock was inherited as it was at the fork; held then by another thread (in
    a session's making), the child's first store open would wait forever. A forked child now gets a fresh one."""
    with store_module._session_lock:  # held at the fork, as another thread's would be
        pid = os.fork()
        if pid == 0:  # the child: exit 0 when its lock is free
            os._exit(0 if store_module._session_lock.acquire(blocking=False) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
