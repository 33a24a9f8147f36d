"""ClientApp: local training on the node's share of digits (unchanged by DP-FedAvg)."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dp_fedavg_app.task import Net, load_data, train

# Nothing of the pack here: DPFedAvg clips and adds the noise on the server.
app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context):
    """Train the received model on this node's data."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss = train(model, x, y, context.run_config["local-epochs"], context.run_config["lr"])
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
