"""Check encrypted training replies one by one and add the valid ones: both HE strategies use it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import tenseal as ts
import tenseal.sealapi  # noqa: F401 - registers SEAL types (Modulus) with Python
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from lepton_flwr.strategies.reply_checks import ReplyError, the_record

from lepton_flwr.he.codec import (
    LOCAL_FAILURES,
    CiphertextError,
    CkksAdder,
    TensorSpec,
    flatten,
    manifest_of,
)
from lepton_flwr.he.keys import fingerprint, load_context
from lepton_flwr.he.params import headroom
from lepton_flwr.he.records import EncryptedModel, is_encrypted
from lepton_flwr.mistakes import NO_HE_MOD, RELATIVE_KEY_PATH

ReplyCheck = Callable[[Message, EncryptedModel], None]


def the_arrays(msg: Message) -> ArrayRecord:
    """A reply's one ArrayRecord (raises ``ReplyError`` otherwise)."""
    return the_record(msg, ArrayRecord)


def the_metrics(msg: Message) -> MetricRecord:
    """A reply's one MetricRecord (raises ``ReplyError`` otherwise)."""
    return the_record(msg, MetricRecord)


def public_key_path(path: str | Path, name: str) -> Path:
    """The public context's path, if it is a usable one: set, and absolute.

    A ServerApp usually passes ``context.run_config["he-public-context"]``, empty until
    the run config sets it. A relative path would be read from the ServerApp's working
    folder, which under ``flwr run`` is where the SuperLink was first started: it works
    or fails depending on that, so it is refused, naming the path it would read.

    Raises
    ------
    ValueError
        If the path is empty or relative, saying how to give it.
    """
    how = (
        "pass the absolute path of the public.ctx that `lepton-flwr keygen --out <folder>` "
        "wrote, e.g. flwr run . --run-config \"he-public-context='/abs/keys/public.ctx'\" "
        "(or he-public-context under [tool.flwr.app.config] in pyproject.toml)"
    )
    if not str(path).strip():
        raise ValueError(
            f"{name}: the public context path is empty (the run config key "
            f"he-public-context is empty unless you set it): {how}"
        )
    given = Path(path).expanduser()
    if not given.is_absolute():
        raise ValueError(
            f"{name}: the public context path {str(path)!r} {RELATIVE_KEY_PATH.phrase}: this "
            f"ServerApp runs in {Path.cwd()}, so it would read {Path.cwd() / given}, and "
            f"under flwr run that folder is wherever the SuperLink was first started; {how}"
        )
    return given


