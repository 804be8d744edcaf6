"""The ``speciesid`` console entry point: :func:`api.cli.main`, with a Ctrl-C while the command line's modules load
(they load numpy) said in one line with exit status 130, as ``main`` says one, not a traceback. Kept out of
:mod:`api.cli` itself, so that a program or test importing it gets Python's own KeyboardInterrupt, and no line on
stderr, from a module import."""

from __future__ import annotations

import sys


def main() -> int:
    """Run the command line (``speciesid ...``, ``python -m api.cli ...``); returns its exit status."""
    try:
        from api.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("speciesid: interrupted\n")
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
