"""Check a SuperNode's own settings before it starts: each problem names the file or key.

Flower reads a SuperNode's node config only when a ClientApp runs, so a wrong key path
would surface at the first round, on the server's side. ``lepton-flwr check-node`` (which
``deploy/supernode.sh`` runs first) reads everything a node will need, the way the
ClientApp and Flower will, and refuses to start with a list of what is wrong.
"""

from __future__ import annotations

from pathlib import Path

from lepton_flwr import protocol
from lepton_flwr.dp.floor import BelowPrivacyFloorError, node_setting

FLOORS = (
    protocol.MAX_CLIP_NORM,
    protocol.MIN_SHARE_NOISE,
    protocol.DPSGD_MAX_EPSILON,
    protocol.DPSGD_MIN_NOISE,
)


def _secret_context(path: str) -> str | None:
    from lepton_flwr.he.keys import load_context

    if not Path(path).is_absolute():
        return f"{protocol.SECRET_CONTEXT}={path}: give an absolute path"
    try:
        load_context(path, expect_secret=True)
    except Exception as err:  # noqa: BLE001 - any failure to load is reported
        return f"{protocol.SECRET_CONTEXT}={path}: {err}"
    return None


def _folder(key: str, path: str, create: bool) -> str | None:
    folder = Path(path)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".lepton-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            return f"{key}={path}: not a writable folder ({err})"
    elif not folder.is_dir():
        return f"{key}={path}: no such folder"
    return None


def _device(name: str) -> str | None:
    if name not in ("cpu", "cuda", "auto"):
        return f"{protocol.DEVICE}={name}: use cpu, cuda or auto"
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            return f"{protocol.DEVICE}=cuda: torch sees no CUDA device on this node"
    return None


def _partition(node_config: dict) -> str | None:
    keys = (protocol.PARTITION_ID, protocol.NUM_PARTITIONS)
    if not any(k in node_config for k in keys):
        return None
    try:
        part, total = (int(node_config[k]) for k in keys)
    except (KeyError, TypeError, ValueError):
        return f"{keys[0]} and {keys[1]} must both be whole numbers"
    return None if 0 <= part < total else f"{keys[0]}={part} is not in [0, {total})"


def _certificate(path: str) -> str | None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        return f"root certificates {path}: not a readable PEM certificate ({err})"
    return None


def _auth_key(path: str) -> str | None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError) as err:
        return f"auth key {path}: not a readable OpenSSH private key ({err})"
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return f"auth key {path}: not an elliptic-curve key (make one with lepton-flwr node-key)"
    return None


def check_node(
    node_config: dict, root_certificates: str | None = None, auth_key: str | None = None
) -> list[str]:
    """Everything wrong with a SuperNode's settings, one line each (empty: all good)."""
    problems = [_partition(node_config)]
    if node_config.get(protocol.SECRET_CONTEXT):
        problems.append(_secret_context(str(node_config[protocol.SECRET_CONTEXT])))
    if node_config.get(protocol.DATA_ROOT):
        problems.append(_folder(protocol.DATA_ROOT, str(node_config[protocol.DATA_ROOT]), False))
    if node_config.get(protocol.STATE_DIR):
        problems.append(_folder(protocol.STATE_DIR, str(node_config[protocol.STATE_DIR]), True))
    if node_config.get(protocol.DEVICE):
        problems.append(_device(str(node_config[protocol.DEVICE])))
    for key in FLOORS:
        try:
            node_setting(node_config, key)
        except BelowPrivacyFloorError as err:
            problems.append(str(err).split(";")[0])
    if root_certificates:
        problems.append(_certificate(root_certificates))
    if auth_key:
        problems.append(_auth_key(auth_key))
    return [p for p in problems if p]
