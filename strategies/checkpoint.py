"""A run's checkpoint, written atomically and authenticated, and read back to resume.

One file, ``checkpoint.zip``, whose members are stored, not compressed: ``state.json``
(the run's id, the last round, whether its evaluation ended, the settings the run was
started with, the strategy's state, the metrics of every round so far, and each array's
dtype, shape and SHA-256),
``state.mac`` (HMAC-SHA256 of ``state.json`` under the server's checkpoint key), and the
arrays, each stored as Flower wrote it (an encrypted model stays encrypted). It is
written to a temporary file in the same folder and renamed over the old one, so a crash
leaves either the previous checkpoint or the new one, never half of one; mode 600.

What a checkpoint holds: the global model (ciphertexts under HE; under DP-FedAvg the
model already released) and the strategy's state: the accountant's history, the
sampling generator's state, the adaptive clip norm, the privacy settings, and under HE
the last global model clients accepted (ciphertexts). It never holds a secret key or a
client's update.

Who must be trusted with what:

- The **checkpoint key** (32 random bytes; ``checkpoint_key=``, else the file named by
  ``$LEPTON_FLWR_CHECKPOINT_KEY``, else ``~/.config/lepton-flwr/checkpoint.key``; made
  mode 600 on first use) authenticates every checkpoint: one that anyone changed (an
  emptied accountant history, another noise multiplier, a larger array) is refused, as
  is any checkpoint when the key is missing. Whoever can read the key can forge
  checkpoints, so it must be readable by the server's user only (a key of another mode
  or owner, or behind a link, is refused) and lie outside the checkpoint folder (a key
  inside it is refused: it would protect nothing against whoever holds the folder).
- Beside the key, a **ledger** keeps each checkpoint folder's run id and last round:
  an older checkpoint of the same folder put back (a rollback, which would make rounds
  run again that the accountant no longer holds), or another run's checkpoint put in its
  place, is refused.
- **Whoever can read a checkpoint** learns which clients the next rounds sample: keep
  the folder as private as the server. **Whoever can write the folder** can delete the
  checkpoint, which makes the next start a new run with its own ε, and nothing more.

A checkpoint that cannot be read (malformed, truncated, oversized, behind a link, not
authenticated) raises :class:`CheckpointError` naming the file and the field; nothing in
it is allocated before its size has been checked against what the file holds.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import secrets
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from lepton_flwr.arrays import check_payload
from lepton_flwr.files import (
    create_exclusively,
    open_regular,
    read_file,
    read_private,
    write_atomically,
)
from lepton_flwr.numbers import is_int

CHECKPOINT_FILE = "checkpoint.zip"
STATE_MEMBER = "state.json"
MAC_MEMBER = "state.mac"
FORMAT_VERSION = 2
MAX_STATE_BYTES = 16 << 20  # 16 MiB of JSON: the accountant's history is a few KiB
MAX_ARRAY_BYTES = 1 << 33  # 8 GiB per array
METRICS = ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")
KEY_ENV = "LEPTON_FLWR_CHECKPOINT_KEY"
KEY_BYTES = 32
LEDGER_FOLDER = "checkpoint-ledger"
_MAC_CONTEXT = b"lepton-flwr checkpoint v2\x00"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_MEMBER = re.compile(r"array-\d{5}|state-\d{3}-\d{5}")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back; the message names the file and why."""


def new_run_id() -> str:
    """A run's id: 128 random bits, kept by every checkpoint and resume of the run."""
    return secrets.token_hex(16)


@dataclass
class Checkpoint:
    """Where a run stands after ``server_round`` rounds.

    Attributes
    ----------
    server_round : int
        The last round whose model was made.
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
    run_id : str
        The run's id (:func:`new_run_id`): the same in every checkpoint of the run, and
        after every resume (Flower gives a resumed run a new run id of its own).
    settings : dict
        The settings the run was started with (JSON values,
        :func:`~lepton_flwr.strategies.resume_settings.run_settings`): a resume under
        other values is refused. Empty in a checkpoint that recorded none.
    """

    server_round: int
    arrays: ArrayRecord
    state: dict = field(default_factory=dict)
    result: Result = field(default_factory=Result)
    evaluated: bool = True
    run_id: str = field(default_factory=new_run_id)
    settings: dict = field(default_factory=dict)


# ---- the key and the ledger ---------------------------------------------------------


