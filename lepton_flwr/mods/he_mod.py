"""``he_mod`` and ``he_dp_mod``: CKKS encryption around a ClientApp's handlers.

``he_mod`` decrypts an encrypted global model on the way in (for training *and*
evaluation) and encrypts a training reply on the way out; ``HEFedAvg`` pairs with it.
Before encrypting, it clamps the weights to the public bound the server announces
(``he-value-bound``); after decrypting, it refuses a model that is not finite or passes
the bound of its encrypted sum (a wrapped CKKS sum, or an upload encrypted dishonestly),
replying with an error that the strategy counts towards falling back to the last good
model. Every decryption is flooded with noise and rounded (:mod:`lepton_flwr.he.publish`).
``he_dp_mod`` does the same around ``dp_share_mod`` (clip + noise share inside, then
encryption); ``HEDPFedAvg`` pairs with it. Attach either to the whole app,
``ClientApp(mods=[he_mod])``: evaluation needs the decrypted model too.

The clients' secret context is found, first match wins, in the node config
(``--node-config "he-secret-context='/keys/secret.ctx'"``, per SuperNode), the run config
(``he-secret-context`` in ``[tool.flwr.app.config]``), or the path given to
:func:`make_he_mod`. Give an absolute path: Flower runs the ClientApp from the
SuperNode's (or simulation's) working folder, not from your app's folder, so a relative
one is refused with an error reply naming it (the node's log names the folder).
"""

from __future__ import annotations

import json
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import log

from lepton_flwr import protocol
from lepton_flwr.dp.floor import BelowPrivacyFloorError, require_evaluation, require_noise_share
from lepton_flwr.he.codec import CiphertextError, CkksEncoder, TensorSpec, flatten, manifest_of
from lepton_flwr.he.keyholder import ModelOutOfBoundError, decrypt_model, encoder_for
from lepton_flwr.he.records import EncryptedModel, is_encrypted
from lepton_flwr.mistakes import (
    MOD_OF_ANOTHER_STRATEGY,
    MODS_IN_WRONG_ORDER,
    NO_DP_SHARE_MOD,
    NO_SECRET_CONTEXT,
    NO_WEIGHT,
    OTHER_WEIGHT,
    RELATIVE_KEY_PATH,
)
from lepton_flwr.mods.common import (
    ModError,
    is_train,
    replies_with_errors,
    the_record,
    train_config,
)
from lepton_flwr.mods.decryptions import RefusedModelError, decrypt_once
from lepton_flwr.mods.dp_share_mod import check_share_floor, dp_share_mod, share_mod_outside
from lepton_flwr.mods.secagg_stages import answer_stage, is_stage, upload_mask
from lepton_flwr.numbers import is_count, positive

SECRET_CONTEXT_NODE_KEY = protocol.SECRET_CONTEXT  # kept for older imports
DEFAULT_WEIGHT_SCALE = 100.0


def find_secret_context(context: Context, default: str | Path | None) -> str:
    """The clients' secret context path: node config, run config, then ``default``.

    Raises
    ------
    ModError
        If none of the three gives one, naming all three, or the one found is a relative
        path (naming it; the folder it would be read from goes to the node's log only).
    """
    key = protocol.SECRET_CONTEXT
    for source, name in ((context.node_config, "node config"), (context.run_config, "run config")):
        if source.get(key):
            return _absolute(str(source[key]), f"{key}={str(source[key])!r} (the {name})")
    if default:
        return _absolute(str(default), f"make_he_mod({str(default)!r})")
    raise ModError(
        f"{NO_SECRET_CONTEXT.phrase}. Give its absolute path in one of: the node config "
        f"(flower-supernode --node-config \"{key}='/path/secret.ctx'\"), the run config "
        f'({key} = "/path/secret.ctx" under [tool.flwr.app.config], or flwr run '
        f"--run-config \"{key}='/path/secret.ctx'\"; in a simulation this reaches every "
        f"client), or the mod itself (make_he_mod('/path/secret.ctx')). Create keys with "
        f"`lepton-flwr keygen --out <folder>`."
    )


