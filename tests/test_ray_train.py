"""Data-parallel training on a real Ray (started in process): DDP equivalence, accuracy, fault tolerance."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raybloom import data, engine, ray_session, ray_train, spec
from raybloom.errors import TrainingDiverged, UserError
from raybloom.reaper import process_tree

from conftest import JOBS, RAYBLOOM, all_runs, run_id_from


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray_session.init_ray(spec.JobSpec())
    yield ray
    ray.shutdown()


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def test_a_ray_address_is_checked_before_ray_init_waits_on_it():
    ray_session.check_address("auto", "$RAY_ADDRESS")  # Ray's own lookup: left to Ray
    for bad in ("nonsense", "127.0.0.1", "127.0.0.1:port"):
        with pytest.raises(UserError, match="is not a Ray address; expected HOST:PORT"):
            ray_session.check_address(bad, "$RAY_ADDRESS")
    with pytest.raises(UserError, match=r"scaling.address: no Ray cluster answers at ray://127.0.0.1:1 "):
        ray_session.check_address("ray://127.0.0.1:1", "scaling.address")


def _steps(client, run_id: str) -> list[tuple[int, int]]:
    return sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "train_loss"))


def _until(what, n: int, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while len(found := what()) < n:
        assert time.monotonic() < deadline, found
        time.sleep(0.05)
    return found


def test_rank0_writes_the_epochs_handed_over_within_its_interval_in_one_write_and_each_once(client):
    """Rank 0's MLflow writer on Ray (no checkpoint to wait for here): the first epoch at once; the epochs
    handed over within `interval` of a write in the next write, together (one timestamp); at `close` what is
    left at once; a writer started on a run that has epochs already (a restarted worker) writes only the rest."""
    from raybloom import tracking

    run_id = client.create_run(client.create_experiment("writer")).info.run_id
    history = [{"train_loss": 1.0 / (t + 1), "val_loss": 2.0, "lr": 0.1} for t in range(400)]
    writer = ray_train.MetricsWriter(tracking.RunRecorder(run_id, client.tracking_uri), interval=1.0)
    writer.write(history, 1)
    (step0, t0), = _until(lambda: _steps(client, run_id), 1)
    assert step0 == 0
    for t in range(1, 5):
        writer.write(history, t + 1)
    steps = _until(lambda: _steps(client, run_id), 5)
    assert [s for s, _ in steps] == [0, 1, 2, 3, 4]
    assert len({ts for _, ts in steps[1:]}) == 1, steps  # epochs 1-4: one write
    assert steps[1][1] - t0 >= 900, steps  # not before the interval was over
    writer.write(history, 6)
    writer.write(history, 7)
    began = time.monotonic()
    writer.close()
    assert time.monotonic() - began < 0.9  # closing does not wait for the interval
    steps = _steps(client, run_id)
    assert [s for s, _ in steps] == list(range(7)) and steps[5][1] == steps[6][1], steps

    again = ray_train.MetricsWriter(tracking.RunRecorder(run_id, client.tracking_uri))
    again.write(history, 400)  # 1,179 values: more than one write takes (METRIC_BATCH), split between epochs
    again.close()
    for key in ("train_loss", "val_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(400)), key


def test_a_worker_sweeps_the_local_checkpoint_folders_of_dead_workers_only(tmp_path, monkeypatch):
    """A worker killed in the middle of a checkpoint leaves its local folder (the model's state in it); the next
    worker on the node removes the folders whose process (pid and start time) no longer runs, no other."""
    from raybloom import pids

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["sleep", "30"])
    dead = pids.read_proc(gone.pid)
    gone.kill()
    gone.wait()
    me = pids.read_proc(os.getpid())
    folders = {
        "dead": tmp_path / f"{ray_train.CHECKPOINT_PREFIX}{dead.pid}.{dead.start}-abc",
        "pid reused": tmp_path / f"{ray_train.CHECKPOINT_PREFIX}{me.pid}.{me.start + 1}-abc",
        "live": tmp_path / f"{ray_train.CHECKPOINT_PREFIX}{me.pid}.{me.start}-abc",
        "not a worker's": tmp_path / f"{ray_train.CHECKPOINT_PREFIX}abc",
    }
    for folder in folders.values():
        folder.mkdir()
        (folder / ray_train.STATE_FILE).write_bytes(b"half a state")
    new = ray_train._checkpoint_folder()
    assert new.parent == tmp_path and new.name.startswith(f"{ray_train.CHECKPOINT_PREFIX}{me.pid}.{me.start}-")
    ray_train._sweep_checkpoint_folders()
    assert {k: f.exists() for k, f in folders.items()} == {"dead": False, "pid reused": False, "live": True,
                                                           "not a worker's": True}
    assert new.exists()


def test_two_worker_ddp_equals_one_process_with_the_global_batch(ray_local, client):
    """Same seed, same initial weights, same sample order -> same parameters.

    The sample order is made identical by `data.Batches`: both runs draw one permutation per epoch from
    a generator seeded with (seed, epoch); the 1-process run takes global batches of 2·b samples in that
    order, and worker r of 2 takes the r-th half of each of those global batches. With train_limit a
    multiple of 2·b every half has b samples, so DDP's average of the two workers' mean gradients is the
    mean gradient of the global batch. Dropout and augmentation are off (their randomness is per process).
    """
    b = 16
    overrides = ["model.filters=[8,16]", "model.head_hidden=32", "regularization.dropout=0", "data.train_limit=320",
                 "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "train.epochs=3", "train.threads=1",
                 "experiment=ddp-equivalence"]
    ddp_spec = spec.load(JOBS / "cnn_digits.yaml", [*overrides, f"train.batch_size={b}", "scaling.workers=2"])
    one_spec = spec.load(JOBS / "cnn_digits.yaml", [*overrides, f"train.batch_size={2 * b}", "scaling.workers=0"])
    ddp_spec = ddp_spec.with_overrides(["regularization.augment.shift=0"])
    one_spec = one_spec.with_overrides(["regularization.augment.shift=0"])

    summary = ray_train.fit(ddp_spec)
    import mlflow.pytorch

    ddp_model = mlflow.pytorch.load_model(f"runs:/{summary.run_id}/model")
    single = engine.fit(one_spec, data.load(one_spec.data)).model
    a, b_ = _params(ddp_model), _params(single)
    rel = float((a - b_).norm() / b_.norm())
    assert rel <= 1e-4, f"relative parameter difference {rel:.2e}"
    # and the training really moved the weights (a no-op would also be "equal")
    engine.seed_everything(one_spec.seed)
    init = _params(engine.build(one_spec, data.load(one_spec.data)))
    assert float((init - b_).norm() / b_.norm()) > 0.05
    run = client.get_run(summary.run_id)
    assert run.data.tags["raybloom.workers"] == "2" and run.info.status == "FINISHED"
    assert run.data.tags["raybloom.device"] == "cpu fp32 gloo x2"


UNINTERRUPTED: dict[str, torch.Tensor] = {}  # cnn_digits on 2 workers, never stopped: its final weights


def _uninterrupted_cnn_digits(client) -> torch.Tensor:
    """The final weights of `cnn_digits.yaml` on 2 workers, trained without a stop (the test below's run)."""
    if "cnn_digits x2" not in UNINTERRUPTED:
        import mlflow.pytorch

        summary = ray_train.fit(spec.load(JOBS / "cnn_digits.yaml", ["scaling.workers=2"]))
        UNINTERRUPTED["cnn_digits x2"] = _params(mlflow.pytorch.load_model(f"runs:/{summary.run_id}/model"))
        UNINTERRUPTED["run_id"] = summary.run_id
    return UNINTERRUPTED["cnn_digits x2"]


def test_cnn_digits_on_two_workers_reaches_98_percent(ray_local, client):
    s = spec.load(JOBS / "cnn_digits.yaml", ["scaling.workers=2"])
    UNINTERRUPTED.clear()
    _uninterrupted_cnn_digits(client)
    summary = SimpleNamespace(run_id=UNINTERRUPTED["run_id"])
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] >= 0.98, run.data.metrics
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        assert [m.step for m in client.get_metric_history(summary.run_id, key)] == list(range(s.train.epochs)), key


@pytest.mark.timeout(300)
def test_a_full_shuffle_streams_beside_workers_that_hold_every_cpu(ray_local, client):
    """`data.shuffle: full` with `ingest: ray_data`: Ray Data's random shuffle has to run while the Train
    workers hold every CPU of the node (2 workers x 1 CPU on 2 cores); each epoch trains on the whole split."""
    cpus = int(ray_local.cluster_resources()["CPU"])
    workers = min(cpus, 4)
    job = spec.load(JOBS / "mlp_digits.yaml", [f"scaling.workers={workers}", f"scaling.cpus_per_worker={cpus / workers}",
                                               "scaling.ingest=ray_data", "data.shuffle=full", "train.epochs=2",
                                               "experiment=full-shuffle"])
    summary = ray_train.fit(job)
    assert [m.step for m in client.get_metric_history(summary.run_id, "train_loss")] == [0, 1]
    assert summary.metrics["test_accuracy"] > 0.5


def test_impossible_resources_fail_at_once_with_a_clear_message(ray_local):
    from raybloom.errors import UserError

    t0 = time.monotonic()
    with pytest.raises(UserError, match="scaling.workers: 64 workers"):
        ray_train.fit(spec.load(JOBS / "cnn_digits.yaml", ["scaling.workers=64"]))
    with pytest.raises(UserError, match="scaling.use_gpu"):
        ray_train.fit(spec.load(JOBS / "cnn_digits.yaml", ["scaling.workers=1", "scaling.use_gpu=true"]))
    assert time.monotonic() - t0 < 30


def _ray_train_workers(parent_pid: int) -> list[int]:
    """The Ray Train workers of the run `parent_pid` drives (the Ray it started): another test's Ray on the
    machine is not touched."""
    found = []
    for pid in process_tree(parent_pid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if "RayTrainWorker" in title:
            found.append(pid)
    return found


def _kill_a_worker_after(client, proc: subprocess.Popen, epochs: int, timeout: float = 240) -> tuple[str, int]:
    """Once the run `proc` drives has `epochs` epochs recorded, SIGKILL one Ray Train worker; (run id, epochs seen)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"no {epochs} epochs recorded in time"
        runs = all_runs(client)
        logged = len(client.get_metric_history(runs[0].info.run_id, "train_loss")) if runs else 0
        if logged >= epochs:
            break
        time.sleep(0.3)
    victims = _ray_train_workers(proc.pid)
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    return runs[0].info.run_id, logged


def test_sigkill_of_a_worker_resumes_from_the_checkpoint_and_records_each_epoch_once(client, store, ray_local):
    """...and ends with the weights of an uninterrupted run (the same job: its epochs, schedule and seed; the
    checkpoint holds the optimizer, early stopping and RNG states, the batch order is seeded per epoch)."""
    epochs = spec.load(JOBS / "cnn_digits.yaml").train.epochs
    proc = subprocess.Popen([RAYBLOOM, "run", str(JOBS / "cnn_digits.yaml"), "scaling.workers=2", "scaling.max_failures=2",
                             "train.checkpoint_every=2", "tracking.explain=false", "experiment=fault-injection"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _, logged = _kill_a_worker_after(client, proc, 4)  # epochs 0-3 checkpointed and recorded
        output, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    run = client.get_run(run_id_from(output))
    assert run.info.status == "FINISHED"
    resumed = int(run.data.tags["raybloom.resumed_from_epoch"])
    # It resumed from a checkpoint (a multiple of checkpoint_every), not from scratch. Rank 0 records epochs
    # once their checkpoint is persisted, but Ray's controller registers a reported checkpoint a moment
    # later: a kill in between resumes from the one before. So at most one checkpoint interval is re-run,
    # and epochs re-run after the restart are not recorded again (checked below).
    assert resumed % 2 == 0 and 2 <= resumed < epochs
    assert resumed >= logged - 2, (resumed, logged)
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(epochs)), (key, steps)
    import mlflow.pytorch

    resumed_weights = _params(mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model"))
    reference = _uninterrupted_cnn_digits(client)
    assert float((resumed_weights - reference).abs().max()) <= 1e-5


def test_rank0_killed_while_it_writes_a_checkpoint_resumes_from_the_previous_complete_one(client, store, ray_local):
    """Rank 0 dies (SIGKILL) with half of epoch 5's checkpoint file written (the failpoint in ray_train): the
    restarted group resumes from epoch 3's checkpoint, the one before, exactly; every epoch is recorded once and
    the final weights equal an uninterrupted run's."""
    epochs = spec.load(JOBS / "cnn_digits.yaml").train.epochs
    env = {**os.environ, ray_train.FAILPOINT: "rank0_dies_writing_checkpoint=5"}
    proc = subprocess.run([RAYBLOOM, "run", str(JOBS / "cnn_digits.yaml"), "scaling.workers=2", "scaling.max_failures=1",
                           "train.checkpoint_every=2", "tracking.explain=false", "experiment=killed-mid-checkpoint"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=400)
    output = proc.stdout
    assert proc.returncode == 0, output[-3000:]
    assert output.count("Attempting to start training worker group") == 2, output[-3000:]  # rank 0 died: one restart
    run = client.get_run(run_id_from(output))
    assert run.info.status == "FINISHED"
    assert run.data.tags["raybloom.resumed_from_epoch"] == "4"  # epochs 0-3: epoch 3's checkpoint
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(epochs)), (key, steps)
    import mlflow.pytorch

    resumed_weights = _params(mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model"))
    assert float((resumed_weights - _uninterrupted_cnn_digits(client)).abs().max()) <= 1e-5


def test_more_worker_kills_than_max_failures_end_the_run_failed_with_each_epoch_once(client, store):
    """max_failures=0 and one worker SIGKILLed (the test above survives one kill with max_failures=2): exit 2
    naming the setting, the run FAILED with the reason, every epoch recorded up to then exactly once."""
    proc = subprocess.Popen([RAYBLOOM, "run", str(JOBS / "cnn_digits.yaml"), "scaling.workers=2", "scaling.max_failures=0",
                             "train.epochs=200", "train.checkpoint_every=2", "model.filters=[8,16]", "model.head_hidden=32",
                             "tracking.log_model=false", "tracking.explain=false", "experiment=too-many-kills"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_id, _ = _kill_a_worker_after(client, proc, 4)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 2, output[-3000:]
    error = [line for line in output.splitlines() if line.startswith("error: ")][-1]
    assert "scaling.max_failures=0" in error and "rank" in error, error
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "scaling.max_failures=0" in run.data.tags["raybloom.failure_reason"]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(len(steps))) and 4 <= len(steps) < 200, steps


def test_sigterm_to_a_ray_run_ends_it_killed_and_a_diverging_one_failed(client, store, ray_local):
    proc = subprocess.Popen([RAYBLOOM, "run", str(JOBS / "cnn_digits.yaml"), "scaling.workers=2", "train.epochs=200",
                             "tracking.log_model=false", "experiment=ray-stop"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no epoch recorded in time"
            runs = all_runs(client)
            if runs and client.get_metric_history(runs[0].info.run_id, "train_loss"):
                break
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, output[-3000:]
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"
    # the diverging run in process, on the module's Ray (what `raybloom run` dispatches to; exit 2 is the
    # CLI's answer to any UserError, tested in test_bad_input)
    with pytest.raises(TrainingDiverged, match="train_loss"):
        ray_train.fit(spec.load(JOBS / "linear_gd.yaml", ["scaling.workers=2", "optim.lr=5", "train.epochs=30",
                                                          "experiment=ray-diverge"]))
    failed = [x for x in all_runs(client) if x.data.tags.get("raybloom.kind") == "train" and x.info.status == "FAILED"]
    assert len(failed) == 1 and "train_loss" in failed[0].data.tags["raybloom.failure_reason"]
    assert not [x for x in all_runs(client) if x.info.status == "RUNNING"]