def default_key_file() -> Path:
    """Where the checkpoint key is, unless one is given.

    ``$LEPTON_FLWR_CHECKPOINT_KEY``, else ``$XDG_CONFIG_HOME/lepton-flwr/checkpoint.key``
    (``~/.config`` when ``XDG_CONFIG_HOME`` is unset).
    """
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "lepton-flwr" / "checkpoint.key"


def _key(key_file: str | Path | None, folder: Path, create: bool) -> tuple[bytes, Path]:
    """The checkpoint key and its path (made first if ``create``).

    Raises
    ------
    CheckpointError
        If the key lies in the checkpoint folder, is missing (``create`` False), or is
        not a private file of 32 bytes or more.
    """
    path = Path(key_file) if key_file is not None else default_key_file()
    path = path.expanduser().absolute()
    if folder.resolve() in path.resolve().parents:
        raise CheckpointError(
            f"the checkpoint key {path} lies in the checkpoint folder {folder}: whoever "
            f"holds the folder would hold the key, and could forge checkpoints; keep it "
            f"elsewhere (checkpoint_key=, or ${KEY_ENV})"
        )
    if create and not os.path.lexists(path):
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_exclusively(path, secrets.token_bytes(KEY_BYTES), 0o600)
        except OSError as err:
            raise CheckpointError(
                f"the checkpoint key {path} cannot be made ({err}); give a folder the server "
                f"may write (checkpoint_key=, or ${KEY_ENV})"
            ) from err
    try:
        key = read_private(path, 4096)
    except FileNotFoundError:
        raise CheckpointError(
            f"there is no checkpoint key at {path}, so the checkpoint in {folder} cannot be "
            f"authenticated; give the key it was written with (checkpoint_key=, or "
            f"${KEY_ENV})"
        ) from None
    except OSError as err:
        raise CheckpointError(f"the checkpoint key cannot be used: {err}") from err
    if len(key) < KEY_BYTES:
        raise CheckpointError(f"the checkpoint key {path} holds {len(key)} bytes, not {KEY_BYTES}")
    return key, path


def _ledger_file(key_path: Path, folder: Path) -> Path:
    name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    return key_path.parent / LEDGER_FOLDER / f"{name}.json"


def _run_ledger_file(key_path: Path, run_id: str) -> Path:
    """Where the run's last round is kept, whatever folder its checkpoints are in."""
    return key_path.parent / LEDGER_FOLDER / f"run-{run_id}.json"


def _ledger_entry(key_path: Path, folder: Path, path: Path | None = None) -> dict | None:
    """The last run id and round written for the folder (or for a run, from ``path``)."""
    path = path or _ledger_file(key_path, folder)
    try:
        entry = json.loads(read_file(path, 4096))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"the checkpoint ledger {path} cannot be read ({err})") from err
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("run_id"), str)
        and is_int(entry.get("server_round"))
    ):
        raise CheckpointError(f"the checkpoint ledger {path} is not one this version wrote")
    return entry


def _write_ledger(key_path: Path, folder: Path, checkpoint: Checkpoint) -> None:
    path = _ledger_file(key_path, folder)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    entry = {
        "folder": str(folder.resolve()),
        "run_id": checkpoint.run_id,
        "server_round": checkpoint.server_round,
    }
    write_atomically(path, json.dumps(entry).encode(), 0o600)
    run_path = _run_ledger_file(key_path, checkpoint.run_id)
    write_atomically(run_path, json.dumps(entry).encode(), 0o600)


def _mac(key: bytes, state: bytes) -> str:
    return hmac.new(key, _MAC_CONTEXT + state, hashlib.sha256).hexdigest()


# ---- writing --------------------------------------------------------------------------


def _write_record(archive: zipfile.ZipFile, prefix: str, record: ArrayRecord) -> list[dict]:
    """Store each array as the member ``<prefix>-NNNNN``; return their specs."""
    specs = []
    for index, (name, array) in enumerate(record.items()):
        archive.writestr(f"{prefix}-{index:05d}", array.data)
        specs.append(
            {
                "name": name,
                "dtype": array.dtype,
                "shape": list(array.shape),
                "stype": array.stype,
                "sha256": hashlib.sha256(array.data).hexdigest(),
            }
        )
    return specs


