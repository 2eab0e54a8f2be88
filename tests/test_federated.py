"""Federated runs in Flower's real simulation engine on a real Ray, read back from the real MLflow store.

One clean IID FedAvg run (and its centralized counterpart) is shared by the tests that compare with it;
every other run changes one thing (partition, strategy, injected faults, DP) against that baseline.
"""

from __future__ import annotations

import math
import subprocess

import mlflow
import numpy as np
import pytest

from raybloom import spec
from raybloom.errors import SpecError, UserError
from raybloom.federated import compare
from raybloom.federated.driver import run_federated

from conftest import JOBS, RAYBLOOM, module_store

ROUNDS = 15
SHORT = 6  # rounds of the runs that only need to complete and be recorded


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with module_store(tmp_path_factory.mktemp("federated")) as s:
        yield s


@pytest.fixture(scope="module")
def clean(fed):
    """The IID FedAvg job and its centralized counterpart (same 30 epochs), via `compare`."""
    return compare.run_comparison(spec.load(JOBS / "fedavg_cnn_digits_iid.yaml"))


def _run(job: str, *overrides: str):
    return run_federated(spec.load(JOBS / job, ["tracking.log_model=false", *overrides]))


def _history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _acc(summary) -> float:
    return summary.metrics["test_accuracy"]


def _no_nan_global(client, run_id: str) -> None:
    assert all(math.isfinite(v) for v in _history(client, run_id, "server_val_loss"))
    assert math.isfinite(client.get_run(run_id).data.metrics["test_loss"])


def test_iid_fedavg_is_within_2_points_of_centralized_and_both_are_recorded(fed, clean):
    c = fed.client
    run = c.get_run(clean.run_id)
    cen = c.get_run(clean.children[0])
    assert run.info.status == "FINISHED" and cen.info.status == "FINISHED"
    assert run.data.tags["raybloom.kind"] == "federated" and cen.data.tags["raybloom.kind"] == "train"
    assert run.info.run_name == "fedavg 10c iid cnn f32-64 k3"
    assert cen.data.params["train.epochs"] == str(ROUNDS * 2)  # the same passes over the data
    fed_acc, cen_acc = run.data.metrics["test_accuracy"], cen.data.metrics["test_accuracy"]
    assert fed_acc >= cen_acc - 0.02, (fed_acc, cen_acc)
    assert run.data.metrics["gap_test_accuracy"] == pytest.approx(fed_acc - cen_acc)
    # the per-round contract (step = round; round 0 = the initial model on the server)
    assert [m.step for m in sorted(c.get_metric_history(clean.run_id, "server_val_loss"), key=lambda m: m.step)] == list(range(ROUNDS + 1))
    for key in ("server_val_accuracy", "clients_train_loss", "clients_ok", "clients_failed"):
        assert len(c.get_metric_history(clean.run_id, key)) >= ROUNDS, key
    assert set(_history(c, clean.run_id, "clients_ok")) == {10.0}
    assert set(_history(c, clean.run_id, "clients_failed")) == {0.0}
    assert run.data.params["federated.clients"] == "10" and run.data.params["federated.strategy"] == "fedavg"
    artifacts = {a.path for a in c.list_artifacts(clean.run_id)} | {a.path for a in c.list_artifacts(clean.run_id, "plots")}
    for path in ("spec.yaml", "comparison.md", "partition_histogram.csv", "plots/partition_heatmap.png",
                 "plots/federated_vs_centralized.png", "plots/loss_curves.png", "plots/confusion_matrix.png"):
        assert path in artifacts, (path, artifacts)
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                       filter_string=f"source_run_id = '{clean.run_id}'")


def _skew(client, run_id: str) -> float:
    """Mean share of each client's most common class."""
    path = client.download_artifacts(run_id, "partition_histogram.csv")
    hist = np.loadtxt(path, delimiter=",")
    return float((hist.max(1) / hist.sum(1)).mean())


