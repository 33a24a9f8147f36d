"""HE + DP: distributed differential privacy under CKKS encryption."""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import tenseal as ts
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies.encrypted_sum import EncryptedSum, the_metrics
from lepton_flwr.strategies.fedavg_args import evaluation_off_by_default, refuse_fraction_train
from lepton_flwr.strategies.he_fedavg import ExplainsEncryptedEvaluation
from lepton_flwr.strategies.last_good import LastGoodModel, TrainingHeldBackError, Verdict
from lepton_flwr.strategies.round_loop import FlowerLoop
from lepton_flwr.strategies.secure_aggregation import resume_settings_of, secure_aggregation_for

from lepton_flwr import protocol
from lepton_flwr.dp.accounting import ClientLevelAccountant
from lepton_flwr.dp.rounds import DPRounds, check_same_settings, wait_for_nodes
from lepton_flwr.he.codec import CiphertextError
from lepton_flwr.he.publish import summed_limit
from lepton_flwr.he.records import EncryptedModel
from lepton_flwr.secagg.params import SecAggParams

NOISE_TAIL = 10.0  # shares are clamped to (C + NOISE_TAIL σ) / d: a 1.5e-23 event per value
TAIL_PROBABILITY = 1e-10  # P(more than r_max clients sampled) in a round: it is withheld


