"""What a gallery's record (``gallery.json``) says of it while it is open: a checklist another process records
after a server started is seen without a restart (stop 52). Tiny random ``timm:test_vit@random`` encoder and
random photos: fast, no shared assets."""

from __future__ import annotations

from _cli_support import _photo, two_species_gallery

from index.gallery import Gallery


def _client(index):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    # refresh_s 0: every request looks at the store (and the folder's record) again
    return TestClient(create_app(Settings(index=str(index), api_keys="k", precision="fp32", refresh_s=0.0)))


def test_a_server_says_a_checklist_recorded_after_it_started_without_a_restart(tmp_path, capsys):
    """Stop 51 left it documented: a server started before ``index build --dataset moroccan`` recorded the
    checklist in gallery.json showed its note only once restarted. Now each look at the store reads gallery.json
    again when it was written since (a stat): the note appears at the next answer, whether or not the build
    committed any row (a re-run that adds nothing records the checklist too)."""
    from retrieval.advice import record_checklist

    index, _ = two_species_gallery(tmp_path, capsys)
    query = _photo(tmp_path / "q.png", 99).read_bytes()
    files = [("images", ("q.png", query, "image/png"))]
    with _client(index) as client:
        before = client.post("/v1/identify", files=files)
        assert before.status_code == 200 and not any("checklist" in n for n in before.json()["notes"]), before.text
        record_checklist(Gallery.open(index), "moroccan")  # another process: no row committed
        after = client.post("/v1/identify", files=files).json()["notes"]
        assert any(n.startswith("this gallery cannot name 7 of the 7 medically important venomous species of the "
                                "moroccan checklist") for n in after), after
        gallery = client.app.state.service.identifier.gallery
        assert gallery.info["encoder"] is not None and gallery.info["checklist"] == "moroccan"
