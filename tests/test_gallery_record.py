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


def test_a_gallery_records_what_embedded_its_references_and_identify_says_when_queries_differ(tmp_path, capsys,
                                                                                                caplog):
    """Stop 51's left-over: a gallery did not record which runtime and precision embedded its references (evaluate
    said what embedded the queries). Now each writer records its setup in gallery.json (``embedded_by``), ``index
    info`` shows it, and identify and evaluate say once when they embed with another runtime or precision."""
    import json

    from _cli_support import _run

    caplog.set_level("INFO", logger="retrieval.workflows")  # a note: an INFO record the CLI shows without -v
    index, root = two_species_gallery(tmp_path, capsys)  # built with torch fp32 (ENCODER)
    entries = json.loads((index / "gallery.json").read_text()).get("embedded_by")
    assert [(e["runtime"], e["precision"], e["device"], e["by"]) for e in entries] == [
        ("torch", "fp32", "cpu", ["index build"])], entries
    assert entries[0]["cpu_kind"] and entries[0]["cpu"] and entries[0]["since"]
    photo = _photo(tmp_path / "new" / "0.png", 300)
    code, out, err = _run(capsys, "references", "add", photo, "--index", index, "--species", "Naja haje",
                          "--precision", "fp32", "-q")
    assert code == 0, (out, err)
    code, out, err = _run(capsys, "index", "info", "--index", index)
    said = json.loads(out)["embedded_by"]
    assert code == 0 and [(e["runtime"], e["precision"], e["by"]) for e in said] == [
        ("torch", "fp32", ["index build", "references add"])], said  # one setup, two writers
    query = _photo(tmp_path / "q.png", 99)
    code, out, err = _run(capsys, "identify", "--index", index, query, "-q", "--precision", "fp32")
    assert code == 0 and "embedded with" not in out + err, (out, err)  # the same setup: nothing said
    code, out, err = _run(capsys, "identify", "--index", index, query, "-q", "--precision", "bf16")
    note = ("note: the gallery's references were embedded with torch fp32 (index build, references add), these "
            "photos with torch bf16: similarities differ slightly between runtimes and precisions, so an answer near "
            "a threshold may differ from one for photos embedded like the references (docs/runtimes.md)")
    assert code == 0 and out.count(note) == 1 and "error" not in err, (out, err)
    evaluation = tmp_path / "eval"
    for i in range(2):
        _photo(evaluation / ("Naja samarensis" if i % 2 else "Natrix maura") / f"{i}.png", 200 + i)
    code, out, err = _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", evaluation,
                          "--report", tmp_path / "report", "--precision", "bf16", "-q")
    said = [r for r in caplog.records if r.getMessage() == note.removeprefix("note: ")]
    assert code == 0 and len(said) == 1 and getattr(said[0], "note", False), (out, err)
    assert note in (tmp_path / "report" / "report.md").read_text()
    code, out, err = _run(capsys, "references", "add", _photo(tmp_path / "new" / "1.png", 301), "--index", index,
                          "--species", "Naja haje", "--precision", "bf16", "-q")
    said = json.loads(_run(capsys, "index", "info", "--index", index)[1])["embedded_by"]
    assert code == 0 and [(e["precision"], e["by"]) for e in said] == [
        ("fp32", ["index build", "references add"]), ("bf16", ["references add"])], said  # per setup, as it came


