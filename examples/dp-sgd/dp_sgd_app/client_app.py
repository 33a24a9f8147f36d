"""ClientApp: DP-SGD (Opacus) on the node's share of digits, with the node's epsilon."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lepton_flwr.dp.client_state import DPSGDHistory  # the pack: the node's accountant
from lepton_flwr.dp.dpsgd import train_dpsgd  # the pack: Opacus DP-SGD, secure noise

from dp_sgd_app.task import Net, load_data

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context):
    """Train the received model with DP-SGD; report the epsilon this node spent so far."""
    config = context.run_config
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    # The pack: the node's accountant history lives in context.state (and in a file with
    # state-dir in the node config), so the epsilon covers every round, not just this one.
    histories = DPSGDHistory(context, msg.content["config"])
    with histories.locked():
        loss, epsilon, history = train_dpsgd(
            model,
            x.numpy(),
            y.numpy(),
            num_outputs=10,
            epochs=config["local-epochs"],
            batch_size=config["batch-size"],
            lr=config["lr"],
            momentum=0.0,
            weight_decay=0.0,
            noise_multiplier=config["noise-multiplier"],
            max_grad_norm=config["max-grad-norm"],
            delta=config["delta"],
            history=histories.this_run(),
            earlier=histories.other_runs(),
        )
        histories.save(history)
    metrics = {"train-loss": loss, "client-epsilon": epsilon, "num-examples": len(y)}
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)
