"""The privacy budget of a DP federated run (`federated.dp`): the epsilon spent, at `federated.dp.delta`,
after r rounds of the Gaussian mechanism on client updates clipped to `clipping_norm` with noise of
`noise_multiplier` × the clipping norm on their sum, each round sampling `federated.sampled` of the
`clients` (rate q = sampled / clients). Computed by Opacus' RDP accountant (`compute_rdp` over its default
orders, then `get_privacy_spent`). Flower samples a fixed number of clients without replacement; the RDP
analysis is of Poisson sampling at rate q: the usual approximation of DP-FedAvg (McMahan et al., 2018).

Epsilon is a pure function of the rounds run, so a resumed run gets the same figures. Opacus is imported
here only, on the server, when a DP run asks (never by the clients).
"""

from __future__ import annotations

import math

from raybloom.errors import UserError
from raybloom.spec.federated import FederatedSpec


def sample_rate(fed: FederatedSpec) -> float:
    return min(fed.sampled / fed.clients, 1.0)


def epsilon(fed: FederatedSpec, rounds: int) -> float:
    """The epsilon spent at `fed.dp.delta` after `rounds` rounds (0 before any; inf without noise)."""
    if rounds <= 0:
        return 0.0
    if fed.dp.noise_multiplier == 0:
        return math.inf
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    orders = RDPAccountant.DEFAULT_ALPHAS
    spent = rdp.compute_rdp(q=sample_rate(fed), noise_multiplier=fed.dp.noise_multiplier, steps=rounds, orders=orders)
    eps, _ = rdp.get_privacy_spent(orders=orders, rdp=spent, delta=fed.dp.delta)
    return float(eps)


def affordable_rounds(fed: FederatedSpec) -> int:
    """How many of `fed.rounds` fit in `dp.target_epsilon` (all of them without a target)."""
    target = fed.dp.target_epsilon
    if target is None:
        return fed.rounds
    return next((r - 1 for r in range(1, fed.rounds + 1) if epsilon(fed, r) > target), fed.rounds)


def check_budget(fed: FederatedSpec) -> int:
    """The rounds the run may play (`affordable_rounds`; all of them without a target: the spec refuses one
    without DP); refuses, before anything is recorded, a target that not even one round fits in."""
    rounds = affordable_rounds(fed)
    if rounds == 0:
        raise UserError(f"federated.dp.target_epsilon: {fed.dp.target_epsilon:g} is below one round's epsilon "
                        f"{epsilon(fed, 1):.4g} (noise_multiplier {fed.dp.noise_multiplier:g}, sample rate "
                        f"{sample_rate(fed):.3g}, delta {fed.dp.delta:g}): raise the target or the noise_multiplier")
    return rounds
