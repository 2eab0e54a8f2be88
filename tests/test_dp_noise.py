"""DP really clips and adds noise: fixed client updates through the strategy raybloom builds for
`federated.dp` (Flower's DP wrappers around FedAvg) and, client-side, through raybloom's ClientApp mod.

Five clients send updates of known norms (0.5, 2, 10, 100 and 1000 × the clipping norm C) on top of a
known global model. Clipping scales each update whose norm exceeds C down to C (the one below stays as
it is), so the plain mean of the clipped updates is known exactly; the aggregate must deviate from it by
Gaussian noise of standard deviation sigma·C/n per parameter. With 50,000 parameters the sample mean and
standard deviation of the deviation are within 5 standard errors of 0 and sigma·C/n (1.6 % for the std).
The unclipped mean lies over 5 noise deviations away per parameter, so a wrapper that did not clip, or noised
with another scale, fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from raybloom import spec
from raybloom.federated import strategies
from raybloom.federated.client_app import dp_clip_mod

from conftest import JOBS

SIGMA, CLIP, CLIENTS = 0.8, 0.5, 5
NORMS = (0.5, 2.0, 10.0, 100.0, 1000.0)  # × CLIP
SHAPES = {"w": (200, 200), "b": (10_000,)}  # 50,000 parameters


@pytest.fixture(autouse=True)
def server_identity():
    """Who this process is, as Flower's ServerApp runtime sets it before a ServerApp builds its messages."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def _fed(side: str):
    s = spec.load(JOBS / "fed_dp_cnn_digits.yaml", [f"federated.clients={CLIENTS}", "federated.fraction_train=1.0",
                                                    f"federated.dp.side={side}", f"federated.dp.clipping_norm={CLIP}",
                                                    f"federated.dp.noise_multiplier={SIGMA}"])
    return s.federated


def _known_updates():
    rng = np.random.default_rng(7)
    size = sum(int(np.prod(s)) for s in SHAPES.values())
    glob = rng.normal(0, 1, size).astype(np.float64)
    updates = []
    for k in NORMS:
        u = rng.normal(0, 1, size)
        updates.append(u * (k * CLIP / np.linalg.norm(u)))
    return glob, updates


def _record(flat: np.ndarray):
    from flwr.app import Array, ArrayRecord

    out, at = {}, 0
    for name, shape in SHAPES.items():
        n = int(np.prod(shape))
        out[name] = Array(flat[at:at + n].reshape(shape).astype(np.float32))
        at += n
    return ArrayRecord(out)


def _flat(record) -> np.ndarray:
    return np.concatenate([a.astype(np.float64).ravel() for a in record.to_numpy_ndarrays()])


def _train_message(glob: np.ndarray, config: dict, node: int):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    content = RecordDict({"arrays": _record(glob), "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def _reply(msg, weights: np.ndarray):
    from flwr.app import Message, MetricRecord, RecordDict

    content = RecordDict({"arrays": _record(weights), "metrics": MetricRecord({"num-examples": 20})})
    return Message(content=content, reply_to=msg)


def _check_noise(aggregate: np.ndarray, glob: np.ndarray, updates: list[np.ndarray]) -> None:
    clipped = [u * min(1.0, CLIP / np.linalg.norm(u)) for u in updates]
    expected = glob + np.mean(clipped, axis=0)  # equal weights (num-examples)
    # float32 on the wire: the arrays are rounded to float32 before and after the noise
    dev = aggregate - expected.astype(np.float32).astype(np.float64)
    std, n = SIGMA * CLIP / CLIENTS, len(dev)
    assert abs(dev.mean()) < 5 * std / np.sqrt(n), dev.mean()
    assert abs(dev.std() / std - 1) < 5 / np.sqrt(2 * n), (dev.std(), std)
    # the raw (unclipped) mean is far outside the noise: clipping happened
    raw = glob + np.mean(updates, axis=0)
    assert np.sqrt(np.mean((aggregate - raw) ** 2)) > 5 * std


def _dp_strategy(side: str, kind: str):
    dp = strategies.build(_fed(side))
    assert type(dp).__name__ == f"DifferentialPrivacy{kind}FixedClipping"
    assert (dp.noise_multiplier, dp.clipping_norm, dp.num_sampled_clients) == (SIGMA, CLIP, CLIENTS)
    return dp


def _client_replies(glob: np.ndarray, updates: list[np.ndarray], config: dict) -> list:
    """Each client's reply (global + its update) through raybloom's ClientApp mod, given the round's config."""
    from flwr.app import Context, RecordDict

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return [dp_clip_mod(_train_message(glob, config, node), ctx, lambda m, c, w=glob + u: _reply(m, w))
            for node, u in enumerate(updates, start=1)]


def _aggregate(dp, replies: list) -> np.ndarray:
    np.random.seed(0)
    arrays, _ = dp.aggregate_train(1, replies)
    return _flat(arrays)


def test_server_side_dp_clips_each_update_and_adds_noise_of_sigma_c_over_n():
    dp = _dp_strategy("server", "ServerSide")
    glob, updates = _known_updates()
    # what the wrapper's configure_train records (the global model the updates are taken against); the clients
    # here are plain replies (no clipping norm sent: the mod passes them through): clipping is the server's job
    dp.current_arrays = _record(glob)
    replies = _client_replies(glob, updates, {})
    assert [np.linalg.norm(_flat(r.content["arrays"]) - glob.astype(np.float32)) for r in replies] == pytest.approx(
        [np.linalg.norm(u) for u in updates], rel=1e-3)
    _check_noise(_aggregate(dp, replies), glob, updates)


def test_client_side_dp_clips_in_the_client_mod_and_the_server_adds_noise():
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    dp = _dp_strategy("client", "ClientSide")
    glob, updates = _known_updates()
    # the clipping norm as the wrapper's configure_train puts it in the round's config
    replies = _client_replies(glob, updates, {KEY_CLIPPING_NORM: dp.clipping_norm})
    for reply, u in zip(replies, updates):
        sent = _flat(reply.content["arrays"]) - glob.astype(np.float32)
        assert np.linalg.norm(sent) == pytest.approx(min(np.linalg.norm(u), CLIP), rel=1e-3)
    _check_noise(_aggregate(dp, replies), glob, updates)
