"""``speciesid`` command line: a dispatch table of command modules, each with its parsers beside its handlers.

Every module has ``register(subparsers)``, which adds its commands and sets ``func`` to their handler;
handlers call :mod:`retrieval.workflows` (and nothing deeper) and print. Heavy libraries load only inside
handlers, and :func:`main` registers only the module of the command asked for, so a query pays for no other
command's imports (``speciesid identify`` on a cached exported encoder never imports torch).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import numbers
import os
import re
import signal
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar, overload

# a Ctrl-C as these load (numpy): one line and 130, said by the console entry point (api.console), not here
from api.cli import clean, evaluate, finetune, identify, index, probe, references, serve
from index.errors import TableReplacedError, first_line, store_io_failure, store_io_kind
from index.formats import speciesid_version
from index.photos import DEFAULT_MAX_PIXELS, PHOTO_MAX_PIXELS
from index.text import printable

logger = logging.getLogger(__name__)
_N = TypeVar("_N")  # a namespace object: CommandParser.parse_known_args returns the one it is given
VERBOSE_HELP = ("more logging, each line naming its level and module (-vv for debug, and the traceback of an "
                "unexpected error; -vvv adds the storage libraries' debug: botocore, urllib3); credentials "
                "and signatures in any line are shown as [redacted]")
#: The epilog of the commands that write a gallery: how long they wait for another writer.
WRITE_WAIT_HELP = ("A command that writes a gallery waits for another writer of it (its lock; on S3 the store's "
                   "lease) up to 600 s, saying whom it waits for after 2 s; SPECIESID_WRITE_WAIT_S=SECONDS sets "
                   "that wait (0: do not wait).")
#: The epilog of the commands that read photos: the pixel limit, and what a photo costs a decode thread
#: (``index.photos.PHOTO_MAX_PIXELS``).
PIXELS_HELP = ("A photo is read when it decodes to at most SPECIESID_MAX_PIXELS pixels (the server's setting; "
               f"default {PHOTO_MAX_PIXELS}, at most {DEFAULT_MAX_PIXELS}; a JPEG counts at the reduced scale it is "
               "decoded at), else skipped saying how small to save it; a decode thread holding a photo takes about "
               f"4 MiB a megapixel: ~{4 * PHOTO_MAX_PIXELS // 10**6} MiB at {PHOTO_MAX_PIXELS // 10**6} MP, "
               f"~{4 * DEFAULT_MAX_PIXELS / 10**6 / 1024:.0f} GB at {DEFAULT_MAX_PIXELS // 10**6} MP.")
#: The commands that read photos (their --help ends with PIXELS_HELP, after WRITE_WAIT_HELP where they write).
READERS = (("index", "build"), ("references", "add"), ("identify",), ("search",), ("clean",), ("evaluate",),
           ("probe", "train"), ("finetune",))
#: The end of every --help that names a docs/ file: an installed package (a wheel) carries none of them.
DOCS_HELP = "The docs/*.md files named above are in speciesid's source repository, not in the installed package."
#: The commands that write a gallery (their --help ends with WRITE_WAIT_HELP).
WRITERS = (("index", "build"), ("references", "add"), ("references", "delete"), ("probe", "train"),
           ("probe", "import"), ("probe", "restore"), ("probe", "publish"), ("probe", "withdraw"), ("clean",),
           ("index", "compact"), ("index", "sweep-uploads"), ("species", "set-venom"), ("index", "venom-advice"))
#: The value name (metavar) of each option that several commands take, or whose flag said little in capitals: one
#: name per option in every command's --help. Set where a command gives none (or finetune's flag in capitals).
VALUE_NAMES = {
    "--root": "DIR", "--val-root": "DIR", "--metadata": "FILE", "--val-metadata": "FILE",  # FILE: CSV (or parquet)
    "--batch-size": "N", "--workers": "N", "--folds": "N", "--k": "N", "--knn": "N", "--neighbours": "N",
    "--temperature": "T", "--unknown-threshold": "P", "--text-strength": "W", "--country": "COUNTRY",
    "--checklist": "moroccan|FILE", "--species": "NAME", "--genus": "NAME", "--family": "NAME",
    "--common-name": "NAME", "--venomous": "yes|no",  # as set-venom's value: parse_yes_no takes y/n, true/false too
}
#: Command modules, in the order ``speciesid --help`` lists their commands.
COMMANDS = (index, identify, references, probe, finetune, evaluate, clean, serve)
#: The top-level commands each module registers (tests check this against the full parser).
COMMAND_NAMES = {
    index: ("index", "species"), identify: ("identify", "search"), references: ("references",), probe: ("probe",),
    finetune: ("finetune",), evaluate: ("evaluate",), clean: ("clean",), serve: ("serve", "encoders"),
}


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, the error and where to read the usage (exit 2), as
    every other error of the CLI is; ``--help`` is argparse's own. Sub-commands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        """Exit 2 with ``PROG: error: MESSAGE; see 'PROG --help'`` (not the usage first, as argparse prints it)."""
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


class CommandParser(OneLineErrors):
    """The parser of a command (``speciesid identify``, ``speciesid index build``): an argument it does not know is
    its error, naming its own ``--help`` (argparse hands it up to ``speciesid``, whose help lists no command's
    options)."""

    #: Said after "unrecognized arguments: ..." when they are all words, no option (``search a.jpg b.jpg``).
    extra_words_hint: str | None = None

    # argparse's own overloads: the namespace given (any object) is the one returned, a new Namespace without one
    @overload
    def parse_known_args(self, args: Iterable[str] | None = None, namespace: None = None
                         ) -> tuple[argparse.Namespace, list[str]]: ...
    @overload
    def parse_known_args(self, args: Iterable[str] | None, namespace: _N) -> tuple[_N, list[str]]: ...
    @overload
    def parse_known_args(self, *, namespace: _N) -> tuple[_N, list[str]]: ...

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        """argparse's, but an argument left over is refused here (the parsers above a command take none after it)."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            message = f"unrecognized arguments: {' '.join(extras)}"
            if self.extra_words_hint and not any(a.startswith("-") for a in extras):
                message += f" ({self.extra_words_hint})"
            self.error(message)
        return namespace, extras


