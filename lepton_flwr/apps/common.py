"""What the ServerApp and the ClientApp share: config lookup and model construction."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import Context
from omegaconf import OmegaConf
from torch import nn

from lepton_flwr import protocol
from lepton_flwr.config import ConfigError, load_config
from lepton_flwr.data import CentralData, load_dataset
from lepton_flwr.models import build_model

OVERRIDES_KEY = "hydra-overrides"
# Where a node keeps its files is set in its node config, never by the run's launcher.
NODE_ONLY_KEYS = {
    "dataset.root": "data-root",
    "he.secret_context_path": "he-secret-context",
}


@lru_cache(maxsize=8)
def _config_for_overrides(overrides: str) -> dict:
    return load_config(overrides)


def config_from_context(context: Context) -> dict:
    """Compose the run's config from the ``hydra-overrides`` run-config key (``flwr run``)."""
    unknown = sorted(set(context.run_config) - {OVERRIDES_KEY, protocol.SECRET_CONTEXT})
    if unknown:
        raise KeyError(
            f"Unknown run-config key(s) {unknown}: lepton-flwr takes '{OVERRIDES_KEY}' "
            f"(and '{protocol.SECRET_CONTEXT}' in a simulation), e.g. --run-config "
            f"'{OVERRIDES_KEY}=\"dataset=digits num_rounds=3\"'."
        )
    overrides = str(context.run_config.get(OVERRIDES_KEY, ""))
    if "${" in overrides:
        # A run's config comes from whoever launched it; resolving an interpolation on a
        # node would let them read the node's environment (${oc.env:...}) back in an error.
        raise ValueError(
            f"'{OVERRIDES_KEY}' holds an interpolation ('${{...}}'); run-config overrides "
            f"take plain values only, and nodes never resolve interpolations sent to them."
        )
    for token in overrides.split():
        key = token.split("=", 1)[0].lstrip("+~")
        if key in NODE_ONLY_KEYS:
            raise ValueError(
                f"'{OVERRIDES_KEY}' sets {key}, a path on the nodes; nodes take it from their "
                f"own node config only (flower-supernode --node-config "
                f"\"{NODE_ONLY_KEYS[key]}='/path'\")."
            )
    return _config_for_overrides(overrides)


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
        If the folder holds no run, or the configs differ, naming the keys.
    """
    if not cfg.get("resume"):
        return cfg
    folder = Path(cfg["resume"]).expanduser().resolve()
    saved_file = folder / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(f"resume={cfg['resume']}: no run there ({saved_file} is missing)")
    saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=True)
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


def model_for(cfg: dict, data: CentralData | None = None) -> nn.Module:
    """Build the config's model for the config's dataset (shapes from the data)."""
    data = data if data is not None else load_dataset(cfg["dataset"], cfg["seed"])
    return build_model(cfg["model"], data.input_shape, data.num_outputs)
