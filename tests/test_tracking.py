"""Tracking contract details: model registration, KILLED on Ctrl-C / SIGTERM, the dashboard command."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import JOBS, RAYBLOOM, all_runs, cli, run_id_from


def test_model_is_logged_with_signature_and_registered(client):
    r = cli("run", str(JOBS / "mlp_digits.yaml"), "train.epochs=2", "tracking.register_as=digits-mlp")
    assert r.returncode == 0, r.stderr
    rid = run_id_from(r.stdout)
    versions = client.search_model_versions("name='digits-mlp'")
    assert [v.run_id for v in versions] == [rid]
    from mlflow.models import get_model_info

    info = get_model_info(f"runs:/{rid}/model")
    assert info.signature is not None and info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, 1, 8, 8], (-1, 1, 8, 8))
    assert info.saved_input_example_info is not None
    # the experiment is tagged as model training, so MLflow's UI opens it on its runs (not a GenAI view)
    exp = client.get_experiment(client.get_run(rid).info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def _wait_for_epoch(client, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = all_runs(client)
        if runs and client.get_metric_history(runs[0].info.run_id, "val_loss"):
            return runs[0]
        time.sleep(0.5)
    raise AssertionError("no epoch was recorded in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_ends_killed_and_keeps_its_epochs(client, store, sig):
    proc = subprocess.Popen([RAYBLOOM, "run", str(JOBS / "mlp_digits.yaml"), "train.epochs=100000", "tracking.log_model=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        run = _wait_for_epoch(client)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # where it hangs: faulthandler prints every thread's stack on SIGABRT
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            stacks = err.split("\nExtension modules:")[0]  # the module list after the stacks is long
            raise AssertionError(f"the run did not end within 60 s of {sig.name}:\n{stacks[-12000:]}") from None
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "KILLED" in err and "Traceback" not in err
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    assert "interrupted" in run.data.tags["raybloom.failure_reason"]
    hist = client.get_metric_history(run.info.run_id, "val_loss")
    assert len(hist) >= 1 and len({m.step for m in hist}) == len(hist)


def test_an_interrupt_waits_for_the_write_under_way_and_a_second_one_does_not():
    """Ctrl-C inside a write to the store is raised when the write returns (cut in half, a SQLite write kept
    its lock and the KILLED status after it waited for ever); a second Ctrl-C is raised at once."""
    from raybloom.errors import interrupt, uninterrupted

    previous = signal.signal(signal.SIGINT, interrupt)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler has run by now
                done.append("write")
        assert done == ["write"]
        with pytest.raises(KeyboardInterrupt):
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                done.append("not reached")
        assert done == ["write"]
        with pytest.raises(KeyboardInterrupt) as raised:  # a write that fails: the interrupt, not left pending
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                raise RuntimeError("database is locked")
        assert isinstance(raised.value.__cause__, RuntimeError)
        with uninterrupted():  # nothing pending is left behind
            done.append("clean")
        import threading

        inside, release = threading.Event(), threading.Event()

        def write_in_a_thread():
            with uninterrupted():
                inside.set()
                release.wait(10)

        writer = threading.Thread(target=write_in_a_thread)
        writer.start()
        inside.wait(10)
        try:  # another thread's write does not hold the main thread's interrupt back
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                done.append("not reached either")
        finally:
            release.set()
            writer.join()
        assert done == ["write", "clean"]
    finally:
        signal.signal(signal.SIGINT, previous)
        from raybloom.errors import _Interrupts

        _Interrupts.depth, _Interrupts.pending = 0, False  # as they were, whatever failed above


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_dashboard_on_the_store(client, store):
    r = cli("run", str(JOBS / "linear_gd.yaml"), "train.epochs=3")
    assert r.returncode == 0, r.stderr
    port = _free_port()
    proc = subprocess.Popen([RAYBLOOM, "ui", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "dashboard did not come up"
                time.sleep(1)

        exps = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"))
        assert "linear-gd" in {e["name"] for e in exps["experiments"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_result_recorded_again_writes_each_part_once(client):
    """A run resumed after the server went away in the middle of its final recording records the result again:
    its final metrics and its model are there once (the plots are files, written again in place)."""
    from raybloom import engine, results, spec, tracking

    s = spec.load(JOBS / "mlp_digits.yaml", ["train.epochs=2", "tracking.explain=false"])
    fit = engine.fit(s)
    with tracking.TrackedRun(s, "train") as run:
        results.record_result(run, fit)
        results.record_result(run, fit)  # as `--resume` does after an outage in the middle of the first
    assert run.record().tags[results.RECORDED_TAG] == "explain,final,model"
    assert len(client.get_metric_history(run.run_id, "test_accuracy")) == 1
    models = client.search_logged_models(experiment_ids=[run.experiment_id],
                                         filter_string=f"source_run_id = '{run.run_id}'")
    assert len(models) == 1, [m.model_id for m in models]