def test_dirichlet_partition_is_skewed_and_fedavg_and_fedprox_are_both_recorded(fed, clean, capsys):
    # 3 rounds: this checks the skew and that both are recorded; README has the full jobs' accuracies
    prox = _run("fedprox_cnn_digits_dirichlet.yaml", "federated.rounds=3")
    avg = _run("fedprox_cnn_digits_dirichlet.yaml", "federated.rounds=3", "federated.strategy=fedavg")
    c = fed.client
    assert _skew(c, prox.run_id) > 0.5 > 0.25 > _skew(c, clean.run_id)  # IID: ~0.15 (10 classes)
    assert _skew(c, prox.run_id) == _skew(c, avg.run_id)  # the same partition (seeded)
    for s in (prox, avg):
        assert c.get_run(s.run_id).info.status == "FINISHED" and 0.1 < _acc(s) <= 1.0
        _no_nan_global(c, s.run_id)
    assert c.get_run(prox.run_id).data.params["federated.mu"] == "0.1"
    with capsys.disabled():
        print(f"\n  dirichlet(0.1): fedprox test accuracy {_acc(prox):.4f}, fedavg {_acc(avg):.4f}; "
              f"IID fedavg {clean.metrics['federated_test_accuracy']:.4f}")


def test_clients_that_raise_or_send_nan_are_counted_and_left_out(fed, clean):
    """20% of the clients raise each round (chosen by seed and round) and client 3 sends NaN weights:
    each round's clients_failed is exactly the injected count, and the result stays within 3 points."""
    from raybloom.federated import client as fed_client

    job = ["federated.faults.raise_fraction=0.2", "federated.faults.byzantine_client=3", "federated.faults.byzantine=nan"]
    s = _run("fedavg_cnn_digits_iid.yaml", *job)
    sp = spec.load(JOBS / "fedavg_cnn_digits_iid.yaml", job)
    injected = [len(fed_client.faulty_clients(sp, r) | {3}) for r in range(1, ROUNDS + 1)]
    assert set(injected) <= {2, 3} and len(fed_client.faulty_clients(sp, 1)) == 2
    c = fed.client
    assert _history(c, s.run_id, "clients_failed") == [float(n) for n in injected]
    assert _history(c, s.run_id, "clients_ok") == [10.0 - n for n in injected]
    assert _acc(s) >= clean.metrics["federated_test_accuracy"] - 0.03
    _no_nan_global(c, s.run_id)


def test_byzantine_weights_x100_ruin_fedavg_but_not_fedmedian(fed, clean):
    median = _run("fedmedian_cnn_digits_attack.yaml")
    base = clean.metrics["federated_test_accuracy"]
    assert _acc(median) >= base - 0.03, (_acc(median), base)
    _no_nan_global(fed.client, median.run_id)
    # FedAvg degrades: its global weights grow ~10x a round until every client diverges from them and a
    # round has too few usable replies (the run FAILS with that reason), or it finishes far below the clean run
    try:
        avg = _run("fedmedian_cnn_digits_attack.yaml", "federated.strategy=fedavg", "experiment=fed-avg-attacked",
                   f"federated.rounds={SHORT}")
    except UserError as e:
        assert "min_train_clients" in str(e)
        exp = fed.client.get_experiment_by_name("fed-avg-attacked")
        (run,) = fed.client.search_runs([exp.experiment_id])
        assert run.info.status == "FAILED"
        losses = _history(fed.client, run.info.run_id, "server_val_loss")
        assert all(math.isfinite(v) for v in losses) and max(losses) > 1e3 * losses[0]
    else:
        assert _acc(avg) < base - 0.10, (_acc(avg), base)
        _no_nan_global(fed.client, avg.run_id)


