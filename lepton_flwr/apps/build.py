"""The one place where the runner turns a composed Hydra config into library objects.

The library (strategies, mods) takes explicit arguments and raises plain messages that
name them; here the config's groups map onto those arguments, and a library error is
re-worded with the config's key paths (``privacy.delta`` rather than ``delta``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.clientapp.typing import Mod

from lepton_flwr.config import HE_ARGUMENTS, PRIVACY_ARGUMENTS, ConfigError, reword
from lepton_flwr.mods import dp_clip_mod, make_he_dp_mod, make_he_mod, privacy_floor_mod
from lepton_flwr.secagg.params import SecAggParams, SecAggParamsError

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

# The strategies (SciPy, the accountants) are imported by the builders below, on the
# server: a ClientApp checks a config's strategy name against STRATEGIES without them.


def _fedavg_arguments(strategy_cfg: dict, train_sampling: bool = True) -> dict:
    """Flower FedAvg's arguments from the ``strategy`` group.

    DP strategies sample training clients themselves (``privacy.sample_rate``):
    ``train_sampling=False`` leaves out ``fraction_train``.
    """
    from lepton_flwr.strategies.metrics import aggregate_train_metrics

    keys = ["fraction_evaluate", "min_evaluate_nodes", "min_available_nodes", "min_train_nodes"]
    if train_sampling:
        keys += ["fraction_train"]
    return {key: strategy_cfg[key] for key in keys} | {
        "train_metrics_aggr_fn": aggregate_train_metrics
    }


def _dp_arguments(cfg: dict) -> dict:
    """The DP round arguments (sampling, noise, budget) from the ``privacy`` group."""
    p = cfg["privacy"]
    keys = ("noise_multiplier", "delta", "sample_rate", "sampling", "accountant")
    keys += ("max_epsilon", "target_epsilon", "seed", "clip_norm")
    return {key: p[key] for key in keys} | {"num_rounds": cfg["num_rounds"]}


def _public_context(cfg: dict) -> str:
    path = cfg["he"].get("public_context_path")
    if not path:
        raise ConfigError(
            f"strategy={cfg['strategy']['name']} needs the server's public CKKS context: set "
            f"he.public_context_path (create keys with `lepton-flwr keygen`)."
        )
    return path


def _fedavg(cfg: dict) -> Strategy:
    from lepton_flwr.strategies import CheckedFedAvg

    return CheckedFedAvg(**_fedavg_arguments(cfg["strategy"]))


def _secure_aggregation(he: dict) -> bool | SecAggParams:
    if not he.get("secure_aggregation", False):
        return False
    try:
        return SecAggParams(
            colluding_fraction=he["secagg_colluding_fraction"],
            dropout_fraction=he["secagg_dropout_fraction"],
        )
    except SecAggParamsError as err:  # name the config keys, not the class's arguments
        message = str(err).replace("colluding_fraction", "he.secagg_colluding_fraction")
        raise ConfigError(
            message.replace("dropout_fraction", "he.secagg_dropout_fraction")
        ) from None


def _he_fedavg(cfg: dict) -> Strategy:
    from lepton_flwr.strategies import HEFedAvg

    he = cfg["he"]
    return HEFedAvg(
        _public_context(cfg),
        headroom_fraction=he["headroom_fraction"],
        workers=he["workers"],
        weight_scale=he["weight_scale"],
        value_bound=he["value_bound"],
        max_weight_ratio=he["max_weight_ratio"],
        secure_aggregation=_secure_aggregation(he),
        **_fedavg_arguments(cfg["strategy"]),
    )


def _dp_fedavg(cfg: dict) -> Strategy:
    from lepton_flwr.strategies import DPFedAvg

    p = cfg["privacy"]
    return DPFedAvg(
        clipping_side=p["clipping_side"],
        adaptive=p["clipping"] == "adaptive",
        target_quantile=p["target_quantile"],
        clip_lr=p["clip_lr"],
        count_stddev=p["count_stddev"],
        **_dp_arguments(cfg),
        **_fedavg_arguments(cfg["strategy"], train_sampling=False),
    )


def _he_dp_fedavg(cfg: dict) -> Strategy:
    from lepton_flwr.strategies import HEDPFedAvg

    he = cfg["he"]
    return HEDPFedAvg(
        _public_context(cfg),
        dropout_rate=cfg["strategy"]["dropout_rate"],
        tolerated_colluders=cfg["strategy"]["tolerated_colluders"],
        secure_aggregation=_secure_aggregation(he),
        headroom_fraction=he["headroom_fraction"],
        workers=he["workers"],
        **_dp_arguments(cfg),
        **_fedavg_arguments(cfg["strategy"], train_sampling=False),
    )


STRATEGIES: dict[str, Callable[[dict], Strategy]] = {
    "fedavg": _fedavg,
    "he_fedavg": _he_fedavg,
    "dp_fedavg": _dp_fedavg,
    "he_dp_fedavg": _he_dp_fedavg,
}


def build_strategy(cfg: dict) -> Strategy:
    """The strategy the config names, with the config's settings.

    Raises
    ------
    ConfigError
        For an unknown name, or a setting the strategy refuses (with its key path).
    """
    name = cfg["strategy"]["name"]
    if name not in STRATEGIES:
        raise ConfigError(
            f"Unknown strategy '{name}'. Allowed choices: {', '.join(sorted(STRATEGIES))}."
        )
    try:
        return STRATEGIES[name](cfg)
    except ConfigError:
        raise
    except ValueError as err:
        message = reword(reword(str(err), "privacy", PRIVACY_ARGUMENTS), "he", HE_ARGUMENTS)
        raise ConfigError(f"strategy={name}: {message}") from err


def build_client_mods(cfg: dict, evaluate_encrypted: bool = False) -> tuple[list[Mod], list[Mod]]:
    """The public mods a client of this config runs: (app-level mods, train-only mods).

    The node's privacy floor comes first, whatever the server's config says; HE runs
    around every handler (evaluation needs the decrypted model); clipping for
    ``DPFedAvg(clipping_side="client")`` runs around training only.
    ``evaluate_encrypted`` lets clients evaluate encrypted models without a node config
    that allows it (a simulation, where every party is one machine).
    """
    he = cfg["he"]
    if he["name"] == "none":
        return [privacy_floor_mod], [dp_clip_mod]
    path = he["secret_context_path"]
    if cfg["strategy"]["name"] == "he_dp_fedavg":
        he_dp_mod = make_he_dp_mod(
            path,
            workers=he["workers"],
            seeded=he["seeded"],
            allow_evaluation=evaluate_encrypted,
        )
        return [privacy_floor_mod, he_dp_mod], []
    he_mod = make_he_mod(
        path,
        he["weight_scale"],
        he["workers"],
        he["seeded"],
        allow_evaluation=evaluate_encrypted,
    )
    return [privacy_floor_mod, he_mod], []
