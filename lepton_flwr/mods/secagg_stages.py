"""The node's side of secure aggregation, in Flower messages (issue 20).

``he_mod`` (and so ``he_dp_mod``) answers the protocol's stages itself: a training
message whose config names a stage (``lepton-secagg-stage``: ``advertise``,
``share-keys`` or ``unmask``) carries no model, never reaches the handler, and gets a
reply holding one ConfigRecord (public keys, encrypted shares, shares of peers'
secrets). A training message with ``lepton-secagg-masked`` carries the tokens the
node's peers sent it; the node opens them before it decrypts anything and masks its
upload with the result (:meth:`SecAggClient.masked_input`). The protocol's rules (each
stage once per round, one kind of secret per peer) live in
:mod:`lepton_flwr.secagg.client`; this module only carries its dicts. Request and reply
fields travel as config keys ``lepton-secagg.<field>``.

The node's state (its run's master secret and the stages it answered) is kept in
Flower's ``context.state``, which Flower keeps per node for the run (simulation and
deployment), and written back before the reply leaves. A node that sets
``secure-aggregation=required`` in its node config refuses to upload an update that is
not masked.

Node settings (node config), each at least the default: ``secagg-colluding-fraction``
(γ), ``secagg-dropout-fraction`` (δ), ``secagg-min-neighbours``; the node refuses a
threshold below what they require for the round's size. Against a malicious server:
``secagg-signing-key`` (absolute path of an elliptic-curve private key, the SuperNode's
authentication key serves) signs the node's advertised keys, and ``secagg-trusted-keys``
(absolute path of a file of OpenSSH public keys, one a line, from the node operators)
makes the node refuse a round in which a peer's keys are not signed by one of them
(:mod:`lepton_flwr.secagg.signatures`).
"""

from __future__ import annotations

import base64
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log

from lepton_flwr import protocol
from lepton_flwr.files import open_regular, read_private, write_atomically
from lepton_flwr.mods.common import ModError, train_config
from lepton_flwr.secagg.client import SecAggClient
from lepton_flwr.secagg.masks import MaskSum
from lepton_flwr.secagg.params import SecAggParams, SecAggParamsError
from lepton_flwr.secagg.signatures import RoundKeySigner, SignatureError, TrustedKeys
from lepton_flwr.secagg.state import MAX_STATE_BYTES, ClientState, SecAggStateError
from lepton_flwr.secagg.wire import MASKED_INPUT, REFUSED, REPLY_KEY, as_config, fields, stages_of

REQUIRED = "secure-aggregation"  # node config: "required" = never upload unmasked
COLLUDING_FRACTION = "secagg-colluding-fraction"
DROPOUT_FRACTION = "secagg-dropout-fraction"
MIN_NEIGHBOURS = "secagg-min-neighbours"
SIGNING_KEY = protocol.SECAGG_SIGNING_KEY
TRUSTED_KEYS = protocol.SECAGG_TRUSTED_KEYS
_STATE_FIELD = "state"
MASKED_INPUT_REFUSAL = "secure aggregation, masked input: "  # what a refusal's reason starts with


def is_stage(msg: Message) -> bool:
    """Whether the message is a secure-aggregation stage (no model, no training)."""
    return protocol.SECAGG_STAGE in train_config(msg)


def node_params(context: Context) -> SecAggParams:
    """The node's own γ, δ and fewest neighbours: its node config, never below the defaults.

    Raises
    ------
    ModError
        If a setting is not a number in its range.
    """
    default = SecAggParams()
    config = context.node_config
    try:
        return SecAggParams(
            colluding_fraction=max(
                default.colluding_fraction,
                _number(config.get(COLLUDING_FRACTION, 0.0), COLLUDING_FRACTION),
            ),
            dropout_fraction=max(
                default.dropout_fraction,
                _number(config.get(DROPOUT_FRACTION, 0.0), DROPOUT_FRACTION),
            ),
            min_neighbours=max(default.min_neighbours, config.get(MIN_NEIGHBOURS, 0)),
        )
    except (SecAggParamsError, TypeError) as err:
        raise ModError(f"node config: {err}") from None


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModError(f"node config: {key} must be a number, not {value!r}")
    return float(value)


def _parsed(data: object) -> ClientState:
    try:
        return ClientState.from_bytes(data)
    except (SecAggStateError, TypeError) as err:
        raise ModError(f"the node's secure-aggregation state cannot be read: {err}") from None


