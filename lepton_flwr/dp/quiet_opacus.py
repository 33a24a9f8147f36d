"""Import Opacus without its side effect on logging.

Opacus calls ``logging.basicConfig()`` when it is imported, which gives the root logger
a handler; Flower's logger propagates to the root, so every Flower line would then be
printed twice. Every import of Opacus in lepton-flwr goes through :func:`import_opacus`,
which removes the handler that import added (and nothing a user set up).
"""

from __future__ import annotations

import logging
from types import ModuleType


def import_opacus() -> ModuleType:
    """Import and return the ``opacus`` package, leaving the root logger as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import opacus
    import opacus.accountants  # noqa: F401 - the submodules we use, imported under guard

    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return opacus
