"""Hostile files and arguments for the node tools: check-node, certs, node-key.

Each case feeds what an attacker or a slip would leave (a planted link, a key others can
read, a wildcard host, a second key over a registered one) and checks the documented
outcome: refused with a reason naming the file or argument, and nothing overwritten.
"""

import os
import secrets
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_end_to_end import _env

from lepton_flwr import protocol
from lepton_flwr.cli import main
from lepton_flwr.deploy import make_certificates, make_node_key
from lepton_flwr.node_check import check_node


def _cli_error(*argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    return str(stop.value)


# check-node


def test_the_write_probe_never_opens_an_existing_path(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("data")
    elsewhere = tmp_path / "created-elsewhere"
    # The old fixed probe name, and the first two names the probe will draw, are links.
    (state / ".lepton-write-test").symlink_to(precious)
    (state / ".lepton-write-test-planted").symlink_to(precious)
    (state / ".lepton-write-test-dangling").symlink_to(elsewhere)
    names = iter(["planted", "dangling", "fresh"])
    monkeypatch.setattr(secrets, "token_hex", lambda _: next(names))
    assert check_node({protocol.STATE_DIR: str(state)}) == []
    assert next(names, "all drawn") == "all drawn"  # the two taken names were skipped
    assert precious.read_text() == "data" and not elsewhere.exists()
    assert sorted(p.name for p in state.iterdir()) == [
        ".lepton-write-test",
        ".lepton-write-test-dangling",
        ".lepton-write-test-planted",
    ]  # the probe file is gone, the links untouched


@pytest.fixture(scope="module")
def node_files(tmp_path_factory):
    from lepton_flwr.he import CKKSParams, write_keys

    folder = tmp_path_factory.mktemp("node")
    secret, _ = write_keys(CKKSParams(), folder / "keys")
    auth_key, _ = make_node_key(folder / "node-keys", "node-0")
    return secret, auth_key


def _check_keys(secret: Path, auth_key: Path) -> list[str]:
    return check_node({protocol.SECRET_CONTEXT: str(secret)}, auth_key=str(auth_key))


def test_check_node_refuses_keys_that_others_can_read(node_files):
    secret, auth_key = node_files
    assert _check_keys(secret, auth_key) == []
    try:
        os.chmod(secret, 0o644)
        os.chmod(auth_key, 0o640)
        problems = _check_keys(secret, auth_key)
    finally:
        os.chmod(secret, 0o600)
        os.chmod(auth_key, 0o600)
    assert problems == [
        f"{protocol.SECRET_CONTEXT} {secret} has mode 0644: users other than its owner have "
        f"access to it; run chmod 600 {secret}",
        f"auth key {auth_key} has mode 0640: users other than its owner have access to it; "
        f"run chmod 600 {auth_key}",
    ]


def test_check_node_refuses_symlinked_keys_naming_link_and_target(node_files, tmp_path):
    secret, auth_key = node_files
    secret_link, key_link = tmp_path / "secret.ctx", tmp_path / "node.key"
    secret_link.symlink_to(secret)
    key_link.symlink_to(auth_key)
    problems = _check_keys(secret_link, key_link)
    assert len(problems) == 2
    assert problems[0].startswith(
        f"{protocol.SECRET_CONTEXT} {secret_link} is a symbolic link to {secret}: give the "
        f"key file itself"
    )
    assert problems[1].startswith(
        f"auth key {key_link} is a symbolic link to {auth_key}: give the key file itself"
    )
    # The command line refuses to start, with the same lines.
    message = _cli_error(
        "check-node",
        "--node-config",
        f"he-secret-context='{secret_link}'",
        "--auth-key",
        str(key_link),
    )
    assert problems[0] in message and problems[1] in message


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [
        (protocol.MAX_CLIP_NORM, -1, "(0, inf)"),
        (protocol.MAX_CLIP_NORM, 0, "(0, inf)"),
        (protocol.MIN_SHARE_NOISE, -0.1, "[0, inf)"),
        (protocol.DPSGD_MAX_EPSILON, 0, "(0, inf)"),
        (protocol.DPSGD_MAX_EPSILON, -3, "(0, inf)"),
        (protocol.DPSGD_MIN_NOISE, -1, "[0, inf)"),
        (protocol.DPSGD_DELTA, 1, "(0, 1)"),
    ],
)
def test_check_node_refuses_floors_out_of_range(key, value, valid):
    assert check_node({key: value}) == [f"node config {key}={value:g} is not in {valid}"]


def test_check_node_accepts_floors_at_the_edge_of_their_range():
    edges = {
        protocol.MAX_CLIP_NORM: 1e-3,
        protocol.MIN_SHARE_NOISE: 0,
        protocol.DPSGD_MAX_EPSILON: 0.5,
        protocol.DPSGD_MIN_NOISE: 0,
        protocol.DPSGD_DELTA: 1e-6,
    }
    assert check_node(edges) == []


# certs


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("*", "wildcards are refused"),
        ("*.com", "wildcards are refused"),
        ("link.*.org", "wildcards are refused"),
        ("", "give a host name or IP address"),
        ("a b", "neither an IP address nor a DNS name"),
        ("-bad.example.org", "neither an IP address nor a DNS name"),
        ("x" * 64 + ".org", "neither an IP address nor a DNS name"),
        ("link..org", "neither an IP address nor a DNS name"),
        ("10.0.0.256", "neither an IP address nor a DNS name"),
        ("link.example.org.", "neither an IP address nor a DNS name"),
        (".".join(["a" * 60] * 5), "neither an IP address nor a DNS name"),  # 304 characters
        ("fe80::1%eth0", "without its zone"),
    ],
)
def test_certs_refuse_hosts_that_are_not_one_host(tmp_path, host, reason):
    with pytest.raises(ValueError, match=reason):
        make_certificates(tmp_path / "certs", ["127.0.0.1", host])
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_certs_refuse_a_wildcard_on_the_command_line(tmp_path):
    message = _cli_error("certs", "--out", str(tmp_path / "certs"), "--host", "*.com")
    assert message == (
        "lepton-flwr certs: --host '*.com': wildcards are refused; a SuperLink certificate "
        "names its own hosts"
    )


