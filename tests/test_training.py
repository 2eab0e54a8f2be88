"""End-to-end training against known answers, read back from the real MLflow store."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from raybloom import data, engine, regularization, runner, spec
from raybloom.spec.sections import AugmentSpec

from conftest import JOBS, all_runs, cli, run_id_from


def test_linear_gd_lands_on_the_least_squares_solution():
    s = spec.load(JOBS / "linear_gd.yaml")
    ds = data.load(s.data)
    result = engine.fit(s, ds)
    x = ds.train.x.numpy().reshape(-1)
    y = ds.train.y.numpy().reshape(-1)
    (w_ls, b_ls), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1).astype(np.float64), y.astype(np.float64), rcond=None)
    lin = result.model[1]
    w, b = float(lin.weight.item()), float(lin.bias.item())
    assert abs(w - w_ls) < 1e-3 and abs(b - b_ls) < 1e-3, (w, b, w_ls, b_ls)
    assert abs(w_ls - 3) < 0.3 and abs(b_ls - 2) < 0.3  # the data really is y = 3x + 2 + noise


def test_linear_gd_run_is_recorded(client):
    r = cli("run", str(JOBS / "linear_gd.yaml"), "train.epochs=25")
    assert r.returncode == 0, r.stderr
    run = client.get_run(run_id_from(r.stdout))
    assert run.info.status == "FINISHED"
    assert run.data.tags["raybloom.kind"] == "train"
    assert run.data.tags["raybloom.early_stopped"] == "false"
    assert run.data.params["optim.name"] == "gd" and run.data.params["train.epochs"] == "25"
    assert set(spec.JobSpec().flat()) <= set(run.data.params)
    for key in ("train_loss", "val_loss", "lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(25)), key  # each epoch exactly once
    assert "val_accuracy" not in run.data.metrics  # regression
    for key in ("test_loss", "best_epoch", "stopped_epoch"):
        assert key in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "spec.yaml" in artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss_curves.png", "plots/learning_rate.png"} <= plots


def test_linear_run_logs_w_and_b_beside_the_least_squares_solution(client):
    s = spec.load(JOBS / "linear_gd.yaml")
    summary = runner.train_in_process(s)
    m = client.get_run(summary.run_id).data.metrics
    ds = data.load(s.data)
    x, y = ds.train.x.numpy().reshape(-1).astype(np.float64), ds.train.y.numpy().astype(np.float64)
    (w_ls, b_ls), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)
    assert m["w_star"] == pytest.approx(w_ls, abs=1e-9) and m["b_star"] == pytest.approx(b_ls, abs=1e-9)
    assert abs(m["w"] - m["w_star"]) < 1e-3 and abs(m["b"] - m["b_star"]) < 1e-3
    assert m["ls_distance"] == pytest.approx(np.hypot(m["w"] - m["w_star"], m["b"] - m["b_star"]), abs=1e-9)
    ws = sorted(client.get_metric_history(summary.run_id, "w"), key=lambda r: r.step)
    bs = client.get_metric_history(summary.run_id, "b")
    assert [r.step for r in ws] == list(range(300)) and len(bs) == 300  # every epoch, once
    assert abs(ws[0].value - w_ls) > abs(ws[-1].value - w_ls)  # it learned its way there
    assert {"w", "b", "w_star", "b_star", "ls_distance"} <= set(summary.metrics)  # the summary table prints them


def test_grad_norm_is_the_global_gradient_norm_of_each_step():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randn(32, 1)  # regression targets are (n, 1), as the data loader gives them
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 1))
    w, b = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    s = spec.load(JOBS / "linear_gd.yaml")
    objective = engine.make_objective(s, data.load(s.data))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: both steps see the same weights
    m = engine.train_epoch(model, [(x[:16], y[:16]), (x[16:], y[16:])], opt, objective)
    expected = []
    for xb, yb in ((x[:16], y[:16]), (x[16:], y[16:])):
        r = (xb @ w.T + b - yb).reshape(-1)  # d/dw mean(r²) = 2/n·Xᵀr, d/db = 2/n·Σr
        g = torch.cat([2 / len(xb) * xb.T @ r, (2 / len(xb) * r.sum()).reshape(1)])
        expected.append(float(g.norm()))
    assert m["grad_norm"] == pytest.approx(np.mean(expected), rel=1e-5)


@pytest.mark.serial
def test_cnn_digits_reaches_98_percent_in_under_two_minutes(client):
    t0 = time.monotonic()
    r = cli("run", str(JOBS / "cnn_digits.yaml"))
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    run = client.get_run(run_id_from(r.stdout))
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] >= 0.98, run.data.metrics
    assert elapsed < 120, f"cnn_digits took {elapsed:.0f}s"
    epochs = spec.load(JOBS / "cnn_digits.yaml").train.epochs
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(epochs))
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/confusion_matrix.png" in plots
    import mlflow.pytorch

    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    ds = data.load(spec.load(JOBS / "cnn_digits.yaml").data)
    acc = (model(ds.test.x).argmax(-1) == ds.test.y).float().mean().item()
    assert acc == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)


def test_deconv_halves_the_mean_image_error(client):
    s = spec.load(JOBS / "deconv_digits.yaml")
    summary = runner.train_in_process(s)
    ds = data.load(s.data)
    mean_image = ds.train.x.mean(0, keepdim=True)
    baseline = float(((ds.test.x - mean_image) ** 2).mean())
    run = client.get_run(summary.run_id)
    assert run.data.metrics["test_loss"] <= baseline / 2, (run.data.metrics["test_loss"], baseline)
    plots = {a.path for a in client.list_artifacts(summary.run_id, "plots")}
    assert "plots/reconstructions.png" in plots


def test_the_introductions_rgb_deconv_beats_the_mean_image_by_2x(client):
    """The introduction's example as it intends: 32x32 RGB, conv 32 and 64 (3x3, same), a stride-2 transposed
    conv, a final transposed conv to 3 channels with a sigmoid, binary cross-entropy."""
    s = spec.load(JOBS / "deconv_rgb_shapes.yaml", ["data.samples=1000", "train.epochs=6"])  # the job's model, less work
    ds = data.load(s.data)
    assert ds.shape == (3, 32, 32) and len(ds.train) + len(ds.val) + len(ds.test) == 1000
    model = engine.build(s, ds)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    ups = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding, c.stride) for c in convs] == [
        (3, 32, (3, 3), (1, 1), (1, 1)), (32, 64, (3, 3), (1, 1), (1, 1))]
    assert [(u.out_channels, u.stride) for u in ups] == [(32, (2, 2)), (3, (1, 1))]
    assert isinstance(list(model.modules())[-1], torch.nn.Sigmoid) and engine.make_objective(s, ds).loss == "bce"
    assert model(ds.test.x[:5]).shape == (5, 3, 32, 32)
    summary = runner.train_in_process(s)
    m = client.get_run(summary.run_id).data.metrics
    mean_image = ds.train.x.mean(0, keepdim=True)
    assert m["baseline_mse"] == pytest.approx(float(((ds.test.x - mean_image) ** 2).mean()), rel=1e-4)
    assert m["test_mse"] <= m["baseline_mse"] / 2, (m["test_mse"], m["baseline_mse"])
    print(f"\n  intro RGB deconv: test MSE {m['test_mse']:.5f}, mean image {m['baseline_mse']:.5f} ({m['baseline_ratio']:.1f}x)")
    assert m["baseline_ratio"] == pytest.approx(m["baseline_mse"] / m["test_mse"], rel=1e-9)


def test_the_rgb_shapes_are_deterministic_colour_and_the_grey_ones_unchanged():
    from raybloom.data import sources

    a, la, _ = sources._shapes_rgb(50, 3)
    b, lb, _ = sources._shapes_rgb(50, 3)
    assert a.shape == (50, 3, 32, 32) and a.dtype == np.float32 and np.array_equal(a, b) and np.array_equal(la, lb)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert (a.std(axis=1) > 0.05).mean() > 0.3  # the channels differ: colour, not grey copied thrice
    grey, lg, _ = sources._shapes(50, 3)
    assert grey.shape == (50, 1, 32, 32) and np.array_equal(lg, la)
    assert np.array_equal((grey[:, 0] > 0), np.abs(a - a[:, :, :1, :1]).sum(1) > 1e-6)  # the same shape masks


def test_early_stopping_stops_and_restores_the_best_weights(client):
    s = spec.load(JOBS / "regularization_digits.yaml")
    ds = data.load(s.data)
    assert len(ds.train) == 300  # small train set, wide model: built to overfit
    result = engine.fit(s, ds)
    assert result.early_stopped
    assert result.stopped_epoch < s.train.epochs - 1
    assert result.best_epoch < result.stopped_epoch
    best_seen = min(h["val_loss"] for h in result.history)
    assert result.history[result.best_epoch]["val_loss"] == best_seen
    assert result.val["loss"] == pytest.approx(best_seen, rel=1e-5)  # the restored weights are the best ones
    summary = runner.train_in_process(s)
    run = client.get_run(summary.run_id)
    assert run.data.tags["raybloom.early_stopped"] == "true"
    assert run.data.metrics["best_epoch"] < run.data.metrics["stopped_epoch"]
    assert len(client.get_metric_history(summary.run_id, "val_loss")) == int(run.data.metrics["stopped_epoch"]) + 1
    assert "l2_penalty" in run.data.metrics


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.ndim > 1])


def test_l2_shrinks_weights_and_l1_zeroes_a_share_of_them():
    base = spec.load(JOBS / "mlp_digits.yaml").with_overrides(["train.epochs=8", "regularization.dropout=0", "schedule.name=constant"])
    ds = data.load(base.data)
    plain = _weights(engine.fit(base, ds).model)
    l2 = _weights(engine.fit(base.with_overrides(["regularization.l2=0.001"]), ds).model)
    l1 = _weights(engine.fit(base.with_overrides(["regularization.l1=0.0005"]), ds).model)
    assert l2.norm() < 0.8 * plain.norm(), (float(l2.norm()), float(plain.norm()))
    near_zero = lambda w: float((w.abs() < 1e-3).float().mean())  # noqa: E731
    assert near_zero(l1) > 0.2 and near_zero(l1) > 5 * near_zero(plain), (near_zero(l1), near_zero(plain))


# The next tests run in process (runner.train_in_process, what `raybloom run` dispatches to) and read the store back;
# the CLI itself is exercised by the tests above and by test_bad_input / test_tracking.
def test_penalties_are_logged_per_epoch(client):
    rid = runner.train_in_process(spec.load(JOBS / "mlp_digits.yaml", ["train.epochs=3", "regularization.l1=1e-5",
                                                          "regularization.l2=1e-4", "tracking.log_model=false"])).run_id
    for key in ("l1_penalty", "l2_penalty"):
        hist = client.get_metric_history(rid, key)
        assert [m.step for m in hist] == [0, 1, 2] and all(m.value > 0 for m in hist)


@pytest.mark.parametrize("schedule", [
    ["schedule.name=time", "schedule.decay=0.5"],
    ["schedule.name=step", "schedule.step_size=2", "schedule.gamma=0.3"],
    ["schedule.name=exponential", "schedule.gamma=0.7"],
    ["schedule.name=cosine", "schedule.warmup_epochs=2", "schedule.min_lr=0.0001"],
    ["schedule.name=plateau", "schedule.patience=1", "schedule.factor=0.5"],
    ["schedule.name=gradient", "schedule.min_lr=0.001", "schedule.power=2"],
])
def test_logged_lr_follows_the_schedule(client, schedule):
    from raybloom import schedules

    s = spec.load(JOBS / "mlp_digits.yaml", ["train.epochs=6", "optim.lr=0.05", "tracking.log_model=false", *schedule])
    rid = runner.train_in_process(s).run_id
    logged = [m.value for m in sorted(client.get_metric_history(rid, "lr"), key=lambda m: m.step)]
    vals = [m.value for m in sorted(client.get_metric_history(rid, "val_loss"), key=lambda m: m.step)]
    grads = [m.value for m in sorted(client.get_metric_history(rid, "grad_norm"), key=lambda m: m.step)]
    assert len(grads) == 6 and all(g > 0 for g in grads)
    expected = [schedules.lr_at(t, 0.05, s.schedule, 6, vals, grads) for t in range(6)]
    assert logged == pytest.approx(expected, rel=1e-9)
    assert len(set(round(v, 12) for v in logged)) > 1 or s.schedule.name == "plateau"


def test_kfold_makes_k_children_and_a_parent_with_mean_and_std(client):
    r = cli("run", str(JOBS / "cv_cnn_digits.yaml"), "train.epochs=3", "train.cv_folds=3", "tracking.log_model=false")
    assert r.returncode == 0, r.stderr
    parent_id = run_id_from(r.stdout)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 3
    assert sorted(c.data.tags["raybloom.fold"] for c in children) == ["0", "1", "2"]
    assert all(c.info.status == "FINISHED" for c in children)
    for c in children:
        hist = client.get_metric_history(c.info.run_id, "val_accuracy")
        assert len(hist) == 3
    m = parent.data.metrics
    assert {"cv_val_loss_mean", "cv_val_loss_std", "cv_val_accuracy_mean", "cv_val_accuracy_std"} <= set(m)
    assert 0 < m["cv_val_accuracy_mean"] <= 1 and m["cv_val_accuracy_std"] >= 0
    assert parent.info.status == "FINISHED"
    assert m["cv_val_accuracy_mean"] == pytest.approx(np.mean([
        client.get_run(c.info.run_id).data.metrics["val_accuracy"] for c in children]), abs=0.05)
    assert len(all_runs(client)) == 4


def test_kfold_holds_every_sample_out_exactly_once():
    folds = regularization.kfold_indices(103, 4, seed=7)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(103))  # each sample held out once
    assert sorted(len(h) for _, h in folds) == [25, 26, 26, 26]
    for train_idx, held_idx in folds:
        assert not set(train_idx) & set(held_idx) and len(train_idx) + len(held_idx) == 103
    assert all((a[1] == b[1]).all() for a, b in zip(folds, regularization.kfold_indices(103, 4, seed=7)))
    assert any((a[1] != b[1]).any() for a, b in zip(folds, regularization.kfold_indices(103, 4, seed=8)))


def test_training_is_deterministic_under_the_seed():
    s = spec.load(JOBS / "mlp_digits.yaml", ["train.epochs=2"])
    ds = data.load(s.data)
    a, b = engine.fit(s, ds), engine.fit(s, ds)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    c = engine.fit(s.with_overrides(["seed=1"]), ds)
    assert [h["train_loss"] for h in a.history] != [h["train_loss"] for h in c.history]


def test_sharded_batches_union_is_the_single_process_batch():
    ds = data.load(spec.JobSpec().data)
    single = list(data.Batches(ds.train, 64, seed=3))
    shards = [list(data.Batches(ds.train, 32, seed=3, rank=r, world=2)) for r in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1])
    for i, (xs, ys) in enumerate(single):
        assert torch.equal(torch.cat([shards[0][i][1], shards[1][i][1]]), ys)


@pytest.mark.parametrize("optim", ["gd", "sgd", "adam", "adagrad"])
def test_every_optimizer_lowers_the_loss(optim):
    s = spec.load(JOBS / "mlp_digits.yaml", ["train.epochs=4", f"optim.name={optim}", "optim.lr=0.05" if optim != "adam" else "optim.lr=0.002",
                                             "schedule.name=constant", "regularization.dropout=0"])
    h = engine.fit(s, data.load(s.data)).history
    assert h[-1]["train_loss"] < h[0]["train_loss"], (optim, [x["train_loss"] for x in h])


@pytest.mark.parametrize("optim, expected", [
    ("gd", lambda ps: torch.optim.SGD(ps, lr=0.05)),
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.05)),
    ("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=0.05)),
])
def test_each_optimizer_takes_torchs_own_steps(optim, expected):
    """Two steps of the engine's optimizer on the same batches give the weights torch's optimizer gives."""
    s = spec.load(JOBS / "mlp_digits.yaml", [f"optim.name={optim}", "optim.lr=0.05", "optim.momentum=0.9",
                                             "regularization.dropout=0"])
    ds = data.load(s.data)
    batches = [(ds.train.x[:64], ds.train.y[:64]), (ds.train.x[64:128], ds.train.y[64:128])]
    objective = engine.make_objective(s, ds)
    torch.manual_seed(0)
    ours = engine.build(s, ds)
    theirs = engine.build(s, ds)
    theirs.load_state_dict(ours.state_dict())
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    engine.train_epoch(ours, batches, engine.make_optimizer(ours.parameters(), s.optim), objective)
    opt = expected(theirs.parameters())
    for xb, yb in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(theirs(xb), yb).backward()
        opt.step()
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (optim, name)
    assert not torch.equal(ours.state_dict()["1.weight"], start["1.weight"])  # the steps moved the weights


def test_bce_loss_trains_the_deconv():
    s = spec.load(JOBS / "deconv_digits.yaml", ["train.epochs=3", "model.loss=bce"])
    r = engine.fit(s, data.load(s.data))
    assert r.objective.loss == "bce" and r.history[-1]["train_loss"] < r.history[0]["train_loss"]


def test_shift_augmentation_moves_pixels_without_changing_the_mass():
    from raybloom import regularization

    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    out = regularization.augment(x, AugmentSpec(shift=1), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)))
    assert (out != x).any(dim=(1, 2, 3)).float().mean() > 0.5  # most samples moved
