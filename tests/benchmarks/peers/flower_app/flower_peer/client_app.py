"""The peer's ClientApp: raybloom's client code (`local_train`, `evaluate_global`) on this node's partition."""

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from raybloom.federated.client import evaluate_global, local_train
from raybloom.spec import JobSpec

app = ClientApp()


@app.train()
def train(msg: Message, context) -> Message:
    config = msg.content["config"]
    spec_json = str(config["spec"])
    spec = JobSpec.model_validate_json(spec_json)
    new, metrics = local_train(spec, int(context.node_config["partition-id"]), msg.content["arrays"].to_torch_state_dict(),
                               int(config["server-round"]), spec.optim.lr, 0.0, spec_json)
    return Message(content=RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context) -> Message:
    metrics = evaluate_global(str(msg.content["config"]["spec"]), int(context.node_config["partition-id"]),
                              msg.content["arrays"].to_torch_state_dict())
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
