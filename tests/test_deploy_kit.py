"""The deployment kit: ``lepton-flwr superlink`` / ``supernode`` and the scripts over them.

Each command checks, then replaces itself with Flower's (``os.execvp``); here ``execvp``
is replaced by a recorder, so the tests see the exact command Flower would get, or that
none was started. The kit must serve any Flower app: only lepton-flwr's keys are checked.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from lepton_flwr.cli import main
from lepton_flwr.deploy import make_certificates, make_node_key
from lepton_flwr.launch import superlink_argv, supernode_argv

BIN = Path(sys.executable).parent
ANOTHER_APPS_CONFIG = "lr=0.1 batch-size=32 he-scheme='bfv' dp-epsilon=3 dp-delta=1e-5"


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kit")
    files = make_certificates(folder / "certs", ["127.0.0.1"], ca_dir=folder / "certs-ca")
    key, _ = make_node_key(folder / "node-keys", "node-0")
    return {"certs": folder / "certs", "ca": files["ca.crt"], "key": key}


@pytest.fixture
def started(monkeypatch):
    """What ``os.execvp`` was asked to run (nothing is run)."""
    calls = []
    monkeypatch.setattr(os, "execvp", lambda file, argv: calls.append(list(argv)))
    return calls


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _supernode(kit, node_config: str, *more: str) -> list[str]:
    return [
        "supernode",
        "--superlink",
        "127.0.0.1:9092",
        "--root-certificates",
        str(kit["ca"]),
        "--auth-key",
        str(kit["key"]),
        "--node-config",
        node_config,
        *more,
    ]


def test_the_superlink_argv_has_tls_auth_a_database_and_absolute_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv = superlink_argv(Path("x/../certs"), Path("state"), 9500, ["--isolation", "process"])
    certs = tmp_path / "certs"
    assert argv == [
        "flower-superlink",
        "--ssl-ca-certfile", f"{certs}/ca.crt",
        "--ssl-certfile", f"{certs}/superlink.crt",
        "--ssl-keyfile", f"{certs}/superlink.key",
        "--enable-supernode-auth",
        "--database", f"{tmp_path}/state/superlink.db",
        "--host", "0.0.0.0", "--port", "9500",
        "--disable-runtime-dependency-installation",
        "--isolation", "process",
    ]  # fmt: skip


def test_the_supernode_argv_passes_the_node_config_and_its_own_port(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv = supernode_argv("link:9092", Path("ca.crt"), Path("n.key"), "lr=0.1 x='a b'", 9601)
    assert argv == [
        "flower-supernode",
        "--superlink", "link:9092",
        "--root-certificates", f"{tmp_path}/ca.crt",
        "--auth-supernode-private-key", f"{tmp_path}/n.key",
        "--node-config", "lr=0.1 x='a b'",
        "--port", "9601",
    ]  # fmt: skip


def test_superlink_command_checks_then_execs_flower_with_extra_flags(kit, started, tmp_path):
    port = _free_port()
    state = tmp_path / "state"
    main(["superlink", str(kit["certs"]), str(state), "--port", str(port), "--", "--isolation",
          "process"])  # fmt: skip
    assert started == [superlink_argv(kit["certs"], state, port, ["--isolation", "process"])]
    assert state.is_dir()


def test_superlink_command_refuses_a_folder_without_its_certificate_before_exec(
    kit, started, tmp_path
):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "ca.crt").write_bytes(kit["ca"].read_bytes())
    with pytest.raises(SystemExit, match=r"lacks superlink\.crt, superlink\.key"):
        main(["superlink", str(bare), str(tmp_path / "state"), "--port", str(_free_port())])
    assert started == [] and not (tmp_path / "state").exists()


def test_another_apps_node_config_is_accepted_and_passed_as_is(kit, started, capsys):
    """Its own keys, some with our prefixes, no partition keys: nothing of ours to check."""
    port = _free_port()
    main(_supernode(kit, ANOTHER_APPS_CONFIG, "--port", str(port)))
    assert started == [supernode_argv("127.0.0.1:9092", kit["ca"], kit["key"],
                                      ANOTHER_APPS_CONFIG, port)]  # fmt: skip
    assert "left to the app as they are: he-scheme, dp-epsilon, dp-delta" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("node_config", "named"),
    [
        ("lr=0.1 dp-max-clip-norm=-1", "dp-max-clip-norm=-1 is not in (0, inf)"),
        ("lr=0.1 dp-max-clip-nrom=1.0", "dp-max-clip-nrom: not a lepton-flwr setting"),
        ("lr=0.1 dpsgd_max_epsilon=3", "did you mean dpsgd-max-epsilon?"),
        ("lr=0.1 partition-id=3 num-partitions=3", "partition-id=3 is not in [0, 3)"),
        ("lr=0.1 he-secret-context='keys/secret.ctx'", "give an absolute path"),
    ],
)
def test_a_bad_node_config_is_refused_before_any_exec_naming_the_key(
    kit, started, node_config, named
):
    with pytest.raises(SystemExit) as stop:
        main(_supernode(kit, node_config, "--port", str(_free_port())))
    assert named in str(stop.value) and started == []


def test_a_supernode_port_in_use_is_refused_naming_it(kit, started):
    with socket.socket() as other_node:
        other_node.bind(("127.0.0.1", 0))
        other_node.listen()
        port = other_node.getsockname()[1]
        with pytest.raises(SystemExit) as stop:
            main(_supernode(kit, "lr=0.1", "--port", str(port)))
    assert f"port {port} on 127.0.0.1 is in use" in str(stop.value)
    assert "give this SuperNode its own --port" in str(stop.value) and started == []


@pytest.mark.parametrize("command", ["superlink", "supernode"])
def test_the_commands_are_installed_entry_points(command):
    """``pip install`` puts them on PATH: the console script itself answers."""
    script = shutil.which("lepton-flwr", path=str(BIN))
    assert script is not None
    proc = subprocess.run([script, command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--port" in proc.stdout, proc.stderr


def test_the_supernode_script_runs_the_command_and_its_checks(kit, tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "deploy" / "supernode.sh"), "127.0.0.1:9092", str(kit["ca"]),
         str(kit["key"]), "lr=0.1 dp_max_clip_norm=1.0", str(_free_port())],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "lepton-flwr supernode: this SuperNode's settings are wrong" in proc.stderr
    assert "did you mean dp-max-clip-norm?" in proc.stderr
