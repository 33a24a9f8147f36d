"""Check a SuperNode's own settings before it starts: each problem names the file or key.

Flower reads a SuperNode's node config only when a ClientApp runs, so a wrong key path
would surface at the first round, on the server's side. ``lepton-flwr check-node`` (which
``lepton-flwr supernode`` and ``deploy/supernode.sh`` run first) reads what the node config
names, the way the ClientApp and Flower will, and refuses to start with a list of what is
wrong. It checks only lepton-flwr's keys; another app's own keys are left to that app.

Private keys (``he-secret-context``, the auth key) must be files only their owner has
access to, never symbolic links; a privacy floor must be a number in its range. The
write probe of ``state-dir`` creates a new file of a random name (never opening an
existing path, so a link planted there is not followed) and removes it.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from lepton_flwr import protocol
from lepton_flwr.deploy import MAX_KEY_BYTES, open_private_file
from lepton_flwr.dp.floor import RANGES, BelowPrivacyFloorError, node_setting


def _secret_context(path: str) -> str | None:
    from lepton_flwr.he.keys import load_context

    if not Path(path).expanduser().is_absolute():
        return (
            f"{protocol.SECRET_CONTEXT}={path}: give an absolute path (a relative one is read "
            f"from the SuperNode's working folder; started here, that is {Path.cwd() / path})"
        )
    try:
        open_private_file(path, protocol.SECRET_CONTEXT).close()
    except ValueError as err:
        return str(err)
    except OSError as err:
        return f"{protocol.SECRET_CONTEXT}={path}: {err}"
    try:
        load_context(path, expect_secret=True)
    except Exception as err:  # noqa: BLE001 - any failure to load is reported
        return f"{protocol.SECRET_CONTEXT}={path}: {err}"
    return None


def _write_probe(folder: Path) -> None:
    """Create a new file of a random name in ``folder`` and remove it.

    ``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing path, a link included, is never opened;
    a name that exists is skipped for another.

    Raises
    ------
    OSError
        If no file can be created there.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    for _ in range(16):
        probe = folder / f".lepton-write-test-{secrets.token_hex(8)}"
        try:
            os.close(os.open(probe, flags, 0o600))
        except FileExistsError:
            continue
        probe.unlink()
        return
    raise FileExistsError(f"no new file name free in {folder}")


def _folder(key: str, path: str, create: bool) -> str | None:
    folder = Path(path)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write_probe(folder)
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
        with open_private_file(path, "auth key") as handle:
            data = handle.read(MAX_KEY_BYTES + 1)
    except ValueError as err:
        return str(err)
    except OSError as err:
        return f"auth key {path}: not readable ({err})"
    try:
        key = load_ssh_private_key(data, None)
    except (TypeError, ValueError) as err:
        return f"auth key {path}: not a readable OpenSSH private key ({err})"
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return f"auth key {path}: not an elliptic-curve key (make one with lepton-flwr node-key)"
    return None


# The node config keys lepton-flwr reads. A key that is one of them written otherwise
# (underscores for hyphens, capitals, spaces), or at most two edits from a privacy key
# (a typo), is refused: a misspelt floor is no floor. Any other key is the app's own and
# left alone, even with a prefix of ours (another app's `dp-epsilon` or `he-scheme`).
OUR_KEYS = (
    protocol.SECRET_CONTEXT,
    protocol.PARTITION_ID,
    protocol.NUM_PARTITIONS,
    protocol.DATA_ROOT,
    protocol.DEVICE,
    protocol.STATE_DIR,
    protocol.SECAGG_SIGNING_KEY,
    protocol.SECAGG_TRUSTED_KEYS,
    protocol.MIN_SHARE_NOISE,
    protocol.MAX_CLIP_NORM,
    protocol.DPSGD_MAX_EPSILON,
    protocol.DPSGD_MIN_NOISE,
    protocol.DPSGD_DELTA,
    protocol.HE_MAX_DECRYPTIONS,
    protocol.ALLOW_EVALUATION,
)
OUR_PREFIXES = ("dp-", "dpsgd-", "he-", "secagg-")  # the prefixes of our floors and keys
TYPO_EDITS = 2  # a key this many edits from a privacy key is taken for a misspelling
# The keys whose loss would lower a node's protection: floors, HE, secure aggregation.
PRIVACY_KEYS = tuple(
    key for key in OUR_KEYS if key.startswith(OUR_PREFIXES) or key == protocol.ALLOW_EVALUATION
)


