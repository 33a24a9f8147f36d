"""Secure aggregation in the documented deployment: TLS, SuperNode auth, one node killed.

The deployment of ``tests/test_secure_deployment.py`` (its helpers, imported) with six
registered SuperNodes, the fewest for which the default parameters tolerate a dropout
(n = 6: t = 4, one dropout), each signing its round keys with its SuperNode auth key and
trusting the six nodes' public keys (``secagg-signing-key``, ``secagg-trusted-keys``).
``flwr run`` over TLS runs HE + DP with ``he.secure_aggregation=true`` twice, two rounds
each, every node sampled:

1. all six take part: both rounds are released with six shares, ε is the accountant's
   for the run's noise (what the same run without secure aggregation spends), no node is
   dropped, every node answered the stage messages, and the final model decrypts to a
   model (masks left in the sum would decrypt to values of the ring's size);
2. one SuperNode's process group is killed as round 2's training message reaches it
   (after it answered round 2's share-keys): the five others answer the unmask, the
   server removes its pairwise masks through the shares of its mask key, round 2 is
   released with five shares, and ε is the first run's.

With ``LEPTON_SECAGG_BASELINE=1`` the same two rounds run first without secure
aggregation, and the test prints both runs' round times and bytes per client (the run
folder's figures); nothing timing-dependent is asserted. Every process runs in its own
process group and is stopped by that id, also when the test fails.
"""

import json
import os
import re
import signal
import statistics
import subprocess
import time

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT
from test_end_to_end import _env, _free_port
from test_secure_deployment import BIN, _cli, _spawn, _stop, _wait_for_port

from lepton_flwr.deploy import connection_toml
from lepton_flwr.dp.accounting import ClientLevelAccountant
from lepton_flwr.he import decrypt_arrays

NODES = 6  # n = 6: t = 4, and one dropout is tolerated with the default parameters
DELTA = 1e-3
VICTIM = 2  # the SuperNode killed in the second run
TRAIN_MESSAGE = "Receiving: train message"
# Set to 1 to run the same two rounds without secure aggregation first and print both
# runs' round times and bytes per client (the run folder's figures).
BASELINE = "LEPTON_SECAGG_BASELINE"
# he_mod's warning at a node's first decryption in a run (the node keeps no state-dir).
FIRST_DECRYPTION = "decryptions under this key are counted for this run only"


def _register(node_keys, cli_env) -> list[int]:
    """Register node-0 .. node-5's public keys; their node ids, in that order."""
    ids = []
    for i in range(NODES):
        proc = _cli(
            "flwr", "supernode", "register", str(node_keys / f"node-{i}.pub"), "secure",
            "--format", "json", env=cli_env,
        )  # fmt: skip
        ids.append(int(json.loads(proc.stdout[proc.stdout.index("{") :])["node-id"]))
    return ids


def _overrides(out, keys, secure: bool) -> str:
    return (
        "+experiment=digits_smoke model=logreg num_rounds=2 strategy=he_dp_fedavg "
        f"privacy.sampling=fixed privacy.sample_rate=1.0 privacy.delta={DELTA} "
        f"round_timeout=120 he.secure_aggregation={str(secure).lower()} "
        f"strategy.min_available_nodes={NODES} he.public_context_path={keys}/public.ctx "
        f"output_dir={out}"
    )


def _flwr_run(overrides: str, cli_env) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "flwr"), "run", ".", "secure", "--stream", "--run-config",
         f'hydra-overrides="{overrides}"'],
        env=cli_env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(run: subprocess.Popen, timeout: float = 600) -> str:
    try:
        log, _ = run.communicate(timeout=timeout)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, log[-4000:]
    return log


