"""One error path for the whole ``xmodal`` command.

Commands raise; nothing below the top-level group prints an error. ``XmodalGroup.main`` turns any
exception into one line on stderr (what, where, how to fix) or, with ``--json``, exactly one JSON
document ``{"error", "type", "hint"}`` on stdout, and exits with a documented code:

  0 success · 1 internal error (a bug: rerun with --debug and report it) · 2 usage ·
  3 input data · 4 environment or resources · 130 interrupted

A traceback is printed only with ``--debug`` (anywhere on the command line) or ``XMODAL_DEBUG=1``.
"""
from __future__ import annotations

import errno
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import typer
from typer import exceptions as typer_exceptions
from typer._click import exceptions as click_exceptions  # typer vendors click: its exception classes live here
from typer.core import TyperGroup

from .errors import EXIT_ENVIRONMENT, EXIT_INPUT, EXIT_INTERNAL, EXIT_USAGE, XmodalError
from .extras import from_import_error
from .jsonio import dumps

EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"
JSON_FLAG = "--json"

_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_ENV_ERRNOS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EMFILE: "too many open files",
               errno.ENOMEM: "out of memory"}
_PATH_ERRNOS = {errno.ENOENT: "no such file or directory", errno.ENOTDIR: "not a directory",
                errno.EISDIR: "is a directory", errno.ELOOP: "too many levels of symbolic links",
                errno.ENAMETOOLONG: "file name too long", errno.EEXIST: "already exists (a file is in the way)"}
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded")
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_FOLDER_OPTIONS = ("--cache-dir", "--out")
_OTHER_COMMAND = re.compile(r"`xmodal [^`]*`")
_QUOTED = re.compile(r"`[^`]*`|(?<!\w)'[^']*'(?!\w)|\"[^\"]*\"")  # code or commands inside a hint: kept whole


