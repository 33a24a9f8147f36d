"""ServerApp: HE-FedAvg; the server adds ciphertexts and never holds a secret key."""

import json
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from lepton_flwr.he import save_encrypted_arrays  # the pack
from lepton_flwr.strategies import HEFedAvg  # the pack, in place of Flower's FedAvg

from he_fedavg_app.task import Net, load_data, test

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Test accuracy of a plaintext model (HEFedAvg calls it on the initial model only)."""
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
    """Run the rounds, then save the encrypted model for the key holders."""
    out = output_folder(context.run_config, "out-dir", "he-fedavg")
    # The pack: the public key (no secret key) replaces nothing else of FedAvg's arguments;
    # fraction_evaluate=0: clients do not evaluate an encrypted model unless they opt in.
    strategy = HEFedAvg(
        context.run_config["he-public-context"],
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
    # The pack: the server cannot decrypt, so it saves the encrypted model.
    save_encrypted_arrays(result.arrays, out / "model.ckks.zip")
    train_metrics = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
    (out / "train_metrics.json").write_text(json.dumps(train_metrics, indent=1))
    log(INFO, "he-fedavg example: encrypted model and metrics saved in %s", out)
