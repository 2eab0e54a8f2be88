"""`federated.strategy` → a strategy from `flwr.serverapp.strategy`, wrapped for DP when asked."""

from __future__ import annotations

from raybloom.spec.federated import FederatedSpec


def build(f: FederatedSpec):
    from flwr.serverapp import strategy as fs

    common = dict(fraction_train=f.fraction_train, fraction_evaluate=0.0, min_train_nodes=f.min_train_clients,
                  min_evaluate_nodes=0, min_available_nodes=f.min_train_clients)
    # (the server waits for all clients to connect before round 1; a node lost later must not stall sampling)
    name = f.strategy
    if name == "fedavg":
        s = fs.FedAvg(**common)
    elif name == "fedprox":
        s = fs.FedProx(**common, proximal_mu=f.mu)
    elif name == "fedadam":
        s = fs.FedAdam(**common, eta=f.server_lr or 0.01)
    elif name == "fedyogi":
        s = fs.FedYogi(**common, eta=f.server_lr or 0.01)
    elif name == "fedavgm":
        s = fs.FedAvgM(**common, server_learning_rate=f.server_lr or 1.0, server_momentum=f.server_momentum)
    elif name == "fedmedian":
        s = fs.FedMedian(**common)
    elif name == "fedtrimmedavg":
        s = fs.FedTrimmedAvg(**common, beta=f.beta)
    elif name == "krum":
        s = fs.Krum(**common, num_malicious_nodes=f.byzantine_f)
    elif name == "bulyan":
        s = fs.Bulyan(**common, num_malicious_nodes=f.byzantine_f)
    else:  # the spec's Literal keeps this unreachable
        raise ValueError(f"federated.strategy: unknown {name!r}")
    if f.dp.enabled:
        wrap = (fs.DifferentialPrivacyServerSideFixedClipping if f.dp.side == "server"
                else fs.DifferentialPrivacyClientSideFixedClipping)
        s = wrap(s, noise_multiplier=f.dp.noise_multiplier, clipping_norm=f.dp.clipping_norm,
                 num_sampled_clients=f.sampled)
    return s
