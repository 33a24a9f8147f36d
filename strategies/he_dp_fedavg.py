"""HE + DP: distributed differential privacy under CKKS encryption."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import tenseal as ts
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies.encrypted_sum import EncryptedSum, the_metrics
from lepton_flwr.strategies.fedavg_args import evaluation_off_by_default, refuse_fraction_train
from lepton_flwr.strategies.he_fedavg import ExplainsEncryptedEvaluation
from lepton_flwr.strategies.last_good import LastGoodModel, Verdict
from lepton_flwr.strategies.round_loop import FlowerLoop

from lepton_flwr import protocol
from lepton_flwr.dp.accounting import ClientLevelAccountant
from lepton_flwr.dp.rounds import DPRounds, check_same_settings, wait_for_nodes
from lepton_flwr.he.codec import CiphertextError
from lepton_flwr.he.records import EncryptedModel

NOISE_TAIL = 10.0  # shares are clamped to (C + NOISE_TAIL σ) / d: a 1.5e-23 event per value


class HEDPFedAvg(FlowerLoop, ExplainsEncryptedEvaluation, FedAvg):
    """Client-level DP whose noise is added by the clients, under encryption.

    Each sampled client (with ``he_dp_mod``) clips its update to C, adds a share
    N(0, σ²) of the noise, scales by 1/d (d = q·N for Poisson sampling, m for fixed
    size) and encrypts. The server adds the encrypted shares to the encrypted global
    model θ (kept with weight 1), so that clients decrypt θ + (Σ clip(Δ_i) + noise) / d:
    central DP-FedAvg's release, while no party ever holds a noise-free update or sum,
    and the server holds no secret key. A reply that is not such a share (no
    ``dp_share_mod`` on the client, so neither clipped nor noised) is refused with a log
    line naming the node, and is never added; so is a reply that fails any check of
    ``HEFedAvg``; shares are added only while their public bounds keep the sum within
    the CKKS headroom. Clients refuse a decrypted model that is not finite or passes the
    bound the sum allows; when more than half of a round's replies, and at least two,
    refuse, the server falls back to the last model clients accepted and leaves suspects
    out of the next rounds until the node at fault is found and excluded, as
    ``HEFedAvg`` does (:mod:`~lepton_flwr.strategies.last_good`).

    ε of refused models: the round in which clients refuse releases nothing (its shares
    are never added) and spends no ε, nor does a round that adds nothing (disputed, too
    few shares). The refused model itself stays accounted: clients decrypted it, and the
    node that made it be refused, holding the key, can subtract its own upload and read
    the others' noisy sum, an ordinary release; giving its ε back would let that node
    collect releases for free, every fallback retraining the same clients with fresh
    noise. What bounds this cost: one dishonest node makes at most 1 + ⌈log2 m⌉ models
    be refused (m: the shares in the first) before it is excluded, and ``max_epsilon``
    bounds the whole run.

    What one share can move. The server checks that each header declares the public
    bound B = (C + 10σ)/d, but cannot see values. Clients check the decrypted model against
    the bound of the whole sum, M_t: the initial model's largest value plus B for every
    share added in every round so far; no released model passes ±M_t, whatever its shares
    hold. An honest share moves each value by at most B (its clipped update, of L2 norm at
    most C/d, plus its noise); a share at +B on every one of n values moves the model by
    B√n in L2, (1 + 10σ/C)√n times what a clipped update can. A key holder's dishonest
    share can go further, up to what the sum's bound leaves: r·B on every value in round
    1 (r shares, initial model 0), M_t − |θ| in round t. Nothing tighter can be checked
    here: an L2 bound on a share would take zero-knowledge proofs over ciphertexts; B
    cannot be lower without clamping honest shares (one clipped update may put all of C
    on one value, and its own noise needs the 10σ tail); and a bound on the noise of the
    sum (10σ√r rather than r·10σ) binds no single client, who clamps its own share only.

    Colluders and dropouts: a client that reported knows its own share and can subtract
    it from the decrypted model, so only the others' shares protect anyone from it. σ is
    set so that ``(1 - dropout_rate)`` of the sampled clients, less ``tolerated_colluders``
    (c) of them, carry the full noise zC together: σ = zC / sqrt(planned − c). The
    accountant composes the noise actually present against c colluders,
    σ·sqrt(reporters − c), which is below zC (larger ε) when more clients drop out than
    planned. Before a round the server computes the fewest shares that keep ε within
    ``max_epsilon``; with fewer valid shares the round releases nothing and is not
    accounted, so dropouts never take ε past the budget. Each round's ``MetricRecord`` carries
    ``epsilon``, ``delta``, ``clients-sampled``, ``clients-reported``,
    ``noise-multiplier-present`` and ``noise-std-present`` besides the clients' metrics.
    ``start`` stops before a round that would pass ``max_epsilon``, skips a server-side
    ``evaluate_fn`` on the encrypted model, and returns the encrypted final model.

    Parameters
    ----------
    public_context : ts.Context | str | Path
        The server's CKKS context, without secret key (``public.ctx``).
    clip_norm : float (default: 1.0)
        C.
    dropout_rate : float (default: 0.0)
        Expected share of sampled clients that do not report, in [0, 1).
    noise_multiplier, delta, sample_rate, sampling, accountant, max_epsilon,
    target_epsilon, num_rounds, seed
        As in :class:`DPFedAvg` (``seed`` drives the sampling only; noise shares come
        from the clients' own secure randomness).
    headroom_fraction, workers
        As in :class:`HEFedAvg`.
    tolerated_colluders : int (default: 1)
        c: clients that may pool their own noise shares with the server's view; the noise
        of the others must suffice. 0 trusts every client not to subtract its share.
    min_train_nodes : int (default: 1)
        With fewer valid shares than this, the round releases nothing (the global model
        is kept) and is not accounted.
    fraction_train : None
        Refused (use ``sample_rate``).
    **fedavg_kwargs
        The rest of Flower's FedAvg arguments, honoured: ``fraction_evaluate`` (default
        0.0 here: federated evaluation sends each client's loss and accuracy on its own
        data to the server in the clear, which ε does not cover; a value > 0 is logged as
        such),
        ``min_evaluate_nodes``, ``min_available_nodes``, ``weighted_by_key`` (weights
        the clients' metrics only), ``arrayrecord_key``, ``configrecord_key``,
        ``train_metrics_aggr_fn``, ``evaluate_metrics_aggr_fn``.
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
        headroom_fraction: float = 0.5,
        workers: int | None = None,
        tolerated_colluders: int = 1,
        min_train_nodes: int = 1,
        fraction_train: float | None = None,
        **fedavg_kwargs,
    ):
        refuse_fraction_train("HEDPFedAvg", fraction_train)
        fedavg_kwargs = evaluation_off_by_default("HEDPFedAvg", fedavg_kwargs)
        if not isinstance(tolerated_colluders, int) or tolerated_colluders < 0:
            raise ValueError(f"tolerated_colluders must be an int >= 0, got {tolerated_colluders}.")
        self.tolerated_colluders = tolerated_colluders
        super().__init__(min_train_nodes=min_train_nodes, **fedavg_kwargs)
        if clip_norm <= 0:
            raise ValueError(f"The clipping norm must be > 0, got {clip_norm}.")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        self.clip_norm, self.dropout_rate = clip_norm, dropout_rate
        self.encrypted_sum = EncryptedSum(public_context, headroom_fraction, workers, "HEDPFedAvg")
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
        self.last_good = LastGoodModel("HEDPFedAvg")
        self._share_std = self._share_bound = 0.0
        self._fewest = 1
        self._sampled = 0

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the CKKS key."""
        return self.encrypted_sum.fingerprint

    @property
    def accountant(self) -> ClientLevelAccountant | None:
        """The accountant of the rounds so far (made in the first round)."""
        return self.rounds.accountant

    def _settings(self) -> dict:
        """The settings besides the DP rounds' that the noise present (and ε) depends on."""
        return {
            "clip_norm": self.clip_norm,
            "dropout_rate": self.dropout_rate,
            "tolerated_colluders": self.tolerated_colluders,
            "min_train_nodes": self.min_train_nodes,
        }

    def state(self) -> dict:
        """The DP rounds' state, the privacy settings and the last good model (encrypted)."""
        settings = self._settings()
        return {"rounds": self.rounds.state(), "settings": settings, **self.last_good.state()}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` (resume).

        Raises
        ------
        ValueError
            If it was made with other privacy settings (naming each, with both values),
            or a value is malformed (naming it).
        """
        check_same_settings(state.get("settings"), self._settings())
        self.rounds.load_state(state.get("rounds"))
        self.last_good.load_state(state)

    def epsilon(self) -> float:
        """ε spent so far."""
        return self.rounds.epsilon()

    def summary(self) -> None:
        """Log the strategy's settings."""
        r = self.rounds
        log(INFO, "\t├──> HE: CKKS, key %s", self.fingerprint)
        log(INFO, "\t├──> DP: %s sampling, q=%s, C=%s", r.sampling, r.sample_rate, self.clip_norm)
        log(
            INFO,
            "\t└──> z=%s, delta=%g, %s accountant, budget %s, neighbours: %s, dropout planned %s",
            r.noise_multiplier,
            r.delta,
            r.accountant_name,
            r.max_epsilon,
            r.neighbouring,
            self.dropout_rate,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients, size the noise shares for the planned reporters, send the model."""
        sampled = self.rounds.start_round(
            server_round, wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)
        )
        self._sampled = len(sampled)
        c = self.tolerated_colluders
        # Suspects left out count as sampled nodes that do not report: the sampling, and
        # with it the accounting, is unchanged.
        sampled = self.last_good.leave_out(
            server_round,
            sampled,
            lambda n: math.floor(n * (1 - self.dropout_rate)) > c and n >= self.min_train_nodes,
        )
        self._global = self.encrypted_sum.encrypted(arrays)
        self.last_good.sent(server_round, arrays)
        planned = math.floor(len(sampled) * (1 - self.dropout_rate))
        if planned <= c:
            log(
                WARNING,
                "HEDPFedAvg round %d: %d sampled nodes (%d expected to report) cannot carry "
                "the noise against %d colluding clients; round skipped, nothing released",
                server_round,
                len(sampled),
                planned,
                c,
            )
            self._share_std, self._fewest = 0.0, len(sampled) + 1
            return []
        # Sized so that the shares of `planned - c` reporters carry the full noise zC: the
        # c colluders' own shares, which they can subtract, are not counted on.
        self._share_std = self.rounds.noise_multiplier * self.clip_norm / math.sqrt(planned - c)
        self._fewest = self._fewest_reporters(len(sampled))
        train_config = ConfigRecord(dict(config))
        train_config[protocol.SERVER_ROUND] = server_round
        train_config[protocol.CLIPPING_NORM] = self.clip_norm
        train_config[protocol.NOISE_SHARE_STD] = self._share_std
        train_config[protocol.UPDATE_SCALE] = 1.0 / self.rounds.denominator
        # A public bound on every share's values, what the header declares: per value
        # |clip(Δ)_i| <= C, and the noise passes 10 σ with probability 1.5e-23.
        self._share_bound = (
            self.clip_norm + NOISE_TAIL * self._share_std
        ) / self.rounds.denominator
        train_config[protocol.SHARE_BOUND] = self._share_bound
        log(
            INFO,
            "HEDPFedAvg round %d: sampled %d of %d nodes, noise share std %.4g (for %d "
            "reporters, %d tolerated colluders); releases only with at least %d shares",
            server_round,
            len(sampled),
            self.rounds.population,
            self._share_std,
            planned,
            c,
            self._fewest,
        )
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: train_config})
        return [
            Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in sampled
        ]

    def _noise_present(self, reported: int) -> float:
        """The noise multiplier that ``reported`` shares carry against c colluders."""
        reported = max(0, reported - self.tolerated_colluders)
        return self._share_std * math.sqrt(reported) / self.clip_norm

    def _fewest_reporters(self, sampled: int) -> int:
        """Fewest valid shares whose noise keeps ε within the budget (and min_train_nodes).

        A round with fewer releases nothing, so dropouts cannot take ε past ``max_epsilon``.
        """
        low, high = self.tolerated_colluders + 1, sampled
        if not self.rounds.within_budget(self._noise_present(high)):
            return sampled + 1  # not reachable: start_round checked the planned noise
        while low < high:  # ε falls as more shares report: the first r within the budget
            mid = (low + high) // 2
            if self.rounds.within_budget(self._noise_present(mid)):
                high = mid
            else:
                low = mid + 1
        return max(low, self.min_train_nodes)

    def _check_share(self, msg: Message, update: EncryptedModel) -> None:
        """Refuse a reply that is not a DP share made for this round."""
        std = the_metrics(msg).get(protocol.DP_SHARE_STD)
        if std is None or update.weight != 1.0:
            raise CiphertextError(
                "not a DP share (neither clipped nor noised): the client must run "
                "dp_share_mod inside he_mod, i.e. ClientApp(mods=[he_dp_mod])"
            )
        if not math.isclose(float(std), self._share_std, rel_tol=1e-9):
            raise CiphertextError(
                f"its noise share has std {std}, the server asked for {self._share_std}"
            )
        if not math.isclose(update.max_abs, self._share_bound, rel_tol=1e-9):
            raise CiphertextError(
                f"its header declares the bound {update.max_abs}, not the public bound "
                f"{self._share_bound} that the server announced"
            )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the encrypted noisy shares to the encrypted global model; account the noise."""
        replies = list(replies)
        verdict = self.last_good.judge(server_round, replies)
        if verdict is not Verdict.ACCEPTED:  # nothing released: no ε spent
            figures = {protocol.CLIENTS_SAMPLED: self._sampled, protocol.CLIENTS_REPORTED: 0}
            fallback = self.last_good.model if verdict is Verdict.REFUSED else None
            return fallback, MetricRecord({**self.rounds.privacy_metrics(), **figures})
        accepted, total = self.encrypted_sum.add(
            server_round, replies, extra=self._global, check_reply=self._check_share
        )
        reported = len(accepted)
        figures = {protocol.CLIENTS_SAMPLED: self._sampled, protocol.CLIENTS_REPORTED: reported}
        if reported < self._fewest or total is None:
            log(
                WARNING,
                "HEDPFedAvg round %d: %d valid shares, fewer than the %d this round needs "
                "(budget, colluders, min_train_nodes); nothing released, not accounted, "
                "global model kept",
                server_round,
                reported,
                self._fewest,
            )
            figures[protocol.NOISE_MULTIPLIER_PRESENT] = 0.0
            return None, MetricRecord({**self.rounds.privacy_metrics(), **figures})
        z_present = self._noise_present(reported)
        epsilon = self.rounds.record(z_present)
        self.last_good.produced(m.metadata.src_node_id for m in accepted)
        figures[protocol.NOISE_MULTIPLIER_PRESENT] = z_present
        figures[protocol.NOISE_STD_PRESENT] = z_present * self.clip_norm / self.rounds.denominator
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
        # The shares are already divided by d: the released model has weight 1. The
        # replies carry no client metrics (dp_share_mod sends public values only).
        released = dataclasses.replace(total, weight=1.0)
        return released.to_record(), MetricRecord({**self.rounds.privacy_metrics(), **figures})
