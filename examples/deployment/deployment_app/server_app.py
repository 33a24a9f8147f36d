"""ServerApp for a deployment: HE + DP with checkpoints, so a restarted SuperLink resumes."""

import json
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from lepton_flwr.he import save_encrypted_arrays  # the pack
from lepton_flwr.strategies import HEDPFedAvg  # the pack, in place of Flower's FedAvg

from deployment_app.task import Net, load_data, test

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Test accuracy of a plaintext model (HEDPFedAvg calls it on the initial model only)."""
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
    """Run (or resume) the rounds; save the encrypted model and epsilon next to the checkpoint."""
    config = context.run_config
    # On the SuperLink's machine; an absolute path (the ServerApp runs in the SuperLink's
    # working folder). The run's checkpoint.zip goes here: start the same run again with
    # the same folder and it continues after the last checkpointed round.
    run_dir = output_folder(config, "checkpoint-dir", "deployment")
    strategy = HEDPFedAvg(
        config["he-public-context"],
        noise_multiplier=config["noise-multiplier"],
        clip_norm=config["clip-norm"],
        sampling="fixed",  # every round the same number of nodes: sample-rate x connected
        sample_rate=config["sample-rate"],
        delta=config["delta"],
        min_available_nodes=config["min-nodes"],
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=config["num-server-rounds"],
        evaluate_fn=central_evaluate,
        checkpoint_dir=run_dir,  # the pack: checkpoints and resume
        checkpoint_key=config["checkpoint-key"] or None,  # None: ~/.config/lepton-flwr/
    )
    save_encrypted_arrays(result.arrays, run_dir / "model.ckks.zip")
    rounds = result.train_metrics_clientapp  # {round: epsilon, delta}
    (run_dir / "train_metrics.json").write_text(
        json.dumps({r: dict(m) for r, m in rounds.items()}, indent=1)
    )
    log(
        INFO,
        "deployment example: epsilon %.3g; encrypted model in %s",
        rounds[max(rounds)]["epsilon"],
        run_dir,
    )