@contextmanager
def node_client(context: Context) -> Iterator[SecAggClient]:
    """The node's protocol side over its state, written back before any answer leaves.

    With ``state-dir`` the state is the file ``secagg-run-<run id>.state`` there, read,
    answered and written under an exclusive lock (``secagg.lock``): Flower may run two
    tasks of one node at once, each with its own copy of ``context.state``, and a server
    that sends two stage messages together must not get a stage answered twice. Without
    it the state is kept in ``context.state``, with a warning once per process. The state
    is written back also when a request is refused (a token that fails closes the round).

    Raises
    ------
    ModError
        If the state or its lock cannot be read or taken.
    """
    folder = context.node_config.get(protocol.STATE_DIR)
    if not folder:
        _warn_without_state_dir()
        record = context.state.config_records.get(protocol.SECAGG_STATE)
        state = ClientState.new() if record is None else _parsed(record.get(_STATE_FIELD))
        client = _client(context, state)
        try:
            yield client
        finally:
            context.state[protocol.SECAGG_STATE] = ConfigRecord(
                {_STATE_FIELD: client.state.to_bytes()}
            )
        return
    folder = Path(str(folder))
    path = folder / f"secagg-run-{int(context.run_id)}.state"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open_regular(folder / "secagg.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    except (OSError, ValueError) as err:
        raise ModError(f"the node's secure-aggregation lock cannot be taken: {err}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            exists = path.exists() or path.is_symlink()
            state = _parsed(read_private(path, MAX_STATE_BYTES)) if exists else ClientState.new()
        except (OSError, ValueError) as err:
            raise ModError(f"the node's secure-aggregation state {path}: {err}") from None
        client = _client(context, state)
        try:
            yield client
        finally:
            write_atomically(path, client.state.to_bytes())
    finally:
        os.close(lock)  # releases the lock


def _client(context: Context, state: ClientState) -> SecAggClient:
    """The protocol side with the node's γ, δ, run, signing key and trusted keys."""
    config = context.node_config
    try:
        signer = RoundKeySigner.from_file(config[SIGNING_KEY]) if SIGNING_KEY in config else None
        trusted = TrustedKeys.from_file(config[TRUSTED_KEYS]) if TRUSTED_KEYS in config else None
    except SignatureError as err:
        raise ModError(f"node config: {err}") from None
    return SecAggClient(
        context.node_id,
        state,
        node_params(context),
        run_id=int(context.run_id),
        signer=signer,
        trusted=trusted,
    )


_warned_without_state_dir = False


def _warn_without_state_dir() -> None:
    global _warned_without_state_dir
    if not _warned_without_state_dir:
        _warned_without_state_dir = True
        log(
            WARNING,
            "secure aggregation: no %s in the node config: the stages this node answered are "
            "kept in Flower's context state, of which two tasks running at once each hold a "
            "copy; in a deployment set %s, so that no stage is answered twice",
            protocol.STATE_DIR,
            protocol.STATE_DIR,
        )


def answer_stage(msg: Message, context: Context) -> Message:
    """The node's reply to a stage message (the handler never runs).

    Each stage the message names is answered on its own, in order: a stage the node
    refuses gets ``refused`` (the reason, naming the field) in the reply and the others
    go on, since one exchange may carry round r's unmask and round r + 1's share-keys.

    Raises
    ------
    ModError
        If the stages are not a list of known stages, or the state cannot be read.
    """
    config = train_config(msg)
    try:
        stages = stages_of(config[protocol.SECAGG_STAGE])
    except ValueError as err:
        raise ModError(f"secure aggregation: {err}") from None
    with node_client(context) as client:
        answers = _answers(client, stages, config, context.node_id)
    content = ConfigRecord({protocol.SECAGG_STAGE: ",".join(stages), **as_config(answers)})
    return Message(RecordDict({REPLY_KEY: content}), reply_to=msg)


def _answers(client: SecAggClient, stages: list[str], config: ConfigRecord, node: int) -> dict:
    """Each stage's answer, or its refusal (``refused``: the reason naming the field)."""
    handlers = {
        "advertise": client.advertise,
        "share-keys": client.share_keys,
        "unmask": client.unmask,
    }
    answers = {}
    for stage in stages:
        try:
            answers[stage] = handlers[stage](fields(config, stage))
        except ValueError as err:  # SecAggRefusal, or the fields' own wrapping
            log(WARNING, "secure aggregation: node %d refused %s: %s", node, stage, err)
            answers[stage] = {REFUSED: str(err)[:500]}
            continue
        _log_signing(client, stage, answers[stage], node)
    return answers


def _log_signing(client: SecAggClient, stage: str, answer: dict, node: int) -> None:
    """Say that the node signed its keys, or checked its neighbours' signatures."""
    if stage == "advertise" and client.signer is not None:
        log(
            INFO,
            "secure aggregation: node %d signed its keys for rounds %d-%d with key SHA256:%s",
            node,
            answer["first_round"],
            answer["first_round"] + len(answer["signatures"]) - 1,
            base64.b64encode(client.signer.key_id).decode().rstrip("="),
        )
    if stage == "share-keys" and client.trusted is not None:
        log(
            INFO,
            "secure aggregation: node %d, round %d: the keys of its %d neighbours are signed "
            "by trusted keys",
            node,
            answer["round"],
            len(answer["recipients"]),
        )


def requires_secure_aggregation(context: Context) -> bool:
    """Whether the node config asks for masked uploads only (``secure-aggregation``).

    ``required`` (or true, yes, on, 1) turns it on; ``optional`` (or false, no, off, 0,
    absent) leaves it off; anything else is refused: a typo must not leave uploads
    unmasked.

    Raises
    ------
    ModError
        For a value that is neither.
    """
    value = context.node_config.get(REQUIRED)
    if value is None:
        return False
    word = str(value).strip().lower()
    if word in ("required", "true", "yes", "on", "1"):
        return True
    if word in ("optional", "false", "no", "off", "0", ""):
        return False
    raise ModError(
        f"node config: {REQUIRED}={value!r} is neither 'required' nor 'optional'; nothing "
        f"was trained or sent"
    )


def upload_mask(msg: Message, context: Context, primes: list[int], degree: int) -> MaskSum | None:
    """The mask of this round's upload, or None when the server does not ask for masking.

    Opens the tokens the node's peers sent (before the model is decrypted) and records
    that the node masked in this round.

    Raises
    ------
    ModError
        If a token or field is refused (the node drops out of the round), or the node
        requires secure aggregation and the server did not ask for it.
    """
    config = train_config(msg)
    if not config.get(protocol.SECAGG_MASKED, False):
        if requires_secure_aggregation(context):
            raise ModError(
                "this node requires secure aggregation (node config secure-aggregation="
                "required) and the server did not ask for masked uploads; nothing was trained "
                "or sent"
            )
        return None
    with node_client(context) as client:
        try:
            return client.masked_input(fields(config, MASKED_INPUT), primes, degree)
        except ValueError as err:  # SecAggRefusal, or the fields' own wrapping
            raise ModError(f"{MASKED_INPUT_REFUSAL}{err}") from None
