"""The secure-aggregation keys of one node and round, and what two nodes agree from them.

A node keeps one 32-byte master secret per run. For round r it derives two X25519 key
pairs, private key = HKDF-SHA256(master, info = purpose ‖ r): one encrypts the Shamir
shares it sends (``ENCRYPTION``), one agrees pairwise mask seeds (``MASK``). Keys are
per round, so a mask key the server reconstructs for a client that dropped opens that
round only; they are a function of the master and the round, so a node can advertise
many rounds' public keys at once and hold no per-round key in its state.

From an X25519 agreement, HKDF-SHA256 derives (info naming the role, the round and
the two node ids, smaller first) a Fernet key for the share tokens of two nodes, or the
32-byte seed of their pairwise mask (:func:`lepton_flwr.he.ring_masks.ring_mask`).
Fernet comes from Flower (``flwr.common.secure_aggregation.crypto``), X25519 and HKDF
from ``cryptography``; the Shamir sharing is :mod:`lepton_flwr.secagg.shamir`.

Keys that are not keys. A public key is accepted only in canonical form (u < 2^255 − 19,
so the top bit is clear) and of large order: X25519 agreement with a low-order point
(u = 0, 1, p − 1, or either u of order 8; on the curve or its twist) gives the all-zero
secret whatever the private key, which ``cryptography`` refuses. :func:`check_public_key`
finds such a point by one agreement with a fixed private key: its clamped scalar is a
multiple of 8 and of neither large prime order (of the curve's and the twist's groups),
so the result is zero exactly when the point has no large-order part.

A node's view of a round (:func:`view_digest`): SHA-256 of the round, t, and the id and
two public keys of every participant it was shown, itself included, sorted by id. Each
share token carries its sender's view digest (:mod:`lepton_flwr.secagg.client`).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from lepton_flwr.numbers import is_int

SECRET_BYTES = 32  # master secret, self-mask seed, private key, pairwise seed
PUBLIC_KEY_BYTES = 32
COMMITMENT_BYTES = 32
VIEW_DIGEST_BYTES = 32
FIELD_PRIME = (1 << 255) - 19  # Curve25519's field; a canonical u is below it
MAX_NODE_ID = (1 << 64) - 1
MAX_ROUND = (1 << 63) - 1

ENCRYPTION = b"share-encryption"
MASK = b"mask-agreement"
_DOMAIN = b"lepton-flwr secagg v1 "


def check_node_id(value: object, field: str) -> int:
    """``value`` if it is a node id (an int in [0, 2^64)); else ValueError naming ``field``."""
    if not is_int(value) or not 0 <= value <= MAX_NODE_ID:
        raise ValueError(f"{field}: a node id is an integer in [0, 2^64), not {value!r}")
    return value


def check_round(value: object, field: str = "round") -> int:
    """``value`` if it is a round number (an int in [0, 2^63)); else ValueError."""
    if not is_int(value) or not 0 <= value <= MAX_ROUND:
        raise ValueError(f"{field}: a round is an integer in [0, 2^63), not {value!r}")
    return value


def _hkdf(key_material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=info).derive(
        key_material
    )


def _pair_info(role: bytes, server_round: int, node_a: int, node_b: int) -> bytes:
    low, high = sorted((node_a, node_b))
    return _DOMAIN + role + struct.pack(">QQQ", server_round, low, high)


def round_private_key(master: bytes, purpose: bytes, server_round: int) -> X25519PrivateKey:
    """The node's private key for ``purpose`` (``ENCRYPTION`` or ``MASK``) in one round."""
    if not isinstance(master, bytes) or len(master) != SECRET_BYTES:
        raise ValueError(f"a master secret is {SECRET_BYTES} bytes")
    if purpose not in (ENCRYPTION, MASK):
        raise ValueError(f"unknown key purpose {purpose!r}")
    check_round(server_round)
    info = _DOMAIN + b"round key " + purpose + struct.pack(">Q", server_round)
    return X25519PrivateKey.from_private_bytes(_hkdf(master, info))


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (of a private key's public half)."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key (what is Shamir-shared)."""
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def round_public_keys(master: bytes, server_round: int) -> tuple[bytes, bytes]:
    """(encryption public key, mask public key) of the node for one round."""
    return (
        public_bytes(round_private_key(master, ENCRYPTION, server_round)),
        public_bytes(round_private_key(master, MASK, server_round)),
    )


def load_public_key(data: object, field: str) -> X25519PublicKey:
    """A peer's public key from 32 bytes in canonical form; ValueError naming ``field``.

    A low-order point passes here and fails at the first agreement with it
    (:func:`share_key`, :func:`pair_seed`); :func:`check_public_key` refuses it at once.
    """
    if not isinstance(data, bytes) or len(data) != PUBLIC_KEY_BYTES:
        raise ValueError(f"{field}: a public key is {PUBLIC_KEY_BYTES} bytes")
    if int.from_bytes(data, "little") >= FIELD_PRIME:
        raise ValueError(
            f"{field}: the public key is not in canonical form (u ≥ 2^255 − 19 or its top bit set)"
        )
    return X25519PublicKey.from_public_bytes(data)


# Any fixed private key: clamped, its scalar is a multiple of 8 (it kills the low-order
# part of a point, on the curve or its twist) and, for this one, of neither large prime
# order (tests/test_secagg_protocol.py checks both).
_LOW_ORDER_PROBE = X25519PrivateKey.from_private_bytes(
    hashlib.sha256(_DOMAIN + b"low-order probe").digest()
)


def check_public_key(data: object, field: str) -> X25519PublicKey:
    """:func:`load_public_key`, and a ValueError naming ``field`` for a low-order point.

    One X25519 agreement with a fixed private key: it is all zeros (``cryptography``
    raises) exactly when the point has no large-order part, that is, when every peer's
    agreement with it would be all zeros too.
    """
    key = load_public_key(data, field)
    _agree(_LOW_ORDER_PROBE, key, field)
    return key


def _agree(private: X25519PrivateKey, public: X25519PublicKey, field: str) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:  # a low-order point: the agreement would be all zeros
        raise ValueError(f"{field}: the public key is a low-order point") from None


def share_key(
    private: X25519PrivateKey,
    peer_public: X25519PublicKey,
    server_round: int,
    node: int,
    peer: int,
    field: str = "encryption key",
) -> bytes:
    """The Fernet key (url-safe base64 of 32 bytes) for tokens between two nodes in a round."""
    shared = _agree(private, peer_public, field)
    return base64.urlsafe_b64encode(
        _hkdf(shared, _pair_info(b"share key", server_round, node, peer))
    )


def pair_seed(
    private: X25519PrivateKey,
    peer_public: X25519PublicKey,
    server_round: int,
    node: int,
    peer: int,
    field: str = "mask key",
) -> bytes:
    """The 32-byte seed of the pairwise mask two nodes agree in a round."""
    shared = _agree(private, peer_public, field)
    return _hkdf(shared, _pair_info(b"pair seed", server_round, node, peer))


def commitment(node: int, server_round: int, self_seed: bytes) -> bytes:
    """SHA-256 commitment to a node's self-mask seed for a round."""
    return hashlib.sha256(
        _DOMAIN + b"self-mask commitment" + struct.pack(">QQ", node, server_round) + self_seed
    ).digest()


def view_digest(
    server_round: int, threshold: int, members: Mapping[int, tuple[bytes, bytes]]
) -> bytes:
    """SHA-256 of one node's view of a round: the round, t, and each participant's keys.

    Parameters
    ----------
    server_round, threshold
        The round and its t, as the node was asked.
    members
        Every participant the node was shown, itself included: id -> (encryption public
        key, mask public key), 32 bytes each. Hashed sorted by id, each entry of fixed
        length, so two views give one digest only if they are the same.

    Raises
    ------
    ValueError
        If an id, the round, t or a key is malformed.
    """
    check_round(server_round)
    if not is_int(threshold) or not 0 <= threshold <= MAX_NODE_ID:
        raise ValueError(f"threshold: an integer in [0, 2^64), not {threshold!r}")
    digest = hashlib.sha256(
        _DOMAIN + b"round view" + struct.pack(">QQQ", server_round, threshold, len(members))
    )
    for node in sorted(members):
        check_node_id(node, "members")
        keys = members[node]
        if len(keys) != 2 or not all(
            isinstance(key, bytes) and len(key) == PUBLIC_KEY_BYTES for key in keys
        ):
            raise ValueError(f"members: node {node} needs two {PUBLIC_KEY_BYTES}-byte keys")
        digest.update(struct.pack(">Q", node) + keys[0] + keys[1])
    return digest.digest()
