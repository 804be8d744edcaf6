"""A gallery whose store is on S3 (moto) compacts it under the store's write lease, by a write and by the CLI."""

from __future__ import annotations

import re

import numpy as np
from conftest import require_module
from test_object_store import _TINY, BUCKET, s3_endpoint, s3_env  # noqa: F401 - the fixtures, reused

from api.cli import main
from index.records import ReferenceRecord
from index.store import ReferenceStore

require_module("moto")


def test_a_store_on_s3_is_compacted_under_its_lease(request, tmp_path, monkeypatch, capsys):
    from index.gallery import Gallery

    request.getfixturevalue("s3_env")  # test_object_store's moto server and AWS_* environment

    held = []
    compact = ReferenceStore.compact

    def watched(self, **kw):
        held.append(g._writer.held_lease is not None)
        return compact(self, **kw)

    monkeypatch.setattr(ReferenceStore, "compact", watched)
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/compact")
    g.compact_fragments = 3
    rng = np.random.default_rng(0)
    ids = []
    for i in range(5):
        ids += g.add([ReferenceRecord(path=f"/{i}.jpg", species="Naja naja")], [f"{i:064x}"],
                     rng.standard_normal((1, _TINY["dim"])))
    assert held == [True]  # the third write compacted, holding the lease
    assert g.store.fragment_stats().small == 3 and g.store.ids().tolist() == ids

    assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "0"]) == 0
    out = capsys.readouterr().out
    assert "fragments: 3 -> 1 (small: 3 -> 1; 3 merged)" in out
    pruned = re.search(r"versions: \(not counted on an object store; \d+ made by this compaction, (\d+) "
                       r"superseded over 0 s ago pruned", out)
    assert pruned and int(pruned.group(1)) > 0, out
    assert held == [True, True]
    g.refresh(force=True)
    assert g.store.ids().tolist() == ids and g.search(rng.standard_normal((1, _TINY["dim"])), 5)[0]
