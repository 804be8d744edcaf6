"""The command line and the server ask for the same device, runtime and precision on one machine (the same
variables, the same options): so a photo gets the same figures in the terminal and on the page (docs/runtimes.md,
"The command line and the server")."""

from __future__ import annotations

import argparse

import pytest

#: A command line of every command that opens a gallery's encoder with --device, --runtime and --precision.
COMMANDS = {
    ("index", "build"): ["index", "build", "--dataset", "folder", "--root", "r", "--index", "g"],
    ("identify",): ["identify", "--index", "g", "photo.jpg"],
    ("search",): ["search", "--index", "g", "photo.jpg"],
    ("references", "add"): ["references", "add", "--index", "g", "--species", "Naja haje", "photo.jpg"],
    ("probe", "train"): ["probe", "train", "--index", "g"],
    ("probe", "import"): ["probe", "import", "--index", "g", "--from", "other"],
    ("evaluate",): ["evaluate", "--index", "g", "--dataset", "folder", "--root", "r"],
    ("clean",): ["clean"],
}
RUN_VARIABLES = ("SPECIESID_DEVICE", "SPECIESID_RUNTIME", "SPECIESID_PRECISION")


def _run(config) -> tuple:
    """(device, runtime, precision) as the encoder's opening takes them (an unset runtime: its variable, else
    auto)."""
    from retrieval.encoders import resolve_runtime

    return config.device, resolve_runtime(config.runtime), config.precision


def _commands_with_runtime(parser: argparse.ArgumentParser, path: tuple = ()) -> list[tuple]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands_with_runtime(sub, (*path, name))
    if any(a.dest == "runtime" for a in parser._actions):
        found.append(path)
    return found


def test_every_command_with_a_runtime_is_checked_here():
    from api.cli import build_parser

    assert sorted(_commands_with_runtime(build_parser())) == sorted([*COMMANDS, ("serve",)])


@pytest.mark.parametrize("env", [
    {},
    {"SPECIESID_PRECISION": "bf16"},
    {"SPECIESID_DEVICE": "cpu", "SPECIESID_RUNTIME": "openvino", "SPECIESID_PRECISION": "fp32"},
    {"SPECIESID_RUNTIME": "onnx", "SPECIESID_PRECISION": "int8"},
], ids=["nothing set", "precision", "all three", "runtime and precision"])
@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_the_command_line_and_the_server_ask_for_the_same_run(command, env, monkeypatch, tmp_path):
    """Under the same variables, each command's encoder options equal the server's (before, the command line read
    SPECIESID_RUNTIME alone: the server ran bf16 under SPECIESID_PRECISION=bf16 while identify chose auto)."""
    from api.cli import build_parser
    from api.cli._common import encoder_config
    from api.settings import Settings

    monkeypatch.chdir(tmp_path)  # no .env of the working folder
    for name in RUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cli = encoder_config(build_parser().parse_args(COMMANDS[command]))
    server = Settings.load(index="g").encoder_config()
    expected = tuple(env.get(name, "auto") for name in RUN_VARIABLES)
    assert _run(cli) == _run(server) == expected


@pytest.mark.parametrize("options", [["--precision", "fp32"], ["--runtime", "torch", "--device", "cpu"],
                                     ["--runtime", "openvino", "--precision", "bf16"]])
def test_the_same_options_ask_for_the_same_run_over_the_variables(options, monkeypatch, tmp_path):
    """An option given to a command and the same option given to ``serve`` win over the variables alike."""
    from api.cli import build_parser
    from api.cli._common import encoder_config
    from api.cli.serve import OPTION_SETTINGS
    from api.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPECIESID_DEVICE", "cuda")
    monkeypatch.setenv("SPECIESID_RUNTIME", "onnx")
    monkeypatch.setenv("SPECIESID_PRECISION", "int8")
    cli = encoder_config(build_parser().parse_args([*COMMANDS[("identify",)], *options]))
    served = build_parser().parse_args(["serve", "--index", "g", *options])
    server = Settings.load(**{n: getattr(served, n) for n in OPTION_SETTINGS if getattr(served, n)}).encoder_config()
    assert _run(cli) == _run(server)
    given = dict(zip(options[::2], options[1::2], strict=True))
    assert _run(cli) == (given.get("--device", "cuda"), given.get("--runtime", "onnx"),
                         given.get("--precision", "int8"))


def test_a_bad_variable_is_refused_by_the_command_line_naming_it(monkeypatch):
    """As the server refuses it at start (tests/test_api.py), naming the variable and what it takes."""
    from api.cli import build_parser
    from api.cli._common import encoder_config

    args = build_parser().parse_args(COMMANDS[("identify",)])
    monkeypatch.setenv("SPECIESID_PRECISION", "fp64")
    with pytest.raises(ValueError, match="SPECIESID_PRECISION: unknown precision 'fp64'; choose one of auto, "
                       "fp32, bf16"):
        encoder_config(args)
    monkeypatch.setenv("SPECIESID_PRECISION", "auto")
    monkeypatch.setenv("SPECIESID_DEVICE", "gpu")
    with pytest.raises(ValueError, match=r"SPECIESID_DEVICE: unknown device 'gpu'; use auto \(CUDA when present\), "
                       "cpu, cuda or cuda:N"):
        encoder_config(args)


