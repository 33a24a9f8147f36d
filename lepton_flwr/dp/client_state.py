"""A node's DP-SGD accountant histories, kept where a restart or a resume does not lose them.

In a deployment every message runs a fresh ClientApp process; only ``context.state``
survives between rounds, and it lives in the SuperNode's memory and belongs to one Flower
run: a restarted SuperNode, or a resumed run (which Flower numbers as a new run), would
start the node's ε at zero. With ``state-dir`` in the node config, each run's history is
also written (atomically, mode 600, never through a link) to
``<state-dir>/dpsgd-<run>-partition-<p>.json`` after every round and read back when
``context.state`` has none.

Runs are named by the id the server's strategy sends in the train config (``lepton-run-id``,
kept across resumes: :class:`~lepton_flwr.strategies.round_loop.FlowerLoop`), else by
Flower's run id. The server also says after which round a run resumed
(``lepton-resumed-after``): a node without ``state-dir`` cannot know what it spent before
the resume, so it refuses to train in a resumed run rather than restart its ε.

The node's own budget (``dpsgd-max-epsilon``) counts **every** history the node keeps
(every run in its ``state-dir`` for this partition, and in ``context.state``), not just the
run the server names: a server that sends a fresh run id every round cannot reset it.
Every entry read is checked (a NaN noise multiplier made Opacus' accountant loop for
ever); a state file that is a link, unreadable or malformed makes the node refuse to train.

Not covered: a state file deleted by hand looks like a run the node never trained in;
without ``state-dir`` a server that starts a new Flower run starts the node's count afresh.
"""

from __future__ import annotations

import json
import re
from logging import ERROR
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log

from lepton_flwr import protocol
from lepton_flwr.dp.rounds import checked_history
from lepton_flwr.files import read_file, write_atomically

RUN_ID = re.compile(r"[0-9a-f]{32}")
MAX_STATE_FILE_BYTES = 1 << 20  # a history is a few entries per run
MAX_STATE_FILES = 10_000  # files read for the node's budget


class LostHistoryError(RuntimeError):
    """The node cannot know its DP-SGD history: it must not train.

    The message says why without naming the node's paths (it goes back to the server);
    the node's log has the details.
    """


def _refuse(reason: str, detail: str = "") -> LostHistoryError:
    log(ERROR, "dpsgd: %s%s", reason, f" ({detail})" if detail else "")
    return LostHistoryError(f"{reason}; this node will not train rather than restart its epsilon")


class DPSGDHistory:
    """One node's DP-SGD histories: the current run's and every other one it keeps.

    Parameters
    ----------
    context : Context
        The node's context (``state``, and ``state-dir`` and ``partition-id`` in its node
        config).
    train_config : ConfigRecord | dict
        The round's train config (the run id and whether the run was resumed).
    default_folder : str | Path | None
        The folder used when the node config has no ``state-dir`` (the simulation
        runner's, whose nodes share its machine); None: no state file.

    Raises
    ------
    LostHistoryError
        If the server's run id is malformed, or the run was resumed and this node keeps
        no state file.
    """

    def __init__(self, context: Context, train_config, default_folder: str | Path | None = None):
        self.context = context
        sent = train_config.get(protocol.RUN_ID)
        if sent is None:
            self.run = f"flower-{int(context.run_id)}"
        elif isinstance(sent, str) and RUN_ID.fullmatch(sent):
            self.run = sent
        else:
            raise _refuse("the server's run id is not 32 hexadecimal digits")
        folder = context.node_config.get(protocol.STATE_DIR) or default_folder
        self.folder = Path(str(folder)) if folder else None
        self.partition = int(context.node_config.get(protocol.PARTITION_ID, 0))
        resumed = train_config.get(protocol.RESUMED_AFTER, 0)
        if self.folder is None and resumed not in (0, None):
            raise _refuse(
                "this run resumes an earlier one, and this node keeps no state-dir: it "
                "cannot know the epsilon it spent before the resume"
            )

    def _file(self, run: str) -> Path:
        return self.folder / f"dpsgd-{run}-partition-{self.partition}.json"

    def _cached(self) -> dict[str, list]:
        """The histories ``context.state`` holds, by run."""
        record = self.context.state.config_records.get(protocol.DPSGD_STATE)
        if not record:
            return {}
        try:
            runs = json.loads(str(record["runs"]))
            return {str(run): checked_history(history) for run, history in runs.items()}
        except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as err:
            reason = "the DP-SGD history in the node's state cannot be read"
            raise _refuse(reason, str(err)) from err

    def _read(self, path: Path, run: str | None) -> tuple[str, list[tuple]]:
        """A state file's run and history, checked (``run``: the one it must be)."""
        try:
            saved = json.loads(read_file(path, MAX_STATE_FILE_BYTES))
            if not isinstance(saved, dict):
                raise ValueError("it is not an object")
            if saved.get("partition") != self.partition or (
                run is not None and saved.get("run") != run
            ):
                raise ValueError("it belongs to another run or partition")
            if not isinstance(saved.get("run"), str):
                raise ValueError("it names no run")
            return saved["run"], checked_history(saved.get("history"))
        except (OSError, ValueError, RecursionError) as err:
            reason = "a DP-SGD history in the node's state-dir cannot be read"
            raise _refuse(reason, f"{path}: {err}") from err

    def this_run(self) -> list[tuple]:
        """The current run's history: ``context.state``, else the node's state file."""
        cached = self._cached()
        if self.run in cached:
            return cached[self.run]
        if self.folder is None:
            return []
        path = self._file(self.run)
        if not path.exists() and not path.is_symlink():
            return []
        return self._read(path, self.run)[1]

    def other_runs(self) -> list[tuple]:
        """Every other run's history this node keeps, one after the other (its budget)."""
        runs = {run: h for run, h in self._cached().items() if run != self.run}
        if self.folder is not None and self.folder.is_dir():
            paths = sorted(self.folder.glob(f"dpsgd-*-partition-{self.partition}.json"))
            if len(paths) > MAX_STATE_FILES:
                raise _refuse("the node's state-dir holds too many DP-SGD histories")
            for path in paths:
                run, history = self._read(path, None)
                if run != self.run:
                    runs[run] = history
        return [entry for history in runs.values() for entry in history]

    def save(self, history: list) -> None:
        """Keep the run's history in ``context.state`` and, with a folder, in its file."""
        history = checked_history([list(h) for h in history])
        runs = {**self._cached(), self.run: history}
        text = json.dumps({run: [list(h) for h in h_] for run, h_ in runs.items()})
        self.context.state[protocol.DPSGD_STATE] = ConfigRecord({"runs": text})
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            record = {"run": self.run, "partition": self.partition, "history": history}
            write_atomically(self._file(self.run), json.dumps(record).encode(), 0o600)
