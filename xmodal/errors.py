"""Exceptions with messages that name the problem and the fix.

Each class carries the CLI exit code of its kind (2 usage, 3 input data, 4 environment or
resources) and an optional ``hint`` that says how to fix it, so one error path
(``xmodal.cli_errors``) can report every failure the same way.
"""
from __future__ import annotations

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_ENVIRONMENT = 4


class XmodalError(Exception):
    """Base class: every error xmodal raises on bad input is one of these."""

    exit_code: int = EXIT_INPUT
    hint: str = ""

    def __init__(self, message: str = "", *args: object, hint: str | None = None) -> None:
        super().__init__(message, *args)
        if hint is not None:
            self.hint = hint


class UsageError(XmodalError, ValueError):
    """Options that cannot work together, or a value outside what an option accepts (also a ValueError,
    for library callers that catch that)."""

    exit_code = EXIT_USAGE
    hint = "see the command's --help"


class InputError(XmodalError):
    """A file or value the user gave is missing, malformed or inconsistent."""

    hint = "check the inputs named in the message"


class ResourceError(XmodalError):
    """The environment cannot do what was asked: disk, permissions, device, missing weights."""

    exit_code = EXIT_ENVIRONMENT
    hint = "check free disk space, permissions and the --device option, then rerun"


class BackboneUnavailableError(ResourceError):
    """Weights for a backbone spec are missing locally and cannot be downloaded."""

    hint = "point the spec at local weights (`xmodal backbones` lists the forms) or use bridge:lite0-minilm offline"


class DatasetError(InputError):
    """A dataset spec, folder or file is missing or malformed."""

    hint = "check the dataset spec (`xmodal datasets` lists the forms) and the folder layout"


class CorruptImageError(DatasetError):
    """An image file cannot be decoded."""

    hint = "remove or replace the file, or pass --skip-corrupt where the command offers it"


class CacheMismatchError(InputError):
    """A cached artefact was produced by a different backbone, dataset or configuration."""

    hint = "remove the stale artefact or choose another --cache-dir / --out folder"


class ShapeError(InputError):
    """Arrays passed to a method have inconsistent shapes."""


class UnknownBackboneError(InputError, ValueError):
    """A backbone spec of no known form (also a ValueError, for callers that catch that)."""

    hint = "run `xmodal backbones` for the spec forms"
