"""`raybloom cluster up --secure` against real servers on loopback: MLflow basic auth (on a throwaway
PostgreSQL) refuses unauthenticated, wrong-password and read-only writes and foreign Host headers; the
Ray Jobs API and Ray's GCS refuse callers without the token; MLflow's artifact proxy and model registry
refuse anonymous callers and a READ user's writes; a job with a wrong MLflow password exits 2 before it
trains; the Flower SuperLink (whose Control API has no user authentication upstream) listens on loopback
only, speaks only TLS and refuses a SuperNode whose key is not registered. Then a Ray job and a
federated deployment run, both read back from MLflow with the credentials of cluster.env, and `down`
leaves nothing running. One cluster for the module (tests run in file order; the last one stops it).
No mocks."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from raybloom.cluster.procs import cluster_processes, read_proc
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
        # Flower's switches for its legacy gRPC Control and Fleet APIs (on 0.0.0.0:9093 and :9092): set
        # here, they must still not reach the SuperLink (test_flower_listens_on_loopback_only)
        mp.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
        mp.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
        t0 = time.monotonic()
        # 4 logical CPUs on the head: the load test's search runs 4 trials at once
        up = cli("cluster", "up", "--secure", "--workers", "0", "--cpus-per-node", "4", "--flower-nodes", "2",
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


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket in LISTEN state that one of `pids` holds (/proc/net/tcp*)."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # gone meanwhile
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                host, port = fields[1].split(":")
                raw = bytes.fromhex(host)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def _own_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (SIOCGIFADDR on each interface)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address
                continue
            found.append(socket.inet_ntoa(packed[20:24]))
    return [a for a in found if not a.startswith("127.")]


def test_flower_listens_on_loopback_only(secure):
    """The SuperLink serves its Control API (`flwr run`, `flwr supernode register`: no user authentication
    in open-source Flower, and a ServerApp runs arbitrary code), its Fleet and Runtime APIs on one port:
    every socket the Flower processes listen on is on 127.0.0.1, even with Flower's variables for its legacy
    gRPC APIs on 0.0.0.0 set in the environment `up` ran in (the fixture sets them)."""
    _, env, record = secure
    procs = cluster_processes(record)
    flower = {pid for pid, p in procs.items()
              if p.pgid in {g["pgid"] for g in record["groups"] if g["role"].startswith("flower-")}}
    while grown := {pid for pid, p in procs.items() if p.ppid in flower} - flower:  # and their children
        flower |= grown
    listening = _listening(flower)
    link_port = int(env["RAYBLOOM_SUPERLINK"].rsplit(":", 1)[1])
    assert ("127.0.0.1", link_port) in listening, listening
    assert len({port for _, port in listening}) == 1 + 2, listening  # the SuperLink's port, one per SuperNode
    assert {host for host, _ in listening} == {"127.0.0.1"}, listening
    for address in _own_addresses():  # from this machine's other addresses the port is closed
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, link_port), timeout=5).close()
    socket.create_connection(("127.0.0.1", link_port), timeout=5).close()


def test_ray_gcs_needs_the_token(secure):
    """A driver's `ray.init` to the cluster's GCS without the token (auth off on its side, so the refusal is
    the GCS's), or with a wrong one, is refused; with the token of cluster.env it connects."""
    _, env, _ = secure
    script = ("import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
              "print('connected', ray.cluster_resources().get('CPU')); ray.shutdown()")
    clean = {k: v for k, v in os.environ.items() if k not in CLEARED}

    def driver(**auth: str) -> subprocess.Popen:  # Ray's driver tries the GCS 20 times, 1 s apart: 2 are enough
        return subprocess.Popen([sys.executable, "-c", script, env["RAY_ADDRESS"]], text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env={**clean, **auth, "RAY_USAGE_STATS_ENABLED": "0",
                                                               "RAY_NUM_REDIS_GET_RETRIES": "2"})
    attempts = {"no token": driver(), "wrong token": driver(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
                "the token": driver(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"])}
    try:
        outs = {name: p.communicate(timeout=60)[0] for name, p in attempts.items()}
    finally:
        for p in attempts.values():
            if p.poll() is None:
                p.kill()
    assert attempts["the token"].returncode == 0 and "connected 4.0" in outs["the token"], outs["the token"][-3000:]
    for name in ("no token", "wrong token"):
        assert attempts[name].returncode != 0 and "connected" not in outs[name], (name, outs[name][-3000:])
        assert "InvalidAuthToken: Authentication token is missing or incorrect" in outs[name], (name, outs[name][-3000:])


def _mlflow_users(env: dict[str, str], reader_name: str) -> tuple[str, tuple, tuple]:
    """The cluster's MLflow API root, the admin's credentials and a new READ user's (the default permission)."""
    api, admin = f"{env['MLFLOW_TRACKING_URI']}/api/2.0", ("admin", env["MLFLOW_TRACKING_PASSWORD"])
    reader = (reader_name, f"{reader_name}-password-123")
    made = requests.post(f"{api}/mlflow/users/create", json={"username": reader[0], "password": reader[1]},
                         auth=admin, timeout=30)
    assert made.status_code == 200, made.text
    return api, admin, reader


def test_mlflow_artifacts_refuse_anonymous_and_read_users(secure):
    """The artifact proxy (`--serve-artifacts`): upload and download need credentials (401); a READ user may
    download (MLflow's rule: GET needs READ) but not upload or delete (403), and the artifact is unchanged."""
    _, env, _ = secure
    api, admin, reader = _mlflow_users(env, "artifact-reader")
    exp = requests.post(f"{api}/mlflow/experiments/create", json={"name": "sec-artifacts"}, auth=admin, timeout=30)
    exp_id = exp.json()["experiment_id"]
    run = requests.post(f"{api}/mlflow/runs/create", json={"experiment_id": exp_id}, auth=admin, timeout=30)
    run_id = run.json()["run"]["info"]["run_id"]
    root = f"{api}/mlflow-artifacts/artifacts"
    file = f"{root}/{exp_id}/{run_id}/artifacts/note.txt"

    assert requests.put(file, data=b"anonymous", timeout=30).status_code == 401
    assert requests.put(file, data=b"admin wrote this", auth=admin, timeout=30).status_code == 200
    assert requests.get(file, timeout=30).status_code == 401
    assert requests.get(file, auth=("admin", "not-the-password"), timeout=30).status_code == 401
    assert requests.get(root, params={"path": f"{exp_id}/{run_id}/artifacts"}, timeout=30).status_code == 401
    upload = requests.put(file, data=b"reader wrote this", auth=reader, timeout=30)
    assert upload.status_code == 403, upload.text
    assert requests.delete(file, auth=reader, timeout=30).status_code == 403
    download = requests.get(file, auth=reader, timeout=30)
    assert download.status_code == 200 and download.content == b"admin wrote this"
    assert requests.get(file, auth=admin, timeout=30).content == b"admin wrote this"


def test_mlflow_registry_refuses_anonymous_and_read_users(secure):
    """Model-registry writes: 401 without credentials; a READ user gets 403 on another user's registered
    model (new versions, updates, renames, tags, deletion). Creating a model of one's own is any
    authenticated user's right in MLflow (workspaces off; the creator gets MANAGE on it), as is creating
    an experiment: those answer 200."""
    _, env, _ = secure
    api, admin, reader = _mlflow_users(env, "registry-reader")
    rm, mv = f"{api}/mlflow/registered-models", f"{api}/mlflow/model-versions"
    version = {"name": "sec-model", "source": "mlflow-artifacts:/0/none/artifacts/model"}
    assert requests.post(f"{rm}/create", json={"name": "sec-model"}, timeout=30).status_code == 401
    assert requests.post(f"{mv}/create", json=version, timeout=30).status_code == 401
    assert requests.post(f"{rm}/create", json={"name": "sec-model"}, auth=("admin", "wrong-password-1"),
                         timeout=30).status_code == 401
    made = requests.post(f"{rm}/create", json={"name": "sec-model"}, auth=admin, timeout=30)
    assert made.status_code == 200, made.text
    assert requests.get(f"{rm}/get", params={"name": "sec-model"}, auth=reader, timeout=30).status_code == 200
    refused = {
        "model-versions/create": requests.post(f"{mv}/create", json=version, auth=reader, timeout=30),
        "registered-models/update": requests.patch(f"{rm}/update", json={"name": "sec-model", "description": "x"},
                                                   auth=reader, timeout=30),
        "registered-models/rename": requests.post(f"{rm}/rename", json={"name": "sec-model", "new_name": "mine"},
                                                  auth=reader, timeout=30),
        "registered-models/set-tag": requests.post(f"{rm}/set-tag", json={"name": "sec-model", "key": "k", "value": "v"},
                                                   auth=reader, timeout=30),
        "registered-models/delete": requests.delete(f"{rm}/delete", json={"name": "sec-model"}, auth=reader, timeout=30),
    }
    assert {k: r.status_code for k, r in refused.items()} == dict.fromkeys(refused, 403), {k: r.text for k, r in refused.items()}
    kept = requests.get(f"{rm}/get", params={"name": "sec-model"}, auth=admin, timeout=30).json()["registered_model"]
    assert kept["name"] == "sec-model" and not kept.get("tags") and not kept.get("description")
    own = requests.post(f"{rm}/create", json={"name": "reader-model"}, auth=reader, timeout=30)
    assert own.status_code == 200, own.text
    assert requests.patch(f"{rm}/update", json={"name": "reader-model", "description": "mine"}, auth=reader,
                          timeout=30).status_code == 200  # its creator MANAGEs it
    assert requests.post(f"{api}/mlflow/experiments/create", json={"name": "reader-exp"}, auth=reader,
                         timeout=30).status_code == 200


def test_wrong_mlflow_password_exits_2_before_training(secure, monkeypatch):
    """`raybloom run` with a wrong MLflow password stops at once with exit 2 and one line naming the
    variables and the server, before data, Ray or a run; with no credentials the same check refuses, with
    the right ones it passes."""
    from raybloom import tracking
    from raybloom.errors import UserError

    _, env, _ = secure
    uri, admin = env["MLFLOW_TRACKING_URI"], ("admin", env["MLFLOW_TRACKING_PASSWORD"])
    t0 = time.monotonic()
    out = subprocess.run([RAYBLOOM, "run", "jobs/linear_gd.yaml", "experiment=sec-wrong-password", "train.epochs=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env, "MLFLOW_TRACKING_PASSWORD": "not-the-password-123", "COLUMNS": "300"})
    print(f"\nwrong MLflow password refused in {time.monotonic() - t0:.1f} s")
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: MLflow tracking server {uri} answered 401 Unauthorized: the credentials were refused; "
                      "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server "
                      "(`raybloom cluster up --secure` writes them to .raybloom/cluster.env)"], out.stderr
    assert "Traceback" not in out.stderr and "run id:" not in out.stdout and "epoch" not in out.stdout.lower()
    api = f"{uri}/api/2.0/mlflow"
    missing = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "sec-wrong-password"},
                           auth=admin, timeout=30)
    assert missing.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in missing.text, missing.text
    ids = [e["experiment_id"] for e in requests.get(f"{api}/experiments/search", params={"max_results": 1000},
                                                     auth=admin, timeout=30).json()["experiments"]]
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": ids, "filter": "params.experiment = 'sec-wrong-password'"},
                         auth=admin, timeout=30)
    assert runs.status_code == 200 and not runs.json().get("runs"), runs.text

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(UserError, match="answered 401 Unauthorized: the credentials are not set; set MLFLOW_TRACKING_USERNAME"):
        tracking.check_reachable(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", env["MLFLOW_TRACKING_PASSWORD"])
    tracking.check_reachable(uri)  # the right credentials pass


LOAD_ERRORS = re.compile(r"database is locked|OperationalError|could not connect|connection (refused|reset)|"
                         r"too many (clients|connections)|deadlock detected|Max retries exceeded", re.IGNORECASE)


def _per_step(client: MlflowClient, run_id: str, key: str) -> float:
    """Seconds between a run's logged steps of `key` (the time per logged epoch or round)."""
    ts = sorted(m.timestamp for m in client.get_metric_history(run_id, key))
    return (ts[-1] - ts[0]) / 1000 / max(1, len(ts) - 1)


def test_under_load_a_search_and_federated_runs_are_recorded_once_with_credentials(secure, monkeypatch, capsys):
    """One MLflow server on PostgreSQL takes at once a search of 4 trials at concurrency 4 (a Ray job:
    `raybloom submit` takes the Ray token and the MLflow credentials from cluster.env by itself), a federated
    simulation and a federated deployment run (credentials from the sourced cluster.env). Each exits 0 with
    no lock or connection error in its output; every trial's epochs and every round's metrics are there
    exactly once; the time per logged epoch and round under that load is printed."""
    state, env, _ = secure
    t0 = time.monotonic()
    common = dict(cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    search = subprocess.Popen([RAYBLOOM, "submit", "jobs/search_random_cnn.yaml", "search.n_trials=4", "search.concurrency=4",
                               "search.pruner=none", "train.epochs=2", "experiment=sec-load-search"],
                              env={**os.environ, "COLUMNS": "200"}, **common)
    fed_env = {**os.environ, **env, "COLUMNS": "200"}
    sim = subprocess.Popen([RAYBLOOM, "run", "jobs/fedavg_cnn_digits_iid.yaml", "federated.clients=2", "federated.rounds=2",
                            "federated.local_epochs=1", "tracking.log_model=false", "experiment=sec-load-sim"],
                           env={k: v for k, v in fed_env.items() if k != "RAY_ADDRESS"}, **common)  # its own Ray
    fed = subprocess.Popen([RAYBLOOM, "run", "jobs/fedavg_cnn_digits_iid.yaml", "federated.mode=deployment",
                            "federated.clients=2", "federated.rounds=1", "federated.local_epochs=1",
                            "tracking.log_model=false", "experiment=sec-fed"], env=fed_env, **common)
    outputs = {}
    try:
        for name, p in (("search", search), ("simulation", sim), ("deployment", fed)):
            outputs[name] = p.communicate(timeout=600)[0]
    finally:
        for p in (search, sim, fed):
            if p.poll() is None:
                p.kill()
    took = time.monotonic() - t0
    for name, p in (("search", search), ("simulation", sim), ("deployment", fed)):
        assert p.returncode == 0, (name, outputs[name][-4000:])
        assert not LOAD_ERRORS.search(outputs[name]), (name, LOAD_ERRORS.search(outputs[name]).group(0), outputs[name][-3000:])
    assert "SUCCEEDED" in outputs["search"], outputs["search"][-3000:]
    study_run, sim_run, fed_run = (run_id_from(outputs[k]) for k in ("search", "simulation", "deployment"))

    with pytest.raises(Exception, match="401|nauthorized|credentials"):
        MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(study_run)  # no credentials in this process yet
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", env["MLFLOW_TRACKING_PASSWORD"])
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(study_run)
    assert parent.info.status == "FINISHED" and parent.data.tags["raybloom.kind"] == "search"
    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{study_run}'")
    assert len(trials) == 4 and {r.info.status for r in trials} == {"FINISHED"}
    for r in trials:
        for key in ("train_loss", "val_loss"):
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == [0, 1], (r.info.run_id, key)
    run = client.get_run(sim_run)
    assert run.info.status == "FINISHED" and run.data.tags["raybloom.mode"] == "simulation"
    assert sorted(m.step for m in client.get_metric_history(sim_run, "clients_ok")) == [1, 2]
    assert sorted(m.step for m in client.get_metric_history(sim_run, "server_val_loss")) == [0, 1, 2]
    run = client.get_run(fed_run)
    assert run.info.status == "FINISHED" and run.data.tags["raybloom.mode"] == "deployment"
    assert [(m.step, m.value) for m in client.get_metric_history(fed_run, "clients_ok")] == [(1, 2.0)]
    epoch = sorted(_per_step(client, r.info.run_id, "train_loss") for r in trials)
    with capsys.disabled():  # reported in make test's output
        print(f"\n  under load (a search of 4 trials at once + a federated simulation + a deployment run, {took:.0f} s): "
              f"{epoch[len(epoch) // 2]:.2f} s per logged epoch (median of the 4 trials, {epoch[0]:.2f}-{epoch[-1]:.2f}), "
              f"{_per_step(client, sim_run, 'clients_ok'):.1f} s per simulated round")


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
