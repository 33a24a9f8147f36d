"""Compose and validate the Hydra config that drives the apps and the runner."""

from __future__ import annotations

import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

CONFIG_NAME = "config"
DEVICES = ("cpu", "cuda", "auto")


class ConfigError(ValueError):
    """A config value is unknown or out of range; raised before any training starts."""


def config_dir() -> Path:
    """Return the folder of the packaged Hydra configs (`lepton_flwr.conf`)."""
    return Path(str(resources.files("lepton_flwr.conf")))


def load_config(overrides: str | list[str] = "") -> dict[str, Any]:
    """Compose the config from the packaged YAML files and Hydra overrides.

    Parameters
    ----------
    overrides : str | list[str]
        Hydra overrides, as one shell-quoted string (``"dataset=digits num_rounds=3"``,
        the form that travels in Flower's run config) or as a list.

    Returns
    -------
    dict[str, Any]
        The resolved config as plain containers (safe to pickle and send to Ray).

    Raises
    ------
    ConfigError
        If an override names an unknown group choice or key, or a value is invalid.
    """
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except HydraException as err:
        raise ConfigError(f"Invalid Hydra overrides {overrides}: {err}") from err
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    validate_config(plain)
    return plain


def reword(message: str, group: str, names: tuple[str, ...]) -> str:
    """A library message in config terms: each argument name becomes its key path.

    The library names its arguments (``delta must be in (0, 1)``); a config user reads
    ``privacy.delta must be in (0, 1)``.
    """
    for name in names:
        message = re.sub(rf"(?<![\w.-]){name}(?=\s*(=|<|must|'))", f"{group}.{name}", message)
    return message


