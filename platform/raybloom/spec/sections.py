"""The sections every job has: data, model, optimizer, schedule, regularization, training, scaling, tracking."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def _check_folds(v: int) -> int:
    if v == 1:
        raise ValueError("must be 0 (off) or at least 2, got 1")
    return v


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnsSpec(Section):
    features: Optional[list[str] | str] = Field(None, description="Feature columns: a list of number columns, or one list (or fixed-shape tensor) column")
    image: Optional[str] = Field(None, description="A column of encoded PNG/JPEG images (binary, or the {bytes, path} struct of a Hugging Face export)")
    label: str = Field("label", description="The label column: integers or strings (classes) or floats (a regression target)")

    @model_validator(mode="after")
    def _features_or_image(self) -> "ColumnsSpec":
        if (self.features is None) == (self.image is None):
            raise ValueError("name either features (number or list columns) or image (a column of encoded images)")
        if self.features is not None and not self.features:
            raise ValueError("features: name at least one column")
        return self


class DataSpec(Section):
    source: str = Field("digits", description="Built-in source (digits, linear, shapes, shapes_rgb: 32x32 colour shapes), a prepared Parquet folder, an .npz file, a folder of IDX files, a Parquet or CSV file (or folder of them), or an image folder; a local path, file://, s3:// or gs://")
    path: Optional[str] = Field(None, description="Where the prepared Parquet folder lives; default: $RAYBLOOM_DATA_DIR (or .raybloom/data) / a name made from the source and split")
    columns: Optional[ColumnsSpec] = Field(None, description="Parquet / CSV sources: which columns hold the features (or the image) and the label")
    image_size: Optional[list[int]] = Field(None, description="[height, width] (or one number) every image is resized to when prepared; needed when a source's images differ in size")
    shape: Optional[list[int]] = Field(None, description="Reshape each row's features, e.g. [1, 28, 28] for a cnn on flat pixel columns")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of the samples held out for validation")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of the samples held out for the final test (a source's own test split is kept instead)")
    split_seed: int = Field(0, description="Seed of the deterministic train/val/test split")
    train_limit: Optional[int] = Field(None, gt=0, description="Use only the first N training samples (to study overfitting)")
    samples: Optional[int] = Field(None, gt=0, description="Number of samples generated for synthetic sources (linear: 200, shapes: 2000)")
    shard_mb: float = Field(32.0, gt=0.0, description="Largest size of one prepared Parquet file, in MB (each split is a folder of them)")
    stream: Optional[bool] = Field(None, description="In-process training streams the splits from their shards instead of loading them (default: when the training split is over data.stream_above_mb)")
    stream_above_mb: float = Field(2048.0, gt=0.0, description="Size (as float32 in memory) above which in-process training streams (data.stream unset)")
    shuffle: Literal["local", "full"] = Field("local", description="Streamed training data, each epoch: local (shard order reshuffled, rows mixed in a buffer of shuffle_buffer rows) or full (ingest: ray_data only: Ray Data's global random shuffle, costlier and not reproducible)")
    shuffle_buffer: int = Field(16384, ge=1, description="Rows of the local shuffle buffer of streamed training data")

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, v):
        return [v, v] if isinstance(v, int) else v

    @field_validator("image_size")
    @classmethod
    def _two_sides(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise ValueError(f"must be [height, width] of positive integers (or one number), got {v}")
        return v

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"must be a non-empty list of positive integers, got {v}")
        return v

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
    layout: Literal["strided", "intro"] = Field("strided", description="deconv: strided (a stride-2 conv per block, mirrored by stride-2 transposed convs) or intro (the introduction's example: two same-padded convs, a 2x2 max-pool, one stride-2 transposed conv, a final transposed conv to the input's channels)")
    loss: Optional[Literal["mse", "cross_entropy", "bce"]] = Field(None, description="Loss; default: cross_entropy for classifiers, mse for regression and deconv")
    init_from: Optional[str] = Field(None, description="cnn: start the conv blocks from a pretrained encoder: the MLflow run id of a deconv job (or runs:/<id>/..., models:/<name>/<version>, or a weights file it logged, weights/state_dict.pt); filters and kernel_size must match its")
    freeze_encoder: bool = Field(False, description="cnn with init_from: keep the pretrained conv blocks fixed, train only the head")

    @model_validator(mode="after")
    def _pretrained_cnn(self) -> "ModelSpec":
        if self.init_from is not None and self.name != "cnn":
            raise ValueError(f"init_from: starts a cnn's conv blocks from a pretrained deconv encoder; model.name is {self.name!r}")
        if self.freeze_encoder and self.init_from is None:
            raise ValueError("freeze_encoder: keeps a pretrained encoder fixed; name one with model.init_from")
        return self

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
    name: Literal["constant", "time", "step", "exponential", "cosine", "plateau", "gradient"] = Field("constant", description="Learning-rate decay rule, a pure function of the epoch (of the round in a federated run; plateau: of the validation history; gradient: of the gradient-norm history)")
    decay: float = Field(0.1, ge=0.0, description="time: k in lr0 / (1 + k·t)")
    step_size: int = Field(10, ge=1, description="step: multiply by gamma every step_size epochs")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step / exponential: decay factor")
    warmup_epochs: int = Field(0, ge=0, description="cosine: epochs of linear warm-up")
    min_lr: float = Field(0.0, ge=0.0, description="cosine / gradient: floor of the learning rate")
    patience: int = Field(3, ge=1, description="plateau: epochs without improvement before the lr is reduced")
    factor: float = Field(0.5, gt=0.0, lt=1.0, description="plateau: multiply the lr by this on a plateau")
    threshold: float = Field(1e-4, ge=0.0, description="plateau: relative improvement of val_loss that counts")
    power: float = Field(1.0, gt=0.0, description="gradient: lr = lr0 · (grad_norm of the last epoch / of the first)^power, within [min_lr, lr0]")


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
    ingest: Literal["arrays", "ray_data"] = Field("arrays", description="How Ray workers read data: arrays (each worker holds the training and validation splits in memory, checked to fit, and takes its shard of every global batch) or ray_data (Ray Data streams the training split from its shards into each worker; validation is streamed too: for data bigger than a worker's memory)")


class TrackingSpec(Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    run_name: Optional[str] = Field(None, description="MLflow run name (default: made from the model and optimizer)")
    register_as: Optional[str] = Field(None, description="Register the trained model under this name in the MLflow registry")
    log_model: bool = Field(True, description="Log the trained model with its signature and an input example")
    explain: bool = Field(True, description="Classifiers: log plots/saliency.png (Saliency and Integrated Gradients maps of a few test inputs) and explain_deletion_gap (top-15% vs random pixels masked); ignored for regression and deconv")
