"""The `federated:` section: clients, rounds, partitioning, strategy, DP, early stopping, faults."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from raybloom.spec.sections import Section


class DPSpec(Section):
    enabled: bool = Field(False, description="Differential privacy: clip each client's update and add Gaussian noise to the aggregate")
    side: Literal["server", "client"] = Field("server", description="Where updates are clipped: on the server, or by each client before sending")
    clipping_norm: float = Field(1.0, gt=0, description="L2 norm each client update is clipped to")
    noise_multiplier: float = Field(0.5, ge=0, description="Gaussian noise std = noise_multiplier × clipping_norm / sampled clients")
    delta: float = Field(1e-5, gt=0, lt=1, description="The delta of the (epsilon, delta) budget: dp_epsilon is logged after every round at this delta (Opacus' RDP accountant)")
    target_epsilon: Optional[float] = Field(None, gt=0, description="Stop before a round that would take the spent epsilon past this (the run ends FINISHED, tag raybloom.stopped_reason)")

    @model_validator(mode="after")
    def _budget_needs_noise(self) -> "DPSpec":
        if self.target_epsilon is not None and not self.enabled:
            raise ValueError(f"target_epsilon: {self.target_epsilon:g} budgets differential privacy, which is off; "
                             "set federated.dp.enabled=true or drop the target")
        if self.target_epsilon is not None and self.noise_multiplier == 0:
            raise ValueError(f"target_epsilon: {self.target_epsilon:g} cannot be met without noise (epsilon is "
                             "infinite at noise_multiplier 0); set federated.dp.noise_multiplier > 0")
        return self


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
    local_epochs: int = Field(1, ge=1, description="Epochs each client trains on its partition per round (the engine's epoch loop)")
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
    mode: Literal["simulation", "deployment"] = Field("simulation", description="simulation: a SuperLink in simulation mode that the driver starts (clients as Ray actors); deployment: a running SuperLink and SuperNodes")
    superlink: Optional[str] = Field(None, description="deployment: SuperLink address host:port (default: $RAYBLOOM_SUPERLINK from cluster.env)")
    client_cpus: int = Field(1, ge=1, description="simulation: whole CPUs per client actor (clients run side by side; Flower's simulation counts whole CPUs)")
    client_gpus: float = Field(0.0, ge=0, description="simulation: GPUs per client actor, a fraction to share one GPU (0.5: two clients per GPU); clients then train on CUDA with train.precision")
    round_timeout: float = Field(300.0, gt=0, description="Seconds the server waits for replies in a round; late clients count as failed")
    client_val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of each client's partition held out (by seed) to evaluate the global model on that client; 0: evaluate on the whole partition")
    evaluate_every: int = Field(1, ge=0, description="Evaluate the global model on every sampled client's held-out share every k rounds (and after the last); 0: never")
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
