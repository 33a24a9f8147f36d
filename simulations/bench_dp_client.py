"""Client-level DP privacy-utility: DP-FedAvg accuracy against ε with many clients.

``python -m simulations.bench_dp_client [--clients 1000] [--rounds 30] [--epsilons 1,3,8]``
splits Fashion-MNIST across ``--clients`` clients, samples them with Poisson sampling
(probability q) and trains the CNN with DP-FedAvg at each target ε (noise calibrated for
the whole run, δ = 1e-5), next to the same run without DP. Clients run in this process
one after the other (``InProcessGrid``): Ray's per-message overhead would dominate with
a thousand clients. Prints a table and writes ``outputs/bench_dp_client/`` (JSON, PNG).
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument(
        "--he-epsilons", default="3", help="also run HE + DP at these ε ('' for none)"
    )
    args = parser.parse_args()
    out = Path("outputs/bench_dp_client")
    common = (
        f"num_rounds={args.rounds} strategy.fraction_evaluate=0.02 strategy.min_evaluate_nodes=2 "
        f"train.batch_size=16"
    )
    results = {
        "no_dp": run(
            f"{common} strategy=fedavg strategy.fraction_train={args.sample_rate}",
            args.clients,
            out / "no_dp",
        )
    }
    for eps in [float(e) for e in args.epsilons.split(",")]:
        overrides = (
            f"{common} strategy=dp_fedavg privacy.noise_multiplier=null "
            f"privacy.target_epsilon={eps} privacy.sample_rate={args.sample_rate} "
            f"privacy.clip_norm={args.clip_norm}"
        )
        results[f"eps_{eps:g}"] = run(overrides, args.clients, out / f"eps_{eps:g}")
    if args.he_epsilons:
        from lepton_flwr.he import CKKSParams, write_keys

        secret, public = write_keys(CKKSParams(), out / "keys")
        keys = f"he.secret_context_path={secret} he.public_context_path={public}"
        for eps in [float(e) for e in args.he_epsilons.split(",")]:
            overrides = (
                f"{common} strategy=he_dp_fedavg {keys} privacy.noise_multiplier=null "
                f"privacy.target_epsilon={eps} privacy.sample_rate={args.sample_rate} "
                f"privacy.clip_norm={args.clip_norm}"
            )
            results[f"he_dp_eps_{eps:g}"] = run(overrides, args.clients, out / f"he_dp_eps_{eps:g}")
    print(
        f"\nFashion-MNIST CNN, {args.clients} clients, Poisson q={args.sample_rate}, "
        f"{args.rounds} rounds"
    )
    for name, row in results.items():
        eps = row.get("epsilon")
        shown = "no DP" if eps is None else f"epsilon={eps:.2f}"
        accuracy = row.get("central_accuracy", row.get("keyholder_accuracy"))
        seconds = row["round_seconds"]
        print(f"  {name:12s} test accuracy {accuracy:.4f} ({shown}), {seconds:.1f} s/round")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "accuracy_vs_epsilon.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = sorted(
        (r["epsilon"], r["central_accuracy"]) for k, r in results.items() if k.startswith("eps")
    )
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*zip(*dp, strict=True), marker="o", label="DP-FedAvg")
    ax.axhline(results["no_dp"]["central_accuracy"], color="grey", linestyle="--", label="no DP")
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