def test_dp_run_completes_and_records_its_settings_and_stops_early(fed):
    """DP with server-side clipping and noise; also early stopping made deterministic: with min_delta=100
    only round 1 counts as an improvement, so patience 2 stops after round 3 and restores round 1's model."""
    s = _run("fed_dp_cnn_digits.yaml", f"federated.rounds={SHORT}", "federated.early_stopping.enabled=true",
             "federated.early_stopping.patience=2", "federated.early_stopping.min_delta=100")
    run = fed.client.get_run(s.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["rounds_run"] == 3 and run.data.metrics["best_round"] == 1
    assert run.data.tags["raybloom.early_stopped"] == "true"
    round1 = _history(fed.client, s.run_id, "server_val_loss")[1]
    assert run.data.metrics["final_server_val_loss"] == pytest.approx(round1, rel=1e-5)  # the restored global model
    p = run.data.params
    assert (p["federated.dp.enabled"], p["federated.dp.side"], p["federated.dp.clipping_norm"],
            p["federated.dp.noise_multiplier"]) == ("True", "server", "1.0", "0.3")
    assert run.info.run_name.startswith("fedavg 10c iid dp")
    # the noised rounds still learn: the validation loss falls every round (round 0: the initial model) and
    # round 3's accuracy is above the untrained model's (seed 0: 0.141 against 0.107); the test accuracy is
    # the restored round 1's model's, near chance (0.093), so it is checked against the run's record only
    losses, accs = (_history(fed.client, s.run_id, k) for k in ("server_val_loss", "server_val_accuracy"))
    assert losses[0] > losses[1] > losses[2] > losses[3] and accs[3] > accs[0]
    assert run.data.metrics["final_server_val_accuracy"] == pytest.approx(accs[1])  # round 1's model, restored
    assert _acc(s) == run.data.metrics["test_accuracy"]
    _no_nan_global(fed.client, s.run_id)
    # the budget spent: Opacus' RDP accountant stepped once a round at q = 10/10, sigma 0.3, delta 1e-5
    from opacus.accountants import RDPAccountant

    accountant, expected = RDPAccountant(), []
    for _ in range(3):
        accountant.step(noise_multiplier=0.3, sample_rate=1.0)
        expected.append(accountant.get_epsilon(delta=1e-5))
    eps = [m for m in sorted(fed.client.get_metric_history(s.run_id, "dp_epsilon"), key=lambda m: m.step)]
    assert [m.step for m in eps] == [1, 2, 3] and p["federated.dp.delta"] == "1e-05"
    assert [m.value for m in eps] == pytest.approx(expected, rel=1e-9)
    assert eps[0].value < eps[1].value < eps[2].value  # epsilon grows with the rounds
    assert s.metrics["dp_epsilon"] == eps[-1].value  # the summary: the budget spent by the last round


def test_dp_target_epsilon_stops_before_the_round_that_would_pass_it(fed):
    """sigma 1.0, 5 of 10 clients a round: epsilon 3.89 after round 1, 5.38 after 2, 6.48 after 3 (delta 1e-5),
    so a target of 6 affords exactly 2 of the 4 rounds (round 2 is then the last: the clients evaluate the
    global model after it, evaluate_every=3 notwithstanding); a target below round 1's is refused before any
    run, and by `raybloom validate`."""
    from opacus.accountants import RDPAccountant

    dp = ["federated.dp.noise_multiplier=1.0", "federated.fraction_train=0.5", "federated.rounds=4",
          "federated.local_epochs=1", "data.train_limit=600", "federated.evaluate_every=3"]
    s = _run("fed_dp_cnn_digits.yaml", *dp, "federated.dp.target_epsilon=6", "experiment=fed-dp-budget")
    run = fed.client.get_run(s.run_id)
    accountant, spent = RDPAccountant(), []
    for _ in range(4):
        accountant.step(noise_multiplier=1.0, sample_rate=0.5)
        spent.append(accountant.get_epsilon(delta=1e-5))
    affordable = max(r for r in range(1, 5) if spent[r - 1] <= 6)
    assert affordable == 2 and run.info.status == "FINISHED"
    assert run.data.metrics["rounds_run"] == affordable
    assert _history(fed.client, s.run_id, "dp_epsilon") == pytest.approx(spent[:affordable], rel=1e-9)
    assert s.metrics["dp_epsilon"] == pytest.approx(spent[affordable - 1], rel=1e-9)
    assert f"round 3 would spend epsilon {spent[2]:.4g} > federated.dp.target_epsilon 6" in run.data.tags["raybloom.stopped_reason"]
    assert [m.step for m in fed.client.get_metric_history(s.run_id, "clients_val_accuracy_mean")] == [affordable]
    with pytest.raises(UserError, match="target_epsilon: 1 is below one round's epsilon 3.89"):
        _run("fed_dp_cnn_digits.yaml", *dp, "federated.dp.target_epsilon=1", "experiment=fed-dp-refused")
    assert fed.client.get_experiment_by_name("fed-dp-refused") is None  # refused before anything was recorded
    proc = subprocess.run([RAYBLOOM, "validate", str(JOBS / "fed_dp_cnn_digits.yaml"), *dp, "federated.dp.target_epsilon=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "federated.dp.target_epsilon: 1 is below one round's epsilon 3.89" in proc.stderr


def test_the_budget_is_opacus_rdp_accountant_and_a_target_needs_noise():
    """The pure module against the accountant stepped directly (sampled and unsampled rounds, two deltas),
    the rounds a target affords against a scan, and the targets the spec refuses (no run needed)."""
    from opacus.accountants import RDPAccountant

    from raybloom.federated import privacy

    for clients, fraction, sigma, delta in ((10, 1.0, 0.3, 1e-5), (20, 0.25, 1.1, 1e-6), (8, 0.5, 2.0, 1e-3)):
        job = spec.load(JOBS / "fed_dp_cnn_digits.yaml", [f"federated.clients={clients}", f"federated.fraction_train={fraction}",
                                                          f"federated.dp.noise_multiplier={sigma}", f"federated.dp.delta={delta}",
                                                          "federated.rounds=12", "federated.dp.target_epsilon=4"])
        q, accountant = privacy.sample_rate(job.federated), RDPAccountant()
        assert q == max(int(clients * fraction), 2) / clients
        spent = []
        for r in range(1, 13):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
            spent.append(accountant.get_epsilon(delta=delta))
            assert privacy.epsilon(job.federated, r) == pytest.approx(spent[-1], rel=1e-9)
        assert privacy.affordable_rounds(job.federated) == sum(e <= 4 for e in spent)  # epsilon grows with r
    assert privacy.epsilon(job.federated, 0) == 0.0
    assert privacy.epsilon(spec.load(JOBS / "fed_dp_cnn_digits.yaml", ["federated.dp.noise_multiplier=0"]).federated, 1) == math.inf
    with pytest.raises(SpecError, match="federated.dp: target_epsilon: 4 budgets differential privacy, which is off"):
        spec.load(JOBS / "fed_dp_cnn_digits.yaml", ["federated.dp.enabled=false", "federated.dp.target_epsilon=4"])
    with pytest.raises(SpecError, match="target_epsilon: 4 cannot be met without noise"):
        spec.load(JOBS / "fed_dp_cnn_digits.yaml", ["federated.dp.noise_multiplier=0", "federated.dp.target_epsilon=4"])
    with pytest.raises(SpecError, match=r"federated.dp.delta: Input should be less than 1"):
        spec.load(JOBS / "fed_dp_cnn_digits.yaml", ["federated.dp.delta=1"])


def test_a_round_with_too_few_usable_clients_fails_the_run_with_the_reason(fed):
    with pytest.raises(UserError, match="min_train_clients"):
        _run("fedavg_cnn_digits_iid.yaml", "federated.faults.raise_fraction=0.9", "experiment=fed-too-few")
    exp = fed.client.get_experiment_by_name("fed-too-few")
    (run,) = fed.client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert "round 1: only 1 of 10 clients" in run.data.tags["raybloom.failure_reason"]
    assert "raised in round 1" in run.data.tags["raybloom.failure_reason"]


@pytest.mark.parametrize("overrides, needle", [
    (["federated.strategy=krum", "federated.clients=4", "federated.byzantine_f=1"], "more than 2f+2=4 sampled clients"),
    (["federated.strategy=bulyan", "federated.clients=6", "federated.byzantine_f=1"], "at least 4f+3=7 sampled clients"),
    (["federated.min_train_clients=12"], "min_train_clients: 12 > clients=10"),
    (["federated.faults.byzantine_client=10"], "faults.byzantine_client: 10 is not a partition id"),
    (["federated.beta=0.6"], "federated.beta"),
    (["data.val_fraction=0"], "server evaluates"),
])
def test_settings_that_cannot_hold_are_refused(overrides, needle):
    with pytest.raises(SpecError, match=needle.replace("+", r"\+").replace("(", r"\(")):
        spec.load(JOBS / "fedavg_cnn_digits_iid.yaml", overrides)


def test_more_clients_than_samples_is_refused_before_a_run(fed):
    with pytest.raises(UserError, match="federated.clients: 2000 clients need"):
        _run("fedavg_cnn_digits_iid.yaml", "federated.clients=2000", "experiment=fed-too-many")
    assert fed.client.get_experiment_by_name("fed-too-many") is None
