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
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lepton_flwr import protocol


class BelowPrivacyFloorError(ValueError):
    """A server's request that this node's privacy floor does not allow."""


def node_setting(node_config: Mapping, key: str) -> float | None:
    """A number from the node config, or None when it is not set.

    Raises
    ------
    BelowPrivacyFloorError
        If it is set but not a finite number (a floor must never be silently off).
    """
    if key not in node_config or node_config[key] in ("", None):
        return None
    try:
        value = float(node_config[key])
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise BelowPrivacyFloorError(
            f"node config {key}={node_config[key]!r} is not a finite number; nothing was sent"
        )
    return value


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