class EncryptedSum:
    """Validates encrypted replies alone and adds them, within the CKKS headroom.

    The server side of HE: it holds a context without secret key, remembers the global
    model's manifest, and turns a round's replies into one encrypted sum. A reply is
    rejected, with one log line naming the node and the reason, when its ciphertexts do
    not parse or are not fresh ciphertexts of the server's parameters, carry another
    key's fingerprint, come in the wrong number, hold plaintext tensors, describe other
    tensors than the global model's, or fail the strategy's own check. CKKS raises no
    error on overflow: the bounds of the added values (public bounds, which the strategy
    checks each header against) must stay within ``headroom_fraction`` of the headroom,
    and the largest replies are rejected until they do. The headroom is that of values
    carried two to a complex slot (:func:`lepton_flwr.he.params.headroom`): sqrt(2)
    below the real-slot bound, since a slot's modulus reaches sqrt(2) times its values.

    Parameters
    ----------
    public_context : ts.Context | str | Path
        The server's CKKS context (or the absolute path of ``public.ctx``: an empty or
        relative one is refused, :func:`public_key_path`); refused if it holds a secret
        key.
    headroom_fraction : float
        Largest share of the CKKS headroom the bound on the summed values may use.
    workers : int | None
        Processes that load and add ciphertexts; None uses every core.
    name : str
        The strategy's name, for log lines.
    """

    def __init__(
        self,
        public_context: ts.Context | str | Path,
        headroom_fraction: float = 0.5,
        workers: int | None = None,
        name: str = "HEFedAvg",
    ):
        if isinstance(public_context, str | Path):
            path = public_key_path(public_context, name)
            public_context = load_context(path, expect_secret=False)
        if public_context.has_secret_key():
            raise ValueError(f"{name} must not hold a secret key: pass the public context.")
        if not 0 < headroom_fraction <= 1:
            raise ValueError(f"headroom_fraction must be in (0, 1], got {headroom_fraction}.")
        self.context, self.workers, self.name = public_context, workers, name
        self.fingerprint = fingerprint(public_context)
        self.adder = CkksAdder(public_context)
        self._sent: tuple[tuple, list[bytes]] | None = None  # for_clients' last copy
        data_level = public_context.seal_context().data.first_context_data()
        scale_bits = round(public_context.global_scale).bit_length() - 1
        # Complex slots: params.headroom is already divided by sqrt(2).
        self.headroom = (
            headroom([q.bit_count() for q in data_level.parms().coeff_modulus()], scale_bits)
            * headroom_fraction
        )
        self.manifest: list[TensorSpec] | None = None
        self.client_mod = "he_dp_mod" if name == "HEDPFedAvg" else "he_mod"
        # Called with each rejected reply and the reason (the strategy's note_rejected).
        self.on_reject: Callable[[Message, object], None] | None = None

    def encrypted(self, arrays: ArrayRecord) -> EncryptedModel:
        """The global model as an encrypted model (a plaintext one is encrypted, weight 1).

        Remembers its manifest, against which replies are checked.
        """
        if is_encrypted(arrays):
            model = EncryptedModel.from_record(arrays)
            self.manifest = model.manifest
            return model
        vector, self.manifest = flatten({k: v.numpy() for k, v in arrays.items()})
        chunks = self.adder.encrypt_public(vector)
        bound = float(np.abs(vector).max(initial=0.0))
        return EncryptedModel(self.manifest, chunks, 1.0, self.fingerprint, bound, summed=1)

    def for_clients(self, arrays: ArrayRecord) -> ArrayRecord:
        """What to send clients of a global model: the download copy of an encrypted sum.

        The server keeps its sums exact (they are added to again: HE + DP's global model
        is a running sum) and sends a copy whose c0 has its low bits rounded off
        (:meth:`lepton_flwr.he.codec.CkksAdder.download`); a plaintext model goes as it is.
        The last copy is kept: a round that trains and evaluates the same model makes it once.

        Raises
        ------
        lepton_flwr.he.publish.TooManySummedError
            If the sum holds more uploads than the flooding covers once rounded.
        """
        if not is_encrypted(arrays):
            return arrays
        model = EncryptedModel.from_record(arrays)
        key, sent = (model.summed, tuple(model.chunks)), self._sent  # a record's bytes
        if sent is None or sent[0] != key:  # the same model trains and evaluates
            sent = self._sent = (key, self.adder.download(list(key[1]), model.summed))
        return replace(model, chunks=sent[1]).to_record()

    def remember_manifest(self, arrays: ArrayRecord) -> None:
        """Take the manifest of the global model (plaintext or encrypted), once."""
        if self.manifest is not None:
            return
        if is_encrypted(arrays):
            self.manifest = EncryptedModel.from_record(arrays).manifest
        else:
            self.manifest = manifest_of(arrays)

    def check(self, msg: Message) -> EncryptedModel:
        """Validate one training reply's ciphertexts and return its encrypted update.

        Raises
        ------
        CiphertextError, ReplyError
            Saying what is wrong with it.
        """
        arrays = the_arrays(msg)
        if not is_encrypted(arrays):  # the client's update in the clear: refused, not kept
            raise CiphertextError(
                f"plaintext reply where a ciphertext is expected: {NO_HE_MOD.phrase}? Its "
                f"tensors came in the clear; none was added. {self.name} pairs with "
                f"ClientApp(mods=[{self.client_mod}]) on every client"
            )
        update = EncryptedModel.from_record(arrays)
        if update.fingerprint != self.fingerprint:
            raise CiphertextError(
                f"encrypted under key {update.fingerprint}, the server's key is {self.fingerprint}"
            )
        if self.manifest is not None and update.manifest != self.manifest:
            raise CiphertextError(
                "tensor names, shapes or dtypes disagree with the global model's manifest"
            )
        expected_chunks = -(-update.num_values // self.adder.slots)
        if len(update.chunks) != expected_chunks:
            raise CiphertextError(
                f"{len(update.chunks)} ciphertext chunks for {update.num_values} values, "
                f"expected {expected_chunks}"
            )
        return update

    def _within_headroom(
        self,
        server_round: int,
        candidates: list[tuple[Message, EncryptedModel]],
        extra: EncryptedModel | None,
    ) -> list[tuple[Message, EncryptedModel]]:
        """Leave out the largest replies until the bound on the sum fits the headroom.

        Every bound counted here was checked by the strategy against a public one, so a
        client cannot make the sum wrap around; one that weighs in too much (a huge
        example count) is rejected alone instead of voiding the round.
        """
        kept = sorted(candidates, key=lambda pair: pair[1].max_abs)
        base = extra.max_abs if extra else 0.0
        if base > self.headroom:
            log(
                ERROR,
                "%s round %d: the global model's bound %.3g passes the safe CKKS "
                "bound %.3g; nothing can be added to it",
                self.name,
                server_round,
                base,
                self.headroom,
            )
        while kept and base + sum(u.max_abs for _, u in kept) > self.headroom:
            msg, update = kept.pop()
            self.reject(
                server_round,
                msg,
                f"its values (up to {update.max_abs:.3g}) would take the sum past the safe "
                f"CKKS bound {self.headroom:.3g} (raise weight_scale, or lower the bound)",
            )
        order = {id(msg): i for i, (msg, _) in enumerate(candidates)}
        return sorted(kept, key=lambda pair: order[id(pair[0])])

    def reject(self, server_round: int, msg: Message, reason: object) -> None:
        """Log one rejected reply (and tell ``on_reject``, when set)."""
        if self.on_reject is not None:
            self.on_reject(msg, reason)
        log(
            WARNING,
            "%s round %d: rejected the reply of node %d: %s",
            self.name,
            server_round,
            msg.metadata.src_node_id,
            reason,
        )

    def add(
        self,
        server_round: int,
        replies: Iterable[Message],
        extra: EncryptedModel | None = None,
        check_reply: ReplyCheck | None = None,
    ) -> tuple[list[Message], EncryptedModel | None]:
        """Check the replies, reject bad ones (one log line each), add the rest.

        Parameters
        ----------
        server_round : int
            For the log lines.
        replies : Iterable[Message]
            The training replies (error replies are logged and skipped).
        extra : EncryptedModel | None
            Added to the sum as well (HE + DP adds the encrypted global model).
        check_reply : Callable[[Message, EncryptedModel], None] | None
            The strategy's own check of a reply; raises ``CiphertextError`` or
            ``ReplyError`` to reject it (any other exception rejects it too, logged
            with its type: nothing one reply holds ends the round).

        Returns
        -------
        tuple[list[Message], EncryptedModel | None]
            The accepted replies, and their encrypted sum (with ``extra``); the sum is
            None when nothing was accepted. Replies whose bounds would take the sum past
            the safe headroom are rejected, largest first (logged).
        """
        candidates: list[tuple[Message, EncryptedModel]] = []
        for msg in replies:
            if msg.has_error():
                self.reject(server_round, msg, f"the client failed: {msg.error.reason}")
                continue
            try:
                update = self.check(msg)
                if check_reply is not None:
                    check_reply(msg, update)
            except (CiphertextError, ReplyError) as err:
                self.reject(server_round, msg, err)
                continue
            except LOCAL_FAILURES:
                raise
            except Exception as err:  # noqa: BLE001 - one reply, one verdict
                self.reject(server_round, msg, f"cannot be read ({err!r})"[:300])
                continue
            candidates.append((msg, update))
        candidates = self._within_headroom(server_round, candidates, extra)
        uploads = [u.chunks for _, u in candidates]
        # Parsing checks every upload; it runs in parallel with the additions. The
        # server's own sum (extra) is added as a sum: only uploads are taken from clients.
        own = [extra.chunks] if extra else []
        sums, failed = self.adder.sum_updates(uploads, self.workers, sums=own)
        for index in sorted(failed):
            self.reject(server_round, candidates[index][0], failed[index])
        accepted = [pair for i, pair in enumerate(candidates) if i not in failed]
        log(INFO, "%s round %d: %d valid encrypted replies", self.name, server_round, len(accepted))
        if not accepted:
            return [], None
        parts = [u for _, u in accepted] + ([extra] if extra else [])
        bound = sum(part.max_abs for part in parts)
        total = EncryptedModel(
            manifest=accepted[0][1].manifest,
            chunks=sums,
            weight=sum(part.weight for part in parts),
            fingerprint=self.fingerprint,
            max_abs=bound,
            # a client's upload counts one, whatever its header says
            summed=len(accepted) + (extra.summed if extra else 0),
        )
        return [msg for msg, _ in accepted], total
