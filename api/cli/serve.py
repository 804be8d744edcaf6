"""``speciesid serve`` (the HTTP API and web page) and ``speciesid encoders list``."""

from __future__ import annotations

import argparse
import errno
import logging
import re
import socket
import sys
from typing import TYPE_CHECKING

from api.cli._common import at_least, emit, logger
from retrieval.encoders import PRECISIONS, RUNTIMES, read_option

if TYPE_CHECKING:
    from fastapi import FastAPI

#: The settings ``serve``'s options override (``--index`` ... ``--precision``), as ``api.settings.Settings`` names them.
OPTION_SETTINGS = ("index", "device", "runtime", "precision")


class _PlannedCut(logging.Filter):
    """uvicorn's ERROR "Cancel N running task(s), timeout graceful shutdown exceeded" made an INFO record (shown
    with -v only): the cut of a planned stop, which the server's own warnings say (:mod:`api.server`), not an error
    to alert on. Every other record passes unchanged."""

    said = re.compile(r"Cancel \d+ running task\(s\), timeout graceful shutdown exceeded")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO and "graceful shutdown" in str(record.msg) and \
                self.said.fullmatch(record.getMessage()):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


#: uvicorn's logging (its ``log_config``): its loggers without handlers of their own, so that their records, the
#: access log's (``uvicorn.access``, INFO: with -v only) among them, reach the command line's handler: on stderr,
#: in its format, secrets redacted (:func:`api.cli.setup_logging`). uvicorn's default wrote the access log to stdout.
#: A stop's cut is not uvicorn's ERROR (:class:`_PlannedCut`).
UVICORN_LOGGING: dict = {
    "version": 1, "disable_existing_loggers": False,
    "filters": {"planned_cut": {"()": _PlannedCut}},
    "loggers": {"uvicorn": {"handlers": [], "propagate": True},
                "uvicorn.error": {"handlers": [], "propagate": True, "filters": ["planned_cut"]},
                "uvicorn.access": {"handlers": [], "propagate": True}},
}


