"""Where a deployment round's time goes: Flower's polling, the ClientApp's process, the server.

Starts the CI deployment on localhost as ``tests/test_secure_deployment.py`` does (a
SuperLink with TLS and SuperNode authentication, three registered SuperNodes, each with
the CKKS key and its partition), runs a config for a few rounds with ``flwr run``, and
reads two clocks: each SuperNode's log lines, timestamped here as they are printed, and
the run's ``run.log``. Each exchange of a round (training, federated evaluation) is split
along its critical path, the node whose reply came last; medians over rounds:

- ``to node``: the round's start on the server to the node's "Receiving" line: the
  server's configure step, then the SuperNode's pull (Flower polls every 3 s when idle);
- ``launch``: "Receiving" to "Start `flwr-clientapp` process" (Flower's SuperExec polls
  for tasks every second);
- ``process``: the ``flwr-clientapp`` process, from its start to the node's "Sending"
  line: interpreter start, imports, the message's handling (data, training, HE), the
  reply's push (the SuperNode checks for it every 0.5 s);
- ``to server``: the last node's "Sending" to the server's first line about the replies
  (the ServerApp pulls replies every 3 s);
- ``server``: the rest of the round (aggregation, HE sum, checkpoint, evaluation).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m simulations.bench_deployment_round
[rounds] [code folder]``: the CI config (HE + DP) and the plain digits config (FedAvg,
no HE), ``rounds`` each (default 4; the first round's numbers are left out); a ``code
folder`` (a copy of ``lepton_flwr`` at another commit) is put first on every process's
``PYTHONPATH``, to measure that code instead of the installed one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NODES = 3
CONFIGS = {
    "HE + DP (CI)": (
        "+experiment=digits_smoke model=logreg strategy=he_dp_fedavg privacy.sampling=fixed "
        "privacy.sample_rate=1.0 privacy.delta=1e-3"
    ),
    "FedAvg": "+experiment=digits_smoke model=logreg",
}
# The server's first line once a training or evaluation exchange's replies are in.
REPLIES_IN = re.compile(r"valid encrypted replies|aggregate_(train|evaluate): Received")
ROUND_START = re.compile(r"\[ROUND (\d+)/\d+\]")
PARTS = ("round", "to node", "launch", "process", "to server", "server")


def _env(extra: dict, code: Path | None) -> dict:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach our clock as they are printed
    if code is not None:
        env["PYTHONPATH"] = f"{code}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port}")


class Federation:
    """A SuperLink and ``NODES`` SuperNodes on localhost, TLS and authentication on."""

    def __init__(self, folder: Path, code: Path | None = None):
        self.folder, self.code = folder, code
        self.processes: list[subprocess.Popen] = []
        self.node_lines: list[list[tuple[float, str]]] = []

    def _cli(self, *args: str, env: dict | None = None) -> None:
        subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            env=env or _env({}, self.code),
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def start(self) -> None:
        """Make certificates and keys, start the SuperLink and the SuperNodes."""
        f = self.folder
        self._cli("lepton-flwr", "certs", "--out", str(f / "certs"), "--host", "127.0.0.1")
        self._cli("lepton-flwr", "keygen", "--out", str(f / "keys"))
        for i in range(NODES):
            self._cli("lepton-flwr", "node-key", "--out", str(f / "node-keys"), "--name", f"n{i}")
        port = _free_port()
        from lepton_flwr.deploy import connection_toml

        (f / "cli-home").mkdir()
        toml = connection_toml("secure", f"127.0.0.1:{port}", f / "certs" / "ca.crt")
        (f / "cli-home" / "config.toml").write_text(toml)
        self.cli_env = _env({"FLWR_HOME": str(f / "cli-home")}, self.code)
        link = [str(f / "certs"), str(f / "link-state"), str(port)]
        self._spawn(["bash", str(REPO_ROOT / "deploy" / "superlink.sh"), *link], "link", None)
        _wait_for_port(port)
        for i in range(NODES):
            pub = str(f / "node-keys" / f"n{i}.pub")
            self._cli("flwr", "supernode", "register", pub, "secure", env=self.cli_env)
        for i in range(NODES):
            config = (
                f"partition-id={i} num-partitions={NODES} "
                f'he-secret-context="{f / "keys" / "secret.ctx"}"'
            )
            args = [
                f"127.0.0.1:{port}",
                str(f / "certs" / "ca.crt"),
                str(f / "node-keys" / f"n{i}.key"),
                config,
                str(_free_port()),
            ]
            lines: list[tuple[float, str]] = []
            self.node_lines.append(lines)
            self._spawn(["bash", str(REPO_ROOT / "deploy" / "supernode.sh"), *args], f"n{i}", lines)

    def _spawn(self, cmd: list[str], name: str, lines: list | None) -> None:
        env = _env({"FLWR_HOME": str(self.folder / f"{name}-home")}, self.code)
        process = subprocess.Popen(
            cmd,
            env=env,
            cwd=self.folder,
            stdout=subprocess.PIPE if lines is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.processes.append(process)
        if lines is not None:

            def read() -> None:
                for line in process.stdout:
                    lines.append((time.time(), line.rstrip()))

            threading.Thread(target=read, daemon=True).start()

    def run(self, overrides: str, rounds: int, out: Path) -> None:
        """``flwr run`` over TLS; the run folder is ``out``."""
        full = f"{overrides} num_rounds={rounds} strategy.min_available_nodes={NODES}"
        if "strategy=he_" in overrides:
            full += f" he.public_context_path={self.folder / 'keys' / 'public.ctx'}"
        full += f" output_dir={out}"
        run_config = f'hydra-overrides="{full}"'
        done = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "secure", "--stream", "--run-config", run_config],
            env=self.cli_env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode != 0 or not (out / "run.log").is_file():
            raise RuntimeError(f"flwr run failed:\n{(done.stdout + done.stderr)[-3000:]}")

    def stop(self) -> None:
        """Stop every process this federation started (its own process groups)."""
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _server_lines(run_log: Path) -> list[tuple[float, str]]:
    stamped = []
    for line in run_log.read_text().splitlines():
        try:
            when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        stamped.append((when, line[24:]))
    return stamped


def _messages(lines: list[tuple[float, str]], since: float) -> list[dict]:
    """The node's messages after ``since``: when received, its process started, replied."""
    messages: list[dict] = []
    for when, line in lines:
        if when < since:
            continue
        if "Receiving:" in line:
            messages.append({"received": when})
        elif "Start `flwr-clientapp` process" in line and messages:
            messages[-1]["started"] = when
        elif "Sending:" in line and messages:
            messages[-1]["sent"] = when
    return [m for m in messages if {"received", "started", "sent"} <= set(m)]


