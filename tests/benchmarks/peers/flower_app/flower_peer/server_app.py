"""The peer's ServerApp: Flower's FedAvg (`strategy.start`); after every round the global model is validated
on the server (Flower's `evaluate_fn`, each round's metrics logged to MLflow) and evaluated on every client
(as raybloom's job does each round); the test split at the end."""

import mlflow
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

from raybloom import data, engine, timeline
from raybloom import spec as spec_mod
from raybloom.objective import make_objective

app = ServerApp()


@app.main()
def main(grid, context) -> None:
    timeline.mark("serverapp_started")
    cfg = context.run_config
    rounds = int(cfg["num-server-rounds"])
    spec = spec_mod.load(str(cfg["job"]), [f"federated.rounds={rounds}"])
    dataset = data.load(spec.data)  # prepared once here; the clients read the same folder
    spec = spec.with_overrides({"data.path": str(dataset.meta["folder"])})
    model, objective = engine.build(spec, dataset), make_objective(spec, dataset)
    mlflow.set_tracking_uri(str(cfg["tracking-uri"]))
    mlflow.set_experiment("federated-digits-peer")
    fed = spec.federated
    with mlflow.start_run():
        mlflow.log_params({"clients": fed.clients, "rounds": rounds, "local_epochs": fed.local_epochs, "strategy": "fedavg"})

        def validate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            m = {f"server_val_{k}": v for k, v in engine.evaluate(model, dataset.val, objective).items()}
            mlflow.log_metrics(m, step=rnd)
            if rnd > 0:  # Flower calls it before the first round too
                timeline.mark(f"round_end {rnd}")  # for the benchmark ($RAYBLOOM_TIMELINE)
            return MetricRecord(m)

        strategy = FedAvg(fraction_train=fed.fraction_train, fraction_evaluate=1.0, min_available_nodes=fed.clients)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                                train_config=ConfigRecord({"spec": spec.model_dump_json()}),
                                evaluate_config=ConfigRecord({"spec": spec.model_dump_json()}), evaluate_fn=validate)
        model.load_state_dict(result.arrays.to_torch_state_dict())
        mlflow.log_metrics({f"test_{k}": v for k, v in engine.evaluate(model, dataset.test, objective).items()})
    timeline.mark("recorded")