def setting_names() -> list[str]:
    """The server's settings as environment variables, from ``api.settings.Settings``: those the options override
    first, then the others in the order ``Settings`` declares them."""
    from api.settings import Settings  # pydantic-settings: only when serve's parser is built

    names = [*OPTION_SETTINGS, *(n for n in Settings.model_fields if n not in OPTION_SETTINGS)]
    return [f"{Settings.model_config['env_prefix']}{n.upper()}" for n in names]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the serve command and the encoders command group."""
    p = sub.add_parser(
        "serve",
        help="run the HTTP API and web page (settings from SPECIESID_* environment variables or .env)",
        description="Run the HTTP API (/v1/identify, /v1/search, /v1/species, adding and deleting references) and "
        "the web page on one gallery, until Ctrl-C. The port is checked before the model loads; /readyz answers "
        "200 once it has. Exit status 2 when the gallery cannot be opened, the port is in use, or the server does "
        "not start.",
        epilog="Settings (environment variables, or a .env file in this folder; the options above override the "
        "first four): " + ", ".join(setting_names()) + ". Each, with its default and what it does: docs/api.md "
        "('Settings').",
    )
    p.add_argument("--index", default=None, metavar="DIR",
                   help="gallery directory (default SPECIESID_INDEX, else runs/gallery)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=at_least(1, 65535), default=8000, help="port, 1-65535 (default 8000)")
    p.add_argument("--root-path", default="", metavar="PREFIX",
                   help="the path prefix a reverse proxy serves the API under and strips before passing a request "
                   "on (e.g. /api): the API docs and the web page work under it (default: none)")
    p.add_argument("--device", default=None, help="encoder device (default SPECIESID_DEVICE or auto)")
    p.add_argument("--runtime", default=None, choices=RUNTIMES,
                   help="inference runtime (default SPECIESID_RUNTIME or auto)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="encoder precision (default SPECIESID_PRECISION or auto)")
    p.set_defaults(func=cmd_serve)

    p_enc = sub.add_parser("encoders", help="the encoder specs accepted, and the inference runtimes of this machine")
    s_enc = p_enc.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = s_enc.add_parser("list", help="print the accepted encoder spec forms (--encoder SPEC), aliases with what "
                         "they stand for")
    p.set_defaults(func=cmd_encoders_list)
    p = s_enc.add_parser("runtimes", help="print this CPU's kind, the runtimes installed, what --runtime auto "
                         "tries, and the exported models in the user cache")
    p.set_defaults(func=cmd_encoders_runtimes)


def cmd_serve(args: argparse.Namespace) -> int:
    """speciesid serve: run the HTTP API on a gallery (exit status)."""
    from api.app import create_app
    from api.server import graceful_server
    from api.settings import Settings
    from index.gallery import read_gallery_info

    overrides = {name: getattr(args, name) for name in OPTION_SETTINGS if getattr(args, name)}
    if (args.device or "").strip():  # read as identify reads --device, in its words (not the variable's)
        overrides["device"] = read_option("device", args.device)
    else:  # blank: not given, as for identify (the variable, else auto)
        overrides.pop("device", None)
    settings = Settings.load(**overrides)  # a refused value: one line naming the variable, exit 2
    read_gallery_info(settings.index)  # fail fast, with the clear message, before uvicorn starts
    for warning in [*Settings.unknown_variables(), *settings.startup_warnings()]:
        logger.warning("%s", warning)
    sock = listening_socket(args.host, args.port)  # a port in use is said now, before the model loads (exit 2)
    host = f"[{args.host}]" if ":" in args.host else args.host
    port = sock.getsockname()[1]  # the port bound (--port is 1..65535, so the one given)
    sys.stderr.write(f"speciesid: serving {settings.index} on http://{host}:{port}/ (web page; API docs at /docs, "
                     "ready when /readyz answers 200); Ctrl-C stops it; -v logs each request\n")
    app = create_app(settings)
    # a stop lets requests finish for SPECIESID_SHUTDOWN_GRACE_S, then cuts them (never an add's commit), logged
    server = graceful_server(app, settings, log_level="info" if args.verbose else "warning",
                             log_config=UVICORN_LOGGING, root_path=args.root_path.rstrip("/"))
    quiet = _StartupFailure(app)  # uvicorn's traceback of a failed load: only under -vv, as other commands show one
    uvicorn_log = logging.getLogger("uvicorn.error")
    if args.verbose < 2:
        uvicorn_log.addFilter(quiet)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's exit (status 3) when the app's startup failed: the loader's error says why
        if app.state.startup_error is not None:
            raise app.state.startup_error from None  # its one line, exit 2, by main() as for other commands
        raise
    finally:
        uvicorn_log.removeFilter(quiet)
    if not server.started:  # the app did not start, for another reason: uvicorn logged why
        sys.stderr.write("speciesid: error: the server did not start (see the lines above)\n")
        return 2
    return 0


class _StartupFailure(logging.Filter):
    """Drops uvicorn's records once the app's startup failed (the loader's traceback and "Application startup
    failed. Exiting."): ``serve`` says the error itself, in one line."""

    def __init__(self, app: FastAPI) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return self.app.state.startup_error is None


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening, as uvicorn binds one (SO_REUSEADDR; IPv6 for an address
    with ':'), for uvicorn to serve on (connections wait in the backlog while the model loads); ValueError saying
    what to do when the port is in use or the address is not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog; two bound, not yet listening SO_REUSEADDR sockets may share a port
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is in use (another server?): choose another with --port") from exc
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --host or "
                         "--port") from exc
    sock.set_inheritable(True)
    return sock


def cmd_encoders_list(args: argparse.Namespace) -> int:
    """speciesid encoders list: the encoder specs and aliases this install knows (exit status)."""
    from retrieval.encoders import ALIASES, list_encoders

    for form in list_encoders():
        emit(f"{form}" + (f"  = {ALIASES[form]}" if form in ALIASES else ""))
    return 0


def cmd_encoders_runtimes(args: argparse.Namespace) -> int:
    """speciesid encoders runtimes: the inference runtimes and CPU features here (exit status)."""
    from retrieval.cpu import cpu_features, cpu_kind
    from retrieval.runtimes import EXTRAS, candidates
    from retrieval.runtimes.cache import cache_root, entries, installed_runtimes

    kind = cpu_kind()
    feats = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu_features().items())
    lines = [f"CPU kind: {kind} ({feats})",
             "installed: " + ", ".join(f"{k} {v or '-'}" for k, v in installed_runtimes().items())
             + f" (extras: {', '.join(sorted(set(EXTRAS.values())))})"]
    for family in ("transformer", "cnn"):
        order = " -> ".join(f"{rt} {p}" for rt, p in candidates(kind, family))
        lines.append(f"auto order, {family}: {order}")
    lines.append(f"user cache: {cache_root()}")
    for folder, info in entries():
        faith = info.get("faithfulness") or {}
        lines.append(f"  {folder.parent.name}/{folder.name}: {info.get('spec')} "
                     f"{'accepted' if info.get('accepted') else 'refused'}, min cosine "
                     f"{faith.get('min_cosine', float('nan')):.4f} on {faith.get('n_photos')} "
                     f"{faith.get('photos')} photos")
    emit("\n".join(lines))
    return 0