class HEDPFedAvg(FlowerLoop, ExplainsEncryptedEvaluation, FedAvg):
    """Client-level DP whose noise is added by the clients, under encryption.

    Each sampled client (with ``he_dp_mod``) clips its update to C, adds a share
    N(0, σ²) of the noise, scales by 1/d (d = q·N for Poisson sampling, m for fixed
    size) and encrypts. The server adds the encrypted shares to the encrypted global
    model θ (kept with weight 1), then an encryption of its own top-up noise, so that
    clients decrypt θ + (Σ clip(Δ_i) + noise) / d: central DP-FedAvg's release, while no
    party ever holds a noise-free update or sum, and the server holds no secret key. A
    reply that is not such a share (no ``dp_share_mod`` on the client, so neither
    clipped nor noised) is refused with a log line naming the node, and is never added;
    so is a reply that fails any check of ``HEFedAvg``.

    Nothing released depends on how many clients were sampled or reported. The
    accountant analyses each round as the Poisson-subsampled Gaussian at rate q, which
    covers the noisy sum alone: an observer who also learns s = |S|, or the number r of
    shares added, learns whether the target was likely sampled from how many others
    were, and ε grows (issue 19 item 2; ``tests/test_released_sample_size.py``). So
    every value a client or an output sees is a function of public settings and N,
    except timing and two residuals stated under "Withheld rounds" and in the README (a
    client that refuses every model can get small rounds disputed; a key holder reading
    the raw released ciphertext could estimate r from its error's variance):

    - r_max, the fewest clients with P(s > r_max) <= ``tail_probability`` (Binomial(N,
      q); m for fixed-size sampling), and σ = zC / √(r_max − c), c =
      ``tolerated_colluders``: the same in every round with the same N. The train
      config carries C, σ, 1/d and the share bound B = (C + 10σ)/d, nothing else.
    - The server's top-up: after adding the r valid shares it adds, encrypted with the
      public context, Gaussian noise of variance T = (r_max − r)σ² per value (over d),
      drawn from the OS's secure randomness (the seed in tests). The release then always
      carries noise of variance r_max·σ² = z²C² + cσ² whatever r is; c colluding
      reporters who subtract their own shares leave at least z²C². So every release is
      accounted at (z, q), and the ε increments are equal.
    - The bound M_t that clients check the decrypted model against (the header's
      ``max_abs``) grows by the constant r_max·B + 10·√(r_max)·σ/d per round: r_max
      shares at B, and the top-up clamped to 10 times its largest std (r = 0; the clamp
      binds with probability below 1.5e-23 per value, like a share's).
    - The round's ``MetricRecord`` carries ``epsilon`` and ``delta`` only. The counts
      (sampled, shares added) go to a server-only log line and :attr:`server_counts`:
      they are not covered by ε and must not be published.

    What the server's top-up means. The server knows T's draw, and it knows S: it
    samples, so amplification by sampling never held against it. It holds no key and
    sees ciphertexts only. A server colluding with a key holder decrypts any one share
    (all clients share one key), whose noise σ = zC/√(r_max − c) is the client's own:
    against them a client is protected by its own share alone, a Gaussian mechanism of
    multiplier z/√(r_max − c) in each round it is sampled (no amplification), whatever
    the top-up. The top-up protects against everyone who sees only the model.

    Withheld rounds. A round releases nothing (the global model is kept) when more than
    r_max clients are sampled (no request is sent: T would be negative), or fewer than
    ``min_train_nodes`` valid shares arrive. Such a round shows that it was withheld, an
    event whose probability p_t is the same under both neighbours (dropouts and rejected
    replies are assumed independent of the data); it is accounted at (z, q) all the
    same. The run then equals the ideal run, which releases every round, except on an
    event of probability p <= Σ p_t under either neighbour; on the transcripts without a
    withheld round the two agree, the others have probability at most p, so an (ε, δ)
    guarantee of the ideal run is (ε, δ + (1 + e^ε)·p) for this one (rounds after a
    withheld round continue, so the e^ε p of a single ⊥ does not suffice). The server
    bounds p_t by P(s > r_max) + P(r < ``min_train_nodes``) with r ~ Binomial(N, q(1 −
    ``dropout_rate``)), adds it up in :attr:`withholding_probability`, and logs at the
    first round the δ addition for the planned run, with a warning when it is not far
    below δ (few clients: 10 clients at q = 0.5 withhold with probability 1e-3 per round
    at ``min_train_nodes`` = 1; ``min_train_nodes`` = 0 releases a round without shares,
    θ plus the top-up alone). :meth:`delta_addition` gives (1 + e^ε)·p for the rounds
    run so far.

    ε of refused models: the round in which clients refuse releases nothing (its shares
    are never added) and spends no ε, nor does a disputed round; these rounds are caused
    by a dishonest node and are outside the withholding figure above. The refused model
    itself stays accounted: clients decrypted it, and the node that made it be refused,
    holding the key, can subtract its own upload and read the others' noisy sum, an
    ordinary release; giving its ε back would let that node collect releases for free,
    every fallback retraining the same clients with fresh noise. What bounds this cost:
    one dishonest node makes at most 1 + ⌈log2 m⌉ models be refused (m: the shares in the
    first) before it is excluded, and ``max_epsilon`` bounds the whole run. Clients
    refuse a decrypted model that is not finite or passes M_t; when more than half of a
    round's replies, and at least two, refuse, the server falls back to the last model
    clients accepted and leaves suspects out of the next rounds until the node at fault
    is found and excluded, as ``HEFedAvg`` does (:mod:`~lepton_flwr.strategies.last_good`).

    What one share can move. The server checks that each header declares the public
    bound B, but cannot see values. An honest share moves each value by at most B (its
    clipped update, of L2 norm at most C/d, plus its noise); a share at +B on every one
    of n values moves the model by B√n in L2, (1 + 10σ/C)√n times what a clipped update
    can. A key holder's dishonest share can go further, up to what M_t leaves: M_t − |θ|.
    Nothing tighter can be checked here: an L2 bound on a share would take zero-knowledge
    proofs over ciphertexts; B cannot be lower without clamping honest shares (one
    clipped update may put all of C on one value, and its own noise needs the 10σ tail).

    ``start`` stops before a round that would pass ``max_epsilon``, skips a server-side
    ``evaluate_fn`` on the encrypted model, and returns the encrypted final model.

    Parameters
    ----------
    public_context : ts.Context | str | Path
        The server's CKKS context, without secret key (``public.ctx``).
    clip_norm : float (default: 1.0)
        C.
    dropout_rate : float (default: 0.0)
        Expected share of sampled clients that do not report (independently of the
        data), in [0, 1). It sizes nothing: it enters only the probability that a round
        is withheld for too few shares, and with it the δ addition logged at start.
    noise_multiplier, delta, sample_rate, sampling, accountant, max_epsilon,
    target_epsilon, num_rounds, seed
        As in :class:`DPFedAvg` (``seed`` drives the sampling and the top-up; noise
        shares come from the clients' own secure randomness).
    headroom_fraction, workers
        As in :class:`HEFedAvg`.
    tolerated_colluders : int (default: 1)
        c: clients that may pool their own noise shares with the server's view; the noise
        of the others must suffice. 0 trusts every client not to subtract its share.
    min_train_nodes : int (default: 1)
        With fewer valid shares than this, the round releases nothing (the global model
        is kept); it is accounted, and its probability adds to δ (see above). 0 releases
        every round that is not disputed.
    tail_probability : float (default: 1e-10)
        P(s > r_max) per round: such rounds are withheld. Smaller values raise r_max and
        lower σ (more clients to carry zC).
    fraction_train : None
        Refused (use ``sample_rate``).
    secure_aggregation : bool | SecAggParams (default: False)
        Mask every share so that no single one, nor any sum short of all the round's
        survivors, can be decrypted, even by a holder of the shared key (see
        :class:`~lepton_flwr.strategies.HEFedAvg` and
        :mod:`~lepton_flwr.strategies.secure_aggregation`). A round whose sum cannot be
        unmasked releases nothing and is accounted as released.
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
        tail_probability: float = TAIL_PROBABILITY,
        fraction_train: float | None = None,
        secure_aggregation: bool | SecAggParams = False,
        **fedavg_kwargs,
    ):
        refuse_fraction_train("HEDPFedAvg", fraction_train)
        fedavg_kwargs = evaluation_off_by_default("HEDPFedAvg", fedavg_kwargs)
        if not isinstance(tolerated_colluders, int) or tolerated_colluders < 0:
            raise ValueError(f"tolerated_colluders must be an int >= 0, got {tolerated_colluders}.")
        if not isinstance(min_train_nodes, int) or min_train_nodes < 0:
            raise ValueError(f"min_train_nodes must be an int >= 0, got {min_train_nodes}.")
        if not 0 < tail_probability < 1:
            raise ValueError(f"tail_probability must be in (0, 1), got {tail_probability}.")
        self.tolerated_colluders, self.tail_probability = tolerated_colluders, tail_probability
        super().__init__(min_train_nodes=min_train_nodes, **fedavg_kwargs)
        if clip_norm <= 0:
            raise ValueError(f"The clipping norm must be > 0, got {clip_norm}.")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        self.clip_norm, self.dropout_rate = clip_norm, dropout_rate
        self.encrypted_sum = EncryptedSum(public_context, headroom_fraction, workers, "HEDPFedAvg")
        self.encrypted_sum.on_reject = self.note_rejected
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
        self.secure_aggregation = secure_aggregation_for(
            secure_aggregation, self.encrypted_sum.adder, "HEDPFedAvg"
        )
        self._presampled: dict[int, tuple[list[int], list[int]]] = {}
        self._grid: Grid | None = None
        self._most = 0  # r_max for the current N
        self._share_std = self._share_bound = self._top_up_bound = 0.0
        self._sized_for: int | None = None  # the N the figures above were computed for
        self._withheld: str | None = None  # why this round sends nothing
        self._sampled = 0
        self.server_counts: dict[int, dict[str, int]] = {}  # server only: outside ε

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the CKKS key."""
        return self.encrypted_sum.fingerprint

    @property
    def accountant(self) -> ClientLevelAccountant | None:
        """The accountant of the rounds so far (made in the first round)."""
        return self.rounds.accountant

    @property
    def round_bound(self) -> float:
        """What M_t grows by each round: r_max shares at B, and the top-up's clamp."""
        return self._most * self._share_bound + self._top_up_bound

    def _settings(self) -> dict:
        """The settings besides the DP rounds' that the noise and ε depend on."""
        return {
            "clip_norm": self.clip_norm,
            "dropout_rate": self.dropout_rate,
            "tolerated_colluders": self.tolerated_colluders,
            "min_train_nodes": self.min_train_nodes,
            "tail_probability": self.tail_probability,
        }

    def resume_settings(self) -> dict:
        """The DP rounds' settings, the noise's, and secure aggregation's (resume)."""
        rounds = self.rounds.state()["settings"]
        return {**rounds, **self._settings(), **resume_settings_of(self.secure_aggregation)}

    def state(self) -> dict:
        """The DP rounds' state, the privacy settings, the withholding figure, last good model."""
        return {
            "rounds": self.rounds.state(),
            "settings": self._settings(),
            **self.last_good.state(),
        }

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

    @property
    def withholding_probability(self) -> float:
        """Σ p_t over the rounds run: the chance that some round was withheld for its counts."""
        return self.rounds.withheld_mass

    def delta_addition(self, epsilon: float | None = None) -> float:
        """(1 + e^ε)·p: what the withheld rounds add to δ (ε: spent so far by default)."""
        return self.rounds.delta_addition(epsilon)

    def summary(self) -> None:
        """Log the strategy's settings."""
        r = self.rounds
        log(INFO, "\t├──> HE: CKKS, key %s", self.fingerprint)
        log(INFO, "\t├──> DP: %s sampling, q=%s, C=%s", r.sampling, r.sample_rate, self.clip_norm)
        log(
            INFO,
            "\t└──> z=%s, delta=%g, %s accountant, budget %s, neighbours: %s, %d tolerated "
            "colluders, P(more than r_max sampled)=%g, dropouts expected %s",
            r.noise_multiplier,
            r.delta,
            r.accountant_name,
            r.max_epsilon,
            r.neighbouring,
            self.tolerated_colluders,
            self.tail_probability,
            self.dropout_rate,
        )

    def _size_the_rounds(self, server_round: int) -> None:
        """r_max, σ, B and the top-up's clamp for this round's N (public figures only)."""
        population = self.rounds.population
        if self._sized_for == population:
            return
        most = self.rounds.most_sampled(self.tail_probability)
        c = self.tolerated_colluders
        if most <= c:
            raise ValueError(
                f"HEDPFedAvg: r_max = {most} clients (N={population}, q="
                f"{self.rounds.sample_rate}) cannot carry the noise against {c} tolerated "
                f"colluders: lower tolerated_colluders or sample more clients"
            )
        self._most, self._sized_for = most, population
        d = self.rounds.denominator
        self._share_std = self.rounds.noise_multiplier * self.clip_norm / math.sqrt(most - c)
        # Per value |clip(Δ)_i| <= C, and the noise passes 10σ with probability 1.5e-23.
        self._share_bound = (self.clip_norm + NOISE_TAIL * self._share_std) / d
        self._top_up_bound = NOISE_TAIL * math.sqrt(most) * self._share_std / d
        per_round = self.rounds.withholding_probability(
            most, self.min_train_nodes, self.dropout_rate
        )
        log(
            INFO,
            "HEDPFedAvg from round %d: N=%d, r_max=%d, noise share std %.4g, share bound "
            "%.4g, the model's bound grows by %.4g a round; P(round withheld) <= %.3g",
            server_round,
            population,
            most,
            self._share_std,
            self._share_bound,
            self.round_bound,
            per_round,
        )

    def _refuse_past_the_summed_limit(self, server_round: int) -> None:
        """Stop before a round could make the running sum more than the flooding covers.

        The global model sums every upload since the first round, and a round adds up to
        r_max uploads and the top-up; a download of more than
        :func:`lepton_flwr.he.publish.summed_limit` is refused, so training stops here,
        keeping the last model, rather than one round later on a model no one may decrypt.

        Raises
        ------
        TrainingHeldBackError
            If this round could take the count past the limit.
        """
        limit = summed_limit(self.encrypted_sum.adder.formats.wire.d_down)
        could_reach = self._global.summed + self._most + 1
        if could_reach > limit:
            raise TrainingHeldBackError(
                f"HEDPFedAvg round {server_round}: the global model sums "
                f"{self._global.summed} ciphertexts and this round could add "
                f"{self._most + 1} (r_max = {self._most} uploads and the top-up), past the "
                f"{limit} that a flooded decryption covers; training stops with the model "
                f"of round {server_round - 1}. Fewer rounds or fewer clients a round fit"
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients and send them the model and the run-wide share settings."""
        self._grid = grid
        presampled = self._presampled.pop(server_round, None)
        if presampled is None:
            nodes = wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)
            sampled = self.rounds.start_round(server_round, nodes)
        else:  # drawn when the previous round ended (secure aggregation shared its keys)
            sampled = self.rounds.start_round(server_round, presampled[0], drawn=presampled[1])
        self._size_the_rounds(server_round)
        self.rounds.withhold_at("HEDPFedAvg", self._most, self.min_train_nodes, self.dropout_rate)
        self._global = self.encrypted_sum.encrypted(arrays)
        if self._global.max_abs + self.round_bound > self.encrypted_sum.headroom:
            raise TrainingHeldBackError(
                f"HEDPFedAvg round {server_round}: the model's bound would reach "
                f"{self._global.max_abs + self.round_bound:.4g}, past the safe CKKS bound "
                f"{self.encrypted_sum.headroom:.4g} (it grows by {self.round_bound:.4g} a "
                f"round); training stops. Larger CKKS primes or a larger headroom_fraction "
                f"allow more rounds"
            )
        self._refuse_past_the_summed_limit(server_round)
        self.last_good.sent(server_round, arrays)
        self._sampled, self._withheld = len(sampled), None
        if len(sampled) > self._most:
            self._withheld = f"more than r_max = {self._most} clients sampled"
            return []
        # Suspects left out count as sampled nodes that do not report: the sampling, and
        # with it the accounting, is unchanged, and the top-up fills in their noise.
        sampled = self.last_good.leave_out(
            server_round, sampled, lambda n: n >= self.min_train_nodes
        )
        train_config = ConfigRecord(dict(config))
        train_config[protocol.SERVER_ROUND] = server_round
        train_config[protocol.CLIPPING_NORM] = self.clip_norm
        train_config[protocol.NOISE_SHARE_STD] = self._share_std
        train_config[protocol.UPDATE_SCALE] = 1.0 / self.rounds.denominator
        train_config[protocol.SHARE_BOUND] = self._share_bound
        # Clients get the download copy (c0 rounded); the server keeps the exact sum.
        sent = self.encrypted_sum.for_clients(arrays)
        content = RecordDict({self.arrayrecord_key: sent, self.configrecord_key: train_config})
        messages = [
            Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in sampled
        ]
        if self.secure_aggregation is None or not messages:
            return messages
        return self.secure_aggregation.masked_messages(
            server_round, messages, grid, self.node_wait_timeout
        )

    def _sample_ahead(self, server_round: int) -> list[int] | None:
        """Draw round ``server_round``'s sample now (``DPRounds.draw``; None: not enough nodes).

        Secure aggregation shares the next round's keys in this round's unmask exchange;
        ``configure_train`` then checks the budget and takes this sample.
        """
        nodes = list(self._grid.get_node_ids())
        if len(nodes) < self.min_available_nodes:
            return None
        drawn = self.rounds.draw(nodes)
        self._presampled = {server_round: (nodes, drawn)}
        return drawn

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

    def _top_up(self, base: EncryptedModel, shares: int) -> EncryptedModel:
        """``base`` plus the encrypted top-up noise N(0, (r_max − shares)σ²) / d per value.

        The result's bound is M_{t−1} + r_max·B + the top-up's clamp, whatever ``shares``.
        """
        std = math.sqrt(self._most - shares) * self._share_std / self.rounds.denominator
        noise = np.clip(
            self.rounds.gaussian(base.num_values, std), -self._top_up_bound, self._top_up_bound
        )
        adder = self.encrypted_sum.adder
        top_up = adder.encrypt_public(noise)
        # Both are the server's own sums (the top-up a public-key encryption): exact.
        sums, _ = adder.sum_updates([], self.encrypted_sum.workers, sums=[base.chunks, top_up])
        return EncryptedModel(
            base.manifest,
            sums,
            1.0,
            self.fingerprint,
            self._global.max_abs + self.round_bound,
            summed=base.summed + 1,
        )

    def _counts(self, server_round: int, reported: int, outcome: str) -> None:
        """Keep the round's counts on the server and log them there, marked as such."""
        self.server_counts[server_round] = {"sampled": self._sampled, "reported": reported}
        log(
            INFO,
            "HEDPFedAvg round %d (server only, not covered by epsilon, not in the metrics): "
            "%d clients sampled, %d shares added; %s",
            server_round,
            self._sampled,
            reported,
            outcome,
        )

    def _metrics(self) -> MetricRecord:
        """What a round releases besides the model: ε and δ, never a count."""
        return MetricRecord(self.rounds.privacy_metrics())

    def _withhold(self, server_round: int, reported: int, why: str) -> None:
        """A round withheld for its counts: nothing released, accounted all the same."""
        epsilon = self.rounds.record(self.rounds.noise_multiplier)
        log(
            WARNING,
            "HEDPFedAvg round %d: nothing released (%s), global model kept; accounted as a "
            "release (epsilon=%.4f), as the withholding analysis requires",
            server_round,
            why,
            epsilon,
        )
        self._counts(server_round, reported, "withheld")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the encrypted shares and the top-up to the encrypted global model; account."""
        replies = list(replies)
        if self.secure_aggregation is not None:
            self.secure_aggregation.note_refusals(server_round, replies)
        if self._withheld is not None:
            self._withhold(server_round, 0, self._withheld)
            return None, self._metrics()
        verdict = self.last_good.judge(server_round, replies)
        if verdict is not Verdict.ACCEPTED:  # nothing released: no ε spent
            self._counts(server_round, 0, f"{verdict.value}: not accounted")
            fallback = self.last_good.model if verdict is Verdict.REFUSED else None
            return fallback, self._metrics()
        accepted, total = self.encrypted_sum.add(
            server_round, replies, extra=self._global, check_reply=self._check_share
        )
        reported = len(accepted)
        if reported < self.min_train_nodes:
            why = f"fewer valid shares than min_train_nodes={self.min_train_nodes}"
            self._withhold(server_round, reported, why)
            return None, self._metrics()
        if self.secure_aggregation is not None and accepted:
            total = self.secure_aggregation.unmask_replies(
                server_round, accepted, total, self._sample_ahead, self.last_round
            )
            if total is None:  # whether it failed depends on who answered: account it
                self._withhold(server_round, reported, "the sum could not be unmasked")
                return None, self._metrics()
        released = self._top_up(self._global if total is None else total, reported)
        epsilon = self.rounds.record(self.rounds.noise_multiplier)
        self.last_good.produced(m.metadata.src_node_id for m in accepted)
        self._counts(server_round, reported, "released")
        delta = self.rounds.reported_delta("HEDPFedAvg", epsilon)
        log(INFO, "HEDPFedAvg round %d: epsilon=%.4f (delta=%g)", server_round, epsilon, delta)
        # The shares are already divided by d: the released model has weight 1. The
        # replies carry no client metrics (dp_share_mod sends public values only).
        return released.to_record(), self._metrics()
