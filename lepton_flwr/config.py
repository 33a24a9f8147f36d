"""Compose and validate the Hydra config that drives the apps and the runner.

Two ways in. :func:`load_config` composes a config for whoever runs the code (the
runner, the benchmarks, the CLI): its errors quote values to help fix them. A run's
launcher reaches the ServerApp and every ClientApp through Flower's run config instead,
so :func:`load_run_config` treats those overrides as data: parsed once, checked against
an allow-list, composed without resolving anything, and refused with errors that name
keys and reasons, never values.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lepton_flwr import protocol
from lepton_flwr.numbers import is_int

CONFIG_NAME = "config"
DEVICES = ("cpu", "cuda", "auto")


class ConfigError(ValueError):
    """A config value is unknown or out of range; raised before any training starts.

    ``str(err)`` is for whoever wrote the config: key, rule and value. ``err.reason``
    names the key and the rule only: it is what goes back to a run's launcher.
    """

    def __init__(self, message: str, reason: str = "the config is invalid") -> None:
        super().__init__(message)
        self.reason = reason


def config_dir() -> Path:
    """Return the folder of the packaged Hydra configs (`lepton_flwr.conf`)."""
    return Path(str(resources.files("lepton_flwr.conf")))


def _compose(overrides: list[str]) -> DictConfig:
    """The packaged config with Hydra overrides applied, nothing resolved."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=overrides)