def _absolute(path: str, where: str) -> str:
    """``path`` if it is absolute; a relative one is refused, whoever gave it.

    Flower runs the ClientApp from the SuperNode's (or the simulation's) working folder,
    so a relative path would work or fail depending on where that process started. The
    error reply names the path as given; the folder it was tried in (this process's
    working folder) stays in the node's log.

    Raises
    ------
    ModError
        If ``path`` is relative.
    """
    if Path(path).expanduser().is_absolute():
        return path
    log(
        ERROR,
        "he_mod: %s %s: this ClientApp runs in %s, so it would read %s",
        where,
        RELATIVE_KEY_PATH.phrase,
        Path.cwd(),
        Path.cwd() / path,
    )
    raise ModError(
        f"{where} {RELATIVE_KEY_PATH.phrase}: Flower runs the ClientApp from its own working "
        f"folder (the node's log says which), not from your app's folder, so a relative "
        f"key path works or fails depending on where the SuperNode or simulation started: "
        f"give an absolute path. Nothing was trained or sent."
    )


def named_by_run_config(context: Context) -> bool:
    """Whether the secret context path comes from the run config (the launcher's choice)."""
    key = protocol.SECRET_CONTEXT
    return not context.node_config.get(key) and bool(context.run_config.get(key))


def _check_run_config_key(path: str, workers: int | None, seeded: bool) -> None:
    """Load a key the run config names, failing with one reason whatever went wrong.

    Whoever launches a run chooses the run config: distinct errors for a missing file
    and an unreadable one would tell them which files exist on the node.
    """
    try:
        encoder_for(path, workers, seeded)
    except Exception as err:  # noqa: BLE001 - the kind of failure is what must not leak
        raise ModError(
            f"cannot load a CKKS secret context from {path!r}, the path the run config "
            f"names (missing, unreadable or not a secret context). On a SuperNode, set "
            f"{protocol.SECRET_CONTEXT} in the node config, which takes precedence; give "
            f"an absolute path."
        ) from err


def encrypt_update(
    record: ArrayRecord,
    weight: float,
    encoder: CkksEncoder,
    own_fingerprint: str,
    bound: float | None = None,
    mask=None,
) -> ArrayRecord:
    """Encrypt ``weight * tensors`` as seeded CKKS chunks, with header.

    The header declares ``bound`` (a public bound the values respect) as their largest
    magnitude when one is given, so that it reveals nothing about the data; otherwise
    their actual largest magnitude.

    Raises
    ------
    ValueError
        If the tensors hold NaN or Inf (they would poison the encrypted sum unseen), or
        exceed ``bound``.
    """
    vector, manifest = flatten({k: v.numpy() for k, v in record.items()})
    if not np.isfinite(vector).all():  # which tensors is for the node's log only
        bad = [
            s.name
            for s, v in zip(manifest, record.values(), strict=True)
            if not np.isfinite(v.numpy()).all()
        ]
        log(ERROR, "he_mod: the local update has NaN or Inf values in %s", bad)
        raise ValueError("the local update has NaN or Inf values; nothing was encrypted")
    scaled = weight * vector
    max_abs = float(np.abs(scaled).max()) if len(scaled) else 0.0
    if bound is not None:
        if max_abs > bound:  # no value in the text: it may leave the client
            raise ValueError("values pass the public bound; nothing was encrypted")
        max_abs = bound
    chunks = encoder.encrypt(scaled, mask=mask)
    return EncryptedModel(manifest, chunks, weight, own_fingerprint, max_abs).to_record()


def clamped(record: ArrayRecord, bound: float) -> ArrayRecord:
    """The record's tensors clamped to ±bound (a warning says how many values moved)."""
    if not (np.isfinite(bound) and bound > 0):
        raise ModError(f"the server's value bound {bound} is not a finite number > 0")
    tensors = {k: v.numpy() for k, v in record.items()}
    moved = sum(int((np.abs(t) > bound).sum()) for t in tensors.values())
    if moved:
        log(WARNING, "he_mod: %d values clamped to the public bound ±%g", moved, bound)
    return ArrayRecord({k: Array(np.clip(t, -bound, bound)) for k, t in tensors.items()})


def remember_manifest(context: Context, record: ArrayRecord) -> None:
    """Keep the names, shapes and dtypes of the node's first training reply in its state.

    The reply is what the client's own code trained (before encryption), so its layout is
    the client's model, not one a server chose: a one-value plaintext model sent first
    cannot pin the layout. Later encrypted models are decrypted into this layout, whatever
    their header (which the server writes) says; a model of another size is refused.
    """
    if protocol.HE_MANIFEST in context.state.config_records:
        return
    text = json.dumps([[s.name, list(s.shape), s.dtype] for s in manifest_of(record)])
    context.state[protocol.HE_MANIFEST] = ConfigRecord({"manifest": text})


