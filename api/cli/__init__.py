"""``speciesid`` command line: a dispatch table of command modules, each with its parsers beside its handlers.

Every module has ``register(subparsers)``, which adds its commands and sets ``func`` to their handler;
handlers call :mod:`retrieval.workflows` (and nothing deeper) and print. Heavy libraries load only inside
handlers, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from api.cli import clean, evaluate, finetune, identify, index, probe, references, serve

#: Command modules, in the order ``speciesid --help`` lists their commands.
COMMANDS = (index, identify, references, probe, finetune, evaluate, clean, serve)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="speciesid",
        description="Identify animal species from photos by embedding retrieval.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 some inputs failed, 2 error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"speciesid: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("speciesid: interrupted\n")
        return 130
