"""ClientApp for a deployment: HE + DP, each SuperNode's own key and privacy floor."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

# The pack: privacy_floor_mod holds the node to its own floor (dp-max-clip-norm,
# dp-min-share-noise-multiplier in its node config) whatever the server asks; he_dp_mod
# clips, adds this node's noise share and encrypts.
from lepton_flwr.mods import he_dp_mod, privacy_floor_mod

from deployment_app.task import Net, load_data, train

app = ClientApp(mods=[privacy_floor_mod, he_dp_mod])


@app.train()
def train_fn(msg: Message, context: Context):
    """Train the received (already decrypted) model on this node's partition."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss = train(model, x, y, context.run_config["local-epochs"], context.run_config["lr"])
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
