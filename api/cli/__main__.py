"""``python -m api.cli``: the same as the ``speciesid`` command (:func:`api.console.main`).

Python loads :mod:`api.cli` before this module runs, so a Ctrl-C in those first imports is Python's own
KeyboardInterrupt here; ``speciesid`` (and ``python -m api.console``) says it in one line, exit status 130."""

import sys

from api.console import main

sys.exit(main())
