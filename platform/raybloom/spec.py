"""The typed job spec: one YAML file says what to train; `key=value` overrides edit it.

Every section is a pydantic model with `extra="forbid"` and a description on each field, so an unknown
key, a wrong type or an out-of-range value is refused with a message that names the dotted field, the
bad value and what is accepted. The same dotted keys are CLI overrides, MLflow parameter names and
search-space keys.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raybloom.errors import SpecError


def _check_folds(v: int) -> int:
    if v == 1:
        raise ValueError("must be 0 (off) or at least 2, got 1")
    return v


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSpec(Section):
    source: str = Field("digits", description="Built-in source (digits, linear, shapes), a prepared Parquet folder, or a local .npz / IDX folder / image folder")
    path: Optional[str] = Field(None, description="Where the prepared Parquet folder lives; default: $RAYBLOOM_DATA_DIR (or .raybloom/data) / a name made from the source and split")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of the samples held out for validation")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of the samples held out for the final test")
    split_seed: int = Field(0, description="Seed of the deterministic train/val/test split")
    train_limit: Optional[int] = Field(None, gt=0, description="Use only the first N training samples (to study overfitting)")
    samples: Optional[int] = Field(None, gt=0, description="Number of samples generated for synthetic sources (linear: 200, shapes: 2000)")

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> "DataSpec":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must be < 0.9, got {self.val_fraction} + {self.test_fraction}"
            )
        return self


class ModelSpec(Section):
    name: Literal["linear", "mlp", "cnn", "deconv"] = Field("cnn", description="Model family: linear (y = w·x + b), mlp, cnn, deconv")
    hidden: list[int] = Field([128, 64], description="mlp: sizes of the hidden layers")
    activation: Literal["sigmoid", "tanh", "relu"] = Field("relu", description="Activation of mlp, cnn and deconv layers")
    filters: list[int] = Field([32, 64], description="cnn / deconv: filters of each conv block")
    kernel_size: int = Field(3, description="cnn / deconv: odd convolution kernel size")
    pool: bool = Field(True, description="cnn: 2x2 max-pooling after each conv block (while the image is at least 2 pixels)")
    batch_norm: bool = Field(False, description="cnn: batch normalization after each convolution")
    head_hidden: int = Field(128, ge=0, description="cnn: width of the hidden layer of the classifier head (0 = none)")
    task: Literal["reconstruct", "denoise"] = Field("reconstruct", description="deconv: rebuild the input, or rebuild it from a noisy copy")
    denoise_std: float = Field(0.3, ge=0.0, description="deconv with task=denoise: std of the Gaussian noise added to the input")
    loss: Optional[Literal["mse", "cross_entropy", "bce"]] = Field(None, description="Loss; default: cross_entropy for classifiers, mse for regression and deconv")

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v < 1 or v % 2 == 0:
            raise ValueError(f"must be an odd positive integer (1, 3, 5, 7, ...), got {v}")
        return v

    @field_validator("filters", "hidden")
    @classmethod
    def _positive_sizes(cls, v: list[int]) -> list[int]:
        if not v or any(n <= 0 for n in v):
            raise ValueError(f"must be a non-empty list of positive integers, got {v}")
        return v


class OptimSpec(Section):
    name: Literal["gd", "sgd", "adam", "adagrad"] = Field("adam", description="gd = full-batch gradient descent; sgd (with momentum), adam, adagrad use mini-batches")
    lr: float = Field(1e-3, gt=0.0, description="Initial learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd: momentum")
    grad_clip: Optional[float] = Field(None, gt=0.0, description="Clip the gradient norm to this value")


class ScheduleSpec(Section):
    name: Literal["constant", "time", "step", "exponential", "cosine", "plateau"] = Field("constant", description="Learning-rate decay rule, a pure function of the epoch (plateau: of the validation history)")
    decay: float = Field(0.1, ge=0.0, description="time: k in lr0 / (1 + k·t)")
    step_size: int = Field(10, ge=1, description="step: multiply by gamma every step_size epochs")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step / exponential: decay factor")
    warmup_epochs: int = Field(0, ge=0, description="cosine: epochs of linear warm-up")
    min_lr: float = Field(0.0, ge=0.0, description="cosine: floor of the learning rate")
    patience: int = Field(3, ge=1, description="plateau: epochs without improvement before the lr is reduced")
    factor: float = Field(0.5, gt=0.0, lt=1.0, description="plateau: multiply the lr by this on a plateau")
    threshold: float = Field(1e-4, ge=0.0, description="plateau: relative improvement of val_loss that counts")


class AugmentSpec(Section):
    shift: int = Field(0, ge=0, description="Random shift of images by up to this many pixels")
    noise: float = Field(0.0, ge=0.0, description="Std of Gaussian noise added to training inputs")
    hflip: bool = Field(False, description="Random horizontal flips (only for data where a mirror image keeps its class: never for digits)")


class EarlyStoppingSpec(Section):
    enabled: bool = Field(False, description="Stop when val_loss stops improving")
    patience: int = Field(5, ge=1, description="Epochs without improvement before stopping")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest decrease of val_loss that counts as an improvement")
    restore_best: bool = Field(True, description="Restore the weights of the best epoch at the end")


class RegularizationSpec(Section):
    l1: float = Field(0.0, ge=0.0, description="L1 penalty λ·Σ|w| on weights (not biases)")
    l2: float = Field(0.0, ge=0.0, description="L2 penalty λ·Σw² on weights (not biases)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability in mlp hidden layers and the cnn head")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="Training-time data augmentation")
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec, description="Early stopping on val_loss")


class TrainSpec(Section):
    epochs: int = Field(10, ge=1, description="Epoch budget")
    batch_size: int = Field(64, ge=1, description="Mini-batch size (ignored by optim gd, which uses the whole training set)")
    checkpoint_every: int = Field(1, ge=0, description="Checkpoint every N epochs (0 = never)")
    cv_folds: int = Field(0, ge=0, description="k-fold cross-validation on train+val: k nested runs and a parent with mean and std (0 = off)")
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast precision on GPU (fp16 adds a grad scaler); CPU runs fp32")
    progress: Optional[bool] = Field(None, description="Progress bar on the terminal (default: when stderr is a terminal)")
    divergence_factor: float = Field(1e4, gt=1.0, description="Stop as diverged when train_loss grows past this multiple of the first epoch's (NaN/inf always stop)")

    @field_validator("cv_folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        return _check_folds(v)


class ScalingSpec(Section):
    workers: int = Field(0, ge=0, description="0 = train in process; N >= 1 = Ray Train with N DDP workers")
    use_gpu: bool = Field(False, description="One GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per Ray worker")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts allowed after a failure (-1 = unlimited)")
    address: Optional[str] = Field(None, description="Ray cluster address (default: $RAY_ADDRESS, else Ray starts in process)")
    ingest: Literal["arrays", "ray_data"] = Field("arrays", description="How Ray workers read data: arrays (each worker reads the Parquet split with pyarrow and takes its shard of every global batch) or ray_data (read_parquet + get_dataset_shard + iter_torch_batches)")


class TrackingSpec(Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    run_name: Optional[str] = Field(None, description="MLflow run name (default: made from the model and optimizer)")
    register_as: Optional[str] = Field(None, description="Register the trained model under this name in the MLflow registry")
    log_model: bool = Field(True, description="Log the trained model with its signature and an input example")


class ParamRange(Section):
    """One search dimension: a float range, an int range, or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(..., description="float (low/high, log), int (low/high, step) or categorical (choices)")
    low: Optional[float] = Field(None, description="Lower bound (float, int)")
    high: Optional[float] = Field(None, description="Upper bound, inclusive (float, int)")
    log: bool = Field(False, description="Sample on a log scale (float, int)")
    step: Optional[float] = Field(None, gt=0, description="Grid step (int: default 1; float: needed for grid search)")
    choices: Optional[list[Any]] = Field(None, description="The values to choose from (categorical)")

    @model_validator(mode="after")
    def _sampleable(self) -> "ParamRange":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty choices list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs low and high")
        if self.low >= self.high:
            raise ValueError(f"low must be < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    def grid(self) -> list[Any]:
        """The values a grid search enumerates."""
        if self.type == "categorical":
            return list(self.choices)
        step = self.step if self.step is not None else (1 if self.type == "int" else None)
        if step is None:
            raise ValueError("a float range needs step (or use type: categorical) for grid search")
        n = int(round((self.high - self.low) / step)) + 1
        values = [self.low + i * step for i in range(n)]
        return [int(round(v)) for v in values] if self.type == "int" else values


class SearchSpec(Section):
    space: dict[str, ParamRange] = Field(..., description="Search space keyed by dotted spec keys (optim.lr, model.filters, ...)")
    sampler: Literal["grid", "random", "tpe"] = Field("tpe", description="grid enumerates the space; random and tpe sample it")
    seed: int = Field(0, description="Sampler seed")
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = Field("none", description="Stop bad trials early on their per-epoch validation metric")
    n_trials: Optional[int] = Field(None, ge=1, description="Trials that must finish (COMPLETE or PRUNED); grid: default the grid size")
    timeout: Optional[float] = Field(None, gt=0, description="Stop starting new trials after this many seconds")
    concurrency: int = Field(1, ge=1, description="Trials running at once on Ray")
    threads_per_trial: int = Field(1, ge=1, description="CPUs (and torch threads) per trial, per worker when workers_per_trial > 1")
    workers_per_trial: int = Field(1, ge=1, description="Ray Train DDP workers per trial (1: the trial trains inside its Ray task)")
    metric: Literal["val_loss", "val_accuracy"] = Field("val_loss", description="What the search optimizes (per epoch; the trial's value is its best epoch)")
    direction: Optional[Literal["minimize", "maximize"]] = Field(None, description="Default: minimize for val_loss, maximize for val_accuracy")
    storage: Optional[str] = Field(None, description="Optuna storage URL, or a journal file path; default: optuna.journal beside the SQLite tracking store")
    study_name: Optional[str] = Field(None, description="Study name (rerun with the same one to resume); default: '<experiment>-search'")
    cv_folds: int = Field(0, ge=0, description="Objective = mean metric over k folds of train+val (0 = the validation split)")
    retrain_best: bool = Field(False, description="Train the best configuration on train+val, test it, register it when tracking.register_as is set")

    @field_validator("space")
    @classmethod
    def _known_keys(cls, v: dict[str, ParamRange]) -> dict[str, ParamRange]:
        if not v:
            raise ValueError("must name at least one dotted key to search")
        for key in v:
            if key not in ALL_KEYS or key.startswith(("search.", "federated.", "kind", "scaling.", "tracking.")):
                raise ValueError(f"{key!r} is not a searchable spec key{_did_you_mean(key)}")
        return v

    @field_validator("cv_folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        return _check_folds(v)

    @model_validator(mode="after")
    def _grid_is_finite(self) -> "SearchSpec":
        if self.sampler == "grid":
            for key, r in self.space.items():
                if r.type == "float" and r.step is None:
                    raise ValueError(f"space.{key}: grid search needs step for a float range (or type: categorical)")
        return self

    @property
    def goal(self) -> str:
        return self.direction or ("maximize" if self.metric == "val_accuracy" else "minimize")

    def grid_size(self) -> int:
        n = 1
        for r in self.space.values():
            n *= len(r.grid())
        return n


class DPSpec(Section):
    enabled: bool = Field(False, description="Differential privacy: clip each client's update and add Gaussian noise to the aggregate")
    side: Literal["server", "client"] = Field("server", description="Where updates are clipped: on the server, or by each client before sending")
    clipping_norm: float = Field(1.0, gt=0, description="L2 norm each client update is clipped to")
    noise_multiplier: float = Field(0.5, ge=0, description="Gaussian noise std = noise_multiplier × clipping_norm / sampled clients")


class FedEarlyStoppingSpec(Section):
    enabled: bool = Field(False, description="Stop when the server's validation loss has not improved for `patience` rounds")
    patience: int = Field(3, ge=1, description="Rounds without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="Smallest decrease of server_val_loss that counts as an improvement")


class FaultsSpec(Section):
    raise_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the sampled clients that raise each round (chosen by seed and round)")
    byzantine_client: Optional[int] = Field(None, ge=0, description="Partition id of one client that sends corrupted weights every round")
    byzantine: Literal["scale", "nan"] = Field("scale", description="What the byzantine client sends: its weights × scale, or NaN")
    scale: float = Field(100.0, description="Factor of the byzantine client's weights (byzantine: scale)")
    slow_seconds: float = Field(0.0, ge=0, description="Extra seconds the byzantine client sleeps before replying (time-out tests)")


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg", "krum", "bulyan")


class FederatedSpec(Section):
    clients: int = Field(10, ge=1, description="Number of clients (data partitions; SuperNodes in deployment mode)")
    rounds: int = Field(10, ge=1, description="Federated rounds")
    local_epochs: int = Field(1, ge=1, description="Epochs each client trains on its partition per round (engine.train_epoch)")
    fraction_train: float = Field(1.0, gt=0, le=1, description="Share of the clients sampled for training each round")
    min_train_clients: int = Field(2, ge=1, description="Fewest clients that must reply with usable weights, or the round (and run) fails")
    partition: Literal["iid", "dirichlet", "shards"] = Field("iid", description="How the training split is divided: iid, dirichlet (label skew by alpha), shards (classes per client)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition: dirichlet); small = more skew")
    shards_per_client: int = Field(2, ge=1, description="Label-sorted shards each client gets (partition: shards)")
    partition_seed: Optional[int] = Field(None, description="Seed of the partition (default: seed)")
    strategy: Literal[STRATEGIES] = Field("fedavg", description="Aggregation: " + ", ".join(STRATEGIES))
    mu: float = Field(0.01, ge=0, description="FedProx proximal weight: clients add mu/2·‖w − w_global‖² to their loss")
    beta: float = Field(0.2, ge=0, lt=0.5, description="FedTrimmedAvg: share cut from each end before averaging")
    byzantine_f: int = Field(1, ge=0, description="Krum / Bulyan: number of malicious clients to tolerate")
    server_lr: Optional[float] = Field(None, gt=0, description="Server learning rate: FedAdam / FedYogi (default 0.01), FedAvgM (default 1.0)")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM server momentum")
    dp: DPSpec = Field(default_factory=DPSpec, description="Differential privacy")
    early_stopping: FedEarlyStoppingSpec = Field(default_factory=FedEarlyStoppingSpec, description="Early stopping on the server's validation loss")
    mode: Literal["simulation", "deployment"] = Field("simulation", description="simulation: Flower's simulation engine on Ray; deployment: a running SuperLink and SuperNodes")
    superlink: Optional[str] = Field(None, description="deployment: SuperLink address host:port (default: $RAYBLOOM_SUPERLINK from cluster.env)")
    client_cpus: float = Field(1.0, gt=0, description="simulation: CPUs per client actor (clients run side by side)")
    round_timeout: float = Field(300.0, gt=0, description="Seconds the server waits for replies in a round; late clients count as failed")
    faults: FaultsSpec = Field(default_factory=FaultsSpec, description="Injected faults (tests and benchmarks)")

    @property
    def sampled(self) -> int:
        """Clients sampled per training round (Flower: max(int(clients × fraction_train), min_train_clients))."""
        return max(int(self.clients * self.fraction_train), self.min_train_clients)

    @model_validator(mode="after")
    def _feasible(self) -> "FederatedSpec":
        if self.min_train_clients > self.clients:
            raise ValueError(f"min_train_clients: {self.min_train_clients} > clients={self.clients}; lower it or add clients")
        n, f = self.sampled, self.byzantine_f
        if self.strategy == "krum" and n <= 2 * f + 2:
            raise ValueError(f"strategy: krum with byzantine_f={f} needs more than 2f+2={2 * f + 2} sampled clients, "
                             f"got {n}; add clients or lower byzantine_f")
        if self.strategy == "bulyan" and n < 4 * f + 3:
            raise ValueError(f"strategy: bulyan with byzantine_f={f} needs at least 4f+3={4 * f + 3} sampled clients, "
                             f"got {n}; add clients or lower byzantine_f")
        if self.faults.byzantine_client is not None and self.faults.byzantine_client >= self.clients:
            raise ValueError(f"faults.byzantine_client: {self.faults.byzantine_client} is not a partition id "
                             f"(0..{self.clients - 1})")
        if self.partition == "shards" and self.shards_per_client * self.clients < 2:
            raise ValueError("shards_per_client × clients must be at least 2")
        return self


class JobSpec(Section):
    kind: Literal["train", "search", "federated"] = Field("train", description="What to run: train (in process or on Ray), search (Optuna), federated (Flower)")
    experiment: str = Field("raybloom", min_length=1, description="MLflow experiment name")
    seed: int = Field(0, description="Seed of weights, batch order, dropout and augmentation")
    data: DataSpec = Field(default_factory=DataSpec, description="Dataset")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule")
    regularization: RegularizationSpec = Field(default_factory=RegularizationSpec, description="Penalties, dropout, augmentation, early stopping")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Epochs, batches, checkpoints, cross-validation")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Where the training runs")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow")
    search: Optional[SearchSpec] = Field(None, description="kind: search: the Optuna search over this spec (see the search keys)")
    federated: Optional[FederatedSpec] = Field(None, description="kind: federated: the Flower setup (see the federated keys)")

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if self.kind == "search" and self.search is None:
            raise ValueError("search: kind: search needs a search section with a space")
        if self.kind == "federated":
            if self.federated is None:
                raise ValueError("federated: kind: federated needs a federated section (clients, rounds, strategy, ...)")
            if self.data.val_fraction == 0:
                raise ValueError("data.val_fraction: the server evaluates the global model on the validation split; set it > 0")
            if self.scaling.workers:
                raise ValueError("scaling.workers: federated clients train in process (simulation actors or SuperNodes); set it to 0")
        if self.regularization.early_stopping.enabled and self.data.val_fraction == 0:
            raise ValueError("regularization.early_stopping.enabled needs a validation set: set data.val_fraction > 0")
        if self.train.precision != "fp32" and not self.scaling.use_gpu:
            raise ValueError(f"train.precision: {self.train.precision} autocast runs on GPU only; set scaling.use_gpu=true "
                             "(with scaling.workers >= 1) or train.precision=fp32")
        if self.scaling.use_gpu and self.scaling.workers == 0:
            raise ValueError("scaling.use_gpu: GPU training runs on Ray workers; set scaling.workers >= 1")
        if self.schedule.name == "plateau" and self.data.val_fraction == 0:
            raise ValueError("schedule.name: plateau needs a validation set: set data.val_fraction > 0")
        return self

    # -- derived views -------------------------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        """The spec as dotted keys (MLflow params, search keys); lists stay lists."""
        return flatten(self.model_dump(mode="json"))

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> "JobSpec":
        """A new spec with dotted overrides applied (a {key: value} dict or ["key=value", ...])."""
        return from_dict(self.model_dump(mode="json"), overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------------------
def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _field_paths(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            paths += _field_paths(sub, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


ALL_KEYS: list[str] = _field_paths()


def resolve_key(key: str) -> str:
    """Map an override key to its dotted path: full paths pass; a unique leaf name (`lr`, `workers`) is expanded."""
    if key in ALL_KEYS or key.split(".")[0] in ("search", "federated"):
        return key
    leaf_matches = [p for p in ALL_KEYS if p.rsplit(".", 1)[-1] == key or p.endswith("." + key)]
    if len(leaf_matches) == 1:
        return leaf_matches[0]
    if len(leaf_matches) > 1:
        raise SpecError(f"{key}: ambiguous override key; say which one: {', '.join(leaf_matches)}")
    raise SpecError(f"{key}: unknown key{_did_you_mean(key)}")


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, ALL_KEYS, n=2, cutoff=0.85) or difflib.get_close_matches(key, ALL_KEYS, n=3, cutoff=0.6)
    if not close:
        leaves = {p.rsplit(".", 1)[-1]: p for p in ALL_KEYS}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=3, cutoff=0.7)]
    return f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(ALL_KEYS)}"


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise SpecError(f"override {item!r}: expected key=value, e.g. optim.lr=0.01")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise SpecError(f"{key}: {p} is a value, not a section")
        node = node[p]
    node[parts[-1]] = value


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key{_did_you_mean(loc)}")
        elif e["type"] == "value_error":
            lines.append(f"{loc}: {msg}" if loc else msg)
        else:
            lines.append(f"{loc}: {msg}, got {e.get('input')!r}")
    return "\n".join(lines)


def from_dict(raw: dict[str, Any], overrides: dict[str, Any] | list[str] | None = None) -> JobSpec:
    data = dict(raw or {})
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(data, resolve_key(key), value)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(err)) from None


def load(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> JobSpec:
    """Read a YAML job spec, apply dotted overrides, validate. Raises SpecError naming the bad field."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such spec file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise SpecError(f"{p}: a job spec is a YAML mapping (kind:, data:, model: ...), got {type(raw).__name__}")
    try:
        return from_dict(raw or {}, overrides)
    except SpecError as e:
        raise SpecError(f"{p}: {e}") from None


def reference_markdown() -> str:
    """The job-spec reference table (README's), generated from the field descriptions."""
    rows = ["| key | default | description |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = field.annotation
            inner = [a for a in typing.get_args(sub) if isinstance(a, type) and issubclass(a, BaseModel)]
            if inner and not typing.get_origin(sub) is dict:  # Optional[Section]
                walk(inner[0], f"{prefix}{name}.")
                continue
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(sub, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append(f"| `{prefix}{name}` | `{default}` | {field.description} |".replace("`None`", "—"))

    walk(JobSpec, "")
    return "\n".join(rows)
