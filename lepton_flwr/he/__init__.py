"""CKKS homomorphic encryption for aggregation: parameters, keys, codec, records."""

from lepton_flwr.he.codec import (
    CiphertextError,
    CkksAdder,
    CkksEncoder,
    TensorSpec,
    flatten,
    unflatten,
)
from lepton_flwr.he.keyholder import (
    decrypt_arrays,
    keyholder_evaluate_fn,
    load_encrypted_arrays,
    save_encrypted_arrays,
)
from lepton_flwr.he.keys import (
    create_secret_context,
    fingerprint,
    load_context,
    public_context_bytes,
    secret_context_bytes,
    write_keys,
)
from lepton_flwr.he.params import CKKSParams, HEParamsError
from lepton_flwr.he.records import EncryptedModel, is_encrypted, load_encrypted, save_encrypted

__all__ = [
    "CKKSParams",
    "CiphertextError",
    "CkksAdder",
    "CkksEncoder",
    "EncryptedModel",
    "HEParamsError",
    "TensorSpec",
    "create_secret_context",
    "decrypt_arrays",
    "fingerprint",
    "flatten",
    "is_encrypted",
    "keyholder_evaluate_fn",
    "load_context",
    "load_encrypted",
    "load_encrypted_arrays",
    "public_context_bytes",
    "save_encrypted",
    "save_encrypted_arrays",
    "secret_context_bytes",
    "unflatten",
    "write_keys",
]