def known_manifest(context: Context) -> list[TensorSpec] | None:
    """The layout :func:`remember_manifest` kept, or None (the header's is used)."""
    kept = context.state.config_records.get(protocol.HE_MANIFEST)
    if not kept:
        return None
    return [TensorSpec(n, tuple(shape), d) for n, shape, d in json.loads(str(kept["manifest"]))]


def _reply_weight(
    msg: Message, metrics: MetricRecord, weight_scale: float, weighted_by: str
) -> float:
    """The weight a training reply is encrypted with: 1 for a DP share, else its data.

    The weight is a whole example count under the key the client chose: the server may
    not name another metric (a training loss, say), since the weight leaves in the clear.
    """
    if protocol.HE_WEIGHT in metrics:
        return float(metrics[protocol.HE_WEIGHT])
    if protocol.NOISE_SHARE_STD in train_config(msg):
        if share_mod_outside():
            raise ModError(
                f"the {MODS_IN_WRONG_ORDER.phrase}: dp_share_mod runs outside he_mod "
                f"(mods=[dp_share_mod, he_mod]), so he_mod got the update before it was "
                f"clipped and noised. Use ClientApp(mods=[he_dp_mod]), which runs both in "
                f"the right order. Nothing was sent."
            )
        raise ModError(
            f"the server (HEDPFedAvg) asks for a DP noise share, {NO_DP_SHARE_MOD.phrase}: "
            "use ClientApp(mods=[he_dp_mod]) so that the update is clipped and noised "
            "before it is encrypted. Nothing was sent."
        )
    asked = str(train_config(msg).get(protocol.WEIGHTED_BY, weighted_by))
    if asked != weighted_by:  # the weight travels in the clear: the client chooses it
        raise ModError(
            f"{OTHER_WEIGHT.phrase} '{asked}'; this client weights by "
            f"'{weighted_by}' (make_he_mod(weighted_by=...)); nothing was sent"
        )
    if weighted_by not in metrics:
        raise ModError(
            f"no '{weighted_by}' {NO_WEIGHT.phrase}: the weight of the update, which the "
            f"train handler must report (MetricRecord({{'{weighted_by}': len(train_data), "
            f"...}})); nothing was sent"
        )
    count = metrics[weighted_by]
    if not (is_count(count) and count >= 0):
        raise ModError(f"'{weighted_by}' is not a whole number >= 0; nothing was sent")
    weight_scale = positive(train_config(msg).get(protocol.WEIGHT_SCALE, weight_scale))
    if weight_scale is None:
        raise ModError("the server's weight scale is not a finite number > 0; nothing was sent")
    return float(count) / weight_scale


# What a training reply under HE may carry in the clear: the weight and values that do not
# depend on the model the client decrypted (a DP share's public values, DP-SGD's ε and z).
PUBLIC_TRAIN_METRICS = (
    protocol.NUM_EXAMPLES,
    protocol.HE_WEIGHT,
    protocol.HE_BOUND,
    protocol.DP_SHARE_STD,
    protocol.CLIENT_EPSILON,
    protocol.DPSGD_NOISE_MULTIPLIER,
)


def public_metrics(metrics: MetricRecord, weighted_by: str) -> MetricRecord:
    """The reply's metrics that may leave an HE client: the weight and public values only.

    Anything else the handler reported (a training loss, say) is computed from the model
    it decrypted, which a malicious server may have crafted from other clients' uploads:
    it stays on the client (logged there once).
    """
    allowed = {*PUBLIC_TRAIN_METRICS, weighted_by}
    withheld = sorted(k for k in metrics if k not in allowed)
    if withheld:
        log(INFO, "he_mod: training metrics %s stay on this client (not sent)", withheld)
    return MetricRecord({k: v for k, v in metrics.items() if k in allowed})


