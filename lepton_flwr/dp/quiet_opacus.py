"""Import Opacus without its side effect on logging.

Opacus calls ``logging.basicConfig()`` when it is imported, which gives the root logger
a handler; Flower's logger propagates to the root, so every Flower line would then be
printed twice. Every import of Opacus in lepton-flwr goes through :func:`import_opacus`,
during which the root logger holds a handler that does nothing, so that
``basicConfig()`` (which only configures a root without handlers) adds none. Removing
the handler after the import was not enough: the import takes seconds, and a thread
logging meanwhile (Flower's simulation engine starting its Ray backend beside a
ServerApp that builds its accountant) printed its DEBUG lines through it.
"""

from __future__ import annotations

import logging
from types import ModuleType


def import_opacus() -> ModuleType:
    """Import and return the ``opacus`` package, leaving the root logger as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)  # basicConfig() leaves a root with a handler alone
    try:
        import opacus
        import opacus.accountants  # noqa: F401 - the submodules we use, imported under guard
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return opacus
