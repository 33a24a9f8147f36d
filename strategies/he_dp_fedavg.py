"""HE + DP: distributed differential privacy under CKKS encryption."""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import tenseal as ts
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from lepton_flwr.strategies.budget_stop import StopsAtPrivacyBudget
from lepton_flwr.strategies.dp_fedavg import dp_round_settings
from lepton_flwr.strategies.fedavg import fedavg_settings
from lepton_flwr.strategies.he_fedavg import HEFedAvg

from lepton_flwr.dp.rounds import DPRounds, wait_for_nodes
from lepton_flwr.he.codec import flatten
from lepton_flwr.he.records import EncryptedModel, is_encrypted
from lepton_flwr.mods.clip_mod import CLIP_NORM_KEY
from lepton_flwr.mods.dp_share_mod import NOISE_SHARE_KEY, UPDATE_SCALE_KEY


class HEDPFedAvg(StopsAtPrivacyBudget, HEFedAvg):
    """Client-level DP whose noise is added by the clients, under encryption.

    Each sampled client clips its update to C, adds a share N(0, σ²) of the noise,
    scales by 1/d (d = q·N for Poisson sampling, m for fixed size) and encrypts
    (``dp_share_mod`` inside ``he_mod``). The server adds the encrypted shares to the
    encrypted global model θ (kept with weight 1), so that clients decrypt
    θ + (Σ clip(Δ_i) + noise) / d: central DP-FedAvg's release, while no party ever
    holds a noise-free update or sum, and the server holds no secret key.

    Dropouts: σ is set so that ``(1 - dropout_rate)`` of the sampled clients carry the
    full noise zC together (σ = zC / sqrt(planned reporters)). The accountant composes
    the noise actually present, σ·sqrt(reporters), which is below zC (larger ε) when
    more clients drop out than planned.

    Parameters
    ----------
    public_context : ts.Context | str | Path
        The server's CKKS context, without secret key.
    clip_norm : float
        C.
    dropout_rate : float
        Expected share of sampled clients that do not report, in [0, 1).
    noise_multiplier, delta, sample_rate, sampling, accountant, max_epsilon,
    target_epsilon, num_rounds, seed
        As in :class:`DPFedAvg` (``seed`` drives the sampling only; noise shares come
        from the clients' own secure randomness).
    **fedavg_kwargs
        ``fraction_evaluate``, ``min_evaluate_nodes``, ``min_available_nodes``,
        ``headroom_fraction``, ``workers``.
    """

    def __init__(
        self,
        public_context: ts.Context | str | Path,
        *,
        clip_norm: float = 1.0,
        dropout_rate: float = 0.0,
        noise_multiplier: float | None = 1.0,
        delta: float = 1e-5,
        sample_rate: float = 0.1,
        sampling: str = "poisson",
        accountant: str = "rdp",
        max_epsilon: float | None = None,
        target_epsilon: float | None = None,
        num_rounds: int | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(public_context, min_train_nodes=1, **kwargs)
        if clip_norm <= 0:
            raise ValueError(f"The clipping norm must be > 0, got {clip_norm}.")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        self.clip_norm, self.dropout_rate = clip_norm, dropout_rate
        self.rounds = DPRounds(
            noise_multiplier=noise_multiplier,
            delta=delta,
            sample_rate=sample_rate,
            sampling=sampling,
            accountant=accountant,
            max_epsilon=max_epsilon,
            target_epsilon=target_epsilon,
            num_rounds=num_rounds,
            seed=seed,
        )
        self._global: EncryptedModel | None = None
        self._share_std = 0.0
        self._sampled = 0
        self.last_report: dict[str, float] = {}

    def epsilon(self) -> float:
        """ε spent so far."""
        return self.rounds.epsilon()

    def _encrypted_global(self, arrays: ArrayRecord) -> EncryptedModel:
        if is_encrypted(arrays):
            model = EncryptedModel.from_record(arrays)
            self._manifest = model.manifest
            return model
        vector, manifest = flatten({k: v.numpy() for k, v in arrays.items()})
        self._manifest = manifest
        chunks = self._adder.encrypt_public(vector)
        return EncryptedModel(
            manifest, chunks, 1.0, self.fingerprint, float(abs(vector).max(initial=0.0))
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients, size the noise shares for the planned reporters, send the model."""
        sampled = self.rounds.start_round(
            server_round, wait_for_nodes(grid, self.min_available_nodes)
        )
        self._sampled = len(sampled)
        self._global = self._encrypted_global(arrays)
        planned = max(1, math.floor(len(sampled) * (1 - self.dropout_rate)))
        self._share_std = self.rounds.noise_multiplier * self.clip_norm / math.sqrt(planned)
        train_config = ConfigRecord(dict(config))
        train_config["server-round"] = server_round
        train_config[CLIP_NORM_KEY] = self.clip_norm
        train_config[NOISE_SHARE_KEY] = self._share_std
        train_config[UPDATE_SCALE_KEY] = 1.0 / self.rounds.denominator
        log(
            INFO,
            "HEDPFedAvg round %d: sampled %d of %d nodes, noise share std %.4g (for %d reporters)",
            server_round,
            len(sampled),
            self.rounds.population,
            self._share_std,
            planned,
        )
        content = RecordDict({"arrays": arrays, "config": train_config})
        return [
            Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in sampled
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the encrypted noisy shares to the encrypted global model; account the noise."""
        accepted, sums = self.sum_valid_replies(server_round, replies, extra=self._global.chunks)
        reported = len(accepted)
        if reported == 0:
            log(
                WARNING,
                "HEDPFedAvg round %d: no valid share; nothing released, global model kept",
                server_round,
            )
            self.last_report = {
                "epsilon": self.epsilon(),
                "clients_sampled": self._sampled,
                "clients_reported": 0,
                "noise_multiplier_present": 0.0,
            }
            return None, None
        z_present = self._share_std * math.sqrt(reported) / self.clip_norm
        epsilon = self.rounds.record(z_present)
        bound = self._global.max_abs + sum(u.max_abs for _, u in accepted)
        self.last_report = {
            "epsilon": epsilon,
            "clients_sampled": self._sampled,
            "clients_reported": reported,
            "noise_multiplier_present": z_present,
            "noise_std_present": self._share_std * math.sqrt(reported) / self.rounds.denominator,
        }
        if z_present < self.rounds.noise_multiplier * (1 - 1e-9):
            log(
                WARNING,
                "HEDPFedAvg round %d: %d of %d sampled clients reported; noise multiplier "
                "present %.4f < planned %.4f",
                server_round,
                reported,
                self._sampled,
                z_present,
                self.rounds.noise_multiplier,
            )
        log(
            INFO,
            "HEDPFedAvg round %d: epsilon=%.4f (delta=%g), %d shares",
            server_round,
            epsilon,
            self.rounds.delta,
            reported,
        )
        total = EncryptedModel(self._global.manifest, sums, 1.0, self.fingerprint, bound)
        metrics = self.train_metrics_aggr_fn([m.content for m, _ in accepted], self.weighted_by_key)
        return total.to_record(), metrics


def build_he_dp_fedavg(cfg: dict) -> HEDPFedAvg:
    """HEDPFedAvg from the ``strategy``, ``he`` and ``privacy`` config groups."""
    s, he, p = cfg["strategy"], cfg["he"], cfg["privacy"]
    if not he.get("public_context_path"):
        raise ValueError(
            "strategy=he_dp_fedavg needs he.public_context_path (see `lepton-flwr keygen`)."
        )
    return HEDPFedAvg(
        he["public_context_path"],
        clip_norm=p["clip_norm"],
        dropout_rate=s["dropout_rate"],
        headroom_fraction=he["headroom_fraction"],
        workers=he["workers"],
        **dp_round_settings(cfg),
        **fedavg_settings(s, train_sampling=False),
    )
