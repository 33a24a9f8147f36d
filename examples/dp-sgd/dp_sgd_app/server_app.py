"""ServerApp: federated averaging of DP-SGD updates; the round's epsilon is the largest."""

import json
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

# The pack: FedAvg whose round metrics take the largest client-epsilon, not the mean.
from lepton_flwr.strategies import CheckedFedAvg

from dp_sgd_app.task import Net, load_data, test

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Loss and accuracy of the global model on the held-out test set."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(model, *load_data())
    return MetricRecord({"loss": loss, "accuracy": accuracy})


def output_folder(run_config, key: str, example: str) -> Path:
    """The folder named by ``run_config[key]``, made if missing; absolute paths only.

    The ServerApp runs in the SuperLink's working folder, not yours: a relative path would
    put the files there, so it is refused. Empty: ``~/lepton-flwr-examples/<example>``.
    """
    configured = str(run_config[key])
    folder = Path(configured) if configured else Path.home() / "lepton-flwr-examples" / example
    if not folder.is_absolute():
        raise ValueError(f"{key} must be an absolute path, got '{configured}'")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds; save the model, the clients' largest epsilon and the test accuracy."""
    out = output_folder(context.run_config, "out-dir", "dp-sgd")
    strategy = CheckedFedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_available_nodes=context.run_config["min-nodes"],
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=context.run_config["num-server-rounds"],
        evaluate_fn=central_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), out / "model.pt")
    rounds = result.train_metrics_clientapp  # {round: train-loss, client-epsilon (largest)}
    results = {
        "train": {r: dict(m) for r, m in rounds.items()},
        "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log(
        INFO,
        "dp-sgd example: clients' epsilon at most %.3g; model saved in %s",
        rounds[max(rounds)]["client-epsilon"],
        out,
    )
