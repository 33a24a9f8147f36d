"""DP-FedAvg: client-level differential privacy with matched sampling and accounting."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies.dp_utility_warnings import utility_warnings
from lepton_flwr.strategies.encrypted_sum import the_arrays, the_metrics
from lepton_flwr.strategies.fedavg_args import evaluation_off_by_default, refuse_fraction_train
from lepton_flwr.strategies.metrics import (
    MAX_NAMED,
    checked_evaluation,
    clients_metrics,
    own_metric_names,
)
from lepton_flwr.strategies.reply_checks import plaintext_tensors
from lepton_flwr.strategies.round_loop import FlowerLoop

from lepton_flwr import protocol
from lepton_flwr.dp import grid as dp_grid
from lepton_flwr.dp.accounting import ClientLevelAccountant
from lepton_flwr.dp.clipping import adapt_clip_norm, l2_norm, update_noise_multiplier
from lepton_flwr.dp.noise import rounded_gaussian
from lepton_flwr.dp.rounds import DPRounds, wait_for_nodes
from lepton_flwr.he.codec import CiphertextError
from lepton_flwr.he.records import is_encrypted
from lepton_flwr.numbers import positive, real


class DPFedAvg(FlowerLoop, FedAvg):
    """FedAvg with client-level (ε, δ)-differential privacy.

    Each round samples clients (Poisson with probability q, or m of N without
    replacement), clips every update ``Δ_i = θ_i − θ`` to norm C on the server (also when
    the clients clip with ``dp_clip_mod`` or Flower's ``fixedclipping_mod``), and releases
    ``θ + (Σ Δ_i + N(0, (z C)² I)) / d`` with a fixed denominator ``d`` (q·N for Poisson,
    m for fixed size). Every sampled client weighs the same, so one client moves the sum
    by at most C and the noise is calibrated to exactly that. The sum and the noise are
    exact integers on a power-of-two grid far below the noise (:mod:`lepton_flwr.dp.grid`),
    so the released float32 model is a post-processing of the Gaussian mechanism. The
    rounds that happened are composed by the accountant (Opacus
    RDP/PRV; dp-accounting RDP for sampling without replacement). Each round's
    ``MetricRecord`` carries ``epsilon``, ``delta``, ``noise-multiplier`` and ``clip-norm``
    (and the clients' own metrics only with ``release_client_metrics=True``), so the
    ``Result`` of ``start`` holds ε per round; ``start`` stops before a round that would
    pass ``max_epsilon`` and returns the rounds that ran.

    A round with no valid update (nobody sampled, or every reply failed or was rejected)
    releases nothing: the global model is kept, never replaced by noise alone. The round
    is accounted as a release all the same, as the withholding analysis requires
    (``min_train_nodes`` below), and a run in which no round released a model ends with
    :class:`~lepton_flwr.strategies.NoModelTrainedError`. The first round warns when a
    round is expected to count fewer than 5 clients, or when the noise on the mean
    dwarfs any update (:mod:`~lepton_flwr.strategies.dp_utility_warnings`).

    How many clients were sampled and counted is not in the ``MetricRecord``: the
    accountant's Poisson analysis covers the noisy model alone, and an observer who also
    learns |S| can learn more than it states (``tests/test_released_sample_size.py``).
    Those counts stay with the server: its log and :attr:`server_counts`.

    A reply is rejected (one log line naming the node and a reason about its form, never
    a value of its update) when it is encrypted or its tensors differ from the global
    model's in names, shapes or dtypes. A well-formed reply that holds NaN or Inf counts
    as an accepted zero update, clipped (b = 0) for adaptive clipping, so that neither
    the count of accepted updates nor the ``min_train_nodes`` decision depends on it; an
    update above C is clipped, whichever side clips.

    Parameters
    ----------
    noise_multiplier : float | None (default: 1.0)
        z; None calibrates it from ``target_epsilon`` over ``num_rounds``.
    clip_norm : float (default: 1.0)
        C (the initial value with adaptive clipping).
    delta : float (default: 1e-5)
        δ of the reported (ε, δ); must be below 1/N.
    sample_rate : float (default: 0.1)
        q: Poisson probability, or the fraction m/N sampled without replacement. It
        replaces FedAvg's ``fraction_train``, which is refused.
    sampling : str (default: "poisson")
        ``"poisson"`` or ``"fixed"``.
    clipping_side : str (default: "server")
        ``"server"`` or ``"client"`` (clients clip with ``dp_clip_mod``).
    adaptive : bool (default: False)
        Adapt C toward the ``target_quantile`` of update norms (Andrew et al.). The
        server releases a noisy count of unclipped updates, centred as Andrew et al. do
        (each reply adds b − 1/2, b = 1 if unclipped, so one client moves it by at most
        1/2; noise std ``count_stddev``, default max(expected clients / 20, z)); it is
        paid for from the same budget: the update's noise grows so that the two together
        are one Gaussian mechanism of multiplier z.
    target_quantile, clip_lr : float (default: 0.5, 0.2)
        Adaptive clipping's target quantile and geometric learning rate.
    count_stddev : float | None (default: None)
        Adaptive clipping's noise on the unclipped count.
    accountant : str (default: "rdp")
        ``"rdp"`` or ``"prv"``.
    max_epsilon : float | None (default: None)
        Budget: no round starts that would take ε past it.
    target_epsilon, num_rounds : float | None, int | None
        For calibration when ``noise_multiplier`` is None.
    seed : int | None (default: None)
        Seed of sampling and noise, for tests only (the run is then not private, and a
        warning says so); None: noise from ``os.urandom``, sampling from secret-seeded
        numpy.
    min_train_nodes : int (default: 1)
        With fewer valid updates than this, the round releases nothing and keeps the
        global model; a round with no valid update never releases (0 acts as 1), so no
        model of noise alone is ever released. Such a round is accounted all the same,
        and its chance, from the sampling alone, adds (1 + e^ε)·p to δ
        (:meth:`delta_addition`, logged at start; p = (1 − q)^N per round for Poisson
        sampling and 0 for fixed-size sampling when min_train_nodes <= 1; dropouts
        would add more and are not modelled here). A run in which no round released a
        model ends with :class:`~lepton_flwr.strategies.NoModelTrainedError`.
    release_client_metrics : bool (default: False)
        Aggregate the clients' own training metrics (e.g. their mean loss) into each
        round's ``MetricRecord``. Off by default: those values come from the clients'
        data without noise, so ε does not cover them; the first round whose replies
        carry such metrics logs once that they are withheld, and how to release them.
    fraction_train : None
        Refused (use ``sample_rate``).
    **fedavg_kwargs
        The rest of Flower's FedAvg arguments, honoured: ``fraction_evaluate`` (default
        0.0 here: federated evaluation sends each client's loss and accuracy on its own
        data to the server in the clear, which ε does not cover; a value > 0 is logged as
        such),
        ``min_evaluate_nodes``, ``min_available_nodes`` (the server waits for this many
        nodes; N = the nodes connected in round 1), ``weighted_by_key`` (weights the
        clients' metrics only: the model average is uniform), ``arrayrecord_key``,
        ``configrecord_key``, ``train_metrics_aggr_fn``, ``evaluate_metrics_aggr_fn``.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float | None = 1.0,
        clip_norm: float = 1.0,
        delta: float = 1e-5,
        sample_rate: float = 0.1,
        sampling: str = "poisson",
        clipping_side: str = "server",
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_stddev: float | None = None,
        accountant: str = "rdp",
        max_epsilon: float | None = None,
        target_epsilon: float | None = None,
        num_rounds: int | None = None,
        seed: int | None = None,
        min_train_nodes: int = 1,
        release_client_metrics: bool = False,
        fraction_train: float | None = None,
        **fedavg_kwargs,
    ):
        refuse_fraction_train("DPFedAvg", fraction_train)
        fedavg_kwargs = evaluation_off_by_default("DPFedAvg", fedavg_kwargs)
        self.release_client_metrics = release_client_metrics
        super().__init__(min_train_nodes=min_train_nodes, **fedavg_kwargs)
        if clip_norm <= 0:
            raise ValueError(f"The clipping norm must be > 0, got {clip_norm}.")
        if clipping_side not in ("server", "client"):
            raise ValueError(f"clipping_side must be 'server' or 'client', got '{clipping_side}'.")
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
        self.clip_norm, self.clipping_side, self.adaptive = clip_norm, clipping_side, adaptive
        self.configured_clip_norm = clip_norm  # C as built (adaptive clipping moves clip_norm)
        self.target_quantile, self.clip_lr = target_quantile, clip_lr
        self.count_stddev = count_stddev
        self._global: list[np.ndarray] = []
        self._keys: list[str] = []
        self._dtypes: list[str] = []
        self._sampled = 0
        # Per round: clients sampled and updates counted. Server-side only: releasing them
        # with the model is not covered by the accountant's Poisson analysis.
        self.server_counts: dict[int, dict[str, int]] = {}
        self._settings_checked = False  # the start warnings (dp_utility_warnings): once
        self._metrics_withheld_told = False  # the clients' own metrics withheld: said once

    @property
    def accountant(self) -> ClientLevelAccountant | None:
        """The accountant of the rounds so far (made in the first round)."""
        return self.rounds.accountant

    def state(self) -> dict:
        """The DP rounds' state and the (adaptive) clip norm, for checkpoints."""
        return {"rounds": self.rounds.state(), "clip_norm": self.clip_norm}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` (resume).

        Raises
        ------
        ValueError
            If it was made with other privacy settings (naming each, with both values),
            or a value is malformed (naming it).
        """
        self.rounds.load_state(state.get("rounds"))
        clip_norm = state.get("clip_norm")
        if real(clip_norm) is None:
            raise ValueError(f"clip_norm {str(clip_norm)[:40]} is not a number")
        if positive(clip_norm) is None:
            raise ValueError(f"clip_norm {clip_norm} is not finite and > 0")
        self.clip_norm = float(clip_norm)

    def resume_settings(self) -> dict:
        """Every setting the run's privacy and what it releases depend on (resume).

        The DP rounds' settings (sampling, q, δ, z or the target ε it is calibrated for,
        with the rounds it is calibrated over, the accountant, the budget, the seed's
        use), the clipping (C as built, side, adaptive clipping's settings),
        ``min_train_nodes``, and what is released beside the model
        (``release_client_metrics``, ``fraction_evaluate``).
        """
        rounds = self.rounds.state()["settings"]
        if self.rounds.configured_noise_multiplier is None:
            rounds["calibration_num_rounds"] = self.rounds.num_rounds
        return {
            **rounds,
            "clip_norm": self.configured_clip_norm,
            "clipping_side": self.clipping_side,
            "adaptive": self.adaptive,
            "target_quantile": self.target_quantile,
            "clip_lr": self.clip_lr,
            "count_stddev": self.count_stddev,
            "min_train_nodes": self.min_train_nodes,
            "release_client_metrics": self.release_client_metrics,
            "fraction_evaluate": self.fraction_evaluate,
        }

    def epsilon(self) -> float:
        """ε spent so far."""
        return self.rounds.epsilon()

    @property
    def fewest_updates(self) -> int:
        """The fewest valid updates a round releases with: ``min_train_nodes``, at least 1."""
        return max(1, self.min_train_nodes)

    def delta_addition(self, epsilon: float | None = None) -> float:
        """(1 + e^ε)·p: what rounds withheld for ``min_train_nodes`` add to δ (0 when it is 0)."""
        return self.rounds.delta_addition(epsilon)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the budget, sample clients as configured, send the model (and C)."""
        sampled = self.rounds.start_round(
            server_round, wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)
        )
        self._sampled = len(sampled)
        # Dropouts are not modelled here (no dropout rate): p counts the sampling alone.
        self.rounds.withhold_at("DPFedAvg", self.rounds.population, self.fewest_updates, 0.0)
        if not self._settings_checked:
            self._settings_checked = True
            self._warn_if_little_to_learn(arrays)
        log(
            INFO,
            "DPFedAvg round %d: sampled %d of %d nodes (%s)",
            server_round,
            len(sampled),
            self.rounds.population,
            self.rounds.sampling,
        )
        self._global = [a.numpy().astype(np.float64) for a in arrays.values()]
        self._keys = list(arrays.keys())
        self._dtypes = [str(a.dtype) for a in arrays.values()]
        train_config = ConfigRecord(dict(config))
        train_config[protocol.SERVER_ROUND] = server_round
        if self.clipping_side == "client":
            train_config[protocol.CLIPPING_NORM] = self.clip_norm
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: train_config})
        return [
            Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in sampled
        ]

    def _warn_if_little_to_learn(self, arrays: ArrayRecord) -> None:
        """The start warnings of :mod:`~lepton_flwr.strategies.dp_utility_warnings`."""
        rounds = self.rounds
        z = rounds.noise_multiplier
        if self.adaptive:
            try:
                count_stddev = self.count_stddev or max(rounds.denominator / 20, z)
                z = update_noise_multiplier(z, count_stddev)
            except ValueError:
                return  # aggregate_train refuses the same split, with its reason
        utility_warnings(
            "DPFedAvg",
            expected_clients=rounds.denominator,
            nobody_sampled=(1 - rounds.sample_rate) ** rounds.population
            if rounds.sampling == "poisson"
            else 0.0,
            noise_multiplier=z,
            num_weights=sum(int(np.prod(a.shape)) for a in arrays.values()),
        )

    # ---- aggregation -----------------------------------------------------------------

    def _update_of(self, msg: Message) -> tuple[list[np.ndarray] | None, float]:
        """The reply's update Δ = θ_i − θ and its bit b (1: left unclipped).

        The update is None when the reply is well formed but holds NaN or Inf: it then
        counts as a zero update that was clipped (b = 0), as an infinite norm would be.

        Raises
        ------
        ValueError
            If the reply is encrypted or its tensors are not the global model's (names,
            shapes, dtypes), saying which; the reason never quotes a value of the update.
        """
        record = the_arrays(msg)
        if is_encrypted(record):
            raise ValueError(
                "the reply is encrypted: DPFedAvg adds plaintext updates (for HE + DP, use "
                "HEDPFedAvg with he_dp_mod on the clients)"
            )
        shapes = (g.shape for g in self._global)
        reference = list(zip(self._keys, shapes, self._dtypes, strict=True))
        tensors = plaintext_tensors(record, reference, finite=False)
        if not all(np.isfinite(t).all() for t in tensors):
            return None, 0.0
        update = [values - current for values, current in zip(tensors, self._global, strict=True)]
        if self.clipping_side == "client":
            # The client clipped (dp_clip_mod, or Flower's fixedclipping_mod); the server
            # clips again below, so an update above C is clipped, never refused.
            norm_bit = the_metrics(msg).get(protocol.NORM_BIT)
            if norm_bit is None:
                norm_bit = l2_norm(update) > self.clip_norm
            return update, 0.0 if norm_bit else 1.0
        return update, float(l2_norm(update) <= self.clip_norm)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, sum in exact integers, add integer noise, divide by the fixed denominator.

        See :mod:`lepton_flwr.dp.grid`: the released model is a deterministic function of
        the global model and the noisy integer sum, so float rounding releases nothing
        more than the Gaussian mechanism.
        """
        rounds = self.rounds
        z, clip_norm, denominator = rounds.noise_multiplier, self.clip_norm, rounds.denominator
        count_stddev = self.count_stddev or max(denominator / 20, z)
        z_update = update_noise_multiplier(z, count_stddev) if self.adaptive else z
        noise_std = z_update * clip_norm
        step = dp_grid.spacing(noise_std, clip_norm, rounds.population)
        total = dp_grid.zeros_like(self._global)
        bits, accepted = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(
                    WARNING,
                    "DPFedAvg round %d: node %d failed: %s",
                    server_round,
                    node,
                    msg.error.reason,
                )
                continue
            try:
                update, bit = self._update_of(msg)
            except (ValueError, KeyError, TypeError, CiphertextError) as err:
                self.note_rejected(msg, err)
                log(
                    WARNING,
                    "DPFedAvg round %d: rejected the reply of node %d: %s",
                    server_round,
                    node,
                    err,
                )
                continue
            if update is None:
                log(
                    WARNING,
                    "DPFedAvg round %d: the update of node %d holds NaN or Inf: it counts "
                    "as a zero update",
                    server_round,
                    node,
                )
            elif len(accepted) >= rounds.population:  # the int64 bound of dp_grid.spacing
                raise RuntimeError("more replies than nodes")
            else:
                on_grid = dp_grid.to_grid(update, clip_norm, step)
                total = [t + u for t, u in zip(total, on_grid, strict=True)]
            bits.append(bit)
            accepted.append(msg)

        figures = {protocol.NOISE_MULTIPLIER: z, protocol.CLIP_NORM: clip_norm}
        self.server_counts[server_round] = {"sampled": self._sampled, "accepted": len(accepted)}
        if not self.release_client_metrics:
            self._say_client_metrics_withheld(accepted)
        if len(accepted) < self.fewest_updates:
            # Accounted all the same: the withholding analysis (DPRounds.withhold_at)
            # compares the run with one that releases every round, and only then may the
            # event "too few updates" (which moves with |S|) show.
            epsilon = rounds.record(z)
            log(
                WARNING,
                "DPFedAvg round %d: %d valid updates of %d sampled, fewer than %d; nothing "
                "released, global model kept; accounted as a release (epsilon=%.4f) "
                "(server-side figures, not in the metrics)",
                server_round,
                len(accepted),
                self._sampled,
                self.fewest_updates,
                epsilon,
            )
            return None, MetricRecord({**rounds.privacy_metrics(), **figures})
        random_bytes = dp_grid.random_bytes_of(rounds.seeded, rounds.rng)
        noisy_total = dp_grid.add_noise(total, noise_std / step, random_bytes)
        new_global = dp_grid.release(self._global, noisy_total, step, denominator)
        epsilon = rounds.record(z)
        if self.adaptive:
            self.clip_norm = self._next_clip_norm(bits, count_stddev, random_bytes)
        log(
            INFO,
            "DPFedAvg round %d: epsilon=%.4f (delta=%g), C=%.4g; %d of %d sampled updates "
            "counted (server-side figures, not in the metrics)",
            server_round,
            epsilon,
            rounds.reported_delta("DPFedAvg", epsilon),
            clip_norm,
            len(accepted),
            self._sampled,
        )
        arrays = ArrayRecord(
            {k: Array(v.astype(np.float32)) for k, v in zip(self._keys, new_global, strict=True)}
        )
        metrics = {}
        if self.release_client_metrics:
            metrics = clients_metrics(
                self.train_metrics_aggr_fn, accepted, self.weighted_by_key, "DPFedAvg", server_round
            )
        return arrays, MetricRecord({**metrics, **rounds.privacy_metrics(), **figures})

    def _say_client_metrics_withheld(self, accepted: list[Message]) -> None:
        """Log once that the clients' own training metrics are not released, and why."""
        if self._metrics_withheld_told:
            return
        names = own_metric_names(accepted, self.weighted_by_key)
        if not names:
            return
        self._metrics_withheld_told = True
        shown = ", ".join(repr(n[:40]) for n in names[:MAX_NAMED])
        more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
        log(
            INFO,
            "DPFedAvg: the clients' own training metrics (%s%s) are not in the rounds' "
            "MetricRecord: they come from the clients' data without noise, so epsilon does "
            "not cover them. To release them anyway (outside epsilon), build the strategy "
            "with release_client_metrics=True (said once)",
            shown,
            more,
        )

    def _next_clip_norm(
        self, bits: list[float], count_stddev: float, random_bytes: Callable[[int], bytes]
    ) -> float:
        """Adaptive clipping's next C, from the noisy centred count released on its grid.

        Each accepted reply adds b − 1/2 (one client moves the count by at most 1/2, the
        sensitivity that ``update_noise_multiplier``'s budget split assumes); in units of
        the count's grid h (a power of two dividing 1/2) that is an exact integer, and the
        noise is ``round(N(0, (count_stddev / h)²))``. The next C is a function of the
        released ``h · (count + noise)`` and public values only.
        """
        unit = dp_grid.count_spacing(count_stddev)
        half = round(0.5 / unit)  # b − 1/2 = ±1/2 is ±half units
        centred = sum(half if b else -half for b in bits)
        noise = int(rounded_gaussian(1, count_stddev / unit, random_bytes)[0])
        released = (centred + noise) * unit  # exact: an integer times a power of two
        noisy_fraction = 0.5 + released / self.rounds.denominator
        return adapt_clip_norm(self.clip_norm, noisy_fraction, self.target_quantile, self.clip_lr)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Each evaluation reply checked alone; metrics over what the kept ones share."""
        return checked_evaluation(self, server_round, replies)

    def summary(self) -> None:
        """Log the privacy settings."""
        r = self.rounds
        clipping = "adaptive" if self.adaptive else "fixed"
        log(INFO, "\t├──> DP: %s sampling, q=%s", r.sampling, r.sample_rate)
        log(
            INFO,
            "\t├──> clipping %s on the %s side, C=%s",
            clipping,
            self.clipping_side,
            self.clip_norm,
        )
        log(
            INFO,
            "\t└──> z=%s, delta=%g, %s accountant, budget %s, neighbours: %s",
            r.noise_multiplier,
            r.delta,
            r.accountant_name,
            r.max_epsilon,
            r.neighbouring,
        )