def test_one_rule_and_one_message_for_a_runtime_asked_by_option_or_variable(monkeypatch):
    """resolve_runtime (the encoder's opening) and run_options (the command line, the server) read and check a
    runtime alike; a bad variable is named whichever reads it."""
    from retrieval.encoders import resolve_runtime, run_options

    monkeypatch.setenv("SPECIESID_RUNTIME", " ONNX ")
    assert resolve_runtime(None) == run_options()["runtime"] == "onnx"
    assert resolve_runtime("torch") == run_options(runtime="torch")["runtime"] == "torch"
    monkeypatch.setenv("SPECIESID_RUNTIME", "tensorrt")
    for read in (lambda: resolve_runtime(None), run_options):
        with pytest.raises(ValueError, match=r"^SPECIESID_RUNTIME: unknown runtime 'tensorrt'; choose one of auto, "
                           "torch, onnx, openvino$"):
            read()
    with pytest.raises(ValueError, match=r"^unknown runtime 'tensorrt'; choose one of"):  # an option: no variable
        resolve_runtime("tensorrt")


def test_a_bad_variable_is_refused_by_the_server_at_start_in_the_command_lines_words(monkeypatch, tmp_path):
    """SPECIESID_DEVICE=gpu (before: accepted by the settings, refused only when the model loaded, in words not
    naming the variable) and SPECIESID_PRECISION=fp64 stop the server at start (``Settings.load``) with the command
    line's refusal; a device spelt in capitals is read as the command line reads it; ``serve --device gpu`` is
    refused as the command line refuses ``--device gpu``, not in the variable's name."""
    from api.cli import build_parser
    from api.cli._common import encoder_config
    from api.settings import Settings, SettingsError
    from retrieval.encoders import check_device

    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    args = build_parser().parse_args(COMMANDS[("identify",)])
    for name, value in (("SPECIESID_DEVICE", "gpu"), ("SPECIESID_PRECISION", "fp64")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError) as cli:
            encoder_config(args)
        with pytest.raises(SettingsError) as server:
            Settings.load()
        assert str(server.value) == str(cli.value) and str(server.value).startswith(f"{name}: unknown ")
        monkeypatch.delenv(name)
    monkeypatch.setenv("SPECIESID_DEVICE", " CUDA:1 ")
    assert Settings.load().encoder_config().device == encoder_config(args).device == "cuda:1"

    monkeypatch.delenv("SPECIESID_DEVICE")
    served = build_parser().parse_args(["serve", "--index", str(tmp_path / "g"), "--device", "gpu"])
    with pytest.raises(ValueError) as option:
        check_device("gpu")
    with pytest.raises(ValueError) as serve:
        served.func(served)
    assert str(serve.value) == str(option.value) and "SPECIESID_DEVICE" not in str(serve.value)


@pytest.mark.parametrize(("name", "value", "read"), [
    ("SPECIESID_PRECISION", " BF16 ", "bf16"), ("SPECIESID_RUNTIME", "ONNX", "onnx"),
    ("SPECIESID_DEVICE", " CPU ", "cpu"), ("SPECIESID_DEVICE", "", "auto"), ("SPECIESID_RUNTIME", "", "auto"),
    ("SPECIESID_PRECISION", "", "auto"), ("SPECIESID_PRECISION", "  ", "auto"),
], ids=["precision spaced, capitals", "runtime capitals", "device spaced, capitals", "device empty", "runtime empty",
        "precision empty", "precision blank"])
def test_the_server_reads_a_variable_as_the_command_line_does(name, value, read, monkeypatch, tmp_path):
    """One reading (``retrieval.encoders.read_option``) for both: spaces and case ignored, an empty variable (an
    empty ``SPECIESID_DEVICE=`` line of a .env) is auto. Before, the server refused at start what identify took:
    ``unknown precision ' BF16 '``, ``unknown runtime 'ONNX'``, ``unknown device ''``."""
    from api.cli import build_parser
    from api.cli._common import encoder_config
    from api.settings import Settings

    monkeypatch.chdir(tmp_path)
    for variable in RUN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(name, value)
    cli = encoder_config(build_parser().parse_args(COMMANDS[("identify",)]))
    server = Settings.load(index="g").encoder_config()
    expected = tuple(read if variable == name else "auto" for variable in RUN_VARIABLES)
    assert _run(cli) == _run(server) == expected


@pytest.mark.parametrize(("device", "read"), [("CPU", "cpu"), (" Cuda:1 ", "cuda:1"), ("  ", "cuda")])
def test_serve_reads_its_device_option_as_identify_does(device, read, monkeypatch, tmp_path):
    """``serve --device CPU`` runs on the CPU as ``identify --device CPU`` does (before: ``unknown device 'CPU'``); a
    blank one is not given, for both (the variable then: cuda here)."""
    from api.cli import build_parser
    from api.cli._common import encoder_config
    from api.settings import Settings

    monkeypatch.chdir(tmp_path)
    for variable in RUN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("SPECIESID_DEVICE", "cuda")
    cli = encoder_config(build_parser().parse_args([*COMMANDS[("identify",)], "--device", device]))
    seen = {}

    def stop(**overrides):  # the settings serve would start with, then stop before any gallery or port
        seen["settings"] = Settings(**overrides)
        raise SystemExit(0)

    monkeypatch.setattr(Settings, "load", staticmethod(stop))
    served = build_parser().parse_args(["serve", "--index", str(tmp_path / "g"), "--device", device])
    with pytest.raises(SystemExit):
        served.func(served)
    assert cli.device == seen["settings"].encoder_config().device == read
