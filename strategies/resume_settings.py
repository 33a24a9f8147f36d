"""What a resumed run must share with the run it continues.

A checkpoint records the settings its run was started with (:func:`run_settings`): the
strategy's class, ``num_rounds``, the model's layout (each tensor's name, dtype and
shape), the key's fingerprint under HE, and what the strategy names in its
``resume_settings()`` (DP-FedAvg: every privacy and sampling setting). A ``start`` with
a checkpoint made under other values is refused (:func:`check_same_run`), naming each
setting with both values and how to start a new run instead, so that a user who changed
a setting never continues the old run under the old one without a word. Only
``num_rounds`` may change, and only when asked for (``change_num_rounds=True``).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord
from lepton_flwr.strategies.checkpoint import CheckpointError

NUM_ROUNDS = "num_rounds"
MAX_SHOWN = 200  # characters of one value in a refusal


class OtherSettingsError(CheckpointError):
    """A checkpoint of a run started with other settings than the strategy's or start's."""


def model_layout(arrays: ArrayRecord) -> list[list]:
    """Each tensor's ``[name, dtype, shape]``, in the record's order."""
    return [[name, array.dtype, list(array.shape)] for name, array in arrays.items()]


def run_settings(
    strategy: object, initial_arrays: ArrayRecord, num_rounds: int, extra: dict
) -> dict:
    """The settings a checkpoint of this run records, as JSON values.

    Parameters
    ----------
    strategy : object
        The strategy; its class name is recorded, and its ``fingerprint`` (the CKKS key's)
        when it has one.
    initial_arrays : ArrayRecord
        The model ``start`` was given: its layout is recorded, never its values.
    num_rounds : int
        The rounds the run is to have.
    extra : dict
        The strategy's own settings (``resume_settings()``).
    """
    settings = {
        "strategy": type(strategy).__name__,
        NUM_ROUNDS: num_rounds,
        "model": model_layout(initial_arrays),
    }
    fingerprint = getattr(strategy, "fingerprint", None)
    if fingerprint is not None:
        settings["key"] = fingerprint
    settings.update(extra)
    return json.loads(json.dumps(settings))  # tuples become lists, as they read back


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _model_difference(saved: object, own: list) -> str:
    """The first tensor on which two layouts differ, both ways, or their lengths."""
    if not isinstance(saved, list):
        return f"model={_shown(saved)} in the checkpoint, {len(own)} tensors here"
    for index, (old, new) in enumerate(zip(saved, own, strict=False)):
        if old != new:
            return f"model tensor {index}: {_shown(old)} in the checkpoint, {_shown(new)} here"
    return f"model: {len(saved)} tensors in the checkpoint, {len(own)} here"


def differences(saved: dict, own: dict, may_change: tuple[str, ...] = ()) -> list[str]:
    """Each setting that differs, as ``name=<saved> in the checkpoint, <own> here``."""
    missing = object()
    found = []
    for key in sorted(set(saved) | set(own)):
        old, new = saved.get(key, missing), own.get(key, missing)
        if key in may_change or old == new:
            continue
        if key == "model" and new is not missing:
            found.append(_model_difference(old, new))
            continue
        old_text = "unset" if old is missing else _shown(old)
        new_text = "unset" if new is missing else _shown(new)
        found.append(f"{key}={old_text} in the checkpoint, {new_text} here")
    return found


def start_fresh(path: Path) -> str:
    """How to start a new run instead of resuming the one at ``path``."""
    return f"to start a new run instead, give another checkpoint_dir or delete {path}"


def check_same_run(path: Path, saved: dict, own: dict, change_num_rounds: bool = False) -> None:
    """Refuse to resume the run checkpointed at ``path`` with other settings.

    Parameters
    ----------
    path : Path
        The checkpoint file, for the message.
    saved, own : dict
        The checkpoint's :func:`run_settings` and this start's.
    change_num_rounds : bool
        Whether ``num_rounds`` may differ (the run goes on to the new number).

    Raises
    ------
    OtherSettingsError
        Naming every setting that differs, with both values, how to resume, and how to
        start a new run; for a checkpoint that recorded no settings (written by hand,
        or by a version before they were recorded), saying so.
    """
    if not saved:
        raise OtherSettingsError(
            f"{path} records no run settings (written by an earlier version of "
            f"lepton-flwr), so a resume cannot be checked against them; {start_fresh(path)}"
        )
    found = differences(saved, own, (NUM_ROUNDS,) if change_num_rounds else ())
    if not found:
        return
    how = "resume with the settings the run was started with"
    if any(f.startswith(f"{NUM_ROUNDS}=") for f in found):
        how += (
            f" (to take the run to num_rounds={own.get(NUM_ROUNDS)} on purpose, pass "
            f"change_num_rounds=True to start; under DP, more rounds spend more epsilon)"
        )
    raise OtherSettingsError(
        f"{path} is a run started with other settings ({'; '.join(found)[:4000]}): "
        f"{how}; {start_fresh(path)}"
    )
