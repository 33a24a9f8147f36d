"""A client is not a decryption service: at most one global model per round, kept in state.

A server holding only the public context can build ciphertexts from clients' uploads (one
upload times a one-slot mask, say) and send them to another client as a "global model".
Whatever that client sends back that depends on the decryption (an error reason quoting a
value, an evaluation loss) answers a question about someone's upload. So ``he_mod``
decrypts through :func:`decrypt_once`:

- each message names the model it carries by its round: a training message of round r
  carries the model of round r − 1 (the one it trains on), an evaluation message of round
  r the model of round r (which round r + 1 trains on);
- a client uses at most one model per round number, once for evaluation and once for
  training, and only for a round later than any before; other ciphertexts for a round it
  has used, or for an earlier round, are refused without decrypting. Every use counts,
  not only every decryption: whether a handler succeeds on a model (or its update is
  NaN) is a bit about the model, so a model used again with other settings would be a
  new question;
- the last model it accepted is kept in the node's state and served again without
  decrypting (evaluated in round r, trained on in round r + 1; sent again in a later
  round as the fallback after a refused model, a new use counted like a decryption);
- a model it refused (past its bound) stays refused, with the same fixed reason;
- it uses at most ``he-max-decryptions`` models (node config; default and most
  ``MAX_DECRYPTIONS``, the number of decryptions the flooding of
  :mod:`lepton_flwr.he.publish` is sized for): per run, or, with ``state-dir`` in the
  node config, per key across every run (counted in a file there before decrypting,
  as the key holder counts its own: :mod:`lepton_flwr.he.ledger`).

What a malicious server still learns from a client per use: whether it refused the model,
or whether the handler failed on it (a few outcomes), and, if the client evaluates
encrypted models, the loss and accuracy of that model on the client's test data. It
chooses the round numbers, so "per round" means per message it is willing to spend; the
budget bounds the total.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from logging import WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common.logger import log

from lepton_flwr import protocol
from lepton_flwr.he.ledger import DecryptionCountError, count_file, read_count, write_count
from lepton_flwr.he.publish import DECRYPTIONS
from lepton_flwr.mods.common import ModError, is_train, train_config
from lepton_flwr.numbers import is_int, plain_number

MAX_DECRYPTIONS = DECRYPTIONS
LEDGER = "lepton-he-decryptions"  # ConfigRecord: round, digest, count, accepted (a digest)
KEPT_MODEL = "lepton-he-decrypted-model"  # ArrayRecord: the last model it accepted
_warned_without_state_dir: set[tuple[int, str]] = set()  # (run, key): count-per-run warned
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
    if not is_int(value) or value < 1:
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
        hashed.update(len(key.encode()).to_bytes(8, "little"))
        hashed.update(key.encode())
        hashed.update(len(data).to_bytes(8, "little"))
        hashed.update(data)
    return hashed.hexdigest()


def decryption_budget(node_config: Mapping) -> int:
    """The most models this node decrypts: ``he-max-decryptions``, else ``MAX_DECRYPTIONS``.

    Raises
    ------
    ModError
        If the setting is not a whole number in [1, ``MAX_DECRYPTIONS``].
    """
    raw = node_config.get(protocol.HE_MAX_DECRYPTIONS)
    value = plain_number(raw) if raw is not None else float(MAX_DECRYPTIONS)
    if not (value.is_integer() and 1 <= value <= MAX_DECRYPTIONS):
        raise ModError(
            f"node config {protocol.HE_MAX_DECRYPTIONS}={raw!r} is not a whole number in "
            f"[1, {MAX_DECRYPTIONS}]; nothing was decrypted"
        )
    return int(value)


def lifetime_file(context: Context, key_fingerprint: str) -> Path | None:
    """Where the node counts its decryptions under a key across runs (``state-dir``)."""
    return count_file(context.node_config.get(protocol.STATE_DIR), key_fingerprint)


def lifetime_count(path: Path | None) -> int:
    """Decryptions counted in ``path`` (0 without a file).

    Raises
    ------
    ModError
        If the file is a link, too large or malformed: the count must not restart.
    """
    try:
        return read_count(path)
    except DecryptionCountError as err:
        raise ModError(f"{err} (state-dir)") from err


def decrypt_once(
    msg: Message,
    context: Context,
    record: ArrayRecord,
    decrypt: Callable[[], ArrayRecord],
    key_fingerprint: str = "",
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
        for a model past its bound and :class:`ModError` for one refused before it is
        decrypted (nor counted); whatever else it raises counts the decryption.
    key_fingerprint : str
        The key's fingerprint: with ``state-dir``, decryptions under it are counted
        there across runs.

    Raises
    ------
    ModError
        If the request is refused without decrypting, or the model is refused.
    """
    round_number = model_round(msg)
    fingerprint = digest(record)
    use = "train" if is_train(msg) else "evaluate"
    ledger = context.state.config_records.get(LEDGER)
    count = int(ledger["count"]) if ledger else 0
    accepted = str(ledger["accepted"]) if ledger else ""
    fallback = bool(ledger) and fingerprint == accepted != str(ledger["digest"])
    if ledger and round_number == int(ledger["round"]) and not fallback:
        if str(ledger["digest"]) != fingerprint:
            raise ModError(
                f"already used a global model for round {round_number}; another one "
                f"for the same round is refused without decrypting"
            )
        if fingerprint != accepted:
            raise RefusedModelError()
        if use in str(ledger["uses"]).split(","):  # each use once: every outcome is a bit
            raise ModError(f"the model of round {round_number} was already used for {use}")
        context.state[LEDGER] = ConfigRecord({**ledger, "uses": f"{ledger['uses']},{use}"})
        return _kept(context)
    if ledger and round_number < int(ledger["round"]):
        raise ModError(
            f"a global model for round {round_number}, after one for round "
            f"{int(ledger['round'])}: earlier rounds are refused without decrypting"
        )
    budget = decryption_budget(context.node_config)
    path = lifetime_file(context, key_fingerprint)
    used = max(count, lifetime_count(path))
    if used >= budget:
        raise ModError(
            f"this client has used {used} global models under this key, the most it uses "
            f"({protocol.HE_MAX_DECRYPTIONS}={budget}); nothing more is decrypted"
        )
    warned = (context.run_id, key_fingerprint)  # once a run and process: a simulation
    # runs many nodes in one process, a deployment one message a process
    if path is None and used == 0 and warned not in _warned_without_state_dir:
        _warned_without_state_dir.add(warned)
        log(
            WARNING,
            "he_mod: no %s in the node config: decryptions under this key are counted for "
            "this run only, so a server that starts a new run gets %d more (the flooding "
            "is sized for %d per key); set %s to count across runs",
            protocol.STATE_DIR,
            budget,
            DECRYPTIONS,
            protocol.STATE_DIR,
        )
    if path is not None:  # counted before decrypting: a crash cannot lose a decryption
        try:
            write_count(path, used + 1)
        except DecryptionCountError as err:
            raise ModError(f"{err} (state-dir)") from err
    entry = {"round": round_number, "digest": fingerprint, "count": used + 1, "uses": use}
    if fingerprint == accepted:  # the model it accepted before (the fallback after a
        # refused one, or a later round): no new decryption, but a new use, counted
        context.state[LEDGER] = ConfigRecord({**entry, "accepted": accepted})
        return _kept(context)
    try:
        plain = decrypt()
    except RefusedModelError:
        context.state[LEDGER] = ConfigRecord({**entry, "accepted": accepted})
        raise
    except ModError:  # refused before decrypting: a model that does not check
        raise
    except BaseException:  # anything else may come after decrypting (a layout that
        # cannot be built, this machine's failure): the round's model is spent
        context.state[LEDGER] = ConfigRecord({**entry, "accepted": accepted})
        raise
    context.state[LEDGER] = ConfigRecord({**entry, "accepted": fingerprint})
    context.state[KEPT_MODEL] = plain
    return _kept(context)


def _kept(context: Context) -> ArrayRecord:
    """The last model this client accepted (a copy: the handler may change its record)."""
    return ArrayRecord(dict(context.state.array_records[KEPT_MODEL].items()))
