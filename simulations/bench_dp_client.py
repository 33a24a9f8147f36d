"""Client-level DP privacy-utility: DP-FedAvg accuracy against ε with many clients.

``python -m simulations.bench_dp_client [--clients 1000] [--rounds 30] [--epsilons 1,3,8]
[--he-epsilons 3] [--seeds 0,1,2]`` splits Fashion-MNIST across ``--clients`` clients,
samples them with Poisson sampling (probability q) and trains the small CNN with DP-FedAvg
at each target ε (noise calibrated for the whole run, δ = 1e-5), next to the same run
without DP, and with HE + DP at the ``--he-epsilons``. Every run repeats for each seed.
Clients run in this process one after the other (``InProcessGrid``): Ray's per-message
overhead would dominate with a thousand clients. Prints mean accuracies and the HE + DP -
central DP gap, and writes ``outputs/bench_dp_client/`` (``results.json``, PNG). Finished
runs are kept in ``results.json`` and not repeated when the command is run again with the
same settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.apps.keyholder import evaluate_encrypted_model
from lepton_flwr.apps.server import ENCRYPTED_MODEL_FILE, run_server
from lepton_flwr.config import load_config


def run(overrides: str, clients: int, out: Path) -> dict:
    """One in-process run; returns its last metrics row (plus the key holder's test of HE runs)."""
    cfg = load_config(f"{overrides} simulation.num_supernodes={clients} output_dir={out}")
    grid = InProcessGrid(make_client_app(cfg), clients, keep_replies=False)
    folder = run_server(grid, cfg)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    if (folder / ENCRYPTED_MODEL_FILE).is_file():
        metrics = evaluate_encrypted_model(
            cfg, folder / ENCRYPTED_MODEL_FILE, cfg["he"]["secret_context_path"]
        )
        last.update({f"keyholder_{k}": v for k, v in metrics.items()})
    return last


def main() -> None:
    """Run the sweep and print accuracy against ε."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument(
        "--model", default="channels=[16,32] hidden=32 activation=tanh", help="CNN options"
    )
    parser.add_argument("--epsilons", default="1,3,8", help="central DP-FedAvg runs")
    parser.add_argument("--he-epsilons", default="3", help="HE + DP runs ('' for none)")
    parser.add_argument("--seeds", default="0", help="each run repeats for every seed")
    parser.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=True, help="the no-DP run"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_dp_client"))
    args = parser.parse_args()
    out = args.out
    common = " ".join(
        [
            f"num_rounds={args.rounds} strategy.fraction_evaluate=0.02",
            "strategy.min_evaluate_nodes=2 train.batch_size=16",
            f"train.local_epochs={args.local_epochs}",
            *(f"model.{option}" for option in args.model.split()),
        ]
    )
    dp = (
        f"privacy.noise_multiplier=null privacy.sample_rate={args.sample_rate} "
        f"privacy.clip_norm={args.clip_norm}"
    )
    plan = {}
    if args.baseline:
        plan["no_dp"] = f"strategy=fedavg strategy.fraction_train={args.sample_rate}"
    for eps in _floats(args.epsilons):
        plan[f"dp_eps_{eps:g}"] = f"strategy=dp_fedavg {dp} privacy.target_epsilon={eps}"
    if _floats(args.he_epsilons):
        from lepton_flwr.he import CKKSParams, write_keys

        secret, public = write_keys(CKKSParams(), out / "keys")
        keys = f"he.secret_context_path={secret} he.public_context_path={public}"
        for eps in _floats(args.he_epsilons):
            plan[f"he_dp_eps_{eps:g}"] = (
                f"strategy=he_dp_fedavg {keys} {dp} privacy.target_epsilon={eps}"
            )

    results_file = out / "results.json"
    done = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, overrides in plan.items():
            key, full = f"{name}/seed{seed}", f"{common} {overrides} seed={seed}"
            if done.get(key, {}).get("overrides") != full:
                row = run(full, args.clients, out / name / f"seed{seed}")
                done[key] = {"overrides": full, **row}
                results_file.write_text(json.dumps(done, indent=2))

    summary = _summarize(done, plan, common)
    print(
        f"\nFashion-MNIST CNN ({args.model}), {args.clients} clients, Poisson q="
        f"{args.sample_rate}, {args.rounds} rounds, {args.local_epochs} local epochs"
    )
    for name, stats in summary.items():
        eps = "no DP" if stats["epsilon"] is None else f"epsilon={stats['epsilon']:.2f}"
        print(
            f"  {name:12s} test accuracy {stats['mean']:.4f} (sd {stats['sd']:.4f}, "
            f"runs {stats['runs']}) {eps}, {stats['round_seconds']:.1f} s/round"
        )
    for eps in _floats(args.he_epsilons):
        he, central = summary[f"he_dp_eps_{eps:g}"], summary.get(f"dp_eps_{eps:g}")
        if central:
            gap = 100 * (he["mean"] - central["mean"])
            print(f"  HE + DP - central DP at epsilon {eps:g}: {gap:+.2f} points")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(summary, out / "accuracy_vs_epsilon.png")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _summarize(done: dict, plan: dict, common: str) -> dict:
    """Mean and standard deviation of the test accuracy of each planned run.

    Over every seed that finished with the present settings: this invocation's seeds and
    those of earlier invocations kept in ``results.json``.
    """
    summary = {}
    for name, overrides in plan.items():
        rows = [
            row
            for key, row in done.items()
            if key.startswith(f"{name}/seed")
            and row["overrides"] == f"{common} {overrides} seed={key.rsplit('seed', 1)[1]}"
        ]
        accuracies = [r.get("central_accuracy", r.get("keyholder_accuracy")) for r in rows]
        summary[name] = {
            "mean": statistics.mean(accuracies),
            "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "runs": len(rows),
            "epsilon": rows[0].get("epsilon"),
            "round_seconds": statistics.median(r["round_seconds"] for r in rows),
        }
    return summary


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for prefix, label in (("dp_eps", "DP-FedAvg"), ("he_dp_eps", "HE + DP")):
        points = sorted(
            (r["epsilon"], r["mean"], r["sd"]) for k, r in summary.items() if k.startswith(prefix)
        )
        if points:
            eps, mean, sd = zip(*points, strict=True)
            ax.errorbar(eps, mean, yerr=sd, marker="o", capsize=3, label=label)
    if "no_dp" in summary:
        ax.axhline(summary["no_dp"]["mean"], color="grey", linestyle="--", label="no DP")
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
