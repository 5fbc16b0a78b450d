"""The ClientApp: local training on this node's partition, wrapped by securefed's client handlers.

The trained model stays on the node: securefed's handler turns it into an update,
hands it to the aggregation protocol, and sends only the protocol's payload. The node's
security settings (seed, DP, expected federation size) come from its own ``node_config``
(``flower-supernode --node-config``), never from the run config, which the server chooses.
"""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from securefed.flower import SecureClient
from securefed_app import task

app = ClientApp()


def train(msg: Message, context: Context) -> Message:
    """An ordinary Flower training function: global model in, trained model and example count out."""
    config = msg.content["config"]
    partition = int(context.node_config["partition-id"])
    dataset, _ = task.data(partition, int(context.node_config["num-partitions"]))
    net = task.model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = task.train(
        net, dataset, epochs=int(config["local-epochs"]), batch_size=int(config["batch-size"]), lr=float(config["lr"]),
        seed=task.train_seed(task.node_settings(context.node_config), int(config["server-round"]), partition),
    )
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(dataset)})
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """An ordinary Flower evaluation function: the global model's loss and accuracy on this node's data. With
    secure aggregation the server sees only their example-weighted means over the nodes (dp=false only)."""
    dataset, _ = task.data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    net = task.model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics = MetricRecord({**task.evaluate(net, dataset), "num-examples": len(dataset)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def mine(context: Context) -> dict:
    """This node's own settings (SecureClient's factories cannot read context.run_config)."""
    return task.node_settings(context.node_config)


SecureClient(
    lambda context: task.protocol(mine(context)),
    phases=task.PHASES,
    privacy=lambda context: task.privacy(mine(context)),
    seed=lambda context: task.seed(mine(context)),
    num_nodes=lambda context: mine(context)["num-nodes"],
).register(app, train, evaluate)
