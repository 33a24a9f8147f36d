"""HE-FedAvg: FedAvg over CKKS ciphertexts, with a server that holds no secret key."""

from __future__ import annotations

from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from pathlib import Path

import tenseal as ts
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies.fedavg import fedavg_settings

from lepton_flwr.he.codec import CiphertextError, CkksAdder, TensorSpec, flatten
from lepton_flwr.he.keys import fingerprint, load_context
from lepton_flwr.he.params import CKKSParams, headroom
from lepton_flwr.he.records import EncryptedModel, is_encrypted


class HEFedAvg(FedAvg):
    """Federated averaging of CKKS-encrypted updates.

    Clients (with ``he_mod``) send ``w_i * update_i`` encrypted, plus their weight
    ``w_i`` in the clear. The server checks each reply, adds the ciphertexts and the
    weights, and keeps the global model as that encrypted weighted sum: it never holds a
    plaintext update or global model, and cannot decrypt (its context has no secret key).
    Clients divide by the total weight after decryption. Round 1 sends the initial
    (public) model in the clear. Central evaluation is impossible by design; evaluation
    is federated.

    A reply is rejected, with one log line naming the node and the reason, when its
    ciphertexts do not parse or are not fresh ciphertexts of the server's parameters,
    carry another key's fingerprint, come in the wrong number, hold plaintext tensors,
    or describe a model whose tensor names, shapes or dtypes differ from the global one.
    With fewer than ``min_train_nodes`` valid replies, the round is skipped and the
    global model kept.

    Parameters
    ----------
    public_context : ts.Context | str | Path
        The server's CKKS context (or the path of ``public.ctx``); refused if it holds
        a secret key.
    headroom_fraction : float (default: 0.5)
        Largest share of the CKKS headroom that the bound on the summed values may use;
        a round that would exceed it is skipped (CKKS would wrap around silently).
    workers : int | None (default: None)
        Processes that load and add ciphertexts in parallel; None uses every core.
    **fedavg_kwargs
        Sampling settings of :class:`flwr.serverapp.strategy.FedAvg`
        (``fraction_train``, ``min_train_nodes``, ...).
    """

    def __init__(
        self,
        public_context: ts.Context | str | Path,
        *,
        headroom_fraction: float = 0.5,
        workers: int | None = None,
        **fedavg_kwargs,
    ):
        super().__init__(**fedavg_kwargs)
        if isinstance(public_context, str | Path):
            public_context = load_context(public_context, expect_secret=False)
        if public_context.has_secret_key():
            raise ValueError("HEFedAvg must not hold a secret key: pass the public context.")
        if not 0 < headroom_fraction <= 1:
            raise ValueError(f"headroom_fraction must be in (0, 1], got {headroom_fraction}")
        self.context = public_context
        self.workers = workers
        self.fingerprint = fingerprint(public_context)
        self._adder = CkksAdder(public_context)
        data_level = public_context.seal_context().data.first_context_data()
        scale_bits = round(public_context.global_scale).bit_length() - 1
        self.headroom = (
            headroom(data_level.total_coeff_modulus_bit_count(), scale_bits) * headroom_fraction
        )
        self._manifest: list[TensorSpec] | None = None

    def summary(self) -> None:
        """Log the strategy's settings."""
        super().summary()
        log(
            INFO,
            "\t├──> HE: CKKS, %d slots per ciphertext, key %s",
            self._adder.slots,
            self.fingerprint,
        )
        log(INFO, "\t└──> bound on summed values: %.3g", self.headroom)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the model's manifest from the initial plaintext model, then sample as FedAvg."""
        if self._manifest is None:
            if is_encrypted(arrays):
                self._manifest = EncryptedModel.from_record(arrays).manifest
            else:
                _, self._manifest = flatten({k: v.numpy() for k, v in arrays.items()})
        return super().configure_train(server_round, arrays, config, grid)

    def check_reply(self, msg: Message) -> EncryptedModel:
        """Validate one training reply and return its encrypted update.

        Raises
        ------
        CiphertextError
            Saying what is wrong with it.
        """
        records = msg.content.array_records
        if list(records) != ["arrays"]:
            raise CiphertextError(f"expected one ArrayRecord 'arrays', got {list(records)}")
        if "num-examples" not in msg.content.metric_records.get("metrics", {}):
            raise CiphertextError("no 'num-examples' in the reply's metrics")
        update = EncryptedModel.from_record(records["arrays"])
        if update.fingerprint != self.fingerprint:
            raise CiphertextError(
                f"encrypted under key {update.fingerprint}, the server's key is {self.fingerprint}"
            )
        if self._manifest is not None and update.manifest != self._manifest:
            raise CiphertextError(
                "tensor names, shapes or dtypes disagree with the global model's manifest"
            )
        expected_chunks = -(-update.num_values // self._adder.slots)
        if len(update.chunks) != expected_chunks:
            raise CiphertextError(
                f"{len(update.chunks)} ciphertext chunks for {update.num_values} values, "
                f"expected {expected_chunks}"
            )
        return update

    @staticmethod
    def _reject(server_round: int, msg: Message, reason: object) -> None:
        log(
            WARNING,
            "HEFedAvg round %d: rejected the reply of node %d: %s",
            server_round,
            msg.metadata.src_node_id,
            reason,
        )

    def sum_valid_replies(
        self, server_round: int, replies: Iterable[Message], extra: list[bytes] | None = None
    ) -> tuple[list[tuple[Message, EncryptedModel]], list[bytes]]:
        """Check the replies, reject bad ones (one log line each), add the rest.

        Parameters
        ----------
        server_round : int
            For the log lines.
        replies : Iterable[Message]
            The training replies.
        extra : list[bytes] | None
            Ciphertexts added to the sum as well (HE + DP adds the encrypted global model).

        Returns
        -------
        tuple[list[tuple[Message, EncryptedModel]], list[bytes]]
            The accepted replies with their updates, and the serialized sums.
        """
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        accepted: list[tuple[Message, EncryptedModel]] = []
        for msg in valid:
            try:
                accepted.append((msg, self.check_reply(msg)))
            except CiphertextError as err:
                self._reject(server_round, msg, err)
        uploads = [u.chunks for _, u in accepted] + ([extra] if extra else [])
        # Loading checks every ciphertext; it runs in parallel with the additions.
        sums, failed = self._adder.sum_updates(uploads, self.workers)
        if len(accepted) in failed:
            raise CiphertextError(
                f"the server's own ciphertexts failed to load: {failed[len(accepted)]}"
            )
        for index in sorted(failed):
            self._reject(server_round, accepted[index][0], failed[index])
        return [pair for i, pair in enumerate(accepted) if i not in failed], sums

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the valid encrypted updates; return the encrypted weighted sum."""
        accepted, sums = self.sum_valid_replies(server_round, replies)

        if len(accepted) < self.min_train_nodes:
            log(
                WARNING,
                "HEFedAvg round %d: %d valid replies, fewer than min_train_nodes=%d; "
                "round skipped, global model kept",
                server_round,
                len(accepted),
                self.min_train_nodes,
            )
            return None, None
        bound = sum(update.max_abs for _, update in accepted)
        if bound > self.headroom:
            log(
                ERROR,
                "HEFedAvg round %d: the summed values may reach %.3g, over the safe CKKS "
                "bound %.3g; round skipped (raise he.weight_scale, or a larger first prime)",
                server_round,
                bound,
                self.headroom,
            )
            return None, None
        first = accepted[0][1]
        total = EncryptedModel(
            manifest=first.manifest,
            chunks=sums,
            weight=sum(update.weight for _, update in accepted),
            fingerprint=self.fingerprint,
            max_abs=bound,
        )
        metrics = self.train_metrics_aggr_fn([m.content for m, _ in accepted], self.weighted_by_key)
        return total.to_record(), metrics


def build_he_fedavg(cfg: dict) -> HEFedAvg:
    """HEFedAvg from the config: sampling from ``strategy``, keys from ``he``."""
    he = cfg["he"]
    CKKSParams.from_config(he)
    path = he.get("public_context_path")
    if not path:
        raise ValueError(
            "strategy=he_fedavg needs the server's public CKKS context: set "
            "he.public_context_path (create keys with `lepton-flwr keygen`)."
        )
    return HEFedAvg(
        path,
        headroom_fraction=he["headroom_fraction"],
        workers=he["workers"],
        **fedavg_settings(cfg["strategy"]),
    )
