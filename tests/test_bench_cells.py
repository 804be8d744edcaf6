"""How two benchmarks write a figure (walk-bench finding 11 and 13): bench_gpu's table shows "-" where a cell has
no figure (no GPU memory on the CPU, no batch in the naive loop) instead of nan; bench_decode's small photos are
not "0 MP"."""

from __future__ import annotations

import pytest
from conftest import bench_script as _script


def test_gpu_cells_without_a_figure_are_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = _script(monkeypatch, "bench_gpu")
    assert [gpu._cell(None), gpu._cell(float("nan"), ".0f")] == ["-", "-"]
    assert [gpu._cell(0.4), gpu._cell(1234.6, ".0f"), gpu._cell(0.8754, ".3f")] == ["0.4", "1235", "0.875"]


def test_gpu_best_build_rates_are_never_in_scientific_notation(monkeypatch: pytest.MonkeyPatch) -> None:
    """s57 re-read #5: the best build's ``.3g`` printed 2345.6 img/s as 2.35e+03 (GPU builds run 841-934 img/s)."""
    gpu = _script(monkeypatch, "bench_gpu")
    assert [gpu._rate(v) for v in (2345.6, 934.2, 100.0, 12.34, 0.4)] == ["2346", "934", "100", "12.3", "0.4"]


def test_decode_megapixels_of_a_small_photo(monkeypatch: pytest.MonkeyPatch) -> None:
    decode = _script(monkeypatch, "bench_decode")
    assert [decode.megapixels(500, 500), decode.megapixels(7000, 7000), decode.megapixels(8064, 6048)] == \
        ["0.25", "49", "48.8"]
