"""`raybloom cluster up --secure` against real servers on loopback: MLflow basic auth (on a throwaway
PostgreSQL) refuses unauthenticated, wrong-password and read-only writes and foreign Host headers; the
Ray Jobs API refuses submissions without the token; the Flower SuperLink speaks only TLS and refuses a
SuperNode whose key is not registered. Then a Ray job and a federated deployment run, both read back
from MLflow with the credentials of cluster.env, and `down` leaves nothing running. One cluster for the
module (tests run in file order; the last one stops it). No mocks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from raybloom.cluster.procs import read_proc
from raybloom.net import free_ports
from raybloom.cluster.secure import make_supernode_key

from conftest import RAYBLOOM, ROOT, cli, run_id_from

CLEARED = ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
           "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "FLWR_HOME",
           "RAYBLOOM_SUPERLINK", "RAYBLOOM_SUPERLINK_CA", "RAYBLOOM_FLWR_CONNECTION")


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def _ours_still_running(record: dict) -> list[str]:
    """A recorded process, a member of a recorded group, or one whose command line names the temp dir."""
    left = []
    for entry in Path("/proc").iterdir():
        p = read_proc(int(entry.name)) if entry.name.isdigit() else None
        if p is None or p.state in ("Z", "X"):
            continue
        recorded = any(r["pid"] == p.pid and r["start"] == p.start for r in record["processes"])
        if recorded or (p.start >= record["since_ticks"] and (p.pgid in record["pgids"] or record["temp_dir"] + "/" in p.cmd
                                                           or record["postgres_dir"] + "/" in p.cmd)):
            left.append(f"{p.pid} {p.cmd[:100]}")
    return left


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """A --secure cluster (Ray head, MLflow on PostgreSQL, SuperLink + 2 SuperNodes): (state, env, record)."""
    state = tmp_path_factory.mktemp("secure") / "state"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYBLOOM_STATE_DIR", str(state))
        for var in CLEARED:  # everything the CLI needs must come from cluster.env
            mp.delenv(var, raising=False)
        t0 = time.monotonic()
        up = cli("cluster", "up", "--secure", "--workers", "0", "--cpus-per-node", "2", "--flower-nodes", "2",
                 cwd=ROOT, timeout=400)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            print(f"\nsecure cluster up in {time.monotonic() - t0:.0f} s")
            yield state, _env_file(state / "cluster.env"), json.loads((state / "cluster.json").read_text())
        finally:
            cli("cluster", "down", cwd=ROOT, timeout=180)  # a no-op when test_down already stopped it


def test_secrets_stay_private(secure):
    state, env, record = secure
    assert stat.S_IMODE((state / "cluster.env").stat().st_mode) == 0o600
    assert env["RAY_AUTH_MODE"] == "token" and len(env["RAY_AUTH_TOKEN"]) >= 32
    assert env["MLFLOW_TRACKING_USERNAME"] == "admin" and len(env["MLFLOW_TRACKING_PASSWORD"]) >= 12
    config = (Path(env["FLWR_HOME"]) / "config.toml").read_text()
    assert f'root-certificates = "{env["RAYBLOOM_SUPERLINK_CA"]}"' in config and "insecure" not in config
    # no secret on a command line (readable by every user) or in cluster.json
    secrets = [env["RAY_AUTH_TOKEN"], env["MLFLOW_TRACKING_PASSWORD"]]
    cmds = [read_proc(p["pid"]).cmd for p in record["processes"] if read_proc(p["pid"])]
    assert cmds and not [c for c in cmds if any(s in c for s in secrets)]
    assert not any(s in (state / "cluster.json").read_text() for s in secrets)
    assert any("--app-name basic-auth" in c for c in cmds)
    # the cluster's folders are its own: the Ray temp dir (Ray makes its node dirs 777 inside) and
    # PostgreSQL's (the postgres user's when run as root)
    temp, pg = Path(record["temp_dir"]), Path(record["postgres_dir"])
    assert stat.S_IMODE(temp.stat().st_mode) == 0o700 and stat.S_IMODE(pg.stat().st_mode) == 0o700
    for sub in ("secure", "flower-state.db"):
        assert stat.S_IMODE((temp / sub).stat().st_mode) & 0o077 == 0, sub
    # PostgreSQL is MLflow's store, listens on 127.0.0.1 only and wants a password
    (postmaster,) = [c for c in cmds if f"-D {record['postgres_dir']}/data" in c]
    assert "listen_addresses=127.0.0.1" in postmaster
    port = int(postmaster.split(" -p ")[1].split()[0])
    import psycopg2

    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="mlflow", connect_timeout=5)


def test_mlflow_basic_auth(secure):
    _, env, _ = secure
    uri, admin = env["MLFLOW_TRACKING_URI"], ("admin", env["MLFLOW_TRACKING_PASSWORD"])
    api = f"{uri}/api/2.0/mlflow"

    def create_experiment(name, auth=None, **kw):
        return requests.post(f"{api}/experiments/create", json={"name": name}, auth=auth, timeout=30, **kw)

    assert requests.get(f"{uri}/health", timeout=30).status_code == 200
    assert create_experiment("sec-anon").status_code == 401
    assert create_experiment("sec-wrong", auth=("admin", "not-the-password")).status_code == 401
    assert requests.get(f"{api}/experiments/search", params={"max_results": 5}, timeout=30).status_code == 401
    made = create_experiment("sec-admin", auth=admin)
    assert made.status_code == 200, made.text
    exp_id = made.json()["experiment_id"]
    # a read-only user (the default permission is READ): reads pass, writes get 403
    reader = ("reader", "reader-password-123")
    created = requests.post(f"{api}/users/create", json={"username": reader[0], "password": reader[1]}, auth=admin, timeout=30)
    assert created.status_code == 200, created.text
    assert requests.get(f"{api}/experiments/get", params={"experiment_id": exp_id}, auth=reader, timeout=30).status_code == 200
    write = requests.post(f"{api}/runs/create", json={"experiment_id": exp_id}, auth=reader, timeout=30)
    assert write.status_code == 403, write.text
    assert requests.post(f"{api}/experiments/delete", json={"experiment_id": exp_id}, auth=reader,
                         timeout=30).status_code == 403
    assert requests.post(f"{api}/runs/create", json={"experiment_id": exp_id}, auth=admin, timeout=30).status_code == 200
    # a Host header other than the loopback host:port (DNS rebinding) is refused, credentials or not
    host = requests.get(f"{api}/experiments/get", params={"experiment_id": exp_id}, auth=admin,
                        headers={"Host": "evil.example.com"}, timeout=30)
    assert host.status_code in (400, 403) and "Host" in host.text, (host.status_code, host.text)


def test_ray_jobs_need_the_token(secure, tmp_path):
    _, env, _ = secure
    jobs = f"{env['RAY_DASHBOARD_ADDRESS']}/api/jobs/"
    marker = tmp_path / "pwned"
    body = {"entrypoint": f"touch {marker}", "submission_id": "sec-no-token"}
    assert requests.post(jobs, json=body, timeout=30).status_code == 401
    assert requests.post(jobs, json=body, headers={"Authorization": "Bearer not-the-token"}, timeout=30).status_code == 403
    # Ray's own client, with no token in its environment, is refused too
    clean = {k: v for k, v in os.environ.items() if k not in CLEARED}
    ray_cli = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "submit", "--address",
                              env["RAY_DASHBOARD_ADDRESS"], "--submission-id", "sec-ray-cli", "--no-wait", "--",
                              "touch", str(marker)], capture_output=True, text=True, timeout=120, env=clean)
    assert ray_cli.returncode != 0, ray_cli.stdout
    assert "401" in ray_cli.stdout + ray_cli.stderr or "auth" in (ray_cli.stdout + ray_cli.stderr).lower()
    # `cluster status` asks the dashboard with the token of cluster.env
    status = cli("cluster", "status", cwd=ROOT, timeout=120)
    assert status.returncode == 0 and "1/1 nodes alive" in status.stdout and "2 SuperNodes online" in status.stdout, status.stdout
    listed = requests.get(jobs, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}, timeout=30)
    assert listed.status_code == 200
    assert not {j.get("submission_id") for j in listed.json()} & {"sec-no-token", "sec-ray-cli"}
    time.sleep(1)
    assert not marker.exists()


def test_superlink_tls_and_supernode_auth(secure, tmp_path):
    state, env, record = secure
    flwr = str(Path(sys.executable).with_name("flwr"))

    def nodes(home: str) -> subprocess.CompletedProcess:
        return subprocess.run([flwr, "supernode", "ls", "raybloom", "--format", "json"], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "FLWR_HOME": home})

    listed = nodes(env["FLWR_HOME"])
    online = [n for n in json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"] if n["status"] == "online"]
    assert len(online) == 2, listed.stdout  # the registered SuperNodes are served
    # a plain-text client gets nowhere: the SuperLink speaks only TLS
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.toml").write_text(f'[superlink]\ndefault = "raybloom"\n\n[superlink.raybloom]\n'
                                       f'address = "{env["RAYBLOOM_SUPERLINK"]}"\ninsecure = true\n')
    assert '"success": true' not in nodes(str(plain)).stdout
    # a SuperNode with a key that was never registered is refused (and gives up)
    key, _ = make_supernode_key(tmp_path / "intruder")
    log = tmp_path / "intruder.log"
    with open(log, "w") as fh:
        intruder = subprocess.Popen([str(Path(sys.executable).with_name("flower-supernode")), "--superlink",
                                     env["RAYBLOOM_SUPERLINK"], "--root-certificates", env["RAYBLOOM_SUPERLINK_CA"],
                                     "--auth-supernode-private-key", str(key), "--host", "127.0.0.1", "--port", str(free_ports(1)[0]),
                                     "--node-config", "partition-id=0 num-partitions=2"],
                                    stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "FLWR_HOME": str(tmp_path),
                                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        deadline = time.monotonic() + 90
        while intruder.poll() is None and "Failed to activate SuperNode" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if intruder.poll() is None:
            intruder.kill()
        intruder.wait()
    text = log.read_text()
    assert "Failed to activate SuperNode" in text, text[-2000:]
    listed = nodes(env["FLWR_HOME"])
    assert len(json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]) == 2, listed.stdout


def test_job_and_federated_run_recorded_with_credentials(secure, monkeypatch):
    """`raybloom submit` takes the Ray token and MLflow credentials from cluster.env by itself; the
    federated driver takes them from the sourced cluster.env. Both run side by side."""
    state, env, _ = secure
    t0 = time.monotonic()
    job = subprocess.Popen([RAYBLOOM, "submit", "jobs/cnn_digits.yaml", "scaling.workers=1", "train.epochs=1",
                            "tracking.log_model=false", "experiment=sec-job"], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    fed = subprocess.Popen([RAYBLOOM, "run", "jobs/fedavg_cnn_digits_iid.yaml", "federated.mode=deployment",
                            "federated.clients=2", "federated.rounds=1", "federated.local_epochs=1",
                            "tracking.log_model=false", "experiment=sec-fed"], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **env, "COLUMNS": "200"})
    try:
        job_out, _ = job.communicate(timeout=400)
        fed_out, _ = fed.communicate(timeout=400)
    finally:
        for p in (job, fed):
            if p.poll() is None:
                p.kill()
    print(f"\nRay job + federated deployment run side by side: {time.monotonic() - t0:.0f} s")
    assert job.returncode == 0 and "SUCCEEDED" in job_out, job_out[-4000:]
    assert fed.returncode == 0, fed_out[-4000:]
    job_run, fed_run = run_id_from(job_out), run_id_from(fed_out)

    with pytest.raises(Exception, match="401|nauthorized|credentials"):
        MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(job_run)  # no credentials in this process yet
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", env["MLFLOW_TRACKING_PASSWORD"])
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(job_run)
    assert run.info.status == "FINISHED" and run.data.params["scaling.workers"] == "1"
    assert [m.step for m in client.get_metric_history(job_run, "val_loss")] == [0]
    run = client.get_run(fed_run)
    assert run.info.status == "FINISHED" and run.data.tags["raybloom.mode"] == "deployment"
    assert [(m.step, m.value) for m in client.get_metric_history(fed_run, "clients_ok")] == [(1, 2.0)]


def test_down_leaves_nothing_running(secure):
    state, env, _ = secure
    record = json.loads((state / "cluster.json").read_text())  # with the processes recorded since `up`
    down = cli("cluster", "down", cwd=ROOT, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (state / "cluster.env").exists() and not (state / "cluster.json").exists()
    assert not _ours_still_running(record)
    assert not Path(record["temp_dir"]).exists()  # the TLS key, the SuperNode keys, the artifacts
    assert not Path(record["postgres_dir"]).exists()  # PostgreSQL's data
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{env['MLFLOW_TRACKING_URI']}/health", timeout=5)


class _Exploit:
    """Unpickling this runs code: what a crafted checkpoint or model file would carry."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_load_weights_only(tmp_path):
    """Ray Train checkpoints are read with torch.load(weights_only=True): a crafted one is refused
    instead of run; and nothing in the platform unpickles (pickle, allow_pickle=True, a torch.load
    without weights_only=True)."""
    import pickle
    import re

    import torch
    from ray.train import Checkpoint

    from raybloom import ray_train

    state = {"model": {"w": torch.ones(2)}, "epoch": 3}
    torch.save(state, tmp_path / ray_train.STATE_FILE)
    assert ray_train._load_state(Checkpoint.from_directory(str(tmp_path)))["epoch"] == 3
    torch.save({"model": _Exploit()}, tmp_path / ray_train.STATE_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ray_train._load_state(Checkpoint.from_directory(str(tmp_path)))
    for path in (ROOT / "platform").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bpickle\.loads?\(|cloudpickle\.loads?\(|allow_pickle\s*=\s*True", text), path
        for call in re.findall(r"torch\.load\(.*", text):  # the call's line
            assert "weights_only=True" in call, (path, call)