def _rows(folder, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def _expected_epsilons(out) -> list[float]:
    """ε after each round of an uninterrupted run at the run's z, every node sampled."""
    z = yaml.safe_load((out / "config.yaml").read_text())["privacy"]["noise_multiplier"]
    accountant = ClientLevelAccountant(sampling="fixed", population=NODES)
    epsilons = []
    for _ in range(2):
        accountant.compose(z, 1.0)
        epsilons.append(accountant.epsilon(DELTA))
    return epsilons


def _check_released(out, keys, reported: list[int]) -> list[dict]:
    """Both rounds released with the given share counts, at the accountant's ε; the final
    model decrypts to a model (masks left in the sum would decrypt to ring-sized values)."""
    rows = _rows(out, "metrics.jsonl")
    run_log = (out / "run.log").read_text()
    assert [r["round"] for r in rows] == [1, 2], run_log[-3000:]
    for r, expected in zip(rows, _expected_epsilons(out), strict=True):
        assert r["epsilon"] == pytest.approx(expected, abs=1e-9, rel=0), rows
    # HEDPFedAvg's own count (server only); the run folder's clients_sampled column also
    # counts the stage messages, which are Flower training messages.
    for server_round, shares in enumerate(reported, start=1):
        assert (
            f"HEDPFedAvg round {server_round} (server only, not covered by epsilon, not in the "
            f"metrics): {NODES} clients sampled, {shares} shares added; released"
        ) in run_log, run_log[-3000:]
    assert "nothing is released" not in run_log and "nothing released" not in run_log
    model = decrypt_arrays(out / "model.ckks.zip", keys / "secret.ctx", count_in=out.parent)
    values = np.concatenate([a.numpy().ravel() for a in model.values()])
    assert np.all(np.isfinite(values)) and np.abs(values).max() < 10, np.abs(values).max()
    return rows


def _round_summary(out) -> dict:
    """Median round seconds and bytes per client per round, as the run folder records them."""
    rows = _rows(out, "metrics.jsonl")
    private = {r["round"]: r for r in _rows(out, "server_only.jsonl")}
    merged = [private.get(r["round"], {}) | r for r in rows]
    summary = {"round_seconds": [r.get("round_seconds") for r in merged]}
    if all("round_seconds" in r for r in merged):
        summary["median_round_seconds"] = statistics.median(r["round_seconds"] for r in merged)
    for key in ("bytes_up", "bytes_down"):
        if all(key in r for r in merged):
            summary[f"{key}_per_client"] = [r[key] / NODES for r in merged]
    return summary


def _node_logs(tmp_path) -> list[str]:
    return [(tmp_path / f"node{i}.log").read_text() for i in range(NODES)]


def _all_six_mask_and_both_rounds_are_released(tmp_path, keys, cli_env) -> tuple[int, int]:
    """Run 1; returns how many messages each node got in the run, and which of them (its
    1-based position) was round 2's training message."""
    out = tmp_path / "secagg"
    before = _node_logs(tmp_path)
    _finish(_flwr_run(_overrides(out, keys, secure=True), cli_env))
    _check_released(out, keys, reported=[NODES, NODES])
    run_log = (out / "run.log").read_text()
    assert re.search(
        rf"secure aggregation .*a round of {NODES} clients needs t = 4 shares per secret, "
        "tolerates 1 dropped",
        run_log,
    ), run_log[-3000:]
    assert not re.search(r"node \d+ dropped", run_log), run_log[-3000:]
    # The stages are Flower training messages too, each node answering every one of them:
    # at least two trainings, two unmasks and the share-keys of round 1.
    runs = [log[len(old) :] for old, log in zip(before, _node_logs(tmp_path), strict=True)]
    received = {log.count(TRAIN_MESSAGE) for log in runs}
    assert len(received) == 1 and min(received) >= 5, received
    # Each node signed its keys with its auth key and checked its neighbours' signatures
    # against the trusted list, in both rounds.
    for log in runs:
        assert re.search(r"node \d+ signed its keys for rounds 1-64 with key SHA256:", log)
        assert len(re.findall(r"round \d: the keys of its 5 neighbours are signed", log)) == 2
    # Round 2's training message is the first to carry an encrypted global model: he_mod
    # logs its first decryption of the run (no state-dir), and nothing else decrypts.
    positions = {log[: log.index(FIRST_DECRYPTION)].count(TRAIN_MESSAGE) for log in runs}
    assert len(positions) == 1, positions
    return received.pop(), positions.pop()


def _a_node_killed_at_round_2s_training_leaves_five_to_unmask(
    tmp_path, keys, processes, cli_env, gone, epsilons, received, training
) -> None:
    """Node VICTIM (node id ``gone``) dies as round 2's training message reaches it,
    after its share-keys answer: the five others remove its pairwise masks through its
    mask key's shares."""
    out = tmp_path / "secagg-fault"
    node_log = tmp_path / f"node{VICTIM}.log"
    before = _node_logs(tmp_path)
    run = _flwr_run(_overrides(out, keys, secure=True), cli_env)
    try:
        deadline = time.monotonic() + 400
        while node_log.read_text()[len(before[VICTIM]) :].count(TRAIN_MESSAGE) < training:
            assert time.monotonic() < deadline and run.poll() is None, "round 2 never came"
            time.sleep(0.1)
        os.killpg(processes[1 + VICTIM][0].pid, signal.SIGKILL)  # the SuperLink, nodes 0..5
    except BaseException:
        run.kill()
        run.wait()
        raise
    _finish(run)
    rows = _check_released(out, keys, reported=[NODES, NODES - 1])
    assert [r["epsilon"] for r in rows] == pytest.approx(epsilons, abs=1e-12, rel=0)
    runs = [log[len(old) :] for old, log in zip(before, _node_logs(tmp_path), strict=True)]
    # It died before it decrypted round 2's model; the five others answered every stage
    # of the run, round 2's unmask included.
    assert FIRST_DECRYPTION not in runs[VICTIM]
    assert runs[VICTIM].count(TRAIN_MESSAGE) == training
    others = [log.count(TRAIN_MESSAGE) for i, log in enumerate(runs) if i != VICTIM]
    assert others == [received] * (NODES - 1), others
    run_log = (out / "run.log").read_text()
    # No stage dropped another node, nor this one before training (it answered round 2's
    # share-keys); its upload is missing. The reply saying so comes from the SuperLink,
    # whose own node id (1) the strategy logs in place of the dead node's.
    dropped = re.findall(r"round (\d+): secure aggregation: node (\d+) dropped(.*)", run_log)
    assert all(int(node) == gone for _, node, _ in dropped), dropped
    assert not [d for d in dropped if "share-keys" in d[2] or "advertise" in d[2]], dropped
    assert re.search(r"round 2: rejected the reply of node \d+: .*Node Unavailable", run_log)


@pytest.mark.slow
def test_secure_aggregation_in_the_tls_deployment_survives_a_killed_node(tmp_path):
    certs, keys, node_keys = tmp_path / "certs", tmp_path / "keys", tmp_path / "node-keys"
    _cli("lepton-flwr", "certs", "--out", str(certs), "--host", "127.0.0.1", "--host", "localhost")
    _cli("lepton-flwr", "keygen", "--out", str(keys))
    for i in range(NODES):
        _cli("lepton-flwr", "node-key", "--out", str(node_keys), "--name", f"node-{i}")
    port = _free_port()
    cli_home = tmp_path / "cli-home"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        connection_toml("secure", f"127.0.0.1:{port}", certs / "ca.crt")
    )
    cli_env = _env(FLWR_HOME=str(cli_home))
    processes = []
    try:
        _spawn(
            ["bash", str(REPO_ROOT / "deploy" / "superlink.sh"), str(certs),
             str(tmp_path / "link-state"), str(port)],
            _env(FLWR_HOME=str(tmp_path / "link-home")), tmp_path / "superlink.log", processes,
        )  # fmt: skip
        _wait_for_port(port)
        node_ids = _register(node_keys, cli_env)
        trusted = node_keys / "trusted.pub"  # every node signs with its auth key, trusts all
        trusted.write_bytes(
            b"".join((node_keys / f"node-{i}.pub").read_bytes() for i in range(NODES))
        )
        for i in range(NODES):
            node_config = (
                f'partition-id={i} num-partitions={NODES} he-secret-context="{keys / "secret.ctx"}"'
                f' secagg-signing-key="{node_keys / f"node-{i}.key"}"'
                f' secagg-trusted-keys="{trusted}"'
            )
            _spawn(
                ["bash", str(REPO_ROOT / "deploy" / "supernode.sh"), f"127.0.0.1:{port}",
                 str(certs / "ca.crt"), str(node_keys / f"node-{i}.key"), node_config,
                 str(_free_port())],
                _env(FLWR_HOME=str(tmp_path / f"node{i}-home")), tmp_path / f"node{i}.log",
                processes,
            )  # fmt: skip
        if os.environ.get(BASELINE):  # the cost of secure aggregation, on request
            plain_out = tmp_path / "plain"
            _finish(_flwr_run(_overrides(plain_out, keys, secure=False), cli_env))
            _check_released(plain_out, keys, reported=[NODES, NODES])
            print(f"\nwithout secure aggregation: {_round_summary(plain_out)}")
        received, training = _all_six_mask_and_both_rounds_are_released(tmp_path, keys, cli_env)
        print(f"\nwith secure aggregation: {_round_summary(tmp_path / 'secagg')}")
        for i, node_id in enumerate(node_ids):  # each node is the key it was started with
            assert f"SuperNode ID: {node_id}" in (tmp_path / f"node{i}.log").read_text()
        epsilons = [r["epsilon"] for r in _rows(tmp_path / "secagg", "metrics.jsonl")]
        _a_node_killed_at_round_2s_training_leaves_five_to_unmask(
            tmp_path, keys, processes, cli_env, node_ids[VICTIM], epsilons, received, training
        )
    finally:
        _stop(processes)
