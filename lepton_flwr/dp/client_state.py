"""A node's DP-SGD accountant histories, kept by node and data, not by run.

The ε a node reports (``client-epsilon``) and the ε its budget (``dpsgd-max-epsilon``)
bounds are the same quantity: the ε of the node's data over every run it keeps a history
of, this round included. The node's data is named by what the node itself configures and
the server cannot change: its ``state-dir`` and its ``partition-id``. A server that
starts a new run, resumes one, or names a fresh run id every round continues the node's
ε; it cannot reset it.

In a deployment every message runs a fresh ClientApp process; only ``context.state``
survives between rounds, and it lives in the SuperNode's memory and belongs to one Flower
run. With ``state-dir`` in the node config, each run's history is also written
(atomically, mode 600, never through a link) to
``<state-dir>/dpsgd-<run>-partition-<p>.json`` after every round, and every such file of
the partition counts. One file per run: two runs on the same node never write the same
file. A lock (``<state-dir>/dpsgd-partition-<p>.lock``) is held from reading the histories
to saving the new one, so that two runs at once on the node cannot both pass its budget
on the same past; with a folder the state file, not ``context.state``, holds the run's
history (a second Flower run sent the same run id continues it, never overwrites it).

Runs are named by the id the server's strategy sends in the train config (``lepton-run-id``,
kept across resumes: :class:`~lepton_flwr.strategies.round_loop.FlowerLoop`), else by
Flower's run id. The run only names the file a run appends to. The server also says after
which round a run resumed (``lepton-resumed-after``): a node without ``state-dir`` cannot
know what it spent before the resume, so it refuses to train in a resumed run rather than
restart its ε.

A simulated node (the simulation runner's, without a ``state-dir`` of its own) keeps its
histories in the run folder's ``client-state/``: a resumed simulation continues them, a
new simulation (a new run folder) starts its nodes afresh.

Every entry read is checked (a NaN noise multiplier made Opacus' accountant loop for
ever); a state file that is a link, unreadable or malformed makes the node refuse to
train, and the node's log names the file and the field.

Not covered: a state file deleted by hand looks like a run the node never trained in;
without ``state-dir`` the node's histories live in ``context.state``, which belongs to one
Flower run: its ε and its budget then cover that run only, and a server that starts a new
Flower run starts the node's count afresh.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from logging import ERROR
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log

from lepton_flwr import protocol
from lepton_flwr.dp.rounds import checked_history
from lepton_flwr.files import open_regular, read_file, write_atomically

RUN_ID = re.compile(r"[0-9a-f]{32}")
_RUN_NAME = re.compile(r"[0-9a-f]{32}|flower-[0-9]{1,20}")  # what ``run`` may be in a file
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
    """One node's DP-SGD histories on its data: the current run's and every other one it keeps.

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

    def _read(self, path: Path) -> tuple[str, list[tuple]]:
        """A state file's run (the one its name says) and history, checked."""
        run = path.name.removeprefix("dpsgd-").removesuffix(f"-partition-{self.partition}.json")
        try:
            if not _RUN_NAME.fullmatch(run):
                raise ValueError("its name holds no run id")
            saved = json.loads(read_file(path, MAX_STATE_FILE_BYTES))
            if not isinstance(saved, dict):
                raise ValueError("it is not a JSON object")
            if saved.get("partition") != self.partition:
                shown = str(saved.get("partition"))[:40]
                raise ValueError(f"field 'partition' is {shown}, not this node's {self.partition}")
            if saved.get("run") != run:
                shown = str(saved.get("run"))[:40]
                raise ValueError(f"field 'run' is {shown}, not {run} as its name says")
            try:
                return saved["run"], checked_history(saved.get("history"))
            except ValueError as err:
                raise ValueError(f"field 'history': {err}") from err
        except (OSError, ValueError, RecursionError) as err:
            reason = "a DP-SGD history in the node's state-dir cannot be read"
            raise _refuse(reason, f"{path}: {err}") from err

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the node's lock on this data's histories (a no-op without a folder).

        Raises
        ------
        LostHistoryError
            If the lock file is a link or not a regular file, or cannot be made.
        """
        if self.folder is None:
            yield
            return
        path = self.folder / f"dpsgd-partition-{self.partition}.lock"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = open_regular(path, os.O_WRONLY | os.O_CREAT, 0o600)
        except (OSError, ValueError) as err:
            raise _refuse("the node's DP-SGD lock cannot be taken", f"{path}: {err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def this_run(self) -> list[tuple]:
        """The current run's history: the node's state file, else ``context.state``."""
        if self.folder is not None:
            path = self._file(self.run)
            if path.exists() or path.is_symlink():
                return self._read(path)[1]
        return self._cached().get(self.run, [])

    def other_runs(self) -> list[tuple]:
        """Every other run's history on this data, one after the other.

        Counted in the ε the node reports and in its budget.
        """
        runs = {run: h for run, h in self._cached().items() if run != self.run}
        if self.folder is not None and self.folder.is_dir():
            paths = sorted(self.folder.glob(f"dpsgd-*-partition-{self.partition}.json"))
            if len(paths) > MAX_STATE_FILES:
                raise _refuse("the node's state-dir holds too many DP-SGD histories")
            for path in paths:
                run, history = self._read(path)
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