def build_parser(modules: Sequence[types.ModuleType] = COMMANDS) -> argparse.ArgumentParser:
    """The argument parser of ``modules`` (all commands by default; exposed for tests and docs)."""
    parser = OneLineErrors(
        prog="speciesid",
        description="Identify animal species from photos by embedding retrieval.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"%(prog)s {speciesid_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for module in modules:
        module.register(sub)
    _verbose_anywhere(sub)
    _describe_everywhere(sub)
    _name_values(sub)
    _note_wait_and_pixels(sub)
    parser.epilog = WRITE_WAIT_HELP
    _note_docs(parser)
    return parser


def _note_docs(parser: argparse.ArgumentParser) -> None:
    """End the ``--help`` of ``parser`` and of each command under it with :data:`DOCS_HELP` where it names a docs/
    file (its description, epilog, an option's help or a sub-command's line)."""
    texts = [parser.description, parser.epilog]
    for action in parser._actions:
        texts.append(action.help)
        if isinstance(action, argparse._SubParsersAction):
            texts += [choice.help for choice in action._choices_actions]
            for command in action.choices.values():
                _note_docs(command)
    if any("docs/" in str(text or "") for text in texts):
        parser.epilog = f"{parser.epilog} {DOCS_HELP}" if parser.epilog else DOCS_HELP


def _command(subparsers: argparse._SubParsersAction, path: Sequence[str]) -> argparse.ArgumentParser | None:
    """The parser of the command ``path`` (``("index", "build")``), None when there is none."""
    command = subparsers.choices.get(path[0])
    for name in path[1:]:
        nested = next((a for a in command._actions if isinstance(a, argparse._SubParsersAction)), None) \
            if command is not None else None
        command = nested.choices.get(name) if nested is not None else None
    return command


def _note_wait_and_pixels(subparsers: argparse._SubParsersAction) -> None:
    """End the ``--help`` of every command that writes a gallery with :data:`WRITE_WAIT_HELP`, and of every one
    that reads photos with :data:`PIXELS_HELP`."""
    for path in WRITERS:
        command = _command(subparsers, path)
        if command is not None and not command.epilog:
            command.epilog = WRITE_WAIT_HELP
    for path in READERS:
        command = _command(subparsers, path)
        if command is not None:
            command.epilog = f"{command.epilog} {PIXELS_HELP}" if command.epilog else PIXELS_HELP


def _name_values(subparsers: argparse._SubParsersAction) -> None:
    """Name the value of each option of :data:`VALUE_NAMES` as that table does, in every command that leaves it to
    argparse (``--root ROOT``) or to the flag in capitals (finetune's ``--batch-size BATCH_SIZE``)."""
    for command in subparsers.choices.values():
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _name_values(action)
                continue
            flag = next((f for f in action.option_strings if f in VALUE_NAMES), None)
            if flag is not None and action.metavar in (None, flag.lstrip("-").upper().replace("-", "_")):
                action.metavar = VALUE_NAMES[flag]


def _describe_everywhere(subparsers: argparse._SubParsersAction) -> None:
    """A command's ``--help`` says what it does: its line in the parent's list, when it has no description."""
    for choice in subparsers._choices_actions:
        command = subparsers.choices[choice.dest]
        if command.description is None and choice.help:
            command.description = choice.help[0].upper() + choice.help[1:] + "."
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _describe_everywhere(action)


def _verbose_anywhere(subparsers: argparse._SubParsersAction) -> None:
    """Let ``-v`` also follow the command (``speciesid identify -v ...``); counts add up with one given before it."""
    for command in subparsers.choices.values():
        if "-v" not in command._option_string_actions:
            command.add_argument("-v", "--verbose", dest="verbose_after", action="count", default=argparse.SUPPRESS,
                                 help=VERBOSE_HELP)  # SUPPRESS: a sub-command's parser does not reset a group's -v
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_anywhere(action)


def parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the command ``argv`` names (only its module registered), else the full one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    for module, names in COMMAND_NAMES.items():
        if first in names:
            return build_parser((module,))
    return build_parser()


#: Our packages: their notes reach the command line's handler without -v. A note is an INFO record logged with
#: ``extra={"note": True}``: a step the user should see without -v (the one-time export for this CPU), shown as a
#: plain ``speciesid: ...`` line, not as a warning.
PACKAGES = ("api", "index", "retrieval", "finetune", "speciesid")


#: What starts a log record's further lines (a library's message of several lines, a traceback): one record, one
#: line at the margin.
CONTINUED = "  "


class CliLogFormat(logging.Formatter):
    """The command line's log lines in the style of its other messages: ``speciesid: warning: ...`` (``error:`` for
    ERROR and above) and a note as ``speciesid: ...``; with -v / -vv, ``LEVEL module: ...`` (where each comes from)."""

    def __init__(self, verbose: int = 0) -> None:
        super().__init__("%(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        """One record as a line (its traceback, when it has one, after it). What the library put into the message
        (its ``%s`` arguments: a file or folder name, a list of them, a warning naming them) is shown with every
        control character escaped (``index.text.printable``: a newline too, so a folder named ``a\nspeciesid: ...``
        cannot fake a line); the message's own text keeps its lines (each line escaped all the same), each after
        the first indented (:data:`CONTINUED`), as are a traceback's: a line at the margin begins a record."""
        if record.args:
            record = _shown_args(record)
        text = _shown(super().format(record)).replace("\n", "\n" + CONTINUED)
        if self.verbose:
            return f"{record.levelname} {record.name}: {text}"
        kind = "error: " if record.levelno >= logging.ERROR else "warning: " if record.levelno >= logging.WARNING \
            else ""
        return f"speciesid: {kind}{text}"


class _Escaped(str):
    """A log argument as ``%s`` shows it: escaped (``index.text.printable``); ``%r`` shows its repr, escaped too."""

    repr_text: str

    def __new__(cls, value: object) -> _Escaped:
        shown = super().__new__(cls, printable(value))
        shown.repr_text = printable(repr(value))
        return shown

    def __repr__(self) -> str:
        return self.repr_text


def _shown_args(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` with its arguments escaped (:class:`_Escaped`), numbers aside (``%d``, ``%.1f`` format
    them); when that does not format (``%d`` of an object that is no Number), only its text, paths and errors."""
    def escaped(text_only: bool) -> tuple | dict:
        def one(value: object) -> object:
            if text_only:
                return _Escaped(value) if isinstance(value, (str, os.PathLike, BaseException)) else value
            return value if value is None or isinstance(value, numbers.Number) else _Escaped(value)

        args = record.args
        if isinstance(args, Mapping):
            return {key: one(value) for key, value in args.items()}
        return tuple(one(value) for value in args or ())

    shown = logging.makeLogRecord({**record.__dict__, "args": escaped(text_only=False)})
    try:
        shown.getMessage()
    except (TypeError, ValueError):
        shown.args = escaped(text_only=True)
    return shown


def _shown(text: str) -> str:
    """``text`` with the control characters of any file name in it escaped (``index.text.printable``), line by
    line: its own line breaks kept."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _shown_without_verbose(record: logging.LogRecord) -> bool:
    """Without -v: warnings and errors, and our notes (:data:`PACKAGES`)."""
    return record.levelno >= logging.WARNING or bool(getattr(record, "note", False))


#: The libraries whose DEBUG lines dump every store request (its signed headers among them): at INFO under -vv,
#: DEBUG only with -vvv (their lines redacted all the same: :class:`RedactSecrets`).
CHATTY_LIBRARIES = ("botocore", "boto3", "s3transfer", "aiobotocore", "urllib3")
_REDACTED = "[redacted]"
#: What a log line may carry that lets its reader act as the server or the user: the value after the name (AWS's
#: CamelCase spellings too: an STS or SSO answer, ``"SecretAccessKey": "..."``; AccessKeyId is no secret).
#: The lookaheads ``(?!\[redacted\])`` keep a second pass from redacting a redacted value again; ``None``, ``null``
#: and an empty value are no secret.
_SECRET_NAMES = (r"x-amz-security-token|x-amz-signature|x-amz-credential|(?:aws_?)?secret_?access_?key|"
                 r"(?:aws_?)?session_?token|(?:aws_?)?security_?token|web_?identity_?token|access_?token|"
                 r"x-api-key|api_keys?")
_SECRETS = (
    re.compile(r"(?i)(\bauthorization['\"]?\s*[:=]\s*(?:b?['\"])?)(?!\[redacted\]|b['\"])([^'\"\s][^'\"\r\n]*)"),
    # a quoted value up to its closing quote, a bracketed list whole, a bare one through commas (k1,k2,k3)
    re.compile(rf"(?i)((?:{_SECRET_NAMES})['\"]?\s*[:=]\s*)(?!\[redacted\])"
               r"(b?(['\"])(?!(?:None|null)?\3)(?:(?!\3).)+|[\[({][^\])}]*[\])}]|(?!(?:None|null)\b)"
               r"[^'\"\s&,;}\]<>]+(?:,[^'\"\s&,;}\]<>]+)*)"),
    # a header list's tuple: ('Authorization', '...'), (b'x-api-key', b'...')
    re.compile(rf"(?i)(\(\s*b?['\"](?:(?:proxy-)?authorization|{_SECRET_NAMES})['\"]\s*,\s*)"
               r"(?!b?['\"]\[redacted\])(b?(['\"])(?:(?!\3).)+)"),
    # an STS / SSO answer's XML: <SecretAccessKey>...</SecretAccessKey>, <SessionToken>, <Token>
    re.compile(r"(?i)(<(?:secret_?access_?key|session_?token|security_?token|token|web_?identity_?token|"
               r"access_?token)>)(?!\[redacted\])([^<]+)"),
    re.compile(r"(?i)(['\"]token['\"]\s*:\s*b?['\"])(?!\[redacted\])([^'\"]+)"),  # a JSON / dict "Token": "..."
    re.compile(r"(?i)(\bsignature['\"]?\s*[:=]\s*(?:b?['\"])?)([0-9a-f]{16,})"),  # botocore.auth's "Signature:"
    re.compile(r"(?i)(\bbearer\s+)(?!\[redacted\])([A-Za-z0-9._~+/=-]{8,})"),  # a token: no "bearer of bad news"
)


def redacted(text: str) -> str:
    """``text`` with the values of credentials and signatures in it (a signed request's ``Authorization`` header,
    ``X-Amz-Security-Token``, a presigned URL's ``X-Amz-Signature``, ``AWS_SECRET_ACCESS_KEY=...``, an STS or SSO
    answer's ``SecretAccessKey`` / ``SessionToken`` / ``Token``, an ``X-API-Key`` or ``Bearer`` value) replaced by
    ``[redacted]``; the names kept."""
    for pattern in _SECRETS:
        text = pattern.sub(_hidden, text)
    return text


def _hidden(found: re.Match) -> str:
    """A match of :data:`_SECRETS` with its value (group 2) redacted; a quoted value's opening quote kept."""
    quote = found.group(3) if (found.re.groups >= 3) else None
    opening = found.group(2)[:found.group(2).index(quote) + 1] if quote else ""
    return found.group(1) + opening + _REDACTED


class _RedactedArg(str):
    """A log argument that held a secret, as ``%s`` and ``%r`` show it: redacted."""

    repr_text: str

    def __new__(cls, text: str, repr_text: str) -> _RedactedArg:
        shown = super().__new__(cls, text)
        shown.repr_text = repr_text
        return shown

    def __repr__(self) -> str:
        return self.repr_text


class RedactSecrets(logging.Filter):
    """A handler's filter: every record's message, arguments, traceback and stack with its secrets redacted
    (:func:`redacted`), so that no log line (-vv's, which bug reports quote) carries one. huggingface_hub's own
    handler and Ray's loggers (which do not propagate) bypass it: neither prints our secrets today."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always True (the record is kept)."""
        if record.args:  # the message as formatted (its arguments escaped as the CLI shows them), then redacted:
            # a template alone, redacted, could lose its "%s" to the argument it names (api_key=%s)
            if isinstance(record.args, Mapping):
                record.args = {key: self._arg(value) for key, value in record.args.items()}
            else:
                record.args = tuple(self._arg(value) for value in record.args)
            try:
                message = _shown_args(record).getMessage()
            except (TypeError, ValueError):  # a template its arguments do not fit: logging says so, redacted
                message = None
            if message is not None:
                record.msg, record.args = redacted(message), None
        elif isinstance(record.msg, str):
            record.msg = redacted(record.msg)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redacted(record.exc_text)
        if record.stack_info:
            record.stack_info = redacted(record.stack_info)
        return True

    @staticmethod
    def _arg(value: object) -> object:
        if value is None or isinstance(value, numbers.Number):
            return value
        try:
            text, rep = str(value), repr(value)
        except Exception:  # noqa: BLE001 - an argument that cannot show itself: left to logging's own handling
            return value
        red_text, red_rep = redacted(text), redacted(rep)
        return _RedactedArg(red_text, red_rep) if red_text != text or red_rep != rep else value


def setup_logging(verbose: int) -> None:
    """Log to stderr in the command line's style (:class:`CliLogFormat`): warnings, errors and notes; -v adds
    INFO (faiss' loader's only with -vv), -vv DEBUG (the storage libraries' only with -vvv:
    :data:`CHATTY_LIBRARIES`); secrets redacted (:class:`RedactSecrets`). Left as it is when the root logger has a
    handler already (a program that embeds the CLI, a test's capture), as ``logging.basicConfig`` does."""
    logging.getLogger("huggingface_hub").propagate = False  # it prints through a handler of its own: once, not twice
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CliLogFormat(verbose))
    if verbose == 1:  # faiss' loader says at INFO which of its builds it could not load: reads like a failure
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if verbose == 2:
        for name in CHATTY_LIBRARIES:
            logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        handler.addFilter(_shown_without_verbose)
        for name in PACKAGES:  # our INFO records reach the handler, which shows the notes among them
            logging.getLogger(name).setLevel(logging.INFO)
    handler.addFilter(RedactSecrets())  # after the visibility filter: a record dropped costs no redaction
    root.addHandler(handler)
    root.setLevel(logging.WARNING - 10 * min(verbose, 2))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 some inputs failed, 2 error, 130 interrupted).

    Errors are one line on stderr; an unexpected one says how to see its traceback (``-vv`` re-raises it). Ctrl-C
    is one line wherever it comes, the command's modules loading (:func:`parser_for`) included.
    """
    try:
        status = _main(argv)
    except KeyboardInterrupt:
        sys.stderr.write("speciesid: interrupted\n")
        return 130
    if argv is None:  # the program itself (not a caller in-process): the command is done
        _exit_on_ctrl_c(status)
    return status


def _exit_on_ctrl_c(status: int) -> None:
    """From now on a Ctrl-C does not turn the command's ``status`` into a silent 130 after its whole output: its work
    is done, and Python is tearing down. While it joins the libraries' threads and runs their exit handlers (their
    own teardown: multiprocessing joining its children, Ray's shutdown), a Ctrl-C ends the program at once with
    ``status``; never ignored, so a teardown that hangs is stopped by it. (After the exit handlers Python puts
    Ctrl-C's default action back: it then kills the program, which stops all the same.)"""

    def done(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)

    with contextlib.suppress(ValueError):  # not the main thread: left as it is
        signal.signal(signal.SIGINT, done)


def _main(argv: Sequence[str] | None) -> int:
    """:func:`main` but for a Ctrl-C outside the command itself (its parser, the logging set up)."""
    from api.cli._finish import finished_status, said_finished, starting

    starting()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser_for(argv)
    args = parser.parse_args(argv)
    args.verbose += getattr(args, "verbose_after", 0)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as other command-line tools do
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1
    except (ValueError, OSError, TableReplacedError) as exc:  # bad input, a missing path, ...; a table replaced
        said = str(store_outage(exc, args) or exc)  # a path in it (a file named with ESC[8m) shown escaped
        sys.stderr.write(f"speciesid: error: {_shown(said)}\n")
        return 2
    except KeyboardInterrupt:
        if (done := finished_status()) is not None:  # as the command's objects were torn down: its work is done
            said_finished("command", ", the lines above are its whole output")
            return done
        sys.stderr.write("speciesid: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - a library's error on input we did not foresee: one line, not a trace
        if (outage := store_outage(exc, args)) is not None:  # Lance's RuntimeError: an operational error, not a bug
            sys.stderr.write(f"speciesid: error: {_shown(str(outage))}\n")
            return 2
        if args.verbose >= 2:
            raise
        first = first_line(exc, 500)
        sys.stderr.write(f"speciesid: error: {type(exc).__name__}: {printable(first)} (run with -vv for the "
                         "traceback)\n")
        return 2


def gallery_store(args: argparse.Namespace) -> str | None:
    """Where the gallery of a command keeps its table: ``--store URI`` (a new gallery's), else where the ``--index``
    folder's gallery.json says (:meth:`index.layout.GalleryLayout.store_location`); None when the command names no
    gallery or its gallery.json cannot be read."""
    options = vars(args)
    if options.get("store"):
        return str(options["store"])
    if not options.get("index"):
        return None
    from pathlib import Path

    from index.gallery import read_gallery_info
    from index.layout import GalleryLayout

    layout = GalleryLayout(Path(options["index"]))
    try:
        return layout.store_location(read_gallery_info(layout.root) if layout.info.is_file() else {})
    except ValueError:
        return None


def store_outage(exc: BaseException, args: argparse.Namespace) -> str | None:
    """One line for a gallery store that failed mid-command; None for any other error. The traceback is logged at
    DEBUG (``-vv``).

    An outage (:func:`index.errors.store_io_failure`: an object store unreachable, a request cut off) says which
    store, what was kept (``index build`` and ``references add`` commit their rows chunk by chunk and skip photos
    whose bytes are stored, so what was committed stays and the same command run again adds the rest) and to
    check the network. A local store's I/O error (:func:`index.errors.store_io_kind`: a data file missing, a full
    disk, a permission) names the store's folder as damaged or unreadable: running again does not help."""
    kind = store_io_kind(exc)
    if kind is None:
        return None
    logger.debug("the gallery's store failed", exc_info=exc)
    store = gallery_store(args)
    if store_io_failure(exc, store) is None:
        where = f"at {store}" if store else "(a local folder)"
        return (f"the gallery's store {where} is damaged or unreadable ({first_line(exc, 300)}); check the disk "
                "(free space, errors) and the folder's permissions, or rebuild the gallery into a new folder with "
                "'speciesid index build --index NEW_DIR ...'")
    named = f"the gallery's {kind} store" if kind else "the gallery's store"
    kept = ""
    if getattr(args, "func", None) in (index.cmd_index_build, references.cmd_references_add):
        kept = ("; the references committed before it stay in the gallery, and running the same command again "
                "adds the rest (photos already stored are skipped)")
    s3 = kind == "S3" or (not kind and str(store).startswith("s3://"))
    where = "the network and the endpoint (AWS_ENDPOINT_URL)" if s3 else "the network and the store's endpoint"
    return f"{named} could not be reached ({first_line(exc, 300)}){kept}; check {where}, then run the command again"
