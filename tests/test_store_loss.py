"""A store that lost its table (walkthrough s50 #1, #2): a folder that saw a committed table refuses to make it again,
saying what it last saw and the two ways on (restore the store, or ``index build --new-store``, whose ids go on past
every id the folder knows); a read never makes a table; a server whose table was made again keeps answering 500
rather than serving the new empty one as its gallery; a store that hangs gets the outage line naming its endpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_object_store import _TINY, BUCKET, s3_endpoint, s3_env  # noqa: F401 - the fixtures, reused

import index.gallery as gallery_module
from index.errors import TableReplacedError, store_table_gone
from index.gallery import Gallery, StoreHoldsTableError, StoreLostError, store_error
from index.records import ReferenceRecord

ENC = {"spec": "test:synthetic", "fingerprint": "test:synthetic#abc", "dim": 8}


def _rows(n: int, start: int, rng: np.random.Generator) -> tuple[list[ReferenceRecord], list[str], np.ndarray]:
    records = [ReferenceRecord(path=f"/p/{start + i}.jpg", species="Naja naja") for i in range(n)]
    return records, [f"{start + i:064x}" for i in range(n)], rng.standard_normal((n, 8)).astype(np.float32)


def test_a_local_store_that_lost_its_table_is_refused_by_every_open_until_new_store_and_ids_go_on(tmp_path, capsys):
    from api.cli import main

    root = tmp_path / "g"
    rng = np.random.default_rng(1)
    Gallery.create(root, ENC).add(*_rows(3, 0, rng))
    table = root / "store" / "references.lance"
    shutil.rmtree(table)  # the store lost: a backup restore or a rebuild is the operator's call, not an open's
    for attempt in (lambda: Gallery.open(root), lambda: Gallery.open(root, make_table=True),
                    lambda: Gallery.create(root, ENC)):
        with pytest.raises(StoreLostError) as lost:
            attempt()
        said = str(lost.value)
        assert f"its store {root / 'store'} no longer holds the gallery's table" in said, said
        assert "with 3 references" in said and "ids up to 3 given" in said and "restore the store from a backup" in said
        assert f"'speciesid index build --index {root} --new-store --dataset ... --root ...'" in said
        assert not table.exists()  # nothing made
    capsys.readouterr()
    assert main(["index", "info", "--index", str(root)]) == 1  # a read: what the folder knows, the error, exit 1
    out, err = capsys.readouterr()
    assert json.loads(out)["local_index"]["count"] == 3 and "no longer holds the gallery's table" in err
    assert not table.exists()
    g = Gallery.create(root, ENC, new_store=True)  # the deliberate start of a new, empty table
    assert len(g) == 0 and json.loads((root / "ids.json").read_text())["next"] == 4
    assert g.add(*_rows(1, 10, rng)) == [4]  # past every id given before the loss
    with pytest.raises(ValueError, match="holds the gallery's table: --new-store starts a new one only where"):
        Gallery.create(root, ENC, new_store=True)


def test_an_s3_store_emptied_is_refused_new_store_continues_ids_and_a_server_keeps_answering_500(
        s3_env, tmp_path, caplog):  # noqa: F811
    _, client = s3_env
    rng = np.random.default_rng(2)
    prefix = f"lost-{tmp_path.name}"
    uri = f"s3://{BUCKET}/{prefix}"
    a, b = tmp_path / "a", tmp_path / "b"
    Gallery.create(a, _TINY, store=uri).add(*_rows(2, 0, rng))
    shutil.copytree(a, b)  # another machine's copy of the folder
    Gallery.open(a).add(*_rows(2, 2, rng))  # ids 3, 4: b's own mark still says 3
    assert len(Gallery.open(b)) == 4  # b's saved index now holds them (its ids.json does not)
    server = Gallery.open(a)
    server.stale_reads = True  # as a server reads
    for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=o["Key"])  # the bucket emptied: the shared id mark too
    for folder in (a, b):
        with pytest.raises(StoreLostError, match=rf"its store {uri} no longer holds the gallery's table"):
            Gallery.open(folder)
    assert not client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents")  # no table made
    with pytest.raises(RuntimeError) as gone:
        server.refresh(force=True)
    assert store_table_gone(gone.value)  # the documented 500
    g = Gallery.create(b, _TINY, new_store=True)
    assert len(g) == 0 and json.loads((b / "ids.json").read_text())["next"] == 5  # past b's index, not its mark
    assert g.add(*_rows(1, 10, rng)) == [5]
    with pytest.raises(TableReplacedError, match="restart the server") as replaced:  # not 0 references, ready
        server.refresh(force=True)
    assert store_table_gone(replaced.value) and server.index.ntotal == 4
    other = Gallery.open(a)  # the other machine's copy follows the new table, saying so, and gives no id twice
    assert len(other) == 1 and "the table was replaced" in caplog.text
    assert other.add(*_rows(1, 20, rng)) == [6]


def test_new_store_on_an_s3_store_that_holds_its_table_says_so_not_to_check_the_credentials(
        s3_env, tmp_path):  # noqa: F811
    """re-read s50 #1: the store opened fine, yet its refusal was re-worded as one that cannot be opened ("check
    the URI and the AWS_* settings ..."), the real advice last, in parentheses."""
    uri = f"s3://{BUCKET}/held-{tmp_path.name}"
    root = tmp_path / "g"
    Gallery.create(root, _TINY, store=uri).add(*_rows(1, 0, np.random.default_rng(3)))
    with pytest.raises(StoreHoldsTableError) as held:
        Gallery.create(root, _TINY, new_store=True)
    said = str(held.value)
    assert said == (f"gallery {root}: its store {uri} holds the gallery's table: --new-store starts a new one only "
                    "where the table was lost; run the command without it"), said
    assert len(Gallery.open(root)) == 1  # nothing made, nothing removed


