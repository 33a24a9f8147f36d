"""A client's local privacy floor: what a node accepts from a server, set in its node config.

The server chooses C and σ for HE + DP, and the noise of DP-SGD; a server that sends
σ = 0 and C = 1e9 would receive a client's exact update. Each SuperNode can set, in its
own node config (``flower-supernode --node-config "dp-max-clip-norm=1.0 ..."``), the
least noise and the largest clip norm it accepts and the most ε DP-SGD may spend; a
request below the floor is refused with an error naming the setting, before any data is
touched. Without settings, a noise share must still be finite and non-zero, and C finite.

``dp-min-share-noise-multiplier`` bounds the client's *own* share, σ_share / C: the noise
its update carries even if every other client and the server collude. With r honest
reporters the central noise multiplier is sqrt(r) times it.

A floor is default-deny: once a node sets one, every training request that does not meet
it is refused, including one that asks for no DP at all (:func:`require_noise_share`,
:func:`require_dpsgd`). A node's DP-SGD ε is computed at its own δ (``dpsgd-delta``,
default ``DEFAULT_NODE_DELTA``), never at the launcher's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lepton_flwr import protocol
from lepton_flwr.numbers import plain_number

SHARE_FLOOR = (protocol.MAX_CLIP_NORM, protocol.MIN_SHARE_NOISE)
DPSGD_FLOOR = (protocol.DPSGD_MAX_EPSILON, protocol.DPSGD_MIN_NOISE)
DEFAULT_NODE_DELTA = 1e-5
# Each setting's valid range: (lowest, highest, whether the lowest is allowed).
RANGES = {
    protocol.MAX_CLIP_NORM: (0.0, math.inf, False),
    protocol.MIN_SHARE_NOISE: (0.0, math.inf, True),
    protocol.DPSGD_MAX_EPSILON: (0.0, math.inf, False),
    protocol.DPSGD_MIN_NOISE: (0.0, math.inf, True),
    protocol.DPSGD_DELTA: (0.0, 1.0, False),
}


class BelowPrivacyFloorError(ValueError):
    """A server's request that this node's privacy floor does not allow.

    Its text starts with ``protocol.FLOOR_REFUSAL``: it depends on the node's settings
    and the request, never on a model the node decrypted, so ``he_mod`` lets it through.
    """

    def __init__(self, reason: str):
        super().__init__(f"{protocol.FLOOR_REFUSAL}{reason}")


def node_setting(node_config: Mapping, key: str) -> float | None:
    """A number from the node config, or None when it is not set.

    Raises
    ------
    BelowPrivacyFloorError
        If it is set but not a finite number in its range (a floor must never be
        silently off, nor mean nothing, like ``dp-max-clip-norm=-1``).
    """
    if node_config.get(key) is None:
        return None
    value = plain_number(node_config[key])
    if not math.isfinite(value):
        raise BelowPrivacyFloorError(
            f"node config {key}={node_config[key]!r} is not a finite number; nothing was sent"
        )
    low, high, low_allowed = RANGES.get(key, (-math.inf, math.inf, True))
    if value < low or (value == low and not low_allowed) or value >= high:
        interval = f"{'[' if low_allowed else '('}{low:g}, {high:g})"
        raise BelowPrivacyFloorError(
            f"node config {key}={value:g} is not in {interval}; nothing was sent"
        )
    return value


def floor_keys(node_config: Mapping, keys: tuple[str, ...]) -> list[str]:
    """Which of ``keys`` the node config sets (each checked by :func:`node_setting`)."""
    return [key for key in keys if node_setting(node_config, key) is not None]


def require_noise_share(node_config: Mapping, train_config: Mapping) -> None:
    """Default deny: a node with an HE + DP floor trains only for requests with a noise share.

    Raises
    ------
    BelowPrivacyFloorError
        If the node sets ``dp-max-clip-norm`` or ``dp-min-share-noise-multiplier`` and
        the training request carries no noise share (plaintext FedAvg, HE-FedAvg,
        DP-FedAvg: each would send an update without the node's own noise).
    """
    keys = floor_keys(node_config, SHARE_FLOOR)
    if keys and protocol.NOISE_SHARE_STD not in train_config:
        raise BelowPrivacyFloorError(
            f"this node sets {', '.join(keys)}: it trains only for requests that ask for an "
            f"HE + DP noise share ({protocol.NOISE_SHARE_STD}), and this one asks for none; "
            f"nothing was trained or sent"
        )


def evaluation_allowed(node_config: Mapping, default: bool = True) -> bool:
    """Whether this node answers federated evaluation.

    ``allow-evaluation`` in the node config (true or false) decides; without it, a node
    that sets a privacy floor does not evaluate (evaluation metrics are exact functions of
    the node's data, outside every ε), and any other node answers ``default`` (``he_mod``
    passes False for an encrypted model: metrics of a model the server may have built
    read the clients' key and uploads).

    Raises
    ------
    BelowPrivacyFloorError
        If ``allow-evaluation`` is set to something other than true or false.
    """
    raw = node_config.get(protocol.ALLOW_EVALUATION)
    if raw is None:
        floor = floor_keys(node_config, SHARE_FLOOR) or floor_keys(node_config, DPSGD_FLOOR)
        return default and not floor
    if isinstance(raw, bool):
        return raw
    if str(raw).strip().lower() in ("true", "false"):
        return str(raw).strip().lower() == "true"
    raise BelowPrivacyFloorError(
        f"node config {protocol.ALLOW_EVALUATION}={raw!r} is not true or false; nothing was sent"
    )


def require_evaluation(node_config: Mapping, default: bool = True) -> None:
    """Refuse federated evaluation on a node that does not allow it (see above).

    Raises
    ------
    BelowPrivacyFloorError
        Naming the setting.
    """
    if not evaluation_allowed(node_config, default):
        raise BelowPrivacyFloorError(
            f"this node does not answer federated evaluation of this model (its metrics are "
            f"exact functions of its data, outside ε, and of an encrypted model the server "
            f"may have built; a node opts in with {protocol.ALLOW_EVALUATION}=true in its node "
            f"config); nothing was evaluated"
        )


def require_dpsgd(node_config: Mapping, privacy: Mapping) -> float | None:
    """Default deny for DP-SGD floors; the δ at which this node computes its ε.

    Parameters
    ----------
    node_config : Mapping
        The node's config.
    privacy : Mapping
        The run's ``privacy`` config group (what the launcher asks for).

    Returns
    -------
    float | None
        The node's δ (``dpsgd-delta``, else ``DEFAULT_NODE_DELTA``) when it sets a DP-SGD
        floor, else None.

    Raises
    ------
    BelowPrivacyFloorError
        If the node sets a DP-SGD floor and the run does not train with DP-SGD, or asks
        for reproducible noise (a function of the run's public seed, no privacy).
    """
    delta = node_setting(node_config, protocol.DPSGD_DELTA)
    keys = floor_keys(node_config, DPSGD_FLOOR)
    if not keys:
        return None
    if privacy.get("name") != "dpsgd":
        raise BelowPrivacyFloorError(
            f"this node sets {', '.join(keys)}: it trains only with DP-SGD, and the run "
            f"asks for privacy={privacy.get('name')}; it does not train"
        )
    if privacy.get("reproducible"):
        raise BelowPrivacyFloorError(
            f"this node sets {', '.join(keys)}: the run asks for reproducible DP-SGD noise, "
            f"which follows the run's public seed and protects nothing; it does not train"
        )
    return DEFAULT_NODE_DELTA if delta is None else delta


def check_share_request(node_config: Mapping, clip_norm: float, share_std: float) -> None:
    """Refuse an HE + DP request (C, σ_share) below this node's floor.

    Raises
    ------
    BelowPrivacyFloorError
        Naming the setting (or the reason, without settings).
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise BelowPrivacyFloorError(f"the server's clip norm {clip_norm} is not finite and > 0")
    if not (math.isfinite(share_std) and share_std > 0):
        raise BelowPrivacyFloorError(
            f"the server asks for a noise share with std {share_std}: an update without "
            f"noise is never sent"
        )
    _within(node_config, protocol.MAX_CLIP_NORM, clip_norm, "the server's clip norm", most=True)
    _within(
        node_config,
        protocol.MIN_SHARE_NOISE,
        share_std / clip_norm,
        "the server's noise share σ/C",
        most=False,
    )


def check_dpsgd_request(node_config: Mapping, noise_multiplier: float, epsilon: float) -> None:
    """Refuse DP-SGD whose noise multiplier, or whose ε after the round, passes the floor.

    Parameters
    ----------
    node_config : Mapping
        The node's config.
    noise_multiplier : float
        The z this round would train with.
    epsilon : float
        The client's cumulative ε after this round (predicted before training).

    Raises
    ------
    BelowPrivacyFloorError
        Naming the setting.
    """
    _within(
        node_config,
        protocol.DPSGD_MIN_NOISE,
        noise_multiplier,
        "DP-SGD noise multiplier",
        most=False,
    )
    _within(
        node_config,
        protocol.DPSGD_MAX_EPSILON,
        epsilon,
        "the node's DP-SGD ε after this round",
        most=True,
        consequence="; it does not train",
    )


def _within(
    node_config: Mapping, key: str, value: float, what: str, most: bool, consequence: str = ""
) -> None:
    """Refuse ``value`` if it passes the node's ``key`` (an upper limit if ``most``).

    Raises
    ------
    BelowPrivacyFloorError
        Naming ``what``, the value and the setting.
    """
    limit = node_setting(node_config, key)
    if limit is None or (value <= limit if most else value >= limit):
        return
    side = "above" if most else "below"
    raise BelowPrivacyFloorError(
        f"{what} {value:.4g} is {side} this node's {key}={limit:g}{consequence}"
    )
