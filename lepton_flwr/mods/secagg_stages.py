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
threshold below what they require for the round's size.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log

from lepton_flwr import protocol
from lepton_flwr.mods.common import ModError, train_config
from lepton_flwr.secagg.client import SecAggClient
from lepton_flwr.secagg.masks import MaskSum
from lepton_flwr.secagg.params import SecAggParams, SecAggParamsError
from lepton_flwr.secagg.state import ClientState, SecAggStateError
from lepton_flwr.secagg.wire import MASKED_INPUT, REFUSED, REPLY_KEY, as_config, fields, stages_of

REQUIRED = "secure-aggregation"  # node config: "required" = never upload unmasked
COLLUDING_FRACTION = "secagg-colluding-fraction"
DROPOUT_FRACTION = "secagg-dropout-fraction"
MIN_NEIGHBOURS = "secagg-min-neighbours"
_STATE_FIELD = "state"


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


def _client(context: Context) -> SecAggClient:
    record = context.state.config_records.get(protocol.SECAGG_STATE)
    try:
        if record is None:
            state = ClientState.new()
        else:
            state = ClientState.from_bytes(record[_STATE_FIELD])
    except (SecAggStateError, KeyError, TypeError) as err:
        raise ModError(f"the node's secure-aggregation state cannot be read: {err}") from None
    return SecAggClient(context.node_id, state, node_params(context))


def _keep(context: Context, client: SecAggClient) -> None:
    """Write the state back before any answer leaves (a lost state could answer twice)."""
    context.state[protocol.SECAGG_STATE] = ConfigRecord({_STATE_FIELD: client.state.to_bytes()})


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
    client = _client(context)
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
            log(WARNING, "secure aggregation: node %d refused %s: %s", context.node_id, stage, err)
            answers[stage] = {REFUSED: str(err)[:500]}
    _keep(context, client)  # before the reply leaves: a lost state could answer twice
    content = ConfigRecord({protocol.SECAGG_STAGE: ",".join(stages), **as_config(answers)})
    return Message(RecordDict({REPLY_KEY: content}), reply_to=msg)


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
        if str(context.node_config.get(REQUIRED, "")).lower() == "required":
            raise ModError(
                "this node requires secure aggregation (node config secure-aggregation="
                "required) and the server did not ask for masked uploads; nothing was trained "
                "or sent"
            )
        return None
    client = _client(context)
    try:
        mask = client.masked_input(fields(config, MASKED_INPUT), primes, degree)
    except ValueError as err:  # SecAggRefusal, or the fields' own wrapping
        _keep(context, client)
        raise ModError(f"secure aggregation, masked input: {err}") from None
    _keep(context, client)
    return mask
