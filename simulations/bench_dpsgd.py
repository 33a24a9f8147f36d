"""DP-SGD cost: epoch time with Opacus / without, same model and data, one run.

``python -m simulations.bench_dpsgd [--batch-size 64] [--repeats 3] [--device cuda]
[--synthetic] [--model "cnn channels=[16,32] hidden=32 activation=tanh" | scatnet]`` trains
a Fashion-MNIST model (default: the CNN of ``conf/model/cnn.yaml``) for one epoch on one
client's share (6,000 images; ``--synthetic``: random images of that shape) without DP and
with each Opacus grad-sample mode, and prints median epoch times and their ratios. A model
with a fixed front (scatnet) is timed as it trains in a run: on cached features.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lepton_flwr.config import load_config
from lepton_flwr.data import load_dataset
from lepton_flwr.dp.dpsgd import MODES, train_dpsgd
from lepton_flwr.models import build_model, train
from simulations.sweep import model_overrides


def main() -> None:
    """Time the epochs and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--synthetic", action="store_true", help="random images, no dataset")
    parser.add_argument("--model", default="", help="model and options, e.g. 'cnn hidden=32'")
    args = parser.parse_args()
    model_cfg = load_config(model_overrides(args.model))["model"]
    if args.synthetic:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(args.examples, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, args.examples)
    else:
        data = load_dataset({"name": "fashion_mnist", "root": "/usr/share/datasets/fashion-mnist"})
        x, y = data.x_train[: args.examples], data.y_train[: args.examples]
    common = dict(num_outputs=10, epochs=1, batch_size=args.batch_size, lr=0.05, momentum=0.0)
    common.update(weight_decay=0.0, device=args.device)
    dp = dict(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def run(mode: str | None) -> float:
        torch.manual_seed(0)
        model = build_model(model_cfg, (1, 28, 28), 10)
        sync()
        start = time.perf_counter()
        if mode is None:
            train(model, x, y, **common)
        else:
            train_dpsgd(model, x, y, mode=mode, **dp, **common)
        sync()
        return time.perf_counter() - start

    run(None)  # CUDA start-up, cuDNN tuning and fixed-feature caching stay out of the timings
    run("ghost")
    times = {}
    for mode in (None, *MODES):  # interleaved repeats: the machine's load drifts
        times[mode or "no_dp"] = []
    for _ in range(args.repeats):
        for mode in (None, *MODES):
            times[mode or "no_dp"].append(run(mode))
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["no_dp"]
    print(
        f"model {args.model or 'cnn'}, {len(y)} examples, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
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