def test_a_writers_commit_between_the_open_and_the_saved_index_read_is_no_replaced_table(tmp_path, monkeypatch,
                                                                                           caplog):
    """re-read s50 #2: another process commits and saves its index after this open read the store's version and
    before it reads the saved index; the saved index is then ahead of the version read, which was taken for a
    replaced table (a warning, and the whole index rebuilt). The store is looked at again first."""
    root = tmp_path / "g"
    rng = np.random.default_rng(4)
    Gallery.create(root, ENC).add(*_rows(3, 0, rng))
    real, wrote = gallery_module.load_index, []

    def load_after_a_write(path):  # noqa: ANN001, ANN202 - the injection: the other writer's add lands first
        if not wrote:
            wrote.append(None)  # the writer's own open loads the index too: once only
            wrote[0] = Gallery.open(root).add(*_rows(1, 3, rng))
        return real(path)

    monkeypatch.setattr(gallery_module, "load_index", load_after_a_write)
    with caplog.at_level("INFO", logger="index.gallery"):
        g = Gallery.open(root, refresh_s=3600.0)  # the store's version is not looked at again by itself
    assert wrote == [[4]] and json.loads((root / "vectors.faiss.json").read_text())["store_version"] == g.store.version
    assert "replaced" not in caplog.text and "rebuilding" not in caplog.text, caplog.text
    assert len(g) == 4 and g.index.ntotal == 4


def test_a_server_keeps_refusing_a_replaced_table_when_the_new_one_reaches_the_version_it_read(tmp_path):
    """re-read s50 #3: a new table that reached exactly the version the server had read was served from the lost
    table's index (its error cleared, nothing synced: the versions were equal). Refused until a restart, as said."""
    root = tmp_path / "g"
    rng = np.random.default_rng(5)
    g = Gallery.create(root, ENC)
    for i in range(4):
        g.add(*_rows(1, i, rng))
    server = Gallery.open(root)
    server.stale_reads = True  # as a server reads
    read = server.store.version
    shutil.rmtree(root / "store" / "references.lance")
    new = Gallery.create(root, ENC, new_store=True)
    new.compact_fragments = 0  # one version a write, so that the new table reaches the version read exactly
    with pytest.raises(TableReplacedError, match="restart the server"):
        server.refresh(force=True)
    while new.store.version < read:
        new.add(*_rows(1, 100 + new.store.version, rng))
    assert new.store.version == read
    for force in (True, False):
        with pytest.raises(TableReplacedError, match="restart the server to serve it"):
            server.refresh(force=force)
    assert server.index.ntotal == 4