def test_certs_refuse_a_ca_key_others_can_read_or_a_link(tmp_path):
    files = make_certificates(tmp_path / "certs", ["127.0.0.1"])
    issued = files["superlink.crt"].read_bytes()
    os.chmod(files["ca.key"], 0o644)
    with pytest.raises(ValueError, match=r"CA key .*ca\.key has mode 0644: .* run chmod 600 "):
        make_certificates(tmp_path / "certs", ["127.0.0.1"])
    moved = tmp_path / "elsewhere.key"
    files["ca.key"].rename(moved)
    os.chmod(moved, 0o600)
    files["ca.key"].symlink_to(moved)
    with pytest.raises(ValueError, match=f"ca.key is a symbolic link to {moved}"):
        make_certificates(tmp_path / "certs", ["127.0.0.1"])
    assert files["superlink.crt"].read_bytes() == issued  # nothing reissued


def test_the_ca_key_never_goes_into_the_superlink_folder(tmp_path):
    link = tmp_path / "certs"
    for inside in (link, link / "ca", tmp_path / "x" / ".." / "certs"):
        with pytest.raises(ValueError, match="must not go where the SuperLink reads"):
            make_certificates(link, ["127.0.0.1"], ca_dir=inside)
    files = make_certificates(link, ["127.0.0.1"], ca_dir=tmp_path / "offline")
    assert files["ca.key"] == tmp_path / "offline" / "ca.key"
    assert not (link / "ca.key").exists()
    # A SuperLink folder of the old layout (ca.key inside) is refused, with the move.
    (link / "ca.key").write_bytes(files["ca.key"].read_bytes())
    with pytest.raises(ValueError, match=r"ca\.key is in the SuperLink's folder: move it"):
        make_certificates(link, ["127.0.0.1"], ca_dir=tmp_path / "offline")
    # So is a SuperLink script given such a folder: it exits before starting anything.
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "deploy" / "superlink.sh"), str(link), str(tmp_path / "db")],
        capture_output=True,
        text=True,
        env=_env(),  # the script runs the installed lepton-flwr command, as a user's would
    )
    assert proc.returncode == 1 and "must not be on the SuperLink" in proc.stderr
    assert not (tmp_path / "db").exists()


def test_a_ca_folder_with_half_a_ca_or_another_cas_key_is_refused(tmp_path):
    first = make_certificates(tmp_path / "a", ["127.0.0.1"], ca_dir=tmp_path / "ca-a")
    second = make_certificates(tmp_path / "b", ["127.0.0.1"], ca_dir=tmp_path / "ca-b")
    certificate = first["ca.crt"].read_bytes()
    first["ca.key"].unlink()
    with pytest.raises(ValueError, match=r"ca\.crt is there without ca\.key: restore it"):
        make_certificates(tmp_path / "a", ["127.0.0.1"], ca_dir=tmp_path / "ca-a")
    assert (tmp_path / "ca-a" / "ca.crt").read_bytes() == certificate  # not replaced
    os.link(second["ca.key"], first["ca.key"])
    with pytest.raises(ValueError, match=r"ca\.key is not the elliptic-curve key of"):
        make_certificates(tmp_path / "a", ["127.0.0.1"], ca_dir=tmp_path / "ca-a")


# node-key


def test_node_key_never_replaces_a_registered_key_without_force(tmp_path):
    private, public = make_node_key(tmp_path, "hospital-a")
    before = private.read_bytes(), public.read_bytes()
    message = _cli_error("node-key", "--out", str(tmp_path), "--name", "hospital-a")
    assert "would no longer match the public key registered" in message
    assert "--force" in message and str(private) in message
    assert (private.read_bytes(), public.read_bytes()) == before
    private.unlink()  # half a pair is refused too: its .pub may be registered
    with pytest.raises(ValueError, match="no longer match"):
        make_node_key(tmp_path, "hospital-a")
    main(["node-key", "--out", str(tmp_path), "--name", "hospital-a", "--force"])
    assert public.read_bytes() != before[1] and private.is_file()


@pytest.mark.parametrize(
    "name",
    ["hospital a", "", ".hidden", "-dash", "../escape", "a/b", "é", "node\n", "x" * 65, "x" * 300],
)
def test_node_key_refuses_names_outside_its_charset_and_length(tmp_path, name):
    message = _cli_error("node-key", "--out", str(tmp_path / "keys"), f"--name={name}")
    assert message == (
        f"lepton-flwr node-key: node name {name!r}: use 1 to 64 letters, digits, dashes and "
        f"underscores, starting with a letter or digit"
    )
    assert not (tmp_path / "keys").exists()


def test_node_key_accepts_the_longest_name(tmp_path):
    private, _ = make_node_key(tmp_path, "n_" + "x" * 62)
    assert private.name == "n_" + "x" * 62 + ".key"