@dataclass(frozen=True)
class ErrorReport:
    """What the user sees: one message, the kind of error, how to fix it, and the exit code."""

    message: str
    type: str
    hint: str
    exit_code: int

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.message, "type": self.type, "hint": self.hint, "exit_code": self.exit_code}

    def as_line(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f" — {self.hint}"
        return " ".join(text.split())  # one line, whatever the message contained


def debug_enabled(args: Sequence[str] = ()) -> bool:
    return DEBUG_FLAG in args or os.environ.get("XMODAL_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def _folders(options: Iterable[str] | None) -> str:
    """The command's folder options, for hints (only those it has, when known)."""
    have = [o for o in _FOLDER_OPTIONS if options is None or o in options]
    return f" ({' / '.join(have)})" if have else ""


def _disk_full(where: str, name: str, options: Iterable[str] | None,
               what: str = _DISK_ERRNOS[errno.ENOSPC]) -> ErrorReport:
    return ErrorReport(f"{what} while writing {where or 'output'}", name,
                       f"free space or write to another disk{_folders(options)}, then rerun: finished work is kept "
                       "and the rerun resumes", EXIT_ENVIRONMENT)


def _oserror_report(exc: OSError, options: Iterable[str] | None) -> ErrorReport:
    where = " ".join(str(p) for p in (exc.filename, exc.filename2) if p)
    what = exc.strerror or str(exc)
    name = type(exc).__name__
    if exc.errno in _DISK_ERRNOS:
        return _disk_full(where, name, options, _DISK_ERRNOS[exc.errno])
    if exc.errno in _ENV_ERRNOS:
        return ErrorReport(f"{_ENV_ERRNOS[exc.errno]}: {where or what}", name,
                           f"choose a writable folder{_folders(options)} or fix the permissions", EXIT_ENVIRONMENT)
    if exc.errno in _PATH_ERRNOS or isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return ErrorReport(f"{_PATH_ERRNOS.get(exc.errno, what)}: {where or what}", name,
                           "check the path (and any symbolic link on it) and try again", EXIT_INPUT)
    return ErrorReport(f"{what}{': ' + where if where else ''}", name,
                       "check the file system and the paths given, then rerun", EXIT_ENVIRONMENT)


def _is_device_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(k in text for k in ("cuda", "nvidia driver", "torch not compiled with", "no kernel image", "mps ", "device-side",
                                   "invalid device", "expected one of cpu"))


def _drop_unknown_options(hint: str, options: Iterable[str] | None) -> str:
    """Remove the clauses of a hint that suggest options this command does not have.

    Quoted text (a shell command, Python code) is never split or rewritten, and a hint whose clauses all
    apply is returned unchanged, so a suggested command can still be copied and run as printed.
    """
    if options is None or not hint:
        return hint
    known = set(options) | {"--help", "--debug"}
    quoted: list[str] = []

    def hide(m: re.Match[str]) -> str:
        quoted.append(m.group(0))
        return f"\0{len(quoted) - 1}\0"

    def unhide(text: str) -> str:
        return re.sub(r"\0(\d+)\0", lambda m: quoted[int(m.group(1))], text)

    clauses = [unhide(c) for c in re.split(r"(?:,? or |; )", _QUOTED.sub(hide, hint))]
    # options inside a quoted `xmodal <other command> ...` belong to that command, not to this one
    kept = [c for c in clauses if set(_OPTION.findall(_OTHER_COMMAND.sub("", c))) <= known]
    if len(kept) == len(clauses):
        return hint
    return " or ".join(kept) if kept else "check the inputs named in the message"


def classify(exc: BaseException, options: Iterable[str] | None = None) -> ErrorReport:
    """Map any exception to an ``ErrorReport`` (exit code and hint by kind).

    ``options``: the options of the command that failed, when known, so a hint never suggests one it lacks.
    """
    rep = _classify(exc, options)
    return replace(rep, hint=_drop_unknown_options(rep.hint, options))


def _classify(exc: BaseException, options: Iterable[str] | None) -> ErrorReport:
    name = type(exc).__name__
    if isinstance(exc, XmodalError):
        return ErrorReport(str(exc), name, exc.hint, exc.exit_code)
    if isinstance(exc, click_exceptions.UsageError):
        cmd = exc.ctx.command_path if exc.ctx is not None else "xmodal"
        return ErrorReport(exc.format_message(), "UsageError", f"run `{cmd} --help` to see the options", EXIT_USAGE)
    if isinstance(exc, click_exceptions.ClickException):
        return ErrorReport(exc.format_message(), "UsageError", "run `xmodal --help`", EXIT_USAGE)
    if isinstance(exc, (KeyboardInterrupt, typer_exceptions.Abort)):
        return ErrorReport("interrupted", "Interrupted",
                           "rerun the same command: finished work is kept and it resumes", EXIT_INTERRUPTED)
    if isinstance(exc, ImportError) and (missing := from_import_error(exc, "this command")) is not None:
        return ErrorReport(str(missing), type(missing).__name__, missing.hint, missing.exit_code)
    if isinstance(exc, MemoryError):
        return ErrorReport("out of memory", name, "lower --batch-size or use a machine with more memory",
                           EXIT_ENVIRONMENT)
    if isinstance(exc, OSError):
        return _oserror_report(exc, options)
    if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):  # e.g. a library's own write error on a full disk
        return _disk_full("", name, options)
    if name == "SafetensorError":
        return ErrorReport(f"a safetensors file is damaged or not a safetensors file: {exc}", name,
                           "re-create the file (refit, retrain or rebuild it) or point at an intact copy", EXIT_INPUT)
    try:
        from PIL import Image, UnidentifiedImageError

        if isinstance(exc, (UnidentifiedImageError, Image.DecompressionBombError)):
            return ErrorReport(f"cannot decode image: {exc}", name,
                               "remove or replace the file, or pass --skip-corrupt where the command offers it",
                               EXIT_INPUT)
    except ImportError:  # pragma: no cover - PIL is a dependency
        pass
    if isinstance(exc, (RuntimeError, AssertionError)) and _is_device_error(exc):
        return ErrorReport(f"the requested device is not usable here: {str(exc).splitlines()[0]}", name,
                           "use --device cpu (or --device auto), or check the GPU driver", EXIT_ENVIRONMENT)
    if isinstance(exc, UnicodeDecodeError):
        return ErrorReport(f"a file is not valid UTF-8 text: {exc}", name,
                           "check that the file given is the text format the command expects", EXIT_INPUT)
    if isinstance(exc, (ValueError, KeyError, IndexError)):
        text = str(exc) if not isinstance(exc, KeyError) else f"missing key {exc}"
        return ErrorReport(text, name, "check the inputs and options named in the message", EXIT_INPUT)
    return ErrorReport(f"internal error: {name}: {exc}", name,
                       "this is a bug in xmodal: rerun with --debug and report the traceback", EXIT_INTERNAL)


def report(exc: BaseException, as_json: bool, debug: bool, options: Iterable[str] | None = None) -> int:
    """Print the error once (stderr line, or JSON on stdout) and return its exit code."""
    if isinstance(exc, click_exceptions.NoArgsIsHelpError):  # a bare group: show its help, as click does
        typer.echo(exc.format_message(), err=True)
        return EXIT_USAGE
    rep = classify(exc, options)
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if as_json:
        sys.stdout.write(dumps(rep.as_dict()) + "\n")
        sys.stdout.flush()
    else:
        typer.secho(rep.as_line(), fg="red", err=True)
    return rep.exit_code


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as ``warning: <text>`` lines on stderr, without the source line Python adds."""
    text = " ".join(str(message).split())
    (file or sys.stderr).write(f"warning: {text}\n")


def _options_of(group: Any, argv: Sequence[str]) -> set[str] | None:
    """The options of the (sub)command ``argv`` names, or None when it names none."""
    cmd, found = group, False
    for tok in argv:
        sub = getattr(cmd, "commands", {}).get(tok)
        if sub is None:
            if not tok.startswith("-"):
                break
            continue
        cmd, found = sub, True
    if not found:
        return None
    return {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}


class XmodalGroup(TyperGroup):
    """The top-level group: runs a command and sends every failure through ``report``."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = debug_enabled(argv)
        argv = [a for a in argv if a != DEBUG_FLAG]
        as_json = JSON_FLAG in argv
        try:
            with warnings.catch_warnings():  # restores the default printer when the command ends
                warnings.showwarning = _one_line_warning
                rv = super().main(args=argv, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except typer_exceptions.Exit as exc:
            code = exc.exit_code
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - the single place that reports errors
            code = report(exc, as_json, debug, _options_of(self, argv))
        if standalone_mode:
            sys.exit(code)
        return code
