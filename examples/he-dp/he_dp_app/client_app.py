"""ClientApp: local training on the node's share of digits; he_dp_mod clips, noises, encrypts."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lepton_flwr.mods import he_dp_mod  # the pack: clip, add a noise share, then encrypt

from he_dp_app.task import Net, load_data, train

# The pack: he_dp_mod on the whole app (it finds the secret key in the node or run config).
app = ClientApp(mods=[he_dp_mod])


@app.train()
def train_fn(msg: Message, context: Context):
    """Train the received (already decrypted) model; he_dp_mod makes the reply a noise share."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss = train(model, x, y, context.run_config["local-epochs"], context.run_config["lr"])
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
