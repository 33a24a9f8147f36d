"""Client-level DP privacy-utility: DP-FedAvg accuracy against ε with many clients.

``python -m simulations.bench_dp_client [--clients 1000] [--rounds 30] [--epsilons 1,3,8]
[--he-epsilons 3] [--seeds 0,1,2]`` splits Fashion-MNIST across ``--clients`` clients,
samples them with Poisson sampling (probability q) and trains a small tanh CNN (the main
job's ScatterNet: ``--model scatnet --overrides train.lr=0.02``) with DP-FedAvg at each
target ε (noise calibrated for the whole run, δ = 1e-5), next to the same run without DP,
and with HE + DP at the ``--he-epsilons``; every run repeats for each seed. Prints mean
accuracies and the HE + DP - central DP gap, and writes ``outputs/bench_dp_client/``
(``results.json``, ``summary.json``, PNG).
"""

from __future__ import annotations

import argparse

from simulations.sweep import (
    add_sweep_arguments,
    common_overrides,
    floats,
    plot_summary,
    print_summary,
    run_plan,
)


def main() -> None:
    """Run the sweep and print accuracy against ε."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--he-epsilons", default="3", help="HE + DP runs ('' for none)")
    add_sweep_arguments(
        parser,
        clients=1000,
        rounds=30,
        local_epochs=5,
        model="channels=[16,32] hidden=32 activation=tanh",
        baseline=True,
        out="outputs/bench_dp_client",
    )
    args = parser.parse_args()
    common = common_overrides(
        args,
        "strategy.fraction_evaluate=0.02 strategy.min_evaluate_nodes=2 train.batch_size=16",
    )
    dp = (
        f"privacy.noise_multiplier=null privacy.sample_rate={args.sample_rate} "
        f"privacy.clip_norm={args.clip_norm}"
    )
    plan = {}
    if args.baseline:
        plan["no_dp"] = f"strategy=fedavg strategy.fraction_train={args.sample_rate}"
    for eps in floats(args.epsilons):
        plan[f"dp_eps_{eps:g}"] = f"strategy=dp_fedavg {dp} privacy.target_epsilon={eps}"
    if floats(args.he_epsilons):
        from lepton_flwr.he import CKKSParams, write_keys
        from lepton_flwr.he.keys import PUBLIC_CONTEXT_FILE, SECRET_CONTEXT_FILE

        # Keep the keys of earlier invocations: their encrypted models stay readable.
        secret, public = (
            args.out / "keys" / SECRET_CONTEXT_FILE,
            args.out / "keys" / PUBLIC_CONTEXT_FILE,
        )
        if not (secret.is_file() and public.is_file()):
            secret, public = write_keys(CKKSParams(), args.out / "keys")
        keys = f"he.secret_context_path={secret} he.public_context_path={public}"
        for eps in floats(args.he_epsilons):
            plan[f"he_dp_eps_{eps:g}"] = (
                f"strategy=he_dp_fedavg {keys} {dp} privacy.target_epsilon={eps}"
            )

    summary = run_plan(plan, common, args.clients, args.seeds, args.out)
    print_summary(
        f"Fashion-MNIST, model {args.model}, {args.clients} clients, Poisson q="
        f"{args.sample_rate}, {args.rounds} rounds, {args.local_epochs} local epochs",
        summary,
    )
    for eps in floats(args.he_epsilons):
        he, central = summary[f"he_dp_eps_{eps:g}"], summary.get(f"dp_eps_{eps:g}")
        if central:
            gap = 100 * (he["mean"] - central["mean"])
            print(f"  HE + DP - central DP at epsilon {eps:g}: {gap:+.2f} points")
    plot_summary(
        summary,
        {"dp_eps": "DP-FedAvg", "he_dp_eps": "HE + DP"},
        args.out / "accuracy_vs_epsilon.png",
    )


if __name__ == "__main__":
    main()
