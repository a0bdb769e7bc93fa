"""Optional packages: imported when a command needs them, with a one-line hint when absent."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def import_extra(module: str, *, extra: str, needed_by: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtra` naming ``jaxce[extra]``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise MissingExtra(
            f"{needed_by} needs {module}, which is not installed: pip install 'jaxce[{extra}]'"
        ) from error