def _edits(first: str, second: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions from one to the other."""
    previous = list(range(len(second) + 1))
    for i, a in enumerate(first, 1):
        current = [i]
        for j, b in enumerate(second, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return previous[-1]


def _meant(key: str) -> str | None:
    """The key of ours that ``key`` misspells, if it misspells one."""
    spelt = str(key).strip().lower().replace("_", "-")
    if key in OUR_KEYS:
        return None
    if spelt in OUR_KEYS:
        return spelt
    close = [ours for ours in PRIVACY_KEYS if _edits(spelt, ours) <= TYPO_EDITS]
    return min(close, key=lambda ours: _edits(spelt, ours)) if close else None


def _unknown_settings(node_config: dict) -> list[str]:
    """Keys that misspell one of ours (written otherwise, or a typo), with the key meant."""
    return [
        f"{key}: not a lepton-flwr setting, so it would be ignored; did you mean {meant}?"
        for key in node_config
        if (meant := _meant(key)) is not None
    ]


def app_keys(node_config: dict) -> list[str]:
    """Keys with a prefix of ours that are neither ours nor a misspelling: the app's own.

    ``lepton-flwr check-node`` names them so that a misspelling beyond the typo rule is
    still seen, without refusing another app's settings.
    """
    return [
        str(key)
        for key in node_config
        if str(key).replace("_", "-").startswith(OUR_PREFIXES)
        and key not in OUR_KEYS
        and _meant(key) is None
    ]


def ignored_text(node_config_text: str) -> list[str]:
    """The parts of a ``--node-config`` string that Flower's parser drops without a word.

    Flower reads ``key=value`` pairs with nothing around the ``=``; in
    ``"dp-max-clip-norm = 1"`` it finds no pair, so the floor would be off on the
    SuperNode as well. What it drops is named, in one line.
    """
    if node_config_text.strip().endswith(".toml"):  # a file, which Flower reads whole
        return []
    left = " ".join(NODE_CONFIG_PAIR.sub(" ", node_config_text).split())
    if not left:
        return []
    return [f"{left!r} in the node config: not key=value (no spaces around '='); Flower ignores it"]


# Flower's own pattern for one key=value pair (flwr.common.config.parse_config_args).
NODE_CONFIG_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def _floor(node_config: dict, key: str) -> str | None:
    try:
        node_setting(node_config, key)
    except BelowPrivacyFloorError as err:
        return str(err).removeprefix(protocol.FLOOR_REFUSAL).split(";")[0]
    return None


def _secagg_keys(node_config: dict) -> list[str]:
    """The secure-aggregation signing key and trusted keys: readable, and fit together."""
    from lepton_flwr.secagg.signatures import RoundKeySigner, SignatureError, TrustedKeys

    signing, trusted = protocol.SECAGG_SIGNING_KEY, protocol.SECAGG_TRUSTED_KEYS
    loaded, problems = {}, []
    for key, load in ((signing, RoundKeySigner.from_file), (trusted, TrustedKeys.from_file)):
        if key in node_config:
            try:
                loaded[key] = load(str(node_config[key]))
            except SignatureError as err:
                problems.append(f"{key}: {err}")
    if trusted in node_config and signing not in node_config:
        problems.append(
            f"{trusted} without {signing}: nodes that trust a list refuse this node's "
            "unsigned keys; sign with this node's own key (its SuperNode auth key serves)"
        )
    if len(loaded) == 2 and loaded[signing].key_id not in loaded[trusted]:
        problems.append(
            f"{signing}: its public key is not in {trusted}; peers holding the same list "
            "would refuse this node"
        )
    return problems


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
    problems.extend(_floor(node_config, key) for key in RANGES)
    problems.extend(_unknown_settings(node_config))
    problems.extend(_secagg_keys(node_config))
    if root_certificates:
        problems.append(_certificate(root_certificates))
    if auth_key:
        problems.append(_auth_key(auth_key))
    return [p for p in problems if p]


def app_keys_note(node_config_text: str) -> str | None:
    """One line naming the keys left to the app (see :func:`app_keys`), or None."""
    from flwr.common.config import parse_config_args

    own = app_keys(parse_config_args([node_config_text]))
    if not own:
        return None
    return f"not lepton-flwr settings, left to the app as they are: {', '.join(own)}"


def node_config_problems(
    node_config_text: str, root_certificates: str | None = None, auth_key: str | None = None
) -> list[str]:
    """Everything wrong with a ``--node-config`` string and the node's files, one line each."""
    from flwr.common.config import parse_config_args

    return ignored_text(node_config_text) + check_node(
        parse_config_args([node_config_text]), root_certificates, auth_key
    )