def load_config(overrides: str | list[str] = "") -> dict[str, Any]:
    """Compose the config from the packaged YAML files and Hydra overrides.

    For configs a user writes; a run's launcher goes through :func:`load_run_config`.

    Parameters
    ----------
    overrides : str | list[str]
        Hydra overrides, as one shell-quoted string (``"dataset=digits num_rounds=3"``)
        or as a list.

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
        cfg = _compose(list(overrides))
    except HydraException as err:
        raise ConfigError(f"Invalid Hydra overrides {overrides}: {err}") from err
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    validate_config(plain)
    return plain


# ---- Overrides sent by a run's launcher (Flower's run config) ---------------------------


@dataclass(frozen=True)
class Kind:
    """The values a key a run may set takes.

    Attributes
    ----------
    what : str
        How an error names them ("a finite number").
    accepts : Callable[[Any], bool]
        Whether a parsed override value is one of them.
    """

    what: str
    accepts: Callable[[Any], bool]

    def __or__(self, other: Kind) -> Kind:
        return Kind(f"{self.what} or {other.what}", lambda v: self.accepts(v) or other.accepts(v))


INT = Kind("an integer", is_int)
NUMBER = Kind(
    "a finite number",
    lambda v: is_int(v) or (isinstance(v, float) and math.isfinite(v)),
)
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
NULL = Kind("null", lambda v: v is None)
NAME = Kind(
    "a name (letters, digits, '_', '-', '.')",
    lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", v) is not None,
)
INTS = Kind("a list of integers", lambda v: isinstance(v, list) and all(map(is_int, v)))
PATH = Kind("a path", lambda v: isinstance(v, str))
# A key file: read by a process whose working folder is not the user's (a SuperLink's).
ABSOLUTE_PATH = Kind(
    "an absolute path (a relative one is read from wherever the process started)",
    lambda v: isinstance(v, str) and Path(v).expanduser().is_absolute(),
)

# What a run may set on every node and on the server: settings of the packaged groups.
RUN_KEYS: dict[str, Kind] = {
    "num_rounds": INT,
    "seed": INT,
    "device": NAME,
    "round_timeout": NUMBER,
    "train.local_epochs": INT,
    "train.batch_size": INT,
    "train.lr": NUMBER,
    "train.momentum": NUMBER,
    "train.weight_decay": NUMBER,
    "dataset.test_fraction": NUMBER,
    "dataset.natural_id": NAME,
    "model.channels": INTS,
    "model.hidden": INT | INTS,
    "model.activation": NAME,
    "model.J": INT,
    "model.L": INT,
    "model.groups": INT,
    "partition.alpha": NUMBER,
    "partition.min_partition_size": INT,
    "partition.test_fraction": NUMBER,
    "privacy.noise_multiplier": NUMBER | NULL,
    "privacy.target_epsilon": NUMBER | NULL,
    "privacy.delta": NUMBER,
    "privacy.clip_norm": NUMBER,
    "privacy.clipping": NAME,
    "privacy.clipping_side": NAME,
    "privacy.target_quantile": NUMBER,
    "privacy.clip_lr": NUMBER,
    "privacy.count_stddev": NUMBER | NULL,
    "privacy.sampling": NAME,
    "privacy.sample_rate": NUMBER,
    "privacy.accountant": NAME,
    "privacy.max_epsilon": NUMBER | NULL,
    "privacy.seed": INT | NULL,
    "privacy.max_grad_norm": NUMBER,
    "privacy.mode": NAME,
    "privacy.reproducible": BOOL,
    "he.poly_modulus_degree": INT,
    "he.coeff_mod_bit_sizes": INTS,
    "he.scale_bits": INT,
    "he.weight_scale": NUMBER,
    "he.value_bound": NUMBER,
    "he.max_weight_ratio": NUMBER | NULL,
    "he.headroom_fraction": NUMBER,
    "he.seeded": BOOL,
    "he.secure_aggregation": BOOL,
    "he.secagg_colluding_fraction": NUMBER,
    "he.secagg_dropout_fraction": NUMBER,
    "simulation.num_supernodes": INT | NULL,
    "simulation.client_resources.num_cpus": NUMBER,
    "simulation.client_resources.num_gpus": NUMBER,
    "simulation.ray_num_cpus": INT | NULL,
    "strategy.fraction_train": NUMBER,
    "strategy.fraction_evaluate": NUMBER,
    "strategy.min_train_nodes": INT,
    "strategy.min_evaluate_nodes": INT,
    "strategy.min_available_nodes": INT,
    "strategy.dropout_rate": NUMBER,
    "strategy.tolerated_colluders": INT,
}
# What a run may set on the server only: where it writes and reads, and its processes.
# Nodes compose their config without these (they keep the packaged defaults).
SERVER_KEYS: dict[str, Kind] = {
    "output_dir": PATH | NULL,
    "resume": PATH | NULL,
    "checkpoint": BOOL,
    "he.public_context_path": ABSOLUTE_PATH | NULL,
    "he.workers": INT | NULL,
}
# Paths on a node: each node sets them in its own node config, never a run.
NODE_KEYS = {"dataset.root": protocol.DATA_ROOT, "he.secret_context_path": protocol.SECRET_CONTEXT}


def config_groups() -> dict[str, list[str]]:
    """The packaged config groups and their choices (``{"model": ["cnn", ...], ...}``)."""
    return {
        folder.name: sorted(file.stem for file in folder.glob("*.yaml"))
        for folder in sorted(config_dir().iterdir())
        if folder.is_dir() and any(folder.glob("*.yaml"))
    }


def _interpolation_in(value: Any, path: str) -> str | None:
    r"""The path of the first string in ``value`` holding ``${`` (escaped or not), else None.

    Dict keys count too (a key holding one is reported at its parent). OmegaConf reads
    ``${`` as an interpolation anywhere in a string, and turns ``\${`` into a literal
    ``${`` that the next load of a saved config would resolve: both are refused.
    """
    if isinstance(value, str):
        return path if "${" in value else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, child in items:
        if "${" in str(key):
            return path or "the root"
        found = _interpolation_in(child, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _refused(reason: str) -> ConfigError:
    return ConfigError(reason, reason)


def _check_override(override: Override, groups: dict[str, list[str]]) -> None:
    """Refuse an override a run may not send, naming its key and the rule it breaks."""
    key = override.key_or_group
    if override.package is not None:
        raise _refused(f"{key}@...: a run may not place a config at another package ('@')")
    if key in NODE_KEYS:
        raise _refused(
            f"{key} is a path on the nodes: each node takes it from its own node config "
            f"only (flower-supernode --node-config \"{NODE_KEYS[key]}='/path'\")"
        )
    if override.is_delete():
        raise _refused(f"~{key}: a run may not delete config entries")
    if override.value_type is not ValueType.ELEMENT:
        raise _refused(f"{key}: a run sets one value per key (no sweeps)")
    value = override.value()
    where = _interpolation_in(value, key)
    if where is not None:
        raise _refused(
            f"{where} holds an interpolation ('${{...}}'): a run's config takes plain "
            f"values only, and nothing a run sends is ever resolved"
        )
    if key in groups:
        _require_run(
            not override.is_force_add() and value in groups[key],
            f"{key} takes one of the packaged choices ({', '.join(groups[key])}; "
            f"'{key}=<choice>', or '+{key}=<choice>' for a group not chosen by default)",
        )
        return
    kind = RUN_KEYS.get(key) or SERVER_KEYS.get(key)
    _require_run(
        kind is not None,
        f"{key} is not a key a run may set (Hydra's own settings, paths on the nodes and "
        f"keys outside the packaged groups are refused)",
    )
    _require_run(
        override.type is OverrideType.CHANGE,
        f"{key}: a run changes existing keys only ('{key}=...', no '+' or '++')",
    )
    _require_run(kind.accepts(value), f"{key} takes {kind.what}")


def _require_run(condition: bool, reason: str) -> None:
    if not condition:
        raise _refused(reason)


def parse_run_overrides(overrides: str) -> list[Override]:
    """Split a run's overrides once, parse them with Hydra's parser, check each one.

    Parameters
    ----------
    overrides : str
        Shell-quoted Hydra overrides, as the ``hydra-overrides`` run-config key holds them.

    Returns
    -------
    list[Override]
        The parsed overrides: each changes a key of ``RUN_KEYS`` or ``SERVER_KEYS`` to a
        value of its kind, or picks a packaged choice of a group; none holds ``${``.

    Raises
    ------
    ConfigError
        Naming the override (position, key) and the rule it breaks, never its value.
    """
    try:
        tokens = shlex.split(overrides)
    except ValueError as err:  # an unclosed quote or a trailing backslash
        raise _refused(f"not a shell-quoted list of overrides ({err})") from err
    groups = config_groups()
    parser = OverridesParser.create()
    parsed = []
    for number, token in enumerate(tokens, start=1):
        try:
            (override,) = parser.parse_overrides([token])
        except HydraException as err:
            raise _refused(f"override {number} is not a Hydra override (key=value)") from err
        try:
            _check_override(override, groups)
        except ConfigError as err:
            raise _refused(f"override {number}: {err.reason}") from err
        parsed.append(override)
    return parsed


def load_run_config(overrides: str, on_server: bool = False) -> dict[str, Any]:
    """Compose the config a run's launcher asks for, treating the overrides as data.

    The overrides are parsed once and checked (:func:`parse_run_overrides`); a node
    leaves out ``SERVER_KEYS``; the config is composed without resolving, refused if
    anything in it holds ``${``, and validated. Nothing is ever resolved.

    Parameters
    ----------
    overrides : str
        Shell-quoted Hydra overrides (the ``hydra-overrides`` run-config key).
    on_server : bool
        The ServerApp's config (keeps ``SERVER_KEYS``); otherwise a node's.

    Returns
    -------
    dict[str, Any]
        The config as plain containers.

    Raises
    ------
    ConfigError
        Whose ``reason`` names keys and rules only (``str(err)`` may quote a value when
        :func:`validate_config` refuses one: send ``reason`` to the launcher).
    """
    parsed = parse_run_overrides(overrides)
    kept = [o.input_line for o in parsed if on_server or o.key_or_group not in SERVER_KEYS]
    try:
        cfg = _compose(kept)
    except (HydraException, OmegaConfBaseException) as err:
        key = getattr(err.__cause__, "full_key", None)
        if key in RUN_KEYS or key in SERVER_KEYS:
            raise _refused(f"{key} is not a key of the chosen groups") from err
        raise _refused(
            f"Hydra cannot compose these overrides ({type(err).__name__}): choose each group "
            f"once and set only keys the chosen groups have"
        ) from err
    plain = OmegaConf.to_container(cfg, resolve=False)
    where = _interpolation_in(plain, "")
    if where is not None:
        raise _refused(f"the composed config holds an interpolation at {where}")
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
    "max_weight_ratio",
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


def _require(condition: bool, rule: str, *got: Any) -> None:
    """Raise a ConfigError unless ``condition``.

    ``rule`` names the key and what it takes, without its value (it is the error's
    ``reason``); ``got`` are the values found, quoted in the message only.
    """
    if not condition:
        found = f", got {', '.join(map(str, got))}" if got else ""
        raise ConfigError(f"{rule}{found}.", f"{rule}.")


def _check_choice(group: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    allowed = ", ".join(sorted(choices))
    if value not in choices:
        raise ConfigError(
            f"Unknown {group} '{value}'. Allowed choices: {allowed}.",
            f"{group} is not one of the allowed choices: {allowed}.",
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
        Naming the offending key, its value and what would be accepted; its ``reason``
        names the key and what would be accepted only.
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
    if reason is not None:
        raise ConfigError(
            f"model '{model}' cannot train on dataset '{dataset}': {reason}",
            f"the chosen model cannot train on the chosen dataset: {reason}",
        )
    if model == "cnn":
        from lepton_flwr.models.catalogue import ACTIVATION_NAMES  # nets' names, no torch

        _check_choice("model.activation", cfg["model"]["activation"], ACTIVATION_NAMES)
        channels, hidden = list(cfg["model"]["channels"]), cfg["model"]["hidden"]
        _require(
            len(channels) == 2
            and all(isinstance(c, int) and c >= 1 for c in channels)
            and isinstance(hidden, int)
            and hidden >= 1,
            "model.channels must be two positive ints and model.hidden an int >= 1",
            f"channels={channels}",
            f"hidden={hidden}",
        )
    if model == "mlp":
        hidden = cfg["model"]["hidden"]
        _require(
            isinstance(hidden, list) and all(isinstance(h, int) and h >= 1 for h in hidden),
            "model.hidden (mlp) must be a list of positive ints",
            hidden,
        )
    if model == "scatnet":
        from lepton_flwr.models.catalogue import scatnet_shape_error

        m = cfg["model"]
        shape = DATASETS[dataset].image_shape
        reason = scatnet_shape_error(shape, m["J"], m["L"], m["groups"])
        if reason is not None:
            raise ConfigError(
                f"model 'scatnet' on dataset '{dataset}': {reason}.",
                "model.J, model.L and model.groups do not fit the chosen dataset's images.",
            )

    part = cfg["partition"]
    if part["name"] == "dirichlet":
        _require(part["alpha"] > 0, "partition.alpha must be > 0", part["alpha"])
    if part["name"] == "natural":
        _require(
            cfg["dataset"].get("natural_id") is not None,
            f"partition 'natural' needs a dataset with a natural client id (datasets with "
            f"one: {', '.join(n for n, s in DATASETS.items() if s.natural_id)})",
            f"'{dataset}'",
        )
    _require(
        0.0 <= part["test_fraction"] < 1.0,
        "partition.test_fraction must be in [0, 1)",
        part["test_fraction"],
    )

    he = cfg["he"]
    _check_choice("he", he["name"], ("none", "ckks"))
    if cfg["strategy"]["name"].startswith("he_"):
        _require(
            he["name"] == "ckks",
            "an he_* strategy needs he=ckks",
            f"strategy={cfg['strategy']['name']}",
            f"he={he['name']}",
        )
    if he["name"] == "ckks":
        from lepton_flwr.he.params import CKKSParams, HEParamsError

        try:
            CKKSParams.from_config(he)
        except HEParamsError as err:
            raise ConfigError(
                reword(str(err), "he", HE_ARGUMENTS),
                "the he.* settings are not secure or usable CKKS parameters.",
            ) from err
        _require(
            he.get("seeded", True) is True,
            "he.seeded must be true: uploads always carry c1 as its seed (the packed format; "
            "full-size uploads are no longer made)",
            he.get("seeded"),
        )
        _require(he["weight_scale"] > 0, "he.weight_scale must be > 0", he["weight_scale"])
        _require(
            0 < he["headroom_fraction"] <= 1,
            "he.headroom_fraction must be in (0, 1]",
            he["headroom_fraction"],
        )
        ratio = he.get("max_weight_ratio")
        _require(
            ratio is None or (math.isfinite(ratio) and ratio >= 1),
            "he.max_weight_ratio must be a finite number >= 1, or null",
            ratio,
        )

    _validate_privacy(cfg)
    _require(cfg["num_rounds"] >= 1, "num_rounds must be >= 1", cfg["num_rounds"])
    _require(cfg["round_timeout"] > 0, "round_timeout must be > 0 seconds", cfg["round_timeout"])
    train = cfg["train"]
    _require(train["local_epochs"] >= 1, "train.local_epochs must be >= 1", train["local_epochs"])
    _require(train["batch_size"] >= 1, "train.batch_size must be >= 1", train["batch_size"])
    _require(train["lr"] > 0, "train.lr must be > 0", train["lr"])

    sim = cfg["simulation"]
    n = sim["num_supernodes"]
    _require(n is None or n >= 1, "simulation.num_supernodes must be >= 1 or null", n)
    _require(
        n is not None or part["name"] == "natural",
        "simulation.num_supernodes may be null only with partition=natural",
    )
    res = sim["client_resources"]
    _require(
        res["num_cpus"] > 0, "simulation.client_resources.num_cpus must be > 0", res["num_cpus"]
    )
    _require(
        res["num_gpus"] >= 0, "simulation.client_resources.num_gpus must be >= 0", res["num_gpus"]
    )

    strat = cfg["strategy"]
    if "fraction_train" in strat:
        frac = strat["fraction_train"]
        _require(0.0 < frac <= 1.0, "strategy.fraction_train must be in (0, 1]", frac)
    if "fraction_evaluate" in strat:
        frac = strat["fraction_evaluate"]
        _require(0.0 <= frac <= 1.0, "strategy.fraction_evaluate must be in [0, 1]", frac)


def _validate_privacy(cfg: dict[str, Any]) -> None:
    """Check the ``privacy`` group, including that a target epsilon can be reached."""
    p = cfg["privacy"]
    _check_choice("privacy", p["name"], ("none", "client_dp", "dpsgd"))
    if p["name"] == "dpsgd":
        _validate_dpsgd(p)
    if cfg["strategy"]["name"] == "dp_fedavg":
        _require(p["name"] == "client_dp", "strategy=dp_fedavg needs privacy=client_dp", p["name"])
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
    _require(p["clip_norm"] > 0, "privacy.clip_norm must be > 0", p["clip_norm"])
    _require(
        0 < p["sample_rate"] <= 1, "privacy.sample_rate (q) must be in (0, 1]", p["sample_rate"]
    )
    z = p["noise_multiplier"]
    _require(z is None or z > 0, "privacy.noise_multiplier must be > 0", z)
    _require(
        z is not None or p["target_epsilon"] is not None,
        "privacy.noise_multiplier=null needs privacy.target_epsilon to calibrate it",
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
        raise ConfigError(
            reword(str(err), "privacy", PRIVACY_ARGUMENTS),
            "privacy.delta, or privacy.target_epsilon in num_rounds, cannot be met with the "
            "chosen sampling and number of clients.",
        ) from err
    if p["sampling"] == "fixed":
        _require(p["accountant"] == "rdp", "privacy.sampling=fixed is accounted with rdp only")


# Opacus' gradient sample modes DP-SGD takes (lepton_flwr.dp.dpsgd.MODES, which imports
# torch): named here so that checking a config imports neither.
DPSGD_MODES = ("ghost", "hooks", "functorch", "ew")


def _validate_dpsgd(p: dict[str, Any]) -> None:
    _check_choice("privacy.mode", p["mode"], DPSGD_MODES)
    _check_choice("privacy.accountant", p["accountant"], ("rdp", "prv"))
    _require(p["max_grad_norm"] > 0, "privacy.max_grad_norm must be > 0", p["max_grad_norm"])
    z, target = p["noise_multiplier"], p["target_epsilon"]
    _require(z is None or z > 0, "privacy.noise_multiplier must be > 0", z)
    _require(
        z is not None or (target is not None and target > 0),
        "privacy.noise_multiplier=null needs a privacy.target_epsilon > 0",
    )
    _require(0 < p["delta"] < 1, "privacy.delta must be in (0, 1)", p["delta"])


def to_yaml(cfg: dict[str, Any]) -> str:
    """Render a plain config as YAML (what each run writes to its output folder)."""
    return OmegaConf.to_yaml(OmegaConf.create(cfg))
