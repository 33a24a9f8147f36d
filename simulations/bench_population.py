"""Round time against the number of simulated nodes, Flower's link state against ours.

Each configuration runs in a fresh process (its own Ray), the two link states side by side
at each population: Flower's ``InMemoryLinkState`` (``LEPTON_FLOWER_LINK_STATE=flower``)
and :class:`lepton_flwr.sim_linkstate.IndexedInMemoryLinkState`. About ``--clients``
clients take part in each round whatever the population. Prints the median round per
configuration (the first round, Ray's start, left out), Flower's over ours, and each
population over 1,000 nodes; writes the curve as a plot.

Workloads (``--workload``):

``engine``
    A stand-in with the main job's engine path and none of its learning: Flower's
    ``run_simulation`` and Ray backend, a ServerApp that samples ``--clients`` nodes a
    round and sends each a 39,700-float array (the main job's ScatterNet weights) through
    ``grid.send_and_receive``, a ClientApp that does a fixed bit of numpy work and sends
    the array back. Client work per round is the same at every population.
``main``
    The main job (``+experiment=main``: HE + DP, ScatterNet, Fashion-MNIST) for
    ``--rounds`` rounds, ``privacy.sample_rate = clients / nodes``; the 60,000 images are
    split over the nodes, so each client trains on fewer images as the population grows.

Examples
--------
``flock /tmp/heavy.lock env OMP_NUM_THREADS=1 python -m simulations.bench_population``
``python -m simulations.bench_population --workload main --nodes 1000 10000 --rounds 3``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINK_STATES = ("flower", "indexed")
SCATNET_WEIGHTS = 39_700


def engine_round_times(
    nodes: int, rounds: int, clients: int, work: int
) -> tuple[list[float], bool]:
    """Run the engine stand-in.

    Returns
    -------
    tuple[list[float], bool]
        The server's seconds per round, and whether the indexed link state ran.
    """
    import logging
    import random

    import numpy as np
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    import simulations.run  # noqa: F401  (its environment defaults for Ray and Flower)
    from lepton_flwr.sim_linkstate import population_flat_engine

    seconds: list[float] = []
    server = ServerApp()
    client = ClientApp()

    @server.main()
    def _serve(grid: Grid, context: Context) -> None:
        rng = random.Random(0)
        content = RecordDict({"arrays": ArrayRecord([np.zeros(SCATNET_WEIGHTS, np.float32)])})
        while len(node_ids := sorted(grid.get_node_ids())) < nodes:  # registering
            time.sleep(0.5)
        for _ in range(rounds):
            started = time.perf_counter()
            chosen = rng.sample(node_ids, min(clients, nodes))
            messages = [Message(content, dst_node_id=n, message_type="train") for n in chosen]
            replies = list(grid.send_and_receive(messages))
            if len(replies) != len(chosen) or any(r.has_error() for r in replies):
                raise RuntimeError(f"{len(chosen)} sent, {len(replies)} replies or errors")
            seconds.append(time.perf_counter() - started)

    @client.train()
    def _train(message: Message, context: Context) -> Message:
        array = message.content["arrays"].to_numpy_ndarrays()[0]
        mixing = np.full((200, 200), 1e-3, np.float32)
        block = array[: 200 * 198].reshape(198, 200)
        for _ in range(work):  # a fixed amount of work, the same at every population
            block = block @ mixing
        reply = RecordDict({"arrays": ArrayRecord([array])})
        return Message(reply, reply_to=message)

    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": True},
    }
    with population_flat_engine() as indexed:
        run_simulation(
            server_app=server, client_app=client, num_supernodes=nodes, backend_config=backend
        )
    if len(seconds) != rounds:
        raise RuntimeError(f"the engine stand-in finished {len(seconds)} of {rounds} rounds")
    return seconds, indexed


def main_job_round_times(
    nodes: int, rounds: int, clients: int
) -> tuple[list[float], bool, dict[str, float]]:
    """Run the main job for ``rounds`` rounds at ``nodes`` nodes.

    Returns
    -------
    tuple[list[float], bool, dict[str, float]]
        Its seconds per round, whether the indexed link state ran, and the run's ε and
        key holder's accuracy (what a faster round must leave as they were).
    """
    from lepton_flwr.config import load_config
    from lepton_flwr.results import SERVER_ONLY_JSONL, SUMMARY_FILE
    from lepton_flwr.sim_linkstate import population_flat_engine
    from simulations.run import run_simulation_from_config

    with population_flat_engine() as indexed:  # what the runner's own block will decide
        pass

    folder = Path(tempfile.mkdtemp(prefix=f"bench-population-{nodes}-"))
    cfg = load_config(
        f"+experiment=main num_rounds={rounds} simulation.num_supernodes={nodes} "
        f"privacy.sample_rate={clients / nodes}"
    )
    run_simulation_from_config(cfg, folder)
    rows = [json.loads(line) for line in (folder / SERVER_ONLY_JSONL).read_text().splitlines()]
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    outcome = {k: summary[k] for k in ("epsilon", "keyholder_accuracy") if k in summary}
    return [row["round_seconds"] for row in rows], indexed, outcome


def run_one(args: argparse.Namespace) -> None:
    """Child process: one population, one link state; write the round seconds as JSON."""
    nodes, state = args.one
    nodes = int(nodes)
    outcome: dict[str, float] = {}
    if args.workload == "engine":
        seconds, indexed = engine_round_times(nodes, args.rounds, args.clients, args.work)
    else:
        seconds, indexed, outcome = main_job_round_times(nodes, args.rounds, args.clients)
    if indexed != (state == "indexed"):
        raise RuntimeError(f"asked for the {state} link state, the other one ran")
    result = {"nodes": nodes, "state": state, "seconds": seconds, "outcome": outcome}
    Path(args.json).write_text(json.dumps(result))


def run_all(args: argparse.Namespace) -> dict[tuple[int, str], list[float]]:
    """Run every (population, link state) in its own process, side by side."""
    results: dict[tuple[int, str], list[float]] = {}
    for nodes in args.nodes:
        for state in args.states:
            env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
            env.pop("LEPTON_FLOWER_LINK_STATE", None)
            if state == "flower":
                env["LEPTON_FLOWER_LINK_STATE"] = "flower"
            with (
                tempfile.NamedTemporaryFile(suffix=".json") as out,
                tempfile.NamedTemporaryFile(suffix=".log") as log,
            ):
                command = [
                    sys.executable, "-m", "simulations.bench_population",
                    "--one", str(nodes), state, "--json", out.name,
                    "--workload", args.workload, "--rounds", str(args.rounds),
                    "--clients", str(args.clients), "--work", str(args.work),
                ]  # fmt: skip
                started = time.perf_counter()
                done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
                if done.returncode:
                    sys.stderr.write(Path(log.name).read_text()[-6000:])
                    raise SystemExit(f"{nodes} nodes, {state}: exit status {done.returncode}")
                written = json.loads(Path(out.name).read_text())
            seconds = results[nodes, state] = written["seconds"]
            shown = " ".join(f"{s:.2f}" for s in seconds)
            outcome = "".join(f", {k} {v:.4f}" for k, v in written.get("outcome", {}).items())
            print(
                f"  {nodes:>6} nodes, {state:>7}: rounds {shown} s "
                f"({time.perf_counter() - started:.0f} s with start-up){outcome}",
                flush=True,
            )
    return results


def median_after_first(seconds: list[float]) -> float:
    """Median round, Ray's start-up round left out when there is more than one."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def report(results: dict[tuple[int, str], list[float]], nodes: list[int]) -> str:
    """The table: medians, Flower's over ours, each population over the reference."""
    reference = 1000 if 1000 in nodes else nodes[0]
    medians = {key: median_after_first(value) for key, value in results.items()}
    lines = [
        f"{'nodes':>7} | {'Flower (s)':>10} | {'indexed (s)':>11} | {'Flower/indexed':>14} | "
        f"Flower/Flower@{reference} | indexed/indexed@{reference}"
    ]
    for n in nodes:
        flower, ours = medians[n, "flower"], medians[n, "indexed"]
        lines.append(
            f"{n:>7,} | {flower:>10.2f} | {ours:>11.2f} | {flower / ours:>13.2f}x | "
            f"{flower / medians[reference, 'flower']:>17.2f}x | "
            f"{ours / medians[reference, 'indexed']:>18.2f}x"
        )
    return "\n".join(lines)


