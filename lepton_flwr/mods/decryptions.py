"""A client is not a decryption service: at most one global model per round, kept in state.

A server holding only the public context can build ciphertexts from clients' uploads (one
upload times a one-slot mask, say) and send them to another client as a "global model".
Whatever that client sends back that depends on the decryption (an error reason quoting a
value, an evaluation loss) answers a question about someone's upload. So ``he_mod``
decrypts through :func:`decrypt_once`:

- each message names the model it carries by its round: a training message of round r
  carries the model of round r − 1 (the one it trains on), an evaluation message of round
  r the model of round r (which round r + 1 trains on);
- a client decrypts at most one model per round number, and only for a round later than
  any it decrypted before; other ciphertexts for a round it has decrypted, or for an
  earlier round, are refused without decrypting;
- the last model it accepted is kept in the node's state and served again, whatever the
  round, without decrypting (evaluated in round r, trained on in round r + 1; sent again
  as the fallback after a refused model): no new decryption, nothing new to learn;
- a model it refused (past its bound) stays refused, with the same fixed reason;
- over a run it decrypts at most ``MAX_DECRYPTIONS`` models (the number of decryptions
  the flooding of :mod:`lepton_flwr.he.publish` is sized for).

What a malicious server still learns from a client per round: whether it refused the
model (one bit), and, if the client also evaluates, the loss and accuracy of the one
model it decrypted for that round on the client's test data. It chooses the round
numbers, so "per round" means per message it is willing to spend; the run's cap bounds
the total.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from lepton_flwr import protocol
from lepton_flwr.he.publish import DECRYPTIONS
from lepton_flwr.mods.common import ModError, is_train, train_config

MAX_DECRYPTIONS = DECRYPTIONS
LEDGER = "lepton-he-decryptions"  # ConfigRecord: round, digest, count, accepted (a digest)
KEPT_MODEL = "lepton-he-decrypted-model"  # ArrayRecord: the last model it accepted
REFUSAL = (
    f"{protocol.MODEL_REFUSED}: its decrypted values are not finite or pass the bound of "
    f"its encrypted sum"
)


class RefusedModelError(ModError):
    """The decrypted model failed its bound; the reason is fixed and carries no value."""

    def __init__(self) -> None:
        super().__init__(REFUSAL)


def model_round(msg: Message) -> int:
    """The round of the model a message carries: r − 1 for training in round r, else r.

    Raises
    ------
    ModError
        If the message has no whole ``server-round`` >= 1.
    """
    value = train_config(msg).get(protocol.SERVER_ROUND)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModError(
            f"an encrypted model needs a whole '{protocol.SERVER_ROUND}' >= 1 in the message's "
            f"config (Flower's strategies send it); nothing was decrypted"
        )
    return value - 1 if is_train(msg) else value


def digest(record: ArrayRecord) -> str:
    """SHA-256 over an encrypted model's header and ciphertexts, in key order."""
    hashed = hashlib.sha256()
    for key in sorted(record.keys()):
        data = record[key].data
        hashed.update(key.encode())
        hashed.update(len(data).to_bytes(8, "little"))
        hashed.update(data)
    return hashed.hexdigest()


def decrypt_once(
    msg: Message, context: Context, record: ArrayRecord, decrypt: Callable[[], ArrayRecord]
) -> ArrayRecord:
    """The plaintext of an encrypted model, decrypted at most once per round (see module).

    Parameters
    ----------
    msg : Message
        The message that carries ``record`` (its type and ``server-round`` name the round).
    context : Context
        The node's context; the ledger and the last plaintext live in ``context.state``.
    record : ArrayRecord
        The encrypted model.
    decrypt : Callable[[], ArrayRecord]
        Decrypts ``record`` (flooded, bound-checked); raises :class:`RefusedModelError`
        for a model past its bound.

    Raises
    ------
    ModError
        If the request is refused without decrypting, or the model is refused.
    """
    round_number = model_round(msg)
    fingerprint = digest(record)
    ledger = context.state.config_records.get(LEDGER)
    if ledger and fingerprint == str(ledger["accepted"]):  # no new decryption: nothing new
        return _kept(context)
    count = int(ledger["count"]) if ledger else 0
    accepted = str(ledger["accepted"]) if ledger else ""
    if ledger and round_number == int(ledger["round"]):
        if str(ledger["digest"]) == fingerprint:  # accepted ones were served above
            raise RefusedModelError()
        raise ModError(
            f"already decrypted a global model for round {round_number}; another one "
            f"for the same round is refused without decrypting"
        )
    if ledger and round_number < int(ledger["round"]):
        raise ModError(
            f"a global model for round {round_number}, after one for round "
            f"{int(ledger['round'])}: earlier rounds are refused without decrypting"
        )
    if count >= MAX_DECRYPTIONS:
        raise ModError(
            f"this client has decrypted {count} global models in this run, the most the "
            f"flooding of published decryptions is sized for; nothing more is decrypted"
        )
    entry = {"round": round_number, "digest": fingerprint, "count": count + 1}
    try:
        plain = decrypt()
    except RefusedModelError:
        context.state[LEDGER] = ConfigRecord({**entry, "accepted": accepted})
        raise
    context.state[LEDGER] = ConfigRecord({**entry, "accepted": fingerprint})
    context.state[KEPT_MODEL] = plain
    return _kept(context)


def _kept(context: Context) -> ArrayRecord:
    """The last model this client accepted (a copy: the handler may change its record)."""
    return ArrayRecord(dict(context.state.array_records[KEPT_MODEL].items()))
