"""A real deployment on this machine: flower-superlink + 2 flower-supernodes + `flwr run`.

HE-FedAvg with the keys where a deployment puts them: each SuperNode gets the secret
context from its node config, the server gets the public context in the run config.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_end_to_end import _env, _free_port, _stop_processes

BIN = Path(sys.executable).parent


def _start(cmd, env, log):
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log.name.rsplit("/", 1)[0]
    )


def _wait_for_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.mark.slow
def test_he_fedavg_in_a_real_deployment(tmp_path):
    keys = tmp_path / "keys"
    subprocess.run([str(BIN / "lepton-flwr"), "keygen", "--out", str(keys)], check=True)
    link_port = _free_port()
    processes = []
    try:
        link_log = open(tmp_path / "superlink.log", "w")
        link_env = _env(FLWR_HOME=str(tmp_path / "link-home"))
        processes.append(
            _start(
                [
                    str(BIN / "flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(link_port),
                    "--disable-runtime-dependency-installation",
                ],
                link_env,
                link_log,
            )
        )
        _wait_for_port(link_port)
        for i in range(2):
            node_config = (
                f'partition-id={i} num-partitions=2 he-secret-context="{keys / "secret.ctx"}"'
            )
            processes.append(
                _start(
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{link_port}",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        node_config,
                    ],
                    _env(FLWR_HOME=str(tmp_path / f"node{i}-home")),
                    open(tmp_path / f"node{i}.log", "w"),
                )
            )
        cli_home = tmp_path / "cli-home"
        cli_home.mkdir()
        connection = f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "dep"\n\n[superlink.dep]\n{connection}'
        )
        out = tmp_path / "run"
        overrides = (
            f"+experiment=digits_smoke strategy=he_fedavg strategy.min_train_nodes=2 "
            f"strategy.min_evaluate_nodes=2 strategy.min_available_nodes=2 "
            f"he.public_context_path={keys / 'public.ctx'} output_dir={out}"
        )
        proc = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                ".",
                "dep",
                "--stream",
                "--run-config",
                f'hydra-overrides="{overrides}"',
            ],
            cwd=REPO_ROOT,
            env=_env(FLWR_HOME=str(cli_home)),
            capture_output=True,
            text=True,
            timeout=900,
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert (out / "model.ckks.zip").is_file(), (
            log[-4000:] + (tmp_path / "node0.log").read_text()[-3000:]
        )
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["train_failures"] == 0 and r["clients_sampled"] == 2 for r in rows)
        assert rows[1]["federated_loss"] < rows[0]["federated_loss"]
        # The server's config never named the secret context: the nodes' config did.
        assert "secret_context_path: null" in (out / "config.yaml").read_text()
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        _stop_processes(f"flwr-clientapp.*{link_port}", grace=5)