HE_ARGUMENTS = (
    "poly_modulus_degree",
    "coeff_mod_bit_sizes",
    "scale_bits",
    "weight_scale",
    "value_bound",
)
PRIVACY_ARGUMENTS = (
    "noise_multiplier",
    "target_epsilon",
    "delta",
    "clip_norm",
    "clipping_side",
    "count_stddev",
    "sample_rate",
    "sampling",
    "accountant",
    "max_epsilon",
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(group: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    _require(
        value in choices,
        f"Unknown {group} '{value}'. Allowed choices: {', '.join(sorted(choices))}.",
    )


def validate_config(cfg: dict[str, Any]) -> None:
    """Check names and ranges of a composed config.

    Everything that can be checked without loading data is checked here: unknown
    strategy, model, dataset or partition names, model/dataset mismatches, and
    numeric ranges. Checks that need the data (more clients than samples) run when
    the partitions are built, still before any training.

    Raises
    ------
    ConfigError
        Naming the offending key, its value and what would be accepted.
    """
    from lepton_flwr.apps.build import STRATEGIES
    from lepton_flwr.data import DATASETS, PARTITIONERS
    from lepton_flwr.models import MODELS, model_supports

    _check_choice("strategy", cfg["strategy"]["name"], list(STRATEGIES))
    _check_choice("dataset", cfg["dataset"]["name"], list(DATASETS))
    _check_choice("model", cfg["model"]["name"], list(MODELS))
    _check_choice("partition", cfg["partition"]["name"], list(PARTITIONERS))
    _check_choice("device", cfg["device"], DEVICES)

    dataset, model = cfg["dataset"]["name"], cfg["model"]["name"]
    reason = model_supports(model, DATASETS[dataset].task, DATASETS[dataset].is_image)
    _require(reason is None, f"model '{model}' cannot train on dataset '{dataset}': {reason}")
    if model == "cnn":
        from lepton_flwr.models.nets import ACTIVATIONS

        _check_choice("model.activation", cfg["model"]["activation"], list(ACTIVATIONS))
        channels = list(cfg["model"]["channels"])
        _require(
            len(channels) == 2 and all(c >= 1 for c in channels) and cfg["model"]["hidden"] >= 1,
            f"model.channels must be two positive ints and model.hidden >= 1, got "
            f"channels={channels}, hidden={cfg['model']['hidden']}.",
        )
    if model == "scatnet":
        from lepton_flwr.models.nets import scatnet_shape_error

        m = cfg["model"]
        shape = DATASETS[dataset].image_shape
        reason = scatnet_shape_error(shape, m["J"], m["L"], m["groups"])
        _require(reason is None, f"model 'scatnet' on dataset '{dataset}': {reason}.")

    part = cfg["partition"]
    if part["name"] == "dirichlet":
        _require(part["alpha"] > 0, f"partition.alpha must be > 0, got {part['alpha']}.")
    if part["name"] == "natural":
        _require(
            cfg["dataset"].get("natural_id") is not None,
            f"partition 'natural' needs a dataset with a natural client id; "
            f"'{dataset}' has none (datasets with one: "
            f"{', '.join(n for n, s in DATASETS.items() if s.natural_id)}).",
        )
    _require(
        0.0 <= part["test_fraction"] < 1.0,
        f"partition.test_fraction must be in [0, 1), got {part['test_fraction']}.",
    )

    he = cfg["he"]
    _check_choice("he", he["name"], ("none", "ckks"))
    if cfg["strategy"]["name"].startswith("he_"):
        _require(
            he["name"] == "ckks",
            f"strategy={cfg['strategy']['name']} needs he=ckks, got he={he['name']}.",
        )
    if he["name"] == "ckks":
        from lepton_flwr.he.params import CKKSParams, HEParamsError

        try:
            CKKSParams.from_config(he)
        except HEParamsError as err:
            raise ConfigError(reword(str(err), "he", HE_ARGUMENTS)) from err
        _require(he["weight_scale"] > 0, f"he.weight_scale must be > 0, got {he['weight_scale']}.")
        _require(
            0 < he["headroom_fraction"] <= 1,
            f"he.headroom_fraction must be in (0, 1], got {he['headroom_fraction']}.",
        )

    _validate_privacy(cfg)
    _require(cfg["num_rounds"] >= 1, f"num_rounds must be >= 1, got {cfg['num_rounds']}.")
    _require(
        cfg["round_timeout"] > 0, f"round_timeout must be > 0 seconds, got {cfg['round_timeout']}."
    )
    train = cfg["train"]
    _require(
        train["local_epochs"] >= 1, f"train.local_epochs must be >= 1, got {train['local_epochs']}."
    )
    _require(train["batch_size"] >= 1, f"train.batch_size must be >= 1, got {train['batch_size']}.")
    _require(train["lr"] > 0, f"train.lr must be > 0, got {train['lr']}.")

    sim = cfg["simulation"]
    n = sim["num_supernodes"]
    _require(n is None or n >= 1, f"simulation.num_supernodes must be >= 1 or null, got {n}.")
    _require(
        n is not None or part["name"] == "natural",
        "simulation.num_supernodes may be null only with partition=natural.",
    )
    res = sim["client_resources"]
    _require(
        res["num_cpus"] > 0,
        f"simulation.client_resources.num_cpus must be > 0, got {res['num_cpus']}.",
    )
    _require(
        res["num_gpus"] >= 0,
        f"simulation.client_resources.num_gpus must be >= 0, got {res['num_gpus']}.",
    )

    strat = cfg["strategy"]
    if "fraction_train" in strat:
        frac = strat["fraction_train"]
        _require(0.0 < frac <= 1.0, f"strategy.fraction_train must be in (0, 1], got {frac}.")
    if "fraction_evaluate" in strat:
        frac = strat["fraction_evaluate"]
        _require(0.0 <= frac <= 1.0, f"strategy.fraction_evaluate must be in [0, 1], got {frac}.")


def _validate_privacy(cfg: dict[str, Any]) -> None:
    """Check the ``privacy`` group, including that a target epsilon can be reached."""
    p = cfg["privacy"]
    _check_choice("privacy", p["name"], ("none", "client_dp", "dpsgd"))
    if p["name"] == "dpsgd":
        _validate_dpsgd(p)
    if cfg["strategy"]["name"] == "dp_fedavg":
        _require(
            p["name"] == "client_dp",
            f"strategy=dp_fedavg needs privacy=client_dp, got {p['name']}.",
        )
    if p["name"] != "client_dp":
        return
    from lepton_flwr.dp.accounting import (
        ACCOUNTANTS,
        SAMPLINGS,
        PrivacyConfigError,
        calibrate_noise_multiplier,
        check_delta,
    )

    _check_choice("privacy.sampling", p["sampling"], SAMPLINGS)
    _check_choice("privacy.accountant", p["accountant"], ACCOUNTANTS)
    _check_choice("privacy.clipping", p["clipping"], ("fixed", "adaptive"))
    _check_choice("privacy.clipping_side", p["clipping_side"], ("server", "client"))
    _require(p["clip_norm"] > 0, f"privacy.clip_norm must be > 0, got {p['clip_norm']}.")
    _require(
        0 < p["sample_rate"] <= 1,
        f"privacy.sample_rate (q) must be in (0, 1], got {p['sample_rate']}.",
    )
    z = p["noise_multiplier"]
    _require(z is None or z > 0, f"privacy.noise_multiplier must be > 0, got {z}.")
    _require(
        z is not None or p["target_epsilon"] is not None,
        "privacy.noise_multiplier=null needs privacy.target_epsilon to calibrate it.",
    )
    population = cfg["simulation"]["num_supernodes"]
    try:
        check_delta(p["delta"], population)
        if z is None:
            rate = p["sample_rate"]
            if p["sampling"] == "fixed" and population:
                rate = max(1, round(rate * population)) / population
            calibrate_noise_multiplier(
                p["target_epsilon"],
                p["delta"],
                rate,
                cfg["num_rounds"],
                p["accountant"],
                p["sampling"],
                population,
            )
    except PrivacyConfigError as err:
        raise ConfigError(reword(str(err), "privacy", PRIVACY_ARGUMENTS)) from err
    if p["sampling"] == "fixed":
        _require(p["accountant"] == "rdp", "privacy.sampling=fixed is accounted with rdp only.")


def _validate_dpsgd(p: dict[str, Any]) -> None:
    from lepton_flwr.dp.dpsgd import MODES

    _check_choice("privacy.mode", p["mode"], MODES)
    _check_choice("privacy.accountant", p["accountant"], ("rdp", "prv"))
    _require(
        p["max_grad_norm"] > 0, f"privacy.max_grad_norm must be > 0, got {p['max_grad_norm']}."
    )
    z, target = p["noise_multiplier"], p["target_epsilon"]
    _require(z is None or z > 0, f"privacy.noise_multiplier must be > 0, got {z}.")
    _require(
        z is not None or (target is not None and target > 0),
        "privacy.noise_multiplier=null needs a privacy.target_epsilon > 0.",
    )
    _require(0 < p["delta"] < 1, f"privacy.delta must be in (0, 1), got {p['delta']}.")


def to_yaml(cfg: dict[str, Any]) -> str:
    """Render a plain config as YAML (what each run writes to its output folder)."""
    return OmegaConf.to_yaml(OmegaConf.create(cfg))