def save_checkpoint(
    folder: str | Path, checkpoint: Checkpoint, key_file: str | Path | None = None
) -> Path:
    """Write ``folder/checkpoint.zip`` atomically (mode 600), authenticated; return its path.

    The strategy's state is stored as JSON, except its top-level ``ArrayRecord`` values
    (a model it keeps, e.g. the last one clients accepted), stored as arrays. The key
    (``key_file``, else :func:`default_key_file`) is made if it does not exist yet, and
    the ledger beside it records the folder's run and round.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key, key_path = _key(key_file, folder, create=True)
    records = {k: v for k, v in checkpoint.state.items() if isinstance(v, ArrayRecord)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        state = {
            "version": FORMAT_VERSION,
            "run_id": checkpoint.run_id,
            "server_round": checkpoint.server_round,
            "evaluated": checkpoint.evaluated,
            "run_settings": checkpoint.settings,
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
        text = json.dumps(state).encode()
        archive.writestr(STATE_MEMBER, text)
        archive.writestr(MAC_MEMBER, _mac(key, text))
    write_atomically(folder / CHECKPOINT_FILE, buffer.getvalue(), 0o600)
    _write_ledger(key_path, folder, checkpoint)
    return folder / CHECKPOINT_FILE


# ---- reading --------------------------------------------------------------------------


def _get(mapping: dict, name: str, kind: type | tuple, where: str = "state.json"):
    """``mapping[name]``, which must be of ``kind``."""
    if not isinstance(mapping, dict) or name not in mapping:
        raise CheckpointError(f"{where} has no field '{name}'")
    value = mapping[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{where}: field '{name}' is not {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "a bool"}[k]
        for k in kinds
    )


def _read_record(
    archive: zipfile.ZipFile, sizes: dict[str, int], prefix: str, specs: object
) -> ArrayRecord:
    """The record :func:`_write_record` stored under ``prefix``, checked before reading."""
    if not isinstance(specs, list):
        raise CheckpointError(f"the array list of '{prefix}' is not a list")
    arrays = {}
    for index, spec in enumerate(specs):
        member = f"{prefix}-{index:05d}"
        where = f"the spec of {member}"
        name = _get(spec, "name", str, where)
        dtype, stype = _get(spec, "dtype", str, where), _get(spec, "stype", str, where)
        shape = _get(spec, "shape", list, where)
        digest = _get(spec, "sha256", str, where)
        if not all(is_int(d) and 0 <= d <= MAX_ARRAY_BYTES for d in shape) or len(shape) > 32:
            raise CheckpointError(f"{where}: shape {str(shape)[:80]} is not a list of sizes")
        if name in arrays:
            raise CheckpointError(f"{where}: the name '{name[:80]}' comes twice")
        if member not in sizes:
            raise CheckpointError(f"{member} is missing")
        if sizes[member] > MAX_ARRAY_BYTES:
            raise CheckpointError(f"{member} is over {MAX_ARRAY_BYTES} bytes")
        data = archive.read(member)
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), digest):
            raise CheckpointError(f"{member} is not the array state.json names (SHA-256)")
        try:
            check_payload(dtype, tuple(shape), stype, data)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{member}: {err}") from err
        arrays[name] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)
    return ArrayRecord(arrays)


def _members(archive: zipfile.ZipFile, file_size: int) -> dict[str, int]:
    """Each member's size, once every member is one we write, stored whole.

    Raises
    ------
    CheckpointError
        For a compressed member (a small file must not expand), an unknown or repeated
        name, or sizes that the file cannot hold.
    """
    sizes: dict[str, int] = {}
    for info in archive.infolist():
        name = info.filename
        if name not in (STATE_MEMBER, MAC_MEMBER) and not _MEMBER.fullmatch(name):
            raise CheckpointError(f"unexpected member {name[:80]!r}")
        if name in sizes:
            raise CheckpointError(f"member {name} comes twice")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise CheckpointError(f"member {name} is compressed; checkpoints store members")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"member {name} is encrypted; checkpoints store members")
        sizes[name] = info.file_size
    if sum(sizes.values()) > file_size:
        raise CheckpointError("its members claim more bytes than the file holds")
    return sizes


def _metrics(state: dict) -> Result:
    result = Result()
    saved = _get(state, "result", dict)
    for key in METRICS:
        for server_round, metrics in _get(saved, key, dict, "result").items():
            if not (server_round.isdigit() and len(server_round) < 10):
                raise CheckpointError(f"result.{key}: '{server_round[:20]}' is not a round")
            try:
                getattr(result, key)[int(server_round)] = MetricRecord(metrics)
            except (TypeError, ValueError, AttributeError) as err:
                raise CheckpointError(
                    f"result.{key}[{server_round}] is not a MetricRecord ({err})"
                ) from err
    return result


def _parse(archive: zipfile.ZipFile, sizes: dict[str, int], key: bytes) -> dict:
    """``state.json``, once its MAC is checked."""
    if sizes.get(STATE_MEMBER, MAX_STATE_BYTES + 1) > MAX_STATE_BYTES:
        raise CheckpointError(f"no {STATE_MEMBER} of at most {MAX_STATE_BYTES} bytes")
    if sizes.get(MAC_MEMBER, 1025) > 1024:
        raise CheckpointError(f"no {MAC_MEMBER}: the checkpoint is not authenticated")
    text = archive.read(STATE_MEMBER)
    if not hmac.compare_digest(archive.read(MAC_MEMBER), _mac(key, text).encode()):
        raise CheckpointError(
            "its MAC does not match: it was changed after it was written, or written "
            "with another checkpoint key"
        )
    try:
        state = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{STATE_MEMBER} is not JSON ({type(err).__name__})") from err
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"not a version-{FORMAT_VERSION} checkpoint")
    return state


def load_checkpoint(folder: str | Path, key_file: str | Path | None = None) -> Checkpoint | None:
    """Read ``folder/checkpoint.zip``, authenticated with the key; None if there is none.

    Raises
    ------
    CheckpointError
        If the file is not a checkpoint this version wrote with this key, is damaged,
        oversized, a link, an older checkpoint of the folder than its last one, or
        another run's (naming the file and the field).
    """
    folder = Path(folder)
    path = folder / CHECKPOINT_FILE
    if not os.path.lexists(path):
        return None
    key, key_path = _key(key_file, folder, create=False)
    try:
        with os.fdopen(open_regular(path), "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            with zipfile.ZipFile(handle) as archive:
                sizes = _members(archive, file_size)
                state = _parse(archive, sizes, key)
                checkpoint = Checkpoint(
                    server_round=_get(state, "server_round", int),
                    arrays=_read_record(archive, sizes, "array", _get(state, "arrays", list)),
                    state=dict(_get(state, "strategy_state", dict)),
                    result=_metrics(state),
                    evaluated=_get(state, "evaluated", bool),
                    run_id=_get(state, "run_id", str),
                    settings=dict(_get(state, "run_settings", dict))
                    if "run_settings" in state
                    else {},
                )
                records = _get(state, "strategy_records", dict)
                for index, (name, specs) in enumerate(records.items()):
                    prefix = f"state-{index:03d}"
                    checkpoint.state[name] = _read_record(archive, sizes, prefix, specs)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    except (
        OSError,
        EOFError,
        zipfile.BadZipFile,
        NotImplementedError,  # zipfile: a version or method it does not read
        ValueError,
        TypeError,
    ) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({err})") from err
    checkpoint.result.arrays = checkpoint.arrays
    _check_ledger(path, key_path, folder, checkpoint)
    return checkpoint


def _check_ledger(path: Path, key_path: Path, folder: Path, checkpoint: Checkpoint) -> None:
    """Refuse another run's checkpoint, or one older than the folder's last (a rollback)."""
    if not _RUN_ID.fullmatch(checkpoint.run_id) or checkpoint.server_round < 0:
        raise CheckpointError(f"{path}: its run id or round is malformed")
    entry = _ledger_entry(key_path, folder)
    if entry is not None and entry["run_id"] != checkpoint.run_id:
        raise CheckpointError(
            f"{path} belongs to run {checkpoint.run_id}, but the last checkpoint written in "
            f"{folder} was run {entry['run_id'][:32]}'s (ledger {_ledger_file(key_path, folder)})"
        )
    run_entry = _ledger_entry(key_path, folder, _run_ledger_file(key_path, checkpoint.run_id))
    for last, where in ((entry, "this folder's"), (run_entry, "this run's")):
        if last is not None and checkpoint.server_round < last["server_round"]:
            raise CheckpointError(
                f"{path} is the checkpoint of round {checkpoint.server_round}, but {where} "
                f"last checkpoint was written after round {last['server_round']}: an older "
                f"checkpoint put back (in any folder) would run rounds again that the "
                f"accountant does not hold"
            )
