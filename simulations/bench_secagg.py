"""What secure aggregation costs a round, side by side with the same round without it.

``python -m simulations.bench_secagg [--clients 20 100] [--values 39700] [--rounds 3]``
runs HE + DP (``HEDPFedAvg``, every node sampled) and HE-FedAvg in one process
(``InProcessGrid``: the nodes answer one after the other, so a round's time is the CPU
it costs), with and without ``secure_aggregation=True``, on a model of ``--values``
float32 weights (the main job's ScatterNet has 39,700) whose handler moves every weight by
a small step. Per round (median over the rounds after the first, which also advertises
keys) it prints the messages sent, the bytes each client receives and sends (Flower's
``count_bytes`` of the records), the server's time in the protocol's stages, and the
round's time, and the ratios with over without. Results go to
``outputs/bench_secagg/results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lepton_flwr.strategies import HEDPFedAvg, HEFedAvg

from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.apps.recording import message_bytes
from lepton_flwr.he import CKKSParams, write_keys
from lepton_flwr.mods import make_he_dp_mod, make_he_mod


class CountingGrid(InProcessGrid):
    """Counts messages and bytes, and times each exchange, per round."""

    def __init__(self, app, num_nodes):
        super().__init__(app, num_nodes, keep_replies=False)
        self.rounds: list[dict] = []
        self.new_round()

    def new_round(self) -> None:
        """Start counting the next round."""
        self.rounds.append({"messages": 0, "down": 0, "up": 0, "exchanges": 0})

    def send_and_receive(self, messages, *, timeout=None):
        """Deliver as ``InProcessGrid`` does, counting messages and bytes."""
        messages = list(messages)
        now = self.rounds[-1]
        now["messages"] += len(messages)
        now["exchanges"] += 1 if messages else 0
        now["down"] += sum(message_bytes(m) for m in messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        now["up"] += sum(message_bytes(m) for m in replies)
        return replies


def _app(mods):
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg, context):
        step = np.float32(0.001 * (context.node_id % 7))
        new = {k: Array(v.numpy() + step) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    return app


def _strategy(name, public, nodes, secure):
    if name == "he_dp":
        return HEDPFedAvg(
            public,
            clip_norm=1.0,
            noise_multiplier=1.0,
            delta=1e-5,
            sample_rate=1.0,
            sampling="fixed",
            min_available_nodes=nodes,
            secure_aggregation=secure,
        )
    return HEFedAvg(
        public, min_available_nodes=nodes, fraction_evaluate=0.0, secure_aggregation=secure
    )


def run_once(name, keys, nodes, values, rounds, secure) -> dict:
    """One run; per-round figures (medians over rounds 2..) and the whole run's time."""
    secret, public = keys
    mod = make_he_dp_mod(secret) if name == "he_dp" else make_he_mod(secret)
    grid = CountingGrid(_app([mod]), nodes)
    strategy = _strategy(name, public, nodes, secure)
    round_times = []
    original = strategy.configure_train

    def timed_configure(server_round, *args):
        if round_times:
            grid.new_round()
        round_times.append(time.perf_counter())
        return original(server_round, *args)

    strategy.configure_train = timed_configure
    start = ArrayRecord({"w": Array(np.zeros(values, dtype=np.float32))})
    began = time.perf_counter()
    strategy.start(grid, start, num_rounds=rounds)
    ended = time.perf_counter()
    bounds = [*round_times, ended]
    seconds = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    steady = list(range(1, rounds)) or [0]
    figures = {
        "round_seconds": statistics.median(seconds[i] for i in steady),
        "first_round_seconds": seconds[0],
        "messages": statistics.median(grid.rounds[i]["messages"] for i in steady),
        "exchanges": statistics.median(grid.rounds[i]["exchanges"] for i in steady),
        "down_per_client": statistics.median(grid.rounds[i]["down"] for i in steady) / nodes,
        "up_per_client": statistics.median(grid.rounds[i]["up"] for i in steady) / nodes,
        "run_seconds": ended - began,
    }
    driver = strategy.secure_aggregation
    if driver is not None:
        stage_seconds = [driver.seconds.get(r + 1, 0.0) for r in steady]
        figures["server_stage_seconds"] = statistics.median(stage_seconds)
    return figures


def main() -> None:
    """Run every configuration, print a line each, write ``results.json``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--values", type=int, default=39_700)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="outputs/bench_secagg")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        keys = write_keys(CKKSParams(), Path(folder))
        for name in ("he_dp", "he_fedavg"):
            for nodes in args.clients:
                row = {"strategy": name, "clients": nodes, "values": args.values}
                for secure in (False, True):
                    figures = run_once(name, keys, nodes, args.values, args.rounds, secure)
                    row["with" if secure else "without"] = figures
                plain, masked = row["without"], row["with"]
                row["ratio_round"] = masked["round_seconds"] / plain["round_seconds"]
                row["ratio_up"] = masked["up_per_client"] / plain["up_per_client"]
                row["ratio_down"] = masked["down_per_client"] / plain["down_per_client"]
                results.append(row)
                print(
                    f"{name:9s} n={nodes:4d}: round {plain['round_seconds']:.2f} s -> "
                    f"{masked['round_seconds']:.2f} s (x{row['ratio_round']:.2f}), exchanges "
                    f"{plain['exchanges']:.0f} -> {masked['exchanges']:.0f}, messages "
                    f"{plain['messages']:.0f} -> {masked['messages']:.0f}, per client up "
                    f"{plain['up_per_client'] / 1e3:.0f} -> {masked['up_per_client'] / 1e3:.0f} KB "
                    f"(x{row['ratio_up']:.3f}), down {plain['down_per_client'] / 1e3:.0f} -> "
                    f"{masked['down_per_client'] / 1e3:.0f} KB (x{row['ratio_down']:.3f}), "
                    f"server in stages {masked.get('server_stage_seconds', 0):.2f} s; "
                    f"first round {masked['first_round_seconds']:.2f} s",
                    flush=True,
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
