"""A run's checkpoint after every round, written atomically, and read back to resume.

One file, ``checkpoint.zip``: ``state.json`` (the last finished round, the strategy's
state, the metrics of every round so far) and the global model's arrays, each stored
as Flower wrote it (an encrypted model stays encrypted). It is written to a temporary
file in the same folder and renamed over the old one, so a crash leaves either the
previous checkpoint or the new one, never half of one; mode 600.

What a checkpoint holds: the global model (ciphertexts under HE; under DP-FedAvg the
model already released) and the strategy's state: the accountant's history, the
sampling generator's state, the adaptive clip norm, and under HE the last global model
clients accepted (ciphertexts, the fallback of :mod:`lepton_flwr.strategies.last_good`).
It never holds a secret key or a client's update. Whoever reads it learns which clients
the next rounds will sample: keep it as private as the server itself.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from lepton_flwr.files import write_atomically

CHECKPOINT_FILE = "checkpoint.zip"
STATE_MEMBER = "state.json"
FORMAT_VERSION = 1
MAX_STATE_BYTES = 64 << 20  # 64 MiB of JSON: the accountant's history is a few KiB
MAX_ARRAY_BYTES = 1 << 34  # 16 GiB per array
METRICS = ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back; the message says why."""


@dataclass
class Checkpoint:
    """Where a run stands after ``server_round`` rounds.

    Attributes
    ----------
    server_round : int
        The last finished round.
    arrays : ArrayRecord
        The global model after it.
    state : dict
        The strategy's ``state()``: JSON values, and ``ArrayRecord`` values at its top
        level.
    result : Result
        The metrics of rounds 1..``server_round`` (``arrays`` as above).
    evaluated : bool
        Whether round ``server_round``'s evaluation had ended (False: the checkpoint was
        written as its ``aggregate_train`` returned, before its model left the server).
    """

    server_round: int
    arrays: ArrayRecord
    state: dict = field(default_factory=dict)
    result: Result = field(default_factory=Result)
    evaluated: bool = True


def _write_record(archive: zipfile.ZipFile, prefix: str, record: ArrayRecord) -> list[dict]:
    """Store each array as the member ``<prefix>-NNNNN``; return their specs."""
    for index, array in enumerate(record.values()):
        archive.writestr(f"{prefix}-{index:05d}", array.data)
    return [
        {"name": name, "dtype": a.dtype, "shape": list(a.shape), "stype": a.stype}
        for name, a in record.items()
    ]


def _read_record(
    archive: zipfile.ZipFile, sizes: dict[str, int], prefix: str, specs: list
) -> ArrayRecord:
    """The record :func:`_write_record` stored under ``prefix``, size-checked."""
    arrays = {}
    for index, spec in enumerate(specs):
        member = f"{prefix}-{index:05d}"
        if sizes.get(member, MAX_ARRAY_BYTES + 1) > MAX_ARRAY_BYTES:
            raise CheckpointError(f"{member} is missing or over {MAX_ARRAY_BYTES} bytes")
        arrays[str(spec["name"])] = Array(
            dtype=str(spec["dtype"]),
            shape=tuple(int(d) for d in spec["shape"]),
            stype=str(spec["stype"]),
            data=archive.read(member),
        )
    return ArrayRecord(arrays)


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``folder/checkpoint.zip`` atomically (mode 600); return its path.

    The strategy's state is stored as JSON, except its top-level ``ArrayRecord`` values
    (a model it keeps, e.g. the last one clients accepted), stored as arrays.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = {k: v for k, v in checkpoint.state.items() if isinstance(v, ArrayRecord)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        state = {
            "version": FORMAT_VERSION,
            "server_round": checkpoint.server_round,
            "evaluated": checkpoint.evaluated,
            "strategy_state": {
                k: v for k, v in checkpoint.state.items() if not isinstance(v, ArrayRecord)
            },
            "strategy_records": {
                name: _write_record(archive, f"state-{index:03d}", record)
                for index, (name, record) in enumerate(records.items())
            },
            "arrays": _write_record(archive, "array", checkpoint.arrays),
            "result": {
                key: {str(r): dict(m) for r, m in getattr(checkpoint.result, key).items()}
                for key in METRICS
            },
        }
        archive.writestr(STATE_MEMBER, json.dumps(state))
    write_atomically(folder / CHECKPOINT_FILE, buffer.getvalue(), 0o600)
    return folder / CHECKPOINT_FILE


def load_checkpoint(folder: str | Path) -> Checkpoint | None:
    """Read ``folder/checkpoint.zip``; None if there is none.

    Raises
    ------
    CheckpointError
        If the file is not a checkpoint this version wrote, or is damaged.
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = {info.filename: info.file_size for info in archive.infolist()}
            if sizes.get(STATE_MEMBER, MAX_STATE_BYTES + 1) > MAX_STATE_BYTES:
                raise CheckpointError(f"no {STATE_MEMBER} of at most {MAX_STATE_BYTES} bytes")
            state = json.loads(archive.read(STATE_MEMBER))
            if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
                raise CheckpointError(f"not a version-{FORMAT_VERSION} checkpoint")
            result = Result(arrays=_read_record(archive, sizes, "array", state["arrays"]))
            for key in METRICS:
                for server_round, metrics in state["result"][key].items():
                    getattr(result, key)[int(server_round)] = MetricRecord(metrics)
            strategy_state = dict(state["strategy_state"])
            for index, (name, specs) in enumerate(state.get("strategy_records", {}).items()):
                strategy_state[name] = _read_record(archive, sizes, f"state-{index:03d}", specs)
            return Checkpoint(
                server_round=int(state["server_round"]),
                arrays=result.arrays,
                state=strategy_state,
                result=result,
                evaluated=bool(state.get("evaluated", True)),
            )
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({err})") from err