def breakdown(server: list[tuple[float, str]], nodes: list[list], skip: int = 1) -> dict:
    """Median seconds per round of each part (see the module), rounds after ``skip``.

    Each exchange is split along its critical path, the node whose reply came last, so
    that the parts of a round add up to it.
    """
    starts = [(when, int(m.group(1))) for when, line in server if (m := ROUND_START.search(line))]
    end_of_run = server[-1][0]
    parts: dict[str, list[float]] = {k: [] for k in PARTS}
    for index, (start, number) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else end_of_run
        if number <= skip:
            continue
        per_node = [[m for m in _messages(lines, start) if m["sent"] <= end] for lines in nodes]
        replies_in = [w for w, line in server if start <= w <= end and REPLIES_IN.search(line)]
        exchange_start = start
        spent = dict.fromkeys(PARTS, 0.0)
        for exchange, heard in enumerate(replies_in):
            ms = [ms[exchange] for ms in per_node if len(ms) > exchange]
            if not ms:
                break
            last = max(ms, key=lambda m: m["sent"])
            spent["to node"] += last["received"] - exchange_start
            spent["launch"] += last["started"] - last["received"]
            spent["process"] += last["sent"] - last["started"]
            spent["to server"] += heard - last["sent"]
            exchange_start = heard
        spent["round"] = end - start
        spent["server"] = end - start - sum(spent[k] for k in PARTS[1:5])
        for key, value in spent.items():
            parts[key].append(value)
    return {k: statistics.median(v) if v else float("nan") for k, v in parts.items()}


def main(rounds: int = 4, code: Path | None = None) -> None:
    """Print the breakdown of each config's rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        federation = Federation(Path(tmp), code)
        try:
            federation.start()
            time.sleep(10)  # the nodes connect
            results = {}
            for name, overrides in CONFIGS.items():
                out = Path(tmp) / f"run-{len(results)}"
                since = time.time()
                federation.run(overrides, rounds, out)
                nodes = [[(w, t) for w, t in ls if w >= since] for ls in federation.node_lines]
                results[name] = breakdown(_server_lines(out / "run.log"), nodes)
        finally:
            federation.stop()
    where = f"code from {code}" if code else "installed code"
    print(
        f"Deployment rounds on localhost ({NODES} SuperNodes, TLS + auth, {where}; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), median s per round "
        f"of rounds 2..{rounds}, each exchange along its last node (parts add up to the round)"
    )
    print(f"{'config':14}" + "".join(f"{k:>11}" for k in PARTS))
    for name, result in results.items():
        print(f"{name:14}" + "".join(f"{result[k]:11.2f}" for k in PARTS))


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 4,
        Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else None,
    )