def plot(results: dict[tuple[int, str], list[float]], nodes: list[int], path: Path, title: str):
    """Median round against nodes (log x), both link states, quartiles as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(figsize=(6, 4))
    labels = {"flower": "Flower's InMemoryLinkState", "indexed": "IndexedInMemoryLinkState"}
    for state, marker in zip(LINK_STATES, ("o", "s"), strict=True):
        rounds = [np.array(results[n, state][1:] or results[n, state]) for n in nodes]
        median = np.array([np.median(r) for r in rounds])
        low = median - np.array([np.percentile(r, 25) for r in rounds])
        high = np.array([np.percentile(r, 75) for r in rounds]) - median
        axes.errorbar(
            nodes, median, yerr=[low, high], marker=marker, capsize=3, label=labels[state]
        )
    axes.set_xscale("log")
    axes.set_ylim(bottom=0)
    axes.set_xlabel("simulated nodes (about 100 clients per round)")
    axes.set_ylabel("median round (s)")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    """Parse the arguments; run every configuration or, with ``--one``, a single one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run, first left out")
    parser.add_argument("--clients", type=int, default=100, help="clients per round")
    parser.add_argument("--workload", choices=("engine", "main"), default="engine")
    parser.add_argument("--work", type=int, default=40, help="engine: matmuls per client")
    parser.add_argument(
        "--states", nargs="+", choices=LINK_STATES, default=list(LINK_STATES),
        help="link states to run (the table and plot need both)",
    )  # fmt: skip
    parser.add_argument("--plot", type=Path, default=Path("docs/population_round_time.png"))
    parser.add_argument("--one", nargs=2, metavar=("NODES", "STATE"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return

    print(
        f"{args.workload} workload, {args.clients} clients a round, {args.rounds} rounds a run, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} cores",
        flush=True,
    )
    results = run_all(args)
    if set(args.states) != set(LINK_STATES):
        for (nodes, state), seconds in results.items():
            print(f"{nodes:>7,} nodes, {state}: median round {median_after_first(seconds):.2f} s")
        return
    print(report(results, args.nodes))
    title = (
        f"{args.workload} workload, {args.clients} clients/round, "
        f"median of rounds 2-{args.rounds} (bars: quartiles), {os.cpu_count()} cores"
    )
    plot(results, args.nodes, args.plot, title)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
