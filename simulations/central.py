"""Train the config's model centrally on the pooled client data: the reference for FL.

``python -m simulations.central +experiment=loans_linreg`` prints the global-test
metrics of the same model trained with the same optimizer for ``num_rounds`` epochs on
all the data at once, and, for linear regression, of the least-squares optimum.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from lepton_flwr.apps.common import model_for
from lepton_flwr.config import load_config
from lepton_flwr.data import load_dataset
from lepton_flwr.models import evaluate, resolve_device, train


def central_metrics(cfg: dict) -> dict[str, dict[str, float]]:
    """Global-test metrics of centrally trained references for ``cfg``."""
    data = load_dataset(cfg["dataset"], cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = model_for(cfg, data)
    t = cfg["train"]
    device = resolve_device(cfg["device"])
    train(
        model,
        data.x_train,
        data.y_train,
        num_outputs=data.num_outputs,
        epochs=cfg["num_rounds"] * t["local_epochs"],
        batch_size=t["batch_size"],
        lr=t["lr"],
        momentum=t["momentum"],
        weight_decay=t["weight_decay"],
        device=device,
        seed=cfg["seed"],
    )
    out = {"central_sgd": evaluate(model, data.x_test, data.y_test, num_outputs=data.num_outputs)}
    if cfg["model"]["name"] == "linreg":
        from sklearn.linear_model import LinearRegression

        ols = LinearRegression().fit(data.x_train.reshape(len(data.x_train), -1), data.y_train)
        pred = ols.predict(data.x_test.reshape(len(data.x_test), -1))
        residual = float(np.sum((data.y_test - pred) ** 2))
        spread = float(np.sum((data.y_test - data.y_test.mean()) ** 2))
        out["least_squares"] = {"r2": 1 - residual / spread, "loss": residual / len(pred)}
    return out


def main(argv: list[str]) -> None:
    """Print the central references for the overrides in ``argv`` as JSON."""
    print(json.dumps(central_metrics(load_config(argv)), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
