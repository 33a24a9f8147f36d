"""Privacy-utility sweeps: named runs repeated over seeds, resumable, summarized and plotted.

Both utility benchmarks (client-level ``bench_dp_client``, sample-level
``bench_dpsgd_utility``) describe their runs as a plan, ``{name: Hydra overrides}``, and
hand it to :func:`run_plan`. Clients run in this process one after the other
(``InProcessGrid``), the same ClientApp and ServerApp code as under Ray without Ray's
start-up and per-message cost. Finished runs are kept in ``results.json`` and not repeated
when a sweep is run again with the same settings.
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


def add_sweep_arguments(
    parser: argparse.ArgumentParser,
    *,
    clients: int,
    rounds: int,
    local_epochs: int,
    model: str,
    baseline: bool,
    out: str,
) -> None:
    """Add the options every sweep has (the defaults given here).

    ``--clients``, ``--rounds``, ``--local-epochs``, ``--model``, ``--epsilons``,
    ``--seeds``, ``--baseline``, ``--out`` and ``--overrides``.
    """
    parser.add_argument("--clients", type=int, default=clients)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--local-epochs", type=int, default=local_epochs)
    parser.add_argument(
        "--model",
        default=model,
        help="model and/or its options, e.g. 'scatnet' or 'cnn activation=tanh' (default: cnn)",
    )
    parser.add_argument("--epsilons", default="1,3,8", help="target epsilons of the DP runs")
    parser.add_argument("--seeds", default="0", help="each run repeats for every seed")
    parser.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=baseline, help="no-DP run"
    )
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--overrides", default="", help="more Hydra overrides for every run")


def model_overrides(options: str) -> list[str]:
    """``"cnn hidden=32"`` -> ``["model=cnn", "model.hidden=32"]`` (a bare word names the model)."""
    return [f"model.{o}" if "=" in o else f"model={o}" for o in options.split()]


def common_overrides(args: argparse.Namespace, *settings: str) -> str:
    """The overrides every run of a sweep shares.

    Rounds and local epochs, the sweep's own ``settings``, then the model and
    ``--overrides`` (given last, so that they win).
    """
    return " ".join(
        [
            f"num_rounds={args.rounds} train.local_epochs={args.local_epochs}",
            *settings,
            *model_overrides(args.model),
            *args.overrides.split(),
        ]
    )


def run_in_process(overrides: str, clients: int, out: Path) -> dict:
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


def run_plan(plan: dict[str, str], common: str, clients: int, seeds: str, out: Path) -> dict:
    """Run every planned run for every seed (skipping those already in ``results.json``).

    Parameters
    ----------
    plan : dict[str, str]
        Run name -> Hydra overrides particular to it.
    common : str
        Overrides every run shares.
    clients : int
        Number of simulated clients.
    seeds : str
        Comma-separated seeds (the config's ``seed``).
    out : Path
        Folder for the runs' outputs, ``results.json`` and ``summary.json``.

    Returns
    -------
    dict
        Per run name: mean and standard deviation of the test accuracy over every seed that
        finished with the present settings (this call's and earlier calls'), ε, runs, median
        round seconds.
    """
    results_file = out / "results.json"
    done = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def full(overrides: str, seed: int | str) -> str:  # also what marks a finished run
        return f"{common} {overrides} seed={seed}"

    for seed in [int(s) for s in seeds.split(",")]:
        for name, overrides in plan.items():
            key = f"{name}/seed{seed}"
            if done.get(key, {}).get("overrides") != full(overrides, seed):
                row = run_in_process(full(overrides, seed), clients, out / name / f"seed{seed}")
                done[key] = {"overrides": full(overrides, seed), **row}
                results_file.write_text(json.dumps(done, indent=2))

    summary = {}
    for name, overrides in plan.items():
        rows = [
            row
            for key, row in done.items()
            if key.startswith(f"{name}/seed")
            and row["overrides"] == full(overrides, key.rsplit("seed", 1)[1])
        ]
        accuracies = [r.get("central_accuracy", r.get("keyholder_accuracy")) for r in rows]
        summary[name] = {
            "mean": statistics.mean(accuracies),
            "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "runs": len(rows),
            "epsilon": rows[0].get("epsilon", rows[0].get("client_epsilon")),
            "round_seconds": statistics.median(r["round_seconds"] for r in rows),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(title: str, summary: dict) -> None:
    """One line per run: mean test accuracy, its spread, ε and round time."""
    print(f"\n{title}")
    for name, stats in summary.items():
        eps = "no DP" if stats["epsilon"] is None else f"epsilon={stats['epsilon']:.2f}"
        print(
            f"  {name:14s} test accuracy {stats['mean']:.4f} (sd {stats['sd']:.4f}, "
            f"runs {stats['runs']}) {eps}, {stats['round_seconds']:.1f} s/round"
        )


def plot_summary(summary: dict, series: dict[str, str], path: Path) -> None:
    """Accuracy against ε, one line per run-name prefix in ``series`` (prefix -> label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for prefix, label in series.items():
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


def floats(text: str) -> list[float]:
    """``"1,3,8"`` -> ``[1.0, 3.0, 8.0]``; an empty string gives an empty list."""
    return [float(v) for v in text.split(",") if v.strip()]
