"""DP-SGD cost: epoch time with Opacus / without, same model and data, one run.

``python -m simulations.bench_dpsgd [--batch-size 64] [--repeats 3]`` trains the
Fashion-MNIST CNN for one epoch on one client's share (6,000 images) without DP and
with each Opacus grad-sample mode, and prints median epoch times and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lepton_flwr.data import load_dataset
from lepton_flwr.dp.dpsgd import MODES, train_dpsgd
from lepton_flwr.models import build_model, train


def main() -> None:
    """Time the epochs and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = load_dataset({"name": "fashion_mnist", "root": "/usr/share/datasets/fashion-mnist"})
    x, y = data.x_train[: args.examples], data.y_train[: args.examples]
    common = dict(
        num_outputs=10,
        epochs=1,
        batch_size=args.batch_size,
        lr=0.05,
        momentum=0.0,
        weight_decay=0.0,
    )

    def run(mode: str | None) -> float:
        torch.manual_seed(0)
        model = build_model({"name": "cnn"}, (1, 28, 28), 10)
        start = time.perf_counter()
        if mode is None:
            train(model, x, y, **common)
        else:
            train_dpsgd(
                model,
                x,
                y,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                delta=1e-5,
                mode=mode,
                **common,
            )
        return time.perf_counter() - start

    times = {}
    for mode in (None, *MODES):  # interleaved repeats: the machine's load drifts
        times[mode or "no_dp"] = []
    for _ in range(args.repeats):
        for mode in (None, *MODES):
            times[mode or "no_dp"].append(run(mode))
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["no_dp"]
    print(
        f"CNN, {len(y)} examples, batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    for name, value in medians.items():
        print(f"  {name:10s} {value:6.2f} s  {value / base:5.2f}x")
    out = Path("outputs/bench_dpsgd")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {"median_s": medians, "ratio": {k: v / base for k, v in medians.items()}}, indent=2
        )
    )


if __name__ == "__main__":
    main()
