"""``he_mod``: decrypt the inbound global model, encrypt the outbound training reply.

Attach it to the ClientApp (``ClientApp(mods=[he_mod])``); it works on every message
type: an encrypted global model is decrypted for training *and* evaluation, and only
training replies are encrypted (evaluation replies carry metrics only).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from lepton_flwr.he.codec import CiphertextError, CkksEncoder, flatten, unflatten
from lepton_flwr.he.keys import fingerprint, load_context
from lepton_flwr.he.records import EncryptedModel, is_encrypted

SECRET_CONTEXT_NODE_KEY = "he-secret-context"
DEFAULT_WEIGHT_SCALE = 1000.0


@lru_cache(maxsize=4)
def _encoder(
    path: str, mtime_ns: int, workers: int | None, seeded: bool
) -> tuple[CkksEncoder, str]:
    context = load_context(path, expect_secret=True)
    return CkksEncoder(context, workers=workers, seeded=seeded), fingerprint(context)


def encoder_for(
    path: str | Path, workers: int | None = None, seeded: bool = True
) -> tuple[CkksEncoder, str]:
    """The codec and key fingerprint of a secret context file (cached per process)."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(
            f"CKKS secret context not found: {resolved}. Create keys with `lepton-flwr keygen` "
            f"and give clients the secret context (node config '{SECRET_CONTEXT_NODE_KEY}=<path>')."
        )
    return _encoder(str(resolved), resolved.stat().st_mtime_ns, workers, seeded)


def decrypt_model(record: ArrayRecord, encoder: CkksEncoder, own_fingerprint: str) -> ArrayRecord:
    """Turn an encrypted global model (weighted sum + total weight) into plaintext tensors."""
    model = EncryptedModel.from_record(record)
    if model.fingerprint != own_fingerprint:
        raise CiphertextError(
            f"the global model is encrypted under key {model.fingerprint}, this client holds "
            f"key {own_fingerprint}: the server and clients use different key pairs"
        )
    vector = encoder.decrypt(model.chunks, model.num_values) / model.weight
    return ArrayRecord({k: Array(v) for k, v in unflatten(vector, model.manifest).items()})


def encrypt_update(
    record: ArrayRecord, weight: float, encoder: CkksEncoder, own_fingerprint: str
) -> ArrayRecord:
    """Encrypt ``weight * tensors`` as seeded CKKS chunks, with header.

    Raises
    ------
    ValueError
        If the tensors hold NaN or Inf (they would poison the encrypted sum unseen).
    """
    vector, manifest = flatten({k: v.numpy() for k, v in record.items()})
    if not np.isfinite(vector).all():
        bad = [
            s.name
            for s, v in zip(manifest, record.values(), strict=True)
            if not np.isfinite(v.numpy()).all()
        ]
        raise ValueError(f"the local update has NaN or Inf values in {bad}; nothing was encrypted")
    scaled = weight * vector
    max_abs = float(np.abs(scaled).max()) if len(scaled) else 0.0
    chunks = encoder.encrypt(scaled)
    return EncryptedModel(manifest, chunks, weight, own_fingerprint, max_abs).to_record()


def apply_he(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    secret_context_path: str | Path,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
    workers: int | None = None,
    seeded: bool = True,
) -> Message:
    """The HE round trip around a handler (see :func:`make_he_mod`)."""
    encoder, own_fingerprint = encoder_for(secret_context_path, workers, seeded)
    if "arrays" in msg.content and is_encrypted(msg.content["arrays"]):
        plain = decrypt_model(msg.content["arrays"], encoder, own_fingerprint)
        msg.content = RecordDict({**msg.content, "arrays": plain})  # never edit a shared record
    reply = call_next(msg, context)
    if not msg.metadata.message_type.startswith("train") or reply.has_error():
        return reply
    metrics = reply.content["metrics"]
    # A DP share (dp_share_mod) is an update with weight 1; a model is weighted by its data.
    weight = (
        float(metrics["he-weight"])
        if "he-weight" in metrics
        else float(metrics["num-examples"]) / weight_scale
    )
    reply.content["arrays"] = encrypt_update(
        reply.content["arrays"], weight, encoder, own_fingerprint
    )
    return reply


def make_he_mod(
    secret_context_path: str | Path | None = None,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
    workers: int | None = None,
    seeded: bool = True,
) -> Mod:
    """Build the HE client mod.

    Parameters
    ----------
    secret_context_path : str | Path | None
        The clients' secret context file. The node config key ``he-secret-context``
        takes precedence (set per SuperNode in a deployment).
    weight_scale : float
        A client encrypts ``(num_examples / weight_scale) * weights``; the server divides
        the sum by the summed weights. It keeps the encrypted values small: all clients
        must use the same value.
    workers : int | None
        Processes that encrypt in parallel (None: all cores this process may use).
    seeded : bool
        Upload seeded ciphertexts: half the bytes, about twice the server's load time.

    Returns
    -------
    Mod
        ``(msg, context, call_next) -> Message``.
    """
    if weight_scale <= 0:
        raise ValueError(f"weight_scale must be > 0, got {weight_scale}")

    def he_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        path = context.node_config.get(SECRET_CONTEXT_NODE_KEY, secret_context_path)
        if path is None:
            raise ValueError(
                f"he_mod needs the clients' secret CKKS context: start the SuperNode with "
                f"--node-config '{SECRET_CONTEXT_NODE_KEY}=<path to secret.ctx>'"
            )
        return apply_he(msg, context, call_next, str(path), weight_scale, workers, seeded)

    return he_mod


he_mod = make_he_mod()
