"""What the ServerApp and the ClientApp share: config lookup and model construction."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from flwr.app import Context
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lepton_flwr import protocol
from lepton_flwr.config import ConfigError, _interpolation_in, load_run_config
from lepton_flwr.data import CentralData, load_dataset
from lepton_flwr.files import read_file

if TYPE_CHECKING:
    from torch import nn

OVERRIDES_KEY = "hydra-overrides"


@lru_cache(maxsize=8)
def _config_for_overrides(overrides: str, on_server: bool) -> dict:
    return load_run_config(overrides, on_server)


def config_from_context(context: Context, on_server: bool = False) -> dict:
    """Compose the run's config from the ``hydra-overrides`` run-config key (``flwr run``).

    Whoever launches a run chooses its run config, so the overrides are data: each one
    must set a key a run may set (``lepton_flwr.config.RUN_KEYS``; the ServerApp also
    takes ``SERVER_KEYS``, which nodes leave out) to a plain value, or pick a packaged
    group choice; nothing is resolved, and nothing composed may hold an interpolation.
    Paths on a node (``dataset.root``, ``he.secret_context_path``) come from its node
    config only.

    Parameters
    ----------
    context : Context
        The app's Flower context.
    on_server : bool
        The ServerApp's config (where the run writes, its public key); else a node's.

    Raises
    ------
    KeyError
        If the run config holds keys other than ours.
    ConfigError
        Naming the override's key and the reason, never a value: the message of an
        exception a ClientApp raises is sent back to the server.
    """
    unknown = sorted(set(context.run_config) - {OVERRIDES_KEY, protocol.SECRET_CONTEXT})
    if unknown:
        raise KeyError(
            f"Unknown run-config key(s) {unknown}: lepton-flwr takes '{OVERRIDES_KEY}' "
            f"(and '{protocol.SECRET_CONTEXT}' in a simulation), e.g. --run-config "
            f"'{OVERRIDES_KEY}=\"dataset=digits num_rounds=3\"'."
        )
    overrides = str(context.run_config.get(OVERRIDES_KEY, ""))
    try:
        return _config_for_overrides(overrides, on_server)
    except Exception as err:  # noqa: BLE001 - a library's own message may quote a value
        why = (
            err.reason
            if isinstance(err, ConfigError)
            else f"the config cannot be composed ({type(err).__name__})"
        )
        reason = f"'{OVERRIDES_KEY}' refused: {why}"
        raise ConfigError(reason, reason) from err


MAX_SAVED_CONFIG_BYTES = 1 << 20
# Settings a resumed run may change: where it writes, how long it waits, how far it goes.
RESUME_MAY_CHANGE = ("resume", "output_dir", "checkpoint", "round_timeout", "num_rounds")


def resumed_config(cfg: dict, take_saved: bool = False) -> dict:
    """The config of a run that continues ``cfg["resume"]`` (a run folder), else ``cfg``.

    Parameters
    ----------
    cfg : dict
        The composed config.
    take_saved : bool
        Use the run's own ``config.yaml`` (the simulation runner, which hands the same
        config to every client). Otherwise (``flwr run``, whose clients compose their
        config from the same overrides) ``cfg`` must equal it but for
        ``RESUME_MAY_CHANGE``.

    Raises
    ------
    ConfigError
        If the folder holds no run, its ``config.yaml`` is a link, unreadable or holds an
        interpolation (it is never resolved), or the configs differ, naming the keys.
    """
    if not cfg.get("resume"):
        return cfg
    folder = Path(cfg["resume"]).expanduser().resolve()
    saved = _saved_config(folder / "config.yaml", cfg["resume"])
    if take_saved:
        cfg = {**saved, "resume": str(folder), "num_rounds": saved["num_rounds"]}
    differing = sorted(
        key
        for key in set(cfg) | set(saved)
        if key not in RESUME_MAY_CHANGE and cfg.get(key) != saved.get(key)
    )
    if differing:
        raise ConfigError(
            f"resume={folder}: the run was made with other settings for {differing}; resume "
            f"with the overrides it was started with (its config.yaml) plus resume=..."
        )
    return {**cfg, "resume": str(folder), "output_dir": str(folder)}


def _saved_config(path: Path, resume: str) -> dict:
    """A run folder's ``config.yaml``: plain values, read without following a link."""
    try:
        text = read_file(path, MAX_SAVED_CONFIG_BYTES).decode("utf-8")
        saved = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except FileNotFoundError:
        raise ConfigError(f"resume={resume}: no run there ({path} is missing)") from None
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"resume={resume}: {path} cannot be read ({err})") from err
    if not isinstance(saved, dict) or "num_rounds" not in saved:
        raise ConfigError(f"resume={resume}: {path} is not a run's config")
    where = _interpolation_in(saved, "")
    if where is not None:
        raise ConfigError(
            f"resume={resume}: {path} holds an interpolation at {where}; a run's saved "
            f"config holds plain values, and it is never resolved"
        )
    return saved


def model_for(cfg: dict, data: CentralData | None = None) -> nn.Module:
    """Build the config's model for the config's dataset (shapes from the data)."""
    from lepton_flwr.models import build_model  # torch: only where a model is built

    data = data if data is not None else load_dataset(cfg["dataset"], cfg["seed"])
    return build_model(cfg["model"], data.input_shape, data.num_outputs)