def test_a_server_records_its_adds_setup_and_says_once_at_start_that_it_embeds_otherwise(tmp_path, capsys, caplog):
    import json

    index, _ = two_species_gallery(tmp_path, capsys)  # torch fp32
    caplog.set_level("WARNING", logger="api.service")
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    photo = _photo(tmp_path / "up.png", 700).read_bytes()
    with TestClient(create_app(Settings(index=str(index), api_keys="k", precision="bf16"))) as client:
        for _ in range(2):
            client.post("/v1/identify", files=[("images", ("q.png", photo, "image/png"))])
        added = client.post("/v1/species/Naja haje/references", files=[("images", ("up.png", photo, "image/png"))],
                            headers={"X-API-Key": "k"})
        assert added.status_code == 201, added.text
    said = [r.getMessage() for r in caplog.records if "references were embedded with" in r.getMessage()]
    assert said == ["the gallery's references were embedded with torch fp32 (index build), this server's photos "
                    "with torch bf16: similarities differ slightly between runtimes and precisions, so an answer "
                    "near a threshold may differ from one for photos embedded like the references "
                    "(docs/runtimes.md)"], said
    entries = json.loads((index / "gallery.json").read_text())["embedded_by"]
    assert [(e["precision"], e["by"]) for e in entries] == [("fp32", ["index build"]), ("bf16", ["API add"])]


SYNTHETIC = {"spec": "test:synthetic", "fingerprint": "test:synthetic#abc", "dim": 16}


def test_a_record_written_while_a_gallery_opens_is_read_at_the_next_look(tmp_path, monkeypatch):
    """gallery.json is stamped before it is read: another process's write between the read and the stamp was taken
    as read, and a server never saw it until the next write."""
    import index.gallery as gallery_module
    from index.atomic import write_json_atomic

    root = tmp_path / "g"
    Gallery.create(root, SYNTHETIC)
    read = gallery_module.read_gallery_info

    def read_then_another_process_writes(where):
        info = read(where)
        write_json_atomic(root / "gallery.json", {**info, "checklist": "moroccan"})
        return info

    monkeypatch.setattr(gallery_module, "read_gallery_info", read_then_another_process_writes)
    opened = Gallery.open(root)
    monkeypatch.undo()
    assert "checklist" not in opened.info
    opened.refresh(force=True)
    assert opened.info["checklist"] == "moroccan"


def test_an_index_asked_for_explicitly_is_recorded_beside_another_process_entries(tmp_path):
    """Gallery.create on a gallery with another index config records it through update_info: gallery.json and the
    open gallery both say it, and an entry another process recorded is kept."""
    import json
    from dataclasses import asdict

    from index.vectors import VectorIndexConfig

    root = tmp_path / "g"
    Gallery.create(root, SYNTHETIC).record_info("checklist", "moroccan")
    config = VectorIndexConfig(approx_threshold=50)
    gallery = Gallery.create(root, SYNTHETIC, index_config=config)
    written = json.loads((root / "gallery.json").read_text())
    assert written["index"] == gallery.info["index"] == asdict(config)
    assert written["checklist"] == gallery.info["checklist"] == "moroccan"
    assert Gallery.open(root).index_config == config


def test_index_info_reads_the_species_and_the_text_prior_once(tmp_path, capsys, monkeypatch):
    """Re-read w3-design #6: gallery_info read text_prior.json twice (venom advice's taxa, the checklist's species)
    and listed the gallery's species three times (a store scan each); now once each, and both blocks still count
    the prior: its venomous Naja haje keeps the advice's note and is nameable by the checklist's count."""
    import json

    import retrieval.workflows as workflows
    from retrieval.advice import record_checklist

    index, _ = two_species_gallery(tmp_path, capsys)
    gallery = Gallery.open(index)
    record_checklist(gallery, "moroccan")
    (index / "text_prior.json").write_text(json.dumps({"species": [
        {"species": "Naja haje", "genus": "Naja", "family": "Elapidae", "common_name": None, "venomous": True}]}))
    calls = {"species": 0, "prior": 0}
    species, taxa = Gallery.species, workflows.text_prior_taxa

    def counted_species(self):
        calls["species"] += 1
        return species(self)

    def counted_taxa(root):
        calls["prior"] += 1
        return taxa(root)

    monkeypatch.setattr(Gallery, "species", counted_species)
    monkeypatch.setattr(workflows, "text_prior_taxa", counted_taxa)
    info = workflows.gallery_info(gallery)
    assert calls == {"species": 1, "prior": 1}, calls
    assert "Naja haje" not in info["checklist"]["missing"] and "Naja haje" in info["checklist"]["venomous_text_only"]
