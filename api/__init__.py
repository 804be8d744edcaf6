"""The edges: the ``speciesid`` command line (and the HTTP service)."""
