"""A real local cluster: `raybloom cluster up` (Ray head + a worker node as separate `ray start`
processes, an MLflow server), `raybloom submit` through the Ray Jobs API, `raybloom cluster down` by PID.
Real processes, no mocks. The cluster's state goes to a tmp folder through $RAYBLOOM_STATE_DIR."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import tomllib
from pathlib import Path

from mlflow.tracking import MlflowClient

from raybloom.cluster.procs import read_proc

from conftest import RAYBLOOM, ROOT, cli, run_id_from


def _running(pid: int, start: int | None = None) -> bool:
    """The process exists, is not a zombie and (when given) started at `start` (pids get reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0] not in ("Z", "X") and (start is None or int(fields[19]) == start)


def _ours_still_running(record: dict) -> list[str]:
    """Any process of the cluster left: a recorded one, one in a recorded process group, or one whose
    command line names the cluster's temp dir (the workers and job drivers started after `up`)."""
    left = [f"{p['pid']} {p['cmd'][:80]}" for p in record["processes"] if _running(p["pid"], p["start"])]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _running(int(entry.name)):
            p = read_proc(int(entry.name))
            if p and p.start >= record["since_ticks"] and (p.pgid in record["pgids"] or record["temp_dir"] + "/" in p.cmd):
                left.append(f"{p.pid} {p.cmd[:80]}")
    return left


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_cluster_up_submit_down(tmp_path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("RAYBLOOM_STATE_DIR", str(state))
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS"):  # submit reads cluster.env
        monkeypatch.delenv(var, raising=False)
    record = None
    t0 = time.monotonic()
    up = cli("cluster", "up", "--workers", "1", "--cpus-per-node", "1", "--flower-nodes", "2", cwd=ROOT, timeout=400)
    try:
        t_up = time.monotonic() - t0
        assert up.returncode == 0, up.stdout + up.stderr
        record = json.loads((state / "cluster.json").read_text())
        env = _env_file(state / "cluster.env")
        assert {"RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "MLFLOW_TRACKING_URI", "RAYBLOOM_CLUSTER_PIDS",
                "RAYBLOOM_SUPERLINK", "FLWR_HOME"} <= env.keys()
        assert env["RAYBLOOM_SUPERLINK"].startswith("127.0.0.1:")
        assert "federations" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]  # FLWR_HOME only
        assert "[superlink.raybloom]" in (Path(env["FLWR_HOME"]) / "config.toml").read_text()
        assert all(env[k].startswith(p) for k, p in [("RAY_ADDRESS", "127.0.0.1:"),
                   ("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:"), ("MLFLOW_TRACKING_URI", "http://127.0.0.1:")])
        dashboard, mlflow_uri = env["RAY_DASHBOARD_ADDRESS"], env["MLFLOW_TRACKING_URI"]

        from ray.util.state import list_nodes  # the dashboard's HTTP API: no driver joins from pytest

        nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")])
        assert len(nodes) == 2 and sum(n.is_head_node for n in nodes) == 1
        assert len({n.node_id for n in nodes}) == 2
        status = cli("cluster", "status", cwd=ROOT)
        assert status.returncode == 0 and "2/2 nodes alive" in status.stdout and "healthy" in status.stdout, status.stdout
        assert "2 SuperNodes online" in status.stdout, status.stdout
        again = cli("cluster", "up", cwd=ROOT)
        assert again.returncode == 1 and "already running" in again.stderr

        t1 = time.monotonic()
        job = cli("submit", "jobs/cnn_digits.yaml", "--address", dashboard, "scaling.workers=2", "train.epochs=3",
                  cwd=ROOT, timeout=400)
        t_submit = time.monotonic() - t1
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert re.search(r"submission id: raysubmit_\w+", job.stdout), job.stdout
        assert "SUCCEEDED" in job.stdout
        run_id = run_id_from(job.stdout)  # the job's own output, streamed by submit
        client = MlflowClient(mlflow_uri)  # THIS cluster's server
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["scaling.workers"] == "2"
        for metric in ("train_loss", "val_loss", "val_accuracy"):
            assert sorted(m.step for m in client.get_metric_history(run_id, metric)) == [0, 1, 2], metric
        assert "test_accuracy" in run.data.metrics

        local = cli("submit", "jobs/cnn_digits.yaml", "--address", dashboard, "optim.lr=-1", cwd=ROOT)
        assert local.returncode == 2 and "optim.lr" in local.stderr and "submission id" not in local.stdout
        bad = cli("submit", "jobs/cnn_digits.yaml", "--address", dashboard, "--no-validate", "optim.lr=-1",
                  cwd=ROOT, timeout=300)
        assert bad.returncode != 0 and "submission id: raysubmit_" in bad.stdout
        assert "optim.lr" in bad.stdout and "FAILED" in bad.stdout, bad.stdout[-3000:]
        t_fed = _federated_deployment_with_a_supernode_killed(state, env, client)
        t_dead = _federated_deployment_with_the_superlink_killed(state, env, client)  # last: the SuperLink is gone
        print(f"\ncluster up {t_up:.0f} s, submit (3 epochs, 2 workers) {t_submit:.0f} s, federated deployment {t_fed:.0f} s, "
              f"SuperLink killed mid-run {t_dead:.0f} s")
    finally:
        down = cli("cluster", "down", cwd=ROOT, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (state / "cluster.env").exists() and not (state / "cluster.json").exists()
    assert record is not None and len(record["processes"]) >= 10
    assert not _ours_still_running(record)
    assert not Path(record["temp_dir"]).exists()


def _federated_deployment_with_a_supernode_killed(state: Path, env: dict[str, str], client: MlflowClient) -> float:
    """`raybloom run` in deployment mode on the cluster's SuperLink + 2 SuperNodes: 2 rounds; SuperNode 1
    is SIGKILLed once round 1 is recorded. The run finishes (min_train_clients=1) with the lost node
    counted in clients_failed, and the driver reports the real outcome, read back from MLflow."""
    import signal

    t0 = time.monotonic()
    # round_timeout 30 s: every round starts a fresh `flwr-clientapp` process per SuperNode (Flower's process
    # isolation: torch, flwr and raybloom imported again), which took over 15 s on a loaded 2-core CI machine;
    # round 2 waits up to this long for the killed node.
    proc = subprocess.Popen([RAYBLOOM, "run", "jobs/fedavg_cnn_digits_iid.yaml", "federated.mode=deployment",
                             "federated.clients=2", "federated.rounds=2", "federated.local_epochs=1",
                             "federated.min_train_clients=1", "federated.round_timeout=30", "tracking.log_model=false",
                             "experiment=fed-deploy"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 240
        run_id = None
        while time.monotonic() < deadline and proc.poll() is None:
            exp = client.get_experiment_by_name("fed-deploy")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "clients_ok")) >= 1:
                run_id = runs[0].info.run_id
                break
            time.sleep(0.3)
        assert run_id, f"no round recorded in time:\n{proc.stdout.read() if proc.poll() is not None else ''}"
        record = json.loads((state / "cluster.json").read_text())
        (node,) = [g for g in record["groups"] if g["role"] == "flower-supernode-1"]
        os.killpg(node["pgid"], signal.SIGKILL)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert run_id_from(output) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raybloom.mode"] == "deployment"
    assert run.data.tags.get("raybloom.flower_run_id")
    ok = [m.value for m in sorted(client.get_metric_history(run_id, "clients_ok"), key=lambda m: m.step)]
    failed = [m.value for m in sorted(client.get_metric_history(run_id, "clients_failed"), key=lambda m: m.step)]
    assert len(ok) == 2 and ok[0] == 2.0  # both SuperNodes trained round 1
    assert sum(failed) >= 1 and min(ok) >= 1, (ok, failed)  # the killed one is counted, the other carries on
    assert run.data.metrics["test_accuracy"] > 0.3
    return time.monotonic() - t0


def _federated_deployment_with_the_superlink_killed(state: Path, env: dict[str, str], client: MlflowClient) -> float:
    """The SuperLink is SIGKILLed (its process group) once round 1 is recorded (on the one SuperNode the run
    before left): the driver gives the run up
    within a minute, ends it FAILED with the reason and exits 2; nothing is left RUNNING."""
    import signal

    t0 = time.monotonic()
    proc = subprocess.Popen([RAYBLOOM, "run", "jobs/fedavg_cnn_digits_iid.yaml", "federated.mode=deployment",
                             "federated.clients=2", "federated.rounds=6", "federated.local_epochs=1",
                             "federated.min_train_clients=1",  # SuperNode 1 was killed by the run before
                             "federated.round_timeout=30", "tracking.log_model=false", "experiment=fed-superlink-dies"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 240
        run_id = None
        while time.monotonic() < deadline and proc.poll() is None and run_id is None:
            exp = client.get_experiment_by_name("fed-superlink-dies")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and client.get_metric_history(runs[0].info.run_id, "clients_ok"):
                run_id = runs[0].info.run_id
            time.sleep(0.3)
        assert run_id, f"no round recorded in time:\n{proc.stdout.read() if proc.poll() is not None else ''}"
        record = json.loads((state / "cluster.json").read_text())
        (link,) = [g for g in record["groups"] if g["role"] == "flower-superlink"]
        os.killpg(link["pgid"], signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    given_up = time.monotonic() - killed_at
    assert proc.returncode == 2, output[-3000:]
    assert given_up < 90, f"the driver took {given_up:.0f} s to give up"
    error = [line for line in output.splitlines() if line.startswith("error: ")][-1]
    assert "the SuperLink at" in error and "stopped answering" in error, error
    run = client.get_run(run_id)
    assert run.info.status == "FAILED", run.info.status
    assert "SuperLink" in run.data.tags["raybloom.failure_reason"], run.data.tags
    assert len(client.get_metric_history(run_id, "clients_ok")) < 6
    return time.monotonic() - t0


def test_down_without_cluster_and_only_what_was_recorded(tmp_path):
    """No cluster: `down` says so and exits 0, `status` exits 1. With a record, `up` refuses while a
    recorded process lives, and `down` stops exactly the recorded processes, not a bystander."""
    state = tmp_path / "state"
    none = cli("cluster", "down", "--state-dir", str(state))
    assert none.returncode == 0 and "no cluster to stop" in none.stdout
    st = cli("cluster", "status", "--state-dir", str(state))
    assert st.returncode == 1 and "no cluster" in st.stdout

    ours = subprocess.Popen(["sleep", "120"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        p = read_proc(ours.pid)
        state.mkdir()
        (state / "cluster.json").write_text(json.dumps({
            "version": 1, "created": "test", "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "since_ticks": p.start, "temp_dir": str(tmp_path / "rb-none"), "workers": 0,
            "dashboard": "http://127.0.0.1:9", "mlflow_uri": "http://127.0.0.1:9", "ray_address": "127.0.0.1:9",
            "pgids": [], "processes": [{"pid": p.pid, "start": p.start, "pgid": p.pgid, "cmd": p.cmd}]}))
        (state / "cluster.env").write_text("RAY_ADDRESS=127.0.0.1:9\n")
        refused = cli("cluster", "up", "--state-dir", str(state))
        assert refused.returncode == 1 and "already running" in refused.stderr
        down = cli("cluster", "down", "--state-dir", str(state), "--timeout", "5")
        assert down.returncode == 0, down.stderr
        assert ours.wait(timeout=10) == -15  # SIGTERM
        assert bystander.poll() is None
        assert not (state / "cluster.env").exists() and not (state / "cluster.json").exists()
    finally:
        for proc in (ours, bystander):
            proc.kill()
            proc.wait()
