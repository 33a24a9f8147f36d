"""ServerApp: DP-FedAvg, client-level differential privacy with the epsilon per round."""

import json
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from lepton_flwr.strategies import DPFedAvg  # the pack, in place of Flower's FedAvg

from dp_fedavg_app.task import Net, load_data, test

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Loss and accuracy of the released (noised) model on the held-out test set."""
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
    """Run the rounds; save the model, epsilon per round and test accuracy per round."""
    config = context.run_config
    out = output_folder(config, "out-dir", "dp-fedavg")
    # The pack: DPFedAvg samples the clients itself (Poisson, rate sample-rate), clips each
    # update to clip-norm and adds Gaussian noise; the accountant tracks epsilon at delta.
    strategy = DPFedAvg(
        noise_multiplier=config["noise-multiplier"],
        clip_norm=config["clip-norm"],
        sample_rate=config["sample-rate"],
        delta=config["delta"],
        min_available_nodes=config["min-nodes"],
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=config["num-server-rounds"],
        evaluate_fn=central_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), out / "model.pt")
    rounds = result.train_metrics_clientapp  # {round: epsilon, delta, noise-multiplier, ...}
    results = {
        "train": {r: dict(m) for r, m in rounds.items()},
        "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log(
        INFO,
        "dp-fedavg example: epsilon %.3g; model saved in %s",
        rounds[max(rounds)]["epsilon"],
        out,
    )
