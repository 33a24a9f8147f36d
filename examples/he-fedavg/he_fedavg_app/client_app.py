"""ClientApp: local training on the node's share of digits, updates encrypted by he_mod."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lepton_flwr.mods import he_mod  # the pack: decrypts the model in, encrypts the update out

from he_fedavg_app.task import Net, load_data, train

# The pack: he_mod on the whole app (it finds the secret key in the node or run config).
app = ClientApp(mods=[he_mod])


@app.train()
def train_fn(msg: Message, context: Context):
    """Train the received (already decrypted) model; he_mod encrypts the reply."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss = train(model, x, y, context.run_config["local-epochs"], context.run_config["lr"])
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