def _handled(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler on a decrypted model; what goes back carries no text read from it.

    An exception or an error reply of the handler may quote values of the model (which
    the server may have crafted): the server gets a fixed reason; the node's log keeps
    the handler's own. Refusals by the node's privacy floor (``protocol.FLOOR_REFUSAL``)
    depend on the node's settings, not the model, and pass unchanged.
    """
    try:
        reply = call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - nothing read from the model may leave
        log(ERROR, "he_mod: the handler failed on the decrypted model: %r", err)
        raise ModError(HANDLER_FAILED) from None
    if reply.has_error() and protocol.FLOOR_REFUSAL not in str(reply.error.reason):
        log(ERROR, "he_mod: the handler's error on the decrypted model: %s", reply.error.reason)
        raise ModError(HANDLER_FAILED)
    return reply


HANDLER_FAILED = (
    "the handler failed on the decrypted global model (the reason is in the node's log, "
    "not sent: it may quote values of the model)"
)


def apply_he(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    secret_context_path: str | Path,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
    workers: int | None = None,
    seeded: bool = True,
    weighted_by: str = protocol.NUM_EXAMPLES,
    allow_evaluation: bool = False,
) -> Message:
    """The HE round trip around a handler (see :func:`make_he_mod`).

    Raises
    ------
    ModError
        For a missing key file, a model under another key, or a reply it cannot encrypt.
    """
    try:
        encoder, own_fingerprint = encoder_for(secret_context_path, workers, seeded)
    except (FileNotFoundError, ValueError) as err:
        raise ModError(str(err)) from err
    arrays = msg.content.array_records
    encrypted = len(arrays) == 1 and is_encrypted(next(iter(arrays.values())))
    try:  # the node's floor, before anything is decrypted
        if is_train(msg):
            require_noise_share(context.node_config, train_config(msg))
        else:  # evaluating an encrypted model: only where the node (or the app) opts in
            require_evaluation(context.node_config, default=allow_evaluation or not encrypted)
    except BelowPrivacyFloorError as err:
        raise ModError(str(err)) from err
    # Secure aggregation: open the peers' tokens before anything is decrypted or trained.
    mask = upload_mask(msg, context, encoder.primes, encoder.degree) if is_train(msg) else None
    if encrypted:
        key, record = next(iter(arrays.items()))

        def decrypt() -> ArrayRecord:
            try:
                return decrypt_model(record, encoder, own_fingerprint, known_manifest(context))
            except ModelOutOfBoundError:
                raise RefusedModelError() from None  # no value read from it leaves
            except CiphertextError as err:
                raise ModError(f"cannot decrypt the global model: {err}") from err

        plain = decrypt_once(msg, context, record, decrypt, own_fingerprint)
        msg.content = RecordDict({**msg.content, key: plain})  # never edit a shared record
    reply = _handled(msg, context, call_next) if encrypted else call_next(msg, context)
    if not is_train(msg) or reply.has_error():
        return reply
    key, record = the_record(reply.content, ArrayRecord)
    if is_encrypted(record):
        raise ModError("the reply is already encrypted: attach he_mod once")
    remember_manifest(context, record)
    _, metrics = the_record(reply.content, MetricRecord)
    weight = _reply_weight(msg, metrics, weight_scale, weighted_by)
    if protocol.HE_BOUND in metrics:  # a DP share: clamped to the public bound B already
        bound = float(metrics[protocol.HE_BOUND])
    else:  # HEFedAvg: clamp to its public bound; the header never holds a computed value
        value_bound = positive(train_config(msg).get(protocol.VALUE_BOUND))
        if value_bound is None:
            raise ModError(
                f"the training request has no public value bound ({protocol.VALUE_BOUND}, "
                f"a finite number > 0), so it does not come from HEFedAvg: it comes from a "
                f"strategy {MOD_OF_ANOTHER_STRATEGY.phrase} (he_mod pairs with HEFedAvg, "
                f"he_dp_mod with HEDPFedAvg; DPFedAvg needs no HE mod); nothing was sent"
            )
        record = clamped(record, value_bound)
        bound = weight * value_bound
    try:
        encrypted = encrypt_update(record, weight, encoder, own_fingerprint, bound, mask=mask)
    except ValueError as err:
        raise ModError(str(err)) from err
    metric_key, _ = the_record(reply.content, MetricRecord)
    public = public_metrics(metrics, str(train_config(msg).get(protocol.WEIGHTED_BY, "")))
    reply.content = RecordDict({**reply.content, key: encrypted, metric_key: public})
    return reply


def _checked_scale(weight_scale: float) -> float:
    if weight_scale <= 0:
        raise ValueError(f"weight_scale must be > 0, got {weight_scale}")
    return weight_scale


def make_he_mod(
    secret_context_path: str | Path | None = None,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
    workers: int | None = None,
    seeded: bool = True,
    weighted_by: str = protocol.NUM_EXAMPLES,
    allow_evaluation: bool = False,
) -> Mod:
    """Build the HE client mod, for ``HEFedAvg``.

    Parameters
    ----------
    secret_context_path : str | Path | None
        Absolute path of the clients' secret context (``secret.ctx`` from
        ``lepton-flwr keygen``). The node config key ``he-secret-context`` (per SuperNode)
        and then the run config key of the same name take precedence.
    weight_scale : float
        A client encrypts ``(num_examples / weight_scale) * weights``; the server divides
        the sum by the summed weights. It keeps the encrypted values small. ``HEFedAvg``
        announces its own value, which takes precedence, and checks each reply's weight
        against it.
    workers : int | None
        Processes that encrypt in parallel (None: all cores this process may use).
    seeded : bool
        Kept for configurations that set it: uploads always carry c1 as its seed (the
        packed format, :mod:`lepton_flwr.he.packed`).
    weighted_by : str
        The reply metric (a whole example count) the update is weighted by; it leaves in
        the clear. The server's ``weighted_by_key`` must be the same, or the client
        refuses: a server may not name another metric (a training loss) as the weight.
    allow_evaluation : bool
        Answer federated evaluation of encrypted models. Off by default: evaluation
        metrics of a model a malicious server built from ciphertexts read the clients'
        key and uploads (docs/guides/guarantees.md, "A client is not a decryption
        service"). Turn it on where the server is trusted to follow the protocol (a
        simulation on one machine); a node's ``allow-evaluation`` node config takes
        precedence, and a node with a privacy floor never evaluates without it.

    Returns
    -------
    Mod
        ``(msg, context, call_next) -> Message``; problems become error replies.

    Examples
    --------
    >>> app = ClientApp(mods=[make_he_mod("/keys/secret.ctx")])  # doctest: +SKIP
    """
    weight_scale = _checked_scale(weight_scale)

    @replies_with_errors("he_mod")
    def he_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Decrypt the global model for the handler; encrypt a training reply (``HEFedAvg``).

        The secret context comes from the node config or run config key
        ``he-secret-context``, or the path given to ``make_he_mod``. Attach it to the
        whole app: ``ClientApp(mods=[he_mod])``. Problems become error replies.
        """
        if is_train(msg) and is_stage(msg):  # a protocol stage: no model, no handler
            return answer_stage(msg, context)
        path = find_secret_context(context, secret_context_path)
        if named_by_run_config(context):
            _check_run_config_key(path, workers, seeded)
        return apply_he(
            msg,
            context,
            call_next,
            path,
            weight_scale,
            workers,
            seeded,
            weighted_by,
            allow_evaluation,
        )

    return he_mod


