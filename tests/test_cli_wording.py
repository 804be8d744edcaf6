"""What ``evaluate`` and ``references add`` say in the cases a new user's walkthrough found unclear: a folder named
by a gallery species' common name, a set none of whose species the gallery holds, the costly error on the terminal,
a species that was not created, an argument with no photo, a species with one photo.

Galleries here use the tiny random ``timm:test_vit@random`` encoder on random photos: fast, no shared assets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from _cli_support import _photo, _run, folder_gallery, two_species_gallery

from api.cli import main


@pytest.fixture
def built(tmp_path, capsys) -> tuple[Path, Path]:
    """(gallery, its photo folder): 6 random photos of two species, one of them with a common name."""
    return two_species_gallery(tmp_path, capsys)


def _evaluate(capsys, index: Path, root: Path, report: Path) -> tuple[int, str, str]:
    """``evaluate`` keeping duplicates: random photos are near-copies of each other to a random encoder."""
    return _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", root, "--report", report,
                "--keep-duplicates", "-q")


def test_evaluate_names_the_species_whose_common_name_a_folder_has(built, tmp_path, capsys, caplog):
    index, _ = built
    val = tmp_path / "val"
    for i in range(2):
        _photo(val / "Natrix maura" / f"{i}.png", 50 + i)
        _photo(val / "samar cobra" / f"{i}.png", 60 + i)
    with caplog.at_level(logging.WARNING, logger="retrieval.workflows"):
        code, out, err = _evaluate(capsys, index, val, tmp_path / "report")
    assert code == 0, err
    assert "1 evaluated species have no reference in the gallery, so the 2 photos of them count as misses whatever " \
        "the settings: samar cobra (2 photos; the common name of Naja samarensis)" in caplog.text
    # the costly error is on the terminal, beside venomous recall (#12)
    (line,) = [x for x in out.splitlines() if x.startswith("knn ")]
    assert "venomous recall n/a  venomous called harmless n/a  coverage" in line, line


def test_evaluate_refuses_a_set_none_of_whose_species_the_gallery_holds(built, tmp_path, capsys, monkeypatch):
    """One line, exit 2, before the model loads (so before any photo is embedded), naming --open-set; no report."""
    import retrieval.workflows as workflows

    index, _ = built
    val = tmp_path / "val"
    _photo(val / "Samar Cobra" / "a.png", 70)
    _photo(val / "Natrix mauraa" / "b.png", 71)
    monkeypatch.setattr(workflows, "open_identifier", lambda *a, **kw: pytest.fail("model loaded"))
    code, out, err = _evaluate(capsys, index, val, tmp_path / "report")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, (out, err)
    assert (f"speciesid: error: none of the 2 species under {val} has a reference in gallery {index}: Natrix mauraa "
            "(1 photo; closest: Natrix maura); Samar Cobra (1 photo; the common name of Naja samarensis); name the "
            f"folders as the gallery's species ('speciesid species list --index {index}' lists them), or evaluate "
            "another gallery; to measure how unknown species are answered (abstentions, venomous called harmless), "
            "pass --open-set") in err, err
    assert not (tmp_path / "report").exists()


def test_evaluate_open_set_runs_on_species_the_gallery_does_not_hold(built, tmp_path, capsys, caplog):
    """--open-set: the same set is evaluated (coverage, venomous called harmless), said in the notes, not warned."""
    index, _ = built
    val = tmp_path / "val"
    _photo(val / "Naja philippinensis" / "a.png", 70)
    _photo(val / "Bungarus fasciatus" / "b.png", 71)
    with caplog.at_level(logging.WARNING):
        code, out, err = _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", val, "--report",
                              tmp_path / "report", "--keep-duplicates", "--open-set", "-q")
    assert code == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("knn ")]
    assert "venomous called harmless" in line and "coverage" in line, line
    assert "have no reference in the gallery" not in caplog.text, caplog.text
    report = (tmp_path / "report" / "report.md").read_text()
    assert "open set: 2 evaluated species (2 photos) have no reference in the gallery: their answers measure " \
        "abstention (coverage) and venomous called harmless" in report, report


def test_evaluate_help_names_open_set(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--open-set evaluate a set of species the gallery may hold none of" in out, out


def test_references_add_says_not_created_when_no_photo_of_a_new_species_was_stored(built, capsys):
    index, root = built
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Fooia barus",
                          root / "Natrix maura" / "0.png", "-q")
    assert code == 1 and out.startswith("Fooia barus (not created: no photo added): added 0, "), (out, err)
    assert "not added: " in out and "(new species)" not in out
    assert "note: nothing was stored: every photo is a reference already (the duplicates), so 'Fooia barus' is not " \
        "in the gallery" in out, out  # the same note as the API's (exists: false)
    code, out, _ = _run(capsys, "species", "list", "--index", index)
    assert "Fooia barus" not in out


def test_references_add_of_an_argument_with_no_photo_says_so_once(built, tmp_path, capsys):
    index, _ = built
    (tmp_path / "emptydir").mkdir()
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Natrix maura",
                          tmp_path / "emptydir")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"speciesid: error: no photos to read: {tmp_path / 'emptydir'}: folder holds no photos"), err


def test_references_add_of_a_species_with_one_photo_says_probe_train_leaves_it_out(built, tmp_path, capsys):
    index, _ = built
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Dendrelaphis pictus",
                          _photo(tmp_path / "one.png", 80), "-q")
    assert code == 0, err
    assert "note: Dendrelaphis pictus has 1 reference photo; 'speciesid probe train' needs 2 that are not " \
        "near-copies of each other, and leaves it out until then (the kNN vote alone answers it): add another photo " \
        "of it" in out, out
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Dendrelaphis pictus",
                          _photo(tmp_path / "two.png", 81), "-q")
    # the random encoder finds two.png a near-copy of one.png: still one photo for probe train, which counts
    # near-copies once (the few-photos note says so), and the near-copy note
    assert code == 0 and "(existing species)" in out, (out, err)
    few, near = [line for line in out.splitlines() if line.startswith("note: ")]
    assert few.startswith("note: Dendrelaphis pictus has 2 reference photos, 1 counting near-copies once; 'speciesid "
                          "probe train' needs 2 that are not near-copies of each other"), out
    assert near.startswith(f"note: {tmp_path / 'two.png'} (reference ") and " is a near-copy of reference " in near \
        and "of Dendrelaphis pictus (one.png, cosine " in near and "'probe train' counts near-copies once" in near, out


def test_references_add_help_gives_the_near_copy_cosine_of_the_clean_rule(capsys, monkeypatch):
    """Re-read finding: the help said "cosine >= 0.95" in its own words; it is the clean rule's threshold."""
    import retrieval.findings

    monkeypatch.setattr(retrieval.findings, "DEFAULT_DUP_THRESHOLD", 0.97)
    with pytest.raises(SystemExit) as exited:
        main(["references", "add", "--help"])
    assert exited.value.code == 0
    assert "re-encoded or re-cropped, cosine >= 0.97) is added" in " ".join(capsys.readouterr().out.split())


