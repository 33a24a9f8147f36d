"""Client-level membership AUC and the one-run ε lower bound against the claimed ε.

``python -m simulations.audit_curve [--out docs/audit_auc_vs_epsilon.png]`` runs the
canary audit (``lepton_flwr.audit.canaries``) of DP-FedAvg at several noise multipliers
(5 rounds, Poisson q = 0.5, 600 clients of which 500 canaries, C = 1, δ = 1e-5) and of
plain FedAvg, and plots the canaries' membership AUC and the lower bound on ε against the
ε the strategy claims, with the bound's ceiling (4.43: the bound had every guess been
right; only a claim below it can be refuted). ``--replot`` redraws from the stored JSON,
adding the ceiling where it is missing (it depends only on the canary count, δ and the
guess counts), without rerunning the audits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies import DPFedAvg

from lepton_flwr.audit.canaries import audit_client_level
from lepton_flwr.audit.epsilon import epsilon_ceiling

NOISE_MULTIPLIERS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0)
NODES = 600
CANARIES = 500  # audit_client_level's default: the other 100 nodes are ordinary clients
DELTA = 1e-5


def main() -> None:
    """Run the audits and draw the curve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/audit_auc_vs_epsilon.png"))
    parser.add_argument(
        "--replot", action="store_true", help="redraw from the stored JSON, no audits"
    )
    args = parser.parse_args()
    if args.replot:
        points = [_with_ceiling(p) for p in json.loads(args.out.with_suffix(".json").read_text())]
        args.out.with_suffix(".json").write_text(json.dumps(points, indent=2) + "\n")
        _plot(points, args.out)
        return
    logging.getLogger("flwr").setLevel(logging.WARNING)
    points = []
    for z in NOISE_MULTIPLIERS:
        strategy = DPFedAvg(
            noise_multiplier=z, clip_norm=1.0, delta=1e-5, sample_rate=0.5,
            min_available_nodes=NODES, fraction_evaluate=0.0,
        )  # fmt: skip
        audit = audit_client_level(
            strategy, strategy.epsilon, DELTA, 1.0, rounds=5, canaries=CANARIES
        )
        points.append({"noise_multiplier": z, **_figures(audit)})
    plain = FedAvg(min_available_nodes=NODES, min_train_nodes=NODES, fraction_evaluate=0.0)
    audit = audit_client_level(plain, lambda: math.inf, DELTA, 1.0, rounds=5, canaries=CANARIES)
    points.append({"noise_multiplier": 0.0, **_figures(audit)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=2) + "\n")
    _plot(points, args.out)
    for p in points:
        print(
            f"z={p['noise_multiplier']:<4} claimed eps={p['claimed_epsilon']:<8.3g} "
            f"lower bound={p['epsilon_lower_bound']:.3g} ceiling={p['epsilon_ceiling']:.3g} "
            f"AUC={p['auc']:.3f} "
            f"TPR@0.1%={p['tpr_at_0.1%_fpr']:.3f}"
        )


def _figures(audit: dict) -> dict:
    keys = (
        "claimed_epsilon",
        "epsilon_lower_bound",
        "epsilon_ceiling",
        "canaries",
        "auc",
        "tpr_at_0.1%_fpr",
        "tpr_at_1%_fpr",
    )
    return {key: audit[key] for key in keys}


def _with_ceiling(point: dict) -> dict:
    """A stored point with its canary count and ceiling (computed as the audit does)."""
    canaries = point.get("canaries", CANARIES)
    return {**point, "canaries": canaries, "epsilon_ceiling": epsilon_ceiling(canaries, DELTA)}


def _plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [p for p in points if math.isfinite(p["claimed_epsilon"])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    eps = [p["claimed_epsilon"] for p in private]
    left.semilogx(eps, [p["auc"] for p in private], "o-", label="DP-FedAvg")
    plain = [p for p in points if not math.isfinite(p["claimed_epsilon"])]
    if plain:
        left.axhline(plain[0]["auc"], color="r", linestyle="--", label="FedAvg (no DP)")
    left.axhline(0.5, color="k", linestyle=":", linewidth=0.8, label="chance")
    left.set_xlabel("claimed ε (client level, δ = 1e-5)")
    left.set_ylabel("canary membership AUC")
    left.legend(fontsize=8)
    right.loglog(eps, eps, "k:", linewidth=0.8, label="claimed")
    bounds = [max(p["epsilon_lower_bound"], 1e-2) for p in private]
    right.loglog(eps, bounds, "o-", label="one-run lower bound (95 %)")
    ceiling = max(p["epsilon_ceiling"] for p in points)
    right.axhline(
        ceiling, color="r", linestyle="--", label=f"ceiling ({ceiling:.2f}): every guess right"
    )
    low, high = right.get_xlim()
    right.axvspan(ceiling, high, color="0.9", zorder=0, label="claims it cannot refute")
    right.set_xlim(low, high)
    right.set_xlabel("claimed ε")
    right.set_ylabel("ε")
    right.legend(fontsize=8)
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    for ax in (left, right):  # plain numbers on the log axes, not 2 × 10⁰ overprinted
        ax.xaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