def make_he_dp_mod(
    secret_context_path: str | Path | None = None,
    workers: int | None = None,
    seeded: bool = True,
    allow_evaluation: bool = False,
) -> Mod:
    """Build the HE + DP client mod, for ``HEDPFedAvg``: ``dp_share_mod`` inside ``he_mod``.

    On a training message from ``HEDPFedAvg`` the client's update is clipped to the C the
    server sent, given its Gaussian noise share, scaled by 1/d and then encrypted; the
    global model is decrypted for training and evaluation as with ``he_mod``. Parameters
    as in :func:`make_he_mod` (a DP share has weight 1, so there is no ``weight_scale``).

    Examples
    --------
    >>> app = ClientApp(mods=[make_he_dp_mod("/keys/secret.ctx")])  # doctest: +SKIP
    """
    he = make_he_mod(
        secret_context_path, workers=workers, seeded=seeded, allow_evaluation=allow_evaluation
    )

    @replies_with_errors("he_dp_mod")
    def he_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Clip, add a noise share, scale and encrypt a training reply (``HEDPFedAvg``).

        ``dp_share_mod`` inside ``he_mod``: the update never leaves the client without
        noise, and never in the clear. A training request without a noise share is
        refused before training. The global model is decrypted for every handler.
        Attach it to the whole app: ``ClientApp(mods=[he_dp_mod])``.
        """
        if is_train(msg) and not is_stage(msg):
            if protocol.NOISE_SHARE_STD not in train_config(msg):
                raise ModError(
                    "the training request asks for no DP noise share, so it does not come "
                    f"from HEDPFedAvg: it comes from a strategy {MOD_OF_ANOTHER_STRATEGY.phrase} "
                    "(he_dp_mod pairs with HEDPFedAvg, he_mod with HEFedAvg). he_dp_mod never "
                    "encrypts an update without a noise share; nothing was trained or sent"
                )
            check_share_floor(msg, context)  # before anything is decrypted
        return he(msg, context, lambda m, c: dp_share_mod(m, c, call_next))

    return he_dp_mod


he_mod = make_he_mod()
he_dp_mod = make_he_dp_mod()
