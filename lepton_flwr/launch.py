"""Start a SuperLink or a SuperNode the documented way: check first, then become Flower's.

``lepton-flwr superlink`` and ``lepton-flwr supernode`` (and ``deploy/*.sh``, which call
them) refuse a setup that would fail later or run less safely than intended, naming what
is wrong, and then replace themselves with ``flower-superlink`` / ``flower-supernode``
(``os.execvp``: same process id, so a supervisor's signals reach Flower). The argv is
built by :func:`superlink_argv` and :func:`supernode_argv`, which start nothing.

Nothing here is specific to lepton-flwr's own apps: the node check reads only the keys a
node config names (``lepton_flwr.node_check``), so any Flower app's SuperNodes can use it.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

# Flower's defaults: the SuperLink's port for SuperNodes and the flwr CLI as this kit
# documents it, and the SuperNode's own Runtime API (flower-supernode --port).
SUPERLINK_PORT = 9092
SUPERNODE_PORT = 9094
SUPERNODE_HOST = "127.0.0.1"  # where flower-supernode binds its Runtime API by default
SUPERLINK_FILES = ("ca.crt", "superlink.crt", "superlink.key")


def check_superlink_folder(certs: Path) -> None:
    """Refuse a SuperLink folder that holds the CA key or lacks one of its three files.

    Raises
    ------
    ValueError
        Naming the file.
    """
    ca_key = certs / "ca.key"
    if ca_key.exists() or ca_key.is_symlink():
        raise ValueError(
            f"{ca_key} is the CA's private key; it must not be on the SuperLink: move it to "
            "the CA folder (lepton-flwr certs --ca-dir), kept offline"
        )
    missing = [name for name in SUPERLINK_FILES if not (certs / name).is_file()]
    if missing:
        raise ValueError(
            f"{certs} lacks {', '.join(missing)}: give the --out folder of lepton-flwr certs"
        )


def check_port_free(host: str, port: int, who: str) -> None:
    """Refuse a port another process listens on, naming it and how to choose another.

    The probe binds with ``SO_REUSEADDR`` as Flower's servers do, so only a listener (not
    the closing connections of a process just stopped) counts as taken.

    Raises
    ------
    ValueError
        If the port is taken or out of range.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port {port}: not in 1-65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            raise ValueError(
                f"port {port} on {host} is in use (another {who} on this host?): "
                f"give this {who} its own --port"
            ) from None


def _absolute(path: Path) -> Path:
    """``path`` from the root, ``..`` folded, links kept (``os.path.abspath``)."""
    return Path(os.path.abspath(path))


def superlink_argv(
    certs: Path, state: Path, port: int = SUPERLINK_PORT, extra: list[str] | None = None
) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and a database.

    Paths are made absolute: the SuperLink's ServerApps run in its working folder, which
    need not be where it was started from a script.
    """
    certs, state = _absolute(certs), _absolute(state)
    return [
        "flower-superlink",
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "superlink.crt"),
        "--ssl-keyfile", str(certs / "superlink.key"),
        "--enable-supernode-auth",
        "--database", str(state / "superlink.db"),
        "--host", "0.0.0.0", "--port", str(port),
        "--disable-runtime-dependency-installation",
        *(extra or []),
    ]  # fmt: skip


def supernode_argv(
    superlink: str,
    root_certificates: Path,
    auth_key: Path,
    node_config: str,
    port: int = SUPERNODE_PORT,
    extra: list[str] | None = None,
) -> list[str]:
    """``flower-supernode`` over TLS, authenticated with the node's own key."""
    return [
        "flower-supernode",
        "--superlink", superlink,
        "--root-certificates", str(_absolute(root_certificates)),
        "--auth-supernode-private-key", str(_absolute(auth_key)),
        "--node-config", node_config,
        "--port", str(port),
        *(extra or []),
    ]  # fmt: skip


def prepare_superlink(certs: Path, state: Path, port: int, extra: list[str]) -> list[str]:
    """Check the SuperLink's folder and port, create the state folder, return the argv."""
    check_superlink_folder(certs)
    check_port_free("0.0.0.0", port, "SuperLink")
    state.mkdir(parents=True, exist_ok=True)
    return superlink_argv(certs, state, port, extra)


def prepare_supernode(
    superlink: str,
    root_certificates: Path,
    auth_key: Path,
    node_config: str,
    port: int,
    extra: list[str],
) -> list[str]:
    """Check the node's settings, files and port (``check-node``); return the argv.

    Raises
    ------
    ValueError
        With one line per problem, each naming the key or file.
    """
    from lepton_flwr.node_check import app_keys_note, node_config_problems

    problems = node_config_problems(node_config, str(root_certificates), str(auth_key))
    if problems:
        raise ValueError("this SuperNode's settings are wrong:\n  " + "\n  ".join(problems))
    if note := app_keys_note(node_config):
        print(note)
    check_port_free(SUPERNODE_HOST, port, "SuperNode")
    return supernode_argv(superlink, root_certificates, auth_key, node_config, port, extra)
