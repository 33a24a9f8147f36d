"""A client's DP-SGD accountant history, kept where a SuperNode restart does not lose it.

In a deployment every message runs a fresh ClientApp process; only ``context.state``
survives between rounds, and it lives in the SuperNode's memory: a restarted SuperNode
would start its ε at zero. With ``state-dir`` in the node config, the history is also
written (atomically, mode 600) to ``<state-dir>/dpsgd-run-<run>-node-<node>.json`` after
every round and read back when ``context.state`` has none. A file that cannot be read is
an error naming it: the client refuses to train rather than restart its ε.

Not covered: a state file deleted by hand looks like a client that never trained.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context

from lepton_flwr import protocol
from lepton_flwr.files import write_atomically


class LostHistoryError(RuntimeError):
    """The client's DP-SGD history exists but cannot be read: it must not train."""


def history_file(context: Context) -> Path | None:
    """Where this node keeps this run's history, or None without ``state-dir``."""
    folder = context.node_config.get(protocol.STATE_DIR)
    if not folder:
        return None
    return Path(str(folder)) / f"dpsgd-run-{context.run_id}-node-{context.node_id}.json"


def load_history(context: Context) -> list[tuple]:
    """The accountant history so far: ``context.state``, else the node's state file.

    Raises
    ------
    LostHistoryError
        If the state file exists but is not a history of this run and node.
    """
    cached = context.state.config_records.get(protocol.DPSGD_STATE)
    if cached:
        return [tuple(h) for h in json.loads(str(cached["history"]))]
    path = history_file(context)
    if path is None or not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
        if (saved["run_id"], saved["node_id"]) != (context.run_id, context.node_id):
            raise ValueError("it belongs to another run or node")
        return [tuple(float(x) for x in h) for h in saved["history"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LostHistoryError(
            f"the DP-SGD history in {path} cannot be read ({err}); this node will not "
            f"train rather than restart its epsilon at zero"
        ) from err


def save_history(context: Context, history: list) -> None:
    """Keep the history in ``context.state`` and, with ``state-dir``, in the node's file."""
    text = json.dumps([list(h) for h in history])
    context.state[protocol.DPSGD_STATE] = ConfigRecord({"history": text})
    path = history_file(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"run_id": context.run_id, "node_id": context.node_id, "history": history}
        write_atomically(path, json.dumps(record).encode(), 0o600)
