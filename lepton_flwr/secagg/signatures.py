"""Signed round keys: a server cannot put its own keys in place of a node's.

Without signatures a malicious server can show a victim node public keys it made itself
under its peers' ids: the victim then encrypts the shares of its self-mask seed to the
server and agrees every pairwise mask with it, and the server unmasks its upload. With
them, each node signs each round's public keys with a long-lived key of its own, and a
node that holds a list of trusted keys (out of band, from the other node operators, not
from the server) refuses a round in which a peer's keys are not signed by a trusted key.

The signing key is an elliptic-curve key in OpenSSH or PEM form: the SuperNode's own
authentication key (``lepton-flwr node-key``) serves, and the trusted list is then the
nodes' ``.pub`` files, one OpenSSH public key a line (``cat nodes/*.pub``). Signatures
are Flower's ECDSA with SHA-256 (``flwr.supercore.primitives.asymmetric``). Flower signs
only an ASCII timestamp with that key; every message signed here starts with this
module's domain string, so neither kind of signature passes for the other.

What is signed (:func:`round_keys_message`): the run, the node id, the round and the
node's two public keys for it. So a signed key is good for one node, one run and one
round: a key the server reconstructed for a dropped node (its round mask key) cannot be
replayed in another round or run, nor a node's keys shown under another node's id.

A key is named by its fingerprint (:func:`key_id`): SHA-256 of its OpenSSH wire form,
the digest ``ssh-keygen -l -f <node>.pub`` prints in base64.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import sign_message, verify_signature

from lepton_flwr.files import UnsafeFileError, read_file, read_private
from lepton_flwr.secagg.keys import PUBLIC_KEY_BYTES, check_node_id, check_round

KEY_ID_BYTES = 32
MAX_SIGNATURE_BYTES = 160  # DER ECDSA: at most 139 bytes on P-521
MAX_KEY_FILE_BYTES = 1 << 16
MAX_TRUSTED_FILE_BYTES = 1 << 22  # about 19,000 OpenSSH P-384 public keys
MAX_RUN_ID = (1 << 64) - 1
_DOMAIN = b"lepton-flwr secagg v1 signed round keys"


class SignatureError(ValueError):
    """A signature, a signing key or a trusted-keys file is refused; the message says why."""


def round_keys_message(
    run_id: int, node: int, server_round: int, encryption_key: bytes, mask_key: bytes
) -> bytes:
    """The bytes a node signs for its keys of one round (fixed length, domain first)."""
    if not isinstance(run_id, int) or isinstance(run_id, bool) or not 0 <= run_id <= MAX_RUN_ID:
        raise ValueError(f"run_id: an integer in [0, 2^64), not {run_id!r}")
    check_node_id(node, "node")
    check_round(server_round)
    for key in (encryption_key, mask_key):
        if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"a public key is {PUBLIC_KEY_BYTES} bytes")
    return _DOMAIN + struct.pack(">QQQ", run_id, node, server_round) + encryption_key + mask_key


def key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 of the key's OpenSSH wire form (what ``ssh-keygen -l`` shows, in base64)."""
    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return hashlib.sha256(base64.b64decode(line.split()[1])).digest()


class RoundKeySigner:
    """A node's signing key.

    Parameters
    ----------
    private_key
        An elliptic-curve private key.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise SignatureError("the signing key must be an elliptic-curve key")
        self._private_key = private_key
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: str | Path) -> RoundKeySigner:
        """Load a private key (OpenSSH or PEM, unencrypted) from a file only its owner reads.

        Raises
        ------
        SignatureError
            If the path is relative, the file unsafe (a link, readable by others) or
            unreadable, or it holds no unencrypted elliptic-curve private key; the
            message names the path.
        """
        path = _absolute(path, "signing key")
        try:
            data = read_private(path, MAX_KEY_FILE_BYTES)
        except (OSError, UnsafeFileError) as err:
            raise SignatureError(f"signing key {path}: {err}") from None
        key = None
        for load in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
            try:
                key = load(data, password=None)
                break
            except (ValueError, TypeError, UnsupportedAlgorithm):
                continue
        if key is None:
            raise SignatureError(
                f"signing key {path}: not an unencrypted private key in OpenSSH or PEM form"
            )
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SignatureError(
                f"signing key {path}: not an elliptic-curve key (make one with lepton-flwr "
                "node-key)"
            )
        return cls(key)

    def sign(
        self, run_id: int, node: int, server_round: int, encryption_key: bytes, mask_key: bytes
    ) -> bytes:
        """The signature of the node's keys for one round of one run."""
        message = round_keys_message(run_id, node, server_round, encryption_key, mask_key)
        return sign_message(self._private_key, message)


class TrustedKeys:
    """The public keys whose signatures a node accepts, by fingerprint.

    Parameters
    ----------
    public_keys
        Elliptic-curve public keys; a key given twice is kept once.
    """

    def __init__(self, public_keys: list[ec.EllipticCurvePublicKey]) -> None:
        if not public_keys:
            raise SignatureError("trusted keys: the list is empty")
        self._keys: dict[bytes, ec.EllipticCurvePublicKey] = {}
        for key in public_keys:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise SignatureError("trusted keys: only elliptic-curve public keys")
            self._keys[key_id(key)] = key

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self._keys

    @classmethod
    def from_file(cls, path: str | Path) -> TrustedKeys:
        """Read one OpenSSH public key a line (blank lines and ``#`` comments skipped).

        Raises
        ------
        SignatureError
            If the path is relative, the file unreadable or unsafe (a link), a line is not
            an elliptic-curve OpenSSH public key (the line number named), or no key is in it.
        """
        path = _absolute(path, "trusted keys")
        try:
            data = read_file(path, MAX_TRUSTED_FILE_BYTES)
        except (OSError, UnsafeFileError) as err:
            raise SignatureError(f"trusted keys {path}: {err}") from None
        keys = []
        for number, line in enumerate(data.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                key = serialization.load_ssh_public_key(line)
            except (ValueError, UnsupportedAlgorithm) as err:
                raise SignatureError(
                    f"trusted keys {path}, line {number}: not an OpenSSH public key ({err})"
                ) from None
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise SignatureError(
                    f"trusted keys {path}, line {number}: not an elliptic-curve key"
                )
            keys.append(key)
        if not keys:
            raise SignatureError(f"trusted keys {path}: no public key in the file")
        return cls(keys)

    def verify(
        self,
        signer: bytes,
        signature: bytes,
        run_id: int,
        node: int,
        server_round: int,
        encryption_key: bytes,
        mask_key: bytes,
    ) -> None:
        """Check that a trusted key signed the node's keys for this round of this run.

        Raises
        ------
        SignatureError
            If the signer is not a trusted key, or the signature does not verify.
        """
        public_key = self._keys.get(signer)
        if public_key is None:
            raise SignatureError(f"node {node}: its keys are not signed by a trusted key")
        message = round_keys_message(run_id, node, server_round, encryption_key, mask_key)
        if not verify_signature(public_key, message, signature):
            raise SignatureError(
                f"node {node}: the signature of its round {server_round} keys does not verify"
            )


def _absolute(path: str | Path, what: str) -> Path:
    path = Path(str(path))
    if not path.is_absolute():
        raise SignatureError(
            f"{what}: {str(path)!r} is a relative path; give an absolute one (a relative "
            "path is read from whatever folder the process was started in)"
        )
    return path