def test_references_add_prints_its_ids_as_runs_not_one_by_one(built, tmp_path, capsys):
    import re

    index, _ = built
    photos = [_photo(tmp_path / f"run{i}.png", 90 + i) for i in range(3)]
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Natrix maura", *photos, "-q")
    assert code == 0, err
    (first, last) = map(int, re.findall(r"^ids: (\d+)-(\d+)$", out, re.M)[0])
    assert last - first == 2, out


def test_id_runs_joins_consecutive_ids_and_counts_past_the_runs_shown():
    from api.cli._common import ID_RUNS_SHOWN, id_runs

    assert id_runs(range(1668, 2228)) == "1668-2227"
    assert id_runs([9, 3, 7, 8, 8]) == "3, 7-9"
    scattered = list(range(0, 2 * (ID_RUNS_SHOWN + 5), 2))  # 25 runs of one id each
    assert id_runs(scattered) == ", ".join(map(str, scattered[:ID_RUNS_SHOWN])) + ", ... (5 more)"


def _logging_run(verbose: int, lines: str, *argv: str) -> str:
    """stderr of a fresh process with the CLI's logging (``setup_logging(verbose)``) that runs ``lines``
    (``logging`` and ``sys`` imported; ``sys.argv[2:]`` is ``argv``). A fresh process: pytest's own log capture
    keeps the CLI from installing its handler here."""
    import subprocess
    import sys

    script = "import logging, sys\nfrom api.cli import setup_logging\nsetup_logging(int(sys.argv[1]))\n" + lines
    run = subprocess.run([sys.executable, "-c", script, str(verbose), *argv], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    return run.stderr


def _logging_lines(verbose: int, lines: str) -> list[str]:
    """:func:`_logging_run`'s stderr, a list of its lines."""
    return _logging_run(verbose, lines).splitlines()


def test_log_lines_are_in_the_command_lines_style_and_module_names_only_with_verbose(tmp_path):
    """Walk s50 #4: the CLI printed library warnings as ``WARNING retrieval.pipeline: ...`` beside its own
    ``speciesid: ...`` lines, and the one-time export as ``WARNING retrieval.runtimes.select: speciesid: preparing
    ...``. Now ``speciesid: warning: ...``, a note (INFO, ``extra={"note": True}``) as a plain ``speciesid: ...``
    line, other INFO records hidden; -v names each line's level and module. A fresh process: pytest's own log
    capture keeps the CLI from installing its handler here."""
    lines = (
        "logging.getLogger('retrieval.pipeline').warning('interrupted: committing')\n"
        "logging.getLogger('index.photos').error('cannot read')\n"
        "logging.getLogger('retrieval.runtimes.select').info('preparing X for this CPU', extra={'note': True})\n"
        "logging.getLogger('retrieval.workflows').info('a detail')\n"
        "logging.getLogger('retrieval.workflows').debug('a debug detail')\n"
    )

    assert _logging_lines(0, lines) == ["speciesid: warning: interrupted: committing",
                                        "speciesid: error: cannot read", "speciesid: preparing X for this CPU"]
    assert _logging_lines(1, lines) == ["WARNING retrieval.pipeline: interrupted: committing",
                                        "ERROR index.photos: cannot read",
                                        "INFO retrieval.runtimes.select: preparing X for this CPU",
                                        "INFO retrieval.workflows: a detail"]
    assert _logging_lines(2, lines)[-1] == "DEBUG retrieval.workflows: a debug detail"


def test_the_one_time_export_is_a_note_not_a_warning(tmp_path, monkeypatch, caplog):
    """The first use's export line is an INFO record marked as a note (shown without -v), with no prefix of its
    own: the CLI's format adds ``speciesid:``."""
    import retrieval.runtimes.export as export
    from retrieval.runtimes import select

    monkeypatch.setenv("SPECIESID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: None)

    class Ref:
        spec = "timm:some-model"

        def image_module(self) -> None:
            return None

    with caplog.at_level(logging.DEBUG, logger="retrieval.runtimes.select"):
        select._export_onnx_once(Ref(), None)
    said = [r for r in caplog.records if "for this CPU" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO and said[0].note is True
    assert said[0].getMessage().startswith("preparing timm:some-model for this CPU (once; cached under ")


def test_debug_logging_redacts_signed_headers_and_keeps_storage_libraries_quiet_under_vv():
    """Walk s56-logs #1: -vv (what every unexpected error says to rerun with) set the root logger to DEBUG, so
    botocore's dump of each signed request (its ``Authorization`` header, ``X-Amz-Security-Token``) reached stderr.
    Now the storage libraries stay at INFO under -vv (-vvv shows their DEBUG), and every line the CLI's handler
    writes has its credentials and signatures redacted, whichever level and logger. A fresh process: pytest's own
    log capture keeps the CLI from installing its handler here."""
    dump = ("Sending http request: <AWSPreparedRequest stream_output=False, method=PUT, url=http://127.0.0.1:1/b/g, "
            "headers={'X-Amz-Security-Token': b'SESSIONTOKENyyy888', 'Authorization': b'AWS4-HMAC-SHA256 "
            "Credential=AKIALOGSWALKID/20261207/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, "
            "Signature=0123456789abcdef0123456789abcdef'}>")
    lines = (
        "logging.getLogger('botocore.endpoint').debug('%s', sys.argv[2])\n"
        "logging.getLogger('botocore.auth').debug('CanonicalRequest:\\nx-amz-security-token:SESSIONTOKENyyy888')\n"
        "logging.getLogger('botocore.auth').debug('Signature:\\n%s', 'fedcba9876543210fedcba9876543210')\n"
        "logging.getLogger('urllib3.connectionpool').debug('GET /b/k?X-Amz-Signature=abcdef0123456789&"
        "X-Amz-Credential=AKIAX%%2F1 HTTP/1.1')\n"
        "logging.getLogger('api.server').warning('env AWS_SECRET_ACCESS_KEY=AWSSECRETzzz999, key X-API-Key: "
        "s3cretKEY-alpha-123456, Authorization: Bearer TOPSECRETBEARER')\n"
        "logging.getLogger('retrieval.workflows').debug('a debug detail')\n"
    )

    def err(verbose: int) -> str:
        return _logging_run(verbose, lines, dump)

    for verbose in (0, 2, 3):
        said = err(verbose)
        for secret in ("SESSIONTOKENyyy888", "AKIALOGSWALKID", "0123456789abcdef0123", "fedcba9876543210",
                       "abcdef0123456789", "AKIAX", "AWSSECRETzzz999", "s3cretKEY", "TOPSECRETBEARER"):
            assert secret not in said, (verbose, secret, said)
        assert "AWS_SECRET_ACCESS_KEY=[redacted]" in said and "X-API-Key: [redacted]" in said
    vv = err(2)
    assert "botocore" not in vv and "urllib3" not in vv  # -vv: the storage libraries' DEBUG is not shown
    assert "DEBUG retrieval.workflows: a debug detail" in vv
    vvv = err(3)
    assert "DEBUG botocore.endpoint: Sending http request" in vvv
    assert "'X-Amz-Security-Token': b'[redacted]'" in vvv and "'Authorization': b'[redacted]'" in vvv
    assert "x-amz-security-token:[redacted]" in vvv and "Signature:\n  [redacted]" in vvv  # its lines indented (#12)
    assert "X-Amz-Signature=[redacted]&X-Amz-Credential=[redacted] HTTP/1.1" in vvv


def test_progress_bars_only_when_stderr_is_a_terminal(monkeypatch, tmp_path):
    """Walk s56-logs #5 (finding 11): the bars' redraws went to stderr when it was a file or a CI log (a one-hour
    build: ~0.8 MB of them); only -q turned them off. Now a command draws them only on a terminal, and never with
    -q (here: what ``index sweep-uploads`` hands its workflow)."""
    import io

    import retrieval.workflows as workflows
    from api.cli import main

    class _Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    seen = []

    def sweep(index, *, progress, **kwargs):
        seen.append(progress)
        raise ValueError("stop here")

    monkeypatch.setattr(workflows, "sweep_uploads", sweep)
    for stderr, quiet, bars in ((io.StringIO(), [], False), (_Tty(), [], True), (_Tty(), ["-q"], False)):
        monkeypatch.setattr("sys.stderr", stderr)
        assert main(["index", "sweep-uploads", "--index", str(tmp_path), *quiet]) == 2
        assert seen.pop() is bars and "stop here" in stderr.getvalue()


def _uvicorn_logging_run(verbose: int, lines: str) -> tuple[str, str]:
    """stdout and stderr of a fresh process with the CLI's logging (``setup_logging(verbose)``) and serve's uvicorn
    config (``UVICORN_LOGGING``, at serve's level for ``verbose``), that runs ``lines`` (``logging`` imported). A
    fresh process: pytest's own log capture keeps the CLI from installing its handler here."""
    import subprocess
    import sys

    script = (
        "import logging, sys\n"
        "import uvicorn\n"
        "from api.cli import setup_logging\n"
        "from api.cli.serve import UVICORN_LOGGING\n"
        "verbose = int(sys.argv[1])\n"
        "setup_logging(verbose)\n"
        "uvicorn.Config(lambda scope, receive, send: None, log_config=UVICORN_LOGGING,\n"
        "               log_level='info' if verbose else 'warning')\n"
        + lines
    )
    run = subprocess.run([sys.executable, "-c", script, str(verbose)], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    return run.stdout, run.stderr


def test_serves_access_log_goes_to_stderr_in_the_clis_format_only_with_verbose():
    """Walk s56-logs #6: serve -v wrote uvicorn's access lines to stdout in uvicorn's format (``INFO:     127.0.0.1
    ...``), everything else to stderr in speciesid's. Now uvicorn's loggers go through the CLI's handler: stderr,
    ``LEVEL module: ...``, secrets redacted; the access log only with -v, as before."""
    lines = ("logging.getLogger('uvicorn.error').info('Started server process [%d]', 42)\n"
             "logging.getLogger('uvicorn.access').info('%s - \"%s %s HTTP/%s\" %d', '127.0.0.1:5', 'POST',\n"
             "                                         '/v1/identify?k=1&X-API-Key=s3cretKEY-alpha', '1.1', 200)\n"
             "logging.getLogger('uvicorn.error').warning('Invalid HTTP request received.')\n")
    out, err = _uvicorn_logging_run(1, lines)
    assert out == ""
    assert err.splitlines() == ["INFO uvicorn.error: Started server process [42]",
                                'INFO uvicorn.access: 127.0.0.1:5 - "POST /v1/identify?k=1&X-API-Key=[redacted] '
                                'HTTP/1.1" 200',
                                "WARNING uvicorn.error: Invalid HTTP request received."], err
    out, err = _uvicorn_logging_run(0, lines)
    assert out == "" and err.splitlines() == ["speciesid: warning: Invalid HTTP request received."], err


def test_a_stops_cut_is_not_uvicorns_error_line_and_other_errors_stay():
    """Walk s56-logs #7: a planned stop that cut a slow upload logged uvicorn's ``ERROR: Cancel 1 running task(s),
    timeout graceful shutdown exceeded`` at the default level, beside the server's own warnings that say it (an
    "alert on ERROR" rule fires on every rolling deploy). Now that one record is INFO: shown with -v only. Any other
    error of uvicorn's is still an error."""
    lines = ("logging.getLogger('uvicorn.error').error('Cancel %s running task(s), timeout graceful shutdown "
             "exceeded', 1)\n"
             "logging.getLogger('uvicorn.error').error('Exception in ASGI application')\n")
    out, err = _uvicorn_logging_run(0, lines)
    assert out == "" and err.splitlines() == ["speciesid: error: Exception in ASGI application"], err
    out, err = _uvicorn_logging_run(1, lines)
    assert err.splitlines() == ["INFO uvicorn.error: Cancel 1 running task(s), timeout graceful shutdown exceeded",
                                "ERROR uvicorn.error: Exception in ASGI application"], err


def test_verbose_keeps_faiss_loaders_chatter_out_and_a_record_of_several_lines_is_one_line_at_the_margin():
    """Walk s56-logs #12: -v began with faiss' loader's INFO "Could not load library with AVX512 support due to:" and,
    on a line of its own with no level or module, its ModuleNotFoundError: reading like a failure, and breaking
    one-record-per-line parsing. Now faiss.loader stays at WARNING under -v (its INFO shown with -vv), and a record's
    further lines (its message's own, a traceback) are indented: a line at the margin begins a record."""
    lines = (
        "logging.getLogger('faiss.loader').info('Could not load library with AVX512 support due to:\\n'\n"
        "                                       'ModuleNotFoundError(\"No module named faiss.swigfaiss_avx512\")')\n"
        "logging.getLogger('retrieval.workflows').info('first line\\nsecond line')\n"
        "try:\n"
        "    raise ValueError('boom')\n"
        "except ValueError:\n"
        "    logging.getLogger('index.gallery').warning('it failed', exc_info=True)\n"
    )

    v = _logging_lines(1, lines)
    assert v[:3] == ["INFO retrieval.workflows: first line", "  second line", "WARNING index.gallery: it failed"], v
    assert v[3] == "  Traceback (most recent call last):" and v[-1] == "  ValueError: boom", v
    assert all(line.startswith(("INFO ", "WARNING ", "  ")) for line in v), v  # faiss' loader: not at all
    vv = _logging_lines(2, lines)
    assert vv[:2] == ["INFO faiss.loader: Could not load library with AVX512 support due to:",
                      '  ModuleNotFoundError("No module named faiss.swigfaiss_avx512")'], vv


def test_redaction_covers_aws_camelcase_credentials_of_sts_and_sso_answers():
    """Re-read 4 #1: -vvv logs botocore's STS / SSO answers and requests (an assumed role on EKS, an SSO profile):
    ``<SecretAccessKey>`` elements, ``"SecretAccessKey": "..."``, ``'WebIdentityToken': '...'``, which the
    snake_case-only names let through. Now those values are redacted too; the AccessKeyId (no secret) is kept."""
    from api.cli import redacted

    cases = {
        "<Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>wJalrX</SecretAccessKey>"
        "<SessionToken>IQoJb3</SessionToken></Credentials>":
            "<Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>[redacted]</SecretAccessKey>"
            "<SessionToken>[redacted]</SessionToken></Credentials>",
        "<token>abc</token> <WebIdentityToken>eyJ.p.s</WebIdentityToken>":
            "<token>[redacted]</token> <WebIdentityToken>[redacted]</WebIdentityToken>",
        "{'Action': 'AssumeRoleWithWebIdentity', 'WebIdentityToken': 'eyJhbGci.payload.sig'}":
            "{'Action': 'AssumeRoleWithWebIdentity', 'WebIdentityToken': '[redacted]'}",
        '{"SecretAccessKey": "wJal", "AccessKeyId": "ASIA2"}':
            '{"SecretAccessKey": "[redacted]", "AccessKeyId": "ASIA2"}',
        "SecretAccessKey: ABC": "SecretAccessKey: [redacted]",
        "<Credentials SecretAccessKey=wJal SessionToken=IQo>":
            "<Credentials SecretAccessKey=[redacted] SessionToken=[redacted]>",
        "{'aws_session_token': 'SESS', 'aws_access_key_id': 'AKIA'}":
            "{'aws_session_token': '[redacted]', 'aws_access_key_id': 'AKIA'}",
        '{"accessToken": "ssoTOK", "Token": "ct"}': '{"accessToken": "[redacted]", "Token": "[redacted]"}',
    }
    for text, shown in cases.items():
        assert redacted(text) == shown, text
        assert redacted(shown) == shown  # a second pass changes nothing


def test_redaction_formats_first_hides_every_key_of_a_list_and_leaves_harmless_text(capsys):
    """Re-read 4 #3, #4, #7, #8, #9: a template ``api_key=%s`` was redacted alone, lost its ``%s``, and logging's
    error report printed the raw argument; only the first of several API keys was hidden; "bearer of bad news"
    and ``session_token=None`` were mangled; a header tuple list kept its values; ``stack_info`` was not redacted.
    Now the formatted message is redacted, a key list whole, only token-like Bearer values, tuples too."""
    import io

    from api.cli import CliLogFormat, RedactSecrets, redacted

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(CliLogFormat(2))
    handler.addFilter(RedactSecrets())
    log = logging.getLogger("tests.redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("api_key=%s", "SECRETKEY")
        log.warning("x-amz-security-token:%s and %s", "TOKSPLIT", "a\nspeciesid: fake")
        log.warning("Authorization: %s", "Bearer eyJhbGciOiJI.body.sig")
    finally:
        log.removeHandler(handler)
    said, err = stream.getvalue(), capsys.readouterr().err
    assert "Logging error" not in err and "SECRETKEY" not in err + said and "TOKSPLIT" not in said, (said, err)
    assert said.splitlines()[:2] == [
        "WARNING tests.redaction: api_key=[redacted]",
        "WARNING tests.redaction: x-amz-security-token:[redacted] and a\\nspeciesid: fake"]  # still escaped
    assert "eyJhbGciOiJI" not in said

    cases = {
        "SPECIESID_API_KEYS=k1,k2,k3 set": "SPECIESID_API_KEYS=[redacted] set",
        "{'SPECIESID_API_KEYS': 'k1,k2;}]'}": "{'SPECIESID_API_KEYS': '[redacted]'}",
        "api_keys=['k1', 'k2']": "api_keys=[redacted]",
        "Settings(api_keys=('k1', 'k2'))": "Settings(api_keys=[redacted])",
        "bearer of bad news": "bearer of bad news",
        "session_token=None, {'session_token': None, 'api_key': ''}":
            "session_token=None, {'session_token': None, 'api_key': ''}",
        "[(b'x-api-key', b'secret'), (b'authorization', b'AWS4-HMAC-SHA256 Credential=A, Signature=0123')]":
            "[(b'x-api-key', b'[redacted]'), (b'authorization', b'[redacted]')]",
        "[('Authorization', 'Basic dXNlcjpw')]": "[('Authorization', '[redacted]')]",
        "Authorization: Bearer eyJhbGciOi.x.y": "Authorization: [redacted]",
    }
    for text, shown in cases.items():
        assert redacted(text) == shown, text
        assert redacted(shown) == shown

    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "here", None, None, sinfo="api_key=STACKKEY")
    RedactSecrets().filter(record)
    assert record.stack_info == "api_key=[redacted]"


def test_probe_trains_selection_line_says_why_the_default_unknown_threshold_is_kept():
    """Walk s57, finding 3: a threshold reaching 95 % on too few photos is not taken; the line said "precision
    1.000 at coverage 0.200" (2 photos) and the gallery answered at 0.42. Now it says the default is kept, and why."""
    from api.cli.probe import _selection_line

    base = {"queries": 10.0, "knn_top1": 0.3, "probe_top1": 0.3, "blend_top1": 0.3}
    few = _selection_line({**base, "unknown_precision": float("nan"), "unknown_coverage": 0.0,
                           "unknown_answered": 2.0, "unknown_min_answered": 20.0}, "probe")
    assert few == ("selection top-1 (10 queries): kNN 0.300, probe 0.300, blend 0.300; the unknown threshold "
                   "reaching 95% precision here answers only 2 photos: too few to trust (at least 20), the default "
                   "is kept")
    none = _selection_line({**base, "unknown_precision": None, "unknown_coverage": 0.0, "unknown_answered": 0.0},
                           "probe")
    assert none.endswith("; no unknown threshold reaches 95% precision here: the default is kept")
    taken = _selection_line({**base, "unknown_precision": 0.952, "unknown_coverage": 0.639}, "probe")
    assert taken.endswith("; unknown threshold gives precision 0.952 at coverage 0.639")


def test_probe_train_on_one_species_says_what_to_do(tmp_path, capsys):
    """Walk s57, finding 11: the refusal gave no next step."""
    index = folder_gallery(tmp_path, capsys, ("Natrix maura",), 4)
    code, _, err = _run(capsys, "probe", "train", "--index", index, "-q")
    assert code != 0
    assert ("a probe needs at least 2 species with reference photos, got 1 (Natrix maura): add references of another "
            "species ('speciesid references add'); without a probe 'speciesid identify --method knn' answers with "
            "the kNN vote alone") in err, err


def test_deleting_every_reference_warns_and_identify_says_they_were_deleted(built, capsys, caplog):
    """Walk s57, finding 11: deleting the last reference said nothing, and identify then said "none was added"."""
    index, photos = built
    with caplog.at_level(logging.WARNING, logger="retrieval.workflows"):
        code, out, err = _run(capsys, "references", "delete", "--index", index, *range(1, 7))
    assert code == 0 and "deleted 6 of 6 references" in out, err
    assert (f"gallery {index} holds no searchable reference now: identify and probe train refuse it until photos are "
            "added ('speciesid references add' or 'speciesid index build')") in caplog.text
    caplog.clear()
    code, _, err = _run(capsys, "identify", "--index", index, next(photos.rglob("*.png")), "-q")
    assert code != 0
    assert (f"gallery {index} has no searchable references: all were deleted: add photos with 'speciesid index "
            "build' or 'speciesid references add'") in err, err
    with caplog.at_level(logging.WARNING, logger="retrieval.workflows"):  # nothing deleted: nothing new to say
        code, out, err = _run(capsys, "references", "delete", "--index", index, 1)
    assert code == 1 and "holds no searchable reference now" not in caplog.text


def _report_notes(report: Path) -> list[str]:
    return json.loads((report / "report.json").read_text(encoding="utf-8"))["notes"]


def test_evaluate_on_a_small_gallery_says_which_figures_it_makes_trivial(built, tmp_path, capsys):
    """Walk s57, finding 8: on a gallery of 5 species or fewer top-5 is right by construction, and a species with
    no reference got a ROC-AUC of 0.5 counted in the macro; the report said neither."""
    index, _ = built
    val = tmp_path / "val"
    for i in range(2):
        _photo(val / "Natrix maura" / f"{i}.png", 70 + i)
        _photo(val / "Naja haje" / f"{i}.png", 80 + i)
    code, _, err = _evaluate(capsys, index, val, tmp_path / "report")
    assert code == 0, err
    notes = _report_notes(tmp_path / "report")
    assert ("note: the gallery holds 2 species: every answer lists them all, so top-5 is trivially right on their "
            "photos") in notes
    assert ("note: ROC-AUC (per species and macro) leaves out the 1 evaluated species with no reference in the "
            "gallery (Naja haje): no answer scores them, so theirs would be 0.5 by construction") in notes
    result = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))["results"]["knn"]
    assert "Naja haje" not in result["roc_auc"] and result["roc_auc_unscored"] == ["Naja haje"]


def test_evaluate_on_a_one_species_one_photo_gallery_says_top1_cannot_be_wrong(tmp_path, capsys):
    index = folder_gallery(tmp_path, capsys, ("Natrix maura",), 1)
    val = tmp_path / "val"
    for i in range(2):
        _photo(val / "Natrix maura" / f"{i}.png", 90 + i)
    code, _, err = _evaluate(capsys, index, val, tmp_path / "report")
    assert code == 0, err
    notes = _report_notes(tmp_path / "report")
    assert ("note: the gallery holds one species (Natrix maura): every answer names it, so top-1 cannot be wrong "
            "on its photos, and the figures say nothing of telling species apart; add references of other "
            "species") in notes
    assert ("note: the gallery holds 1 reference photo: too few to measure how unlike every reference a photo may "
            "be, so no answer is UNKNOWN for that and coverage counts photos of anything; add reference photos (from "
            "2, the gallery measures that threshold)") in notes
    assert not any("top-5 is trivially" in n for n in notes)  # the one-species note says more
