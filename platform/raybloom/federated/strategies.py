"""`federated.strategy` → a strategy from `flwr.serverapp.strategy`, wrapped for DP when asked."""

from __future__ import annotations

from raybloom.spec.federated import FederatedSpec


def build(fed: FederatedSpec):
    from flwr.serverapp import strategy as fs

    common = dict(fraction_train=fed.fraction_train, fraction_evaluate=0.0, min_train_nodes=fed.min_train_clients,
                  min_evaluate_nodes=0, min_available_nodes=fed.min_train_clients)
    # (the server waits for all clients to connect before round 1; a node lost later must not stall sampling)
    name = fed.strategy
    if name == "fedavg":
        strategy = fs.FedAvg(**common)
    elif name == "fedprox":
        strategy = fs.FedProx(**common, proximal_mu=fed.mu)
    elif name == "fedadam":
        strategy = fs.FedAdam(**common, eta=fed.server_lr or 0.01)
    elif name == "fedyogi":
        strategy = fs.FedYogi(**common, eta=fed.server_lr or 0.01)
    elif name == "fedavgm":
        strategy = fs.FedAvgM(**common, server_learning_rate=fed.server_lr or 1.0, server_momentum=fed.server_momentum)
    elif name == "fedmedian":
        strategy = fs.FedMedian(**common)
    elif name == "fedtrimmedavg":
        strategy = fs.FedTrimmedAvg(**common, beta=fed.beta)
    elif name == "krum":
        strategy = fs.Krum(**common, num_malicious_nodes=fed.byzantine_f)
    elif name == "bulyan":
        strategy = fs.Bulyan(**common, num_malicious_nodes=fed.byzantine_f)
    else:  # the spec's Literal keeps this unreachable
        raise ValueError(f"federated.strategy: unknown {name!r}")
    if fed.dp.enabled:
        wrap = (fs.DifferentialPrivacyServerSideFixedClipping if fed.dp.side == "server"
                else fs.DifferentialPrivacyClientSideFixedClipping)
        strategy = wrap(strategy, noise_multiplier=fed.dp.noise_multiplier, clipping_norm=fed.dp.clipping_norm,
                           num_sampled_clients=fed.sampled)
    return strategy
