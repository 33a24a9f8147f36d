"""ServerApp: HE + DP; clients add noise shares under encryption, the server only adds."""

import json
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from lepton_flwr.he import save_encrypted_arrays  # the pack
from lepton_flwr.strategies import HEDPFedAvg  # the pack, in place of Flower's FedAvg

from he_dp_app.task import Net, load_data, test

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
    """Run the rounds; save the encrypted model and the epsilon per round."""
    config = context.run_config
    out = output_folder(config, "out-dir", "he-dp")
    # The pack: the public key, and DP-FedAvg's settings; each sampled client clips its
    # update to clip-norm and adds its share of the noise before encrypting.
    strategy = HEDPFedAvg(
        config["he-public-context"],
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
    # The pack: the server cannot decrypt, so it saves the encrypted model.
    save_encrypted_arrays(result.arrays, out / "model.ckks.zip")
    rounds = result.train_metrics_clientapp  # {round: epsilon, delta, clients-reported, ...}
    (out / "train_metrics.json").write_text(
        json.dumps({r: dict(m) for r, m in rounds.items()}, indent=1)
    )
    log(
        INFO,
        "he-dp example: epsilon %.3g; encrypted model saved in %s",
        rounds[max(rounds)]["epsilon"],
        out,
    )
