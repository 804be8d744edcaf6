"""A writer process for the shared-gallery tests: imports the command line (and torch, timm) once, then runs each
command line read from stdin (one JSON list a line) in a forked child, a process of its own that opens the gallery,
takes its locks and writes as ``python -m api.cli`` would, and prints its exit status (one line each). Saves each
command's ~3 s of imports (most of a small add on 2 loaded cores); what the children do is the CLI's own code."""

from __future__ import annotations

import json
import os
import sys
import traceback

import timm  # noqa: F401 - imported once here, for every child
import torch  # noqa: F401

from api.cli import main


def _child(argv: list[str]) -> int:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # its output is not read (the exit status goes on this pipe)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - said on stderr, exit status 1, as the interpreter would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code or 0


for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os._exit(_child(json.loads(line)))
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
