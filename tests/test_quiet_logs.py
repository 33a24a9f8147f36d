"""Importing Opacus never prints another thread's log lines (issue 21: stray Ray DEBUG lines).

Opacus calls ``logging.basicConfig()`` on import. :func:`~lepton_flwr.dp.quiet_opacus.
import_opacus` used to remove the root handler that call added once the import was done;
meanwhile (seconds) Flower's simulation engine, starting its Ray backend in another thread
of the same process, printed two DEBUG lines through it in every DP run's log.
"""

import subprocess
import sys

SPY = """
import logging
root = logging.getLogger()
added = []
original = root.addHandler
root.addHandler = lambda handler: (added.append(type(handler).__name__), original(handler))
from lepton_flwr.dp.quiet_opacus import import_opacus
import_opacus()
print(sorted(set(added)), root.handlers)
"""


def test_importing_opacus_gives_the_root_logger_no_printing_handler_even_for_a_moment():
    """Checked in a fresh process: Opacus configures logging on its first import only."""
    proc = subprocess.run([sys.executable, "-c", SPY], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # Only our placeholder was ever added (before: a StreamHandler, for the whole import),
    # and nothing is left.
    assert proc.stdout.strip() == "['NullHandler'] []", proc.stdout