def test_a_command_whose_table_is_replaced_while_it_runs_refuses_it_from_then_on_and_a_new_open_follows(
        tmp_path, capsys, monkeypatch):
    """s50 left-over: a command's gallery (no server) whose table was replaced while it ran synced the new table by
    id difference (at the version it had read, it kept the lost table's index), reads and writes alike. It now
    refuses, as a server does, saying to run it again; a new open follows the new table (a warning, as documented)."""
    from api.cli import main

    root = tmp_path / "g"
    rng = np.random.default_rng(6)
    g = Gallery.create(root, ENC)
    for i in range(4):
        g.add(*_rows(1, i, rng))
    running = Gallery.open(root)  # as a command opens it: no stale reads
    read = running.store.version
    shutil.rmtree(root / "store" / "references.lance")
    new = Gallery.create(root, ENC, new_store=True)
    new.add(*_rows(2, 50, rng))
    assert new.store.version < read
    said = (rf"holds a table at version {new.store.version}, before the version {read} this command read: its table "
            r"was replaced \(made again, or restored from an older backup\); run the command again: it then rebuilds")
    with pytest.raises(TableReplacedError, match=said) as replaced:
        running.refresh(force=True)
    assert store_table_gone(replaced.value)
    with pytest.raises(TableReplacedError, match=said):  # from then on, a read within refresh_s too
        running.search(rng.standard_normal((1, 8)).astype(np.float32), 1)
    for write in (lambda: running.add(*_rows(1, 70, rng)), lambda: running.delete([5]),
                  lambda: running.set_excluded([5])):
        with pytest.raises(TableReplacedError, match=said):
            write()
    assert running.index.ntotal == 4 and new.store.count() == 2  # nothing synced, nothing written
    assert len(Gallery.open(root)) == 2  # a new open serves the new table (another copy of the folder: S3 test)
    monkeypatch.setattr(Gallery, "open", classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(replaced.value)))
    assert main(["index", "info", "--index", str(root)]) == 2  # the command's one line, no type name nor traceback
    assert capsys.readouterr().err.startswith(f"speciesid: error: the store {root / 'store'} holds a table at version ")


def test_a_servers_own_write_landing_during_its_look_is_no_replaced_table(tmp_path, monkeypatch):
    """A server's look read the store's version, then compared it with the version its index had synced: a write of
    the same server committing between the two raised the synced version past the one read, which was taken for a
    replaced table (a 500 on every request until a restart). The synced version is read first now."""
    import threading

    from index.store import ReferenceStore

    root = tmp_path / "g"
    rng = np.random.default_rng(7)
    Gallery.create(root, ENC).add(*_rows(2, 0, rng))
    server = Gallery.open(root)
    server.stale_reads = True  # as a server reads: its looks run in a thread beside its writes
    real, wrote = ReferenceStore.version, []

    def version(store):  # noqa: ANN001, ANN202 - the injection: the server's own add commits as a look reads
        seen = real.fget(store)
        if threading.current_thread().name == "speciesid-store-check" and not wrote:
            wrote.append(None)
            wrote[0] = server.add(*_rows(1, 10, rng))
        return seen

    monkeypatch.setattr(ReferenceStore, "version", property(version))
    server.refresh(force=True)
    assert wrote == [[3]] and server._replaced is None
    assert len(server) == 3 and server.index.ntotal == 3


#: What `index info` and `references add` printed when moto was stopped with SIGSTOP (walkthrough s50 #2): Lance's
#: text of a store that does not answer within the client timeout.
LANCE_HANG = ('Invalid input, Failed to connect to namespace: IO { source: Generic { store: "S3", source: ListRequest { '
              'source: RetryError(RetryErrorImpl { method: GET, uri: Some(http://127.0.0.1:18752/bkt?list-type=2&prefix'
              '=g%2F__manifest%2F_versions%2F), retries: 2, max_retries: 2, elapsed: 30.229540029s, retry_timeout: 30s, '
              'inner: Http(HttpError { kind: Timeout, source: reqwest::Error { kind: Request, source: TimedOut } }) }) '
              '} }')


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:18752"])
def test_a_store_that_hangs_gets_the_outage_line_naming_its_endpoint_and_the_raw_text_last(endpoint):
    msg = str(store_error("s3://bkt/g", ValueError(LANCE_HANG), endpoint))
    assert msg.startswith("cannot open the store s3://bkt/g: it did not answer (timed out); check the network and "
                          "that the endpoint http://127.0.0.1:18752 is up and reachable from this machine"), msg
    assert msg.index("AWS_ENDPOINT_URL") < msg.index("(the store's error: Invalid input, Failed to connect")
