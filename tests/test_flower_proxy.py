"""The Helm chart's nginx sidecar, run for real in front of a real Flower SuperLink on loopback.

Flower 1.42 serves the SuperLink's Control, Fleet and Runtime APIs on one port; the chart puts the SuperLink
on 127.0.0.1 inside its pod and an nginx sidecar in front of it with two TLS ports, the Fleet port passing
on only the Fleet API and the Control port only the Control API, so that NetworkPolicies can admit
SuperNodes to one and drivers to the other (tests/test_helm.py checks the policies). Here the nginx.conf
comes out of the chart rendered by the real Helm, and only what must change off Kubernetes is replaced
(listen ports -> free ports on 127.0.0.1, the SuperLink's port, certificate and temp paths); the SuperLink
runs with the chart's own flags (its certificate, database, ports moved likewise), Debian's nginx runs the
file. Then the real `flwr` CLI, raw HTTPS requests, real SuperNodes (keys registered with `flwr supernode
register`, as the chart expects) and a real deployment run (`raybloom run ... federated.mode=deployment`)
show which port answers what. No mocks. Every process started here is stopped by pid at the end.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from raybloom.cluster.procs import stop_processes
from raybloom.cluster.secure import make_supernode_key, make_tls
from raybloom.net import free_ports, port_open
from raybloom.pids import boot_id, read_proc

from conftest import RAYBLOOM, ROOT, run_id_from
from test_helm import FULLNAME, SECRETS, _after, _container, _one, _template, helm  # noqa: F401 (helm: fixture)

BIN = Path(sys.executable).parent
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
# Flower's switches for its legacy gRPC Control and Fleet APIs on 0.0.0.0: never on here (as in `cluster up`)
GRPC_APIS_OFF = {"FLWR_INTERNAL_GRPC_CONTROL_API": "0", "FLWR_INTERNAL_GRPC_FLEET_API": "0"}
CLEARED = ("RAY_ADDRESS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "FLWR_HOME", "RAYBLOOM_SUPERLINK",
           "RAYBLOOM_SUPERLINK_CA", "RAYBLOOM_FLWR_CONNECTION")


def _nginx() -> str:
    found = next((p for p in NGINX_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("nginx")
    if found is None:
        pytest.fail("nginx is needed (the Helm chart's proxy sidecar runs it): `make system-deps` installs it, "
                    "or `sudo apt-get install -y nginx`")
    return found


def _replace(text: str, old: str, new: str, count: int | None = 1) -> str:
    """`old` -> `new`, which must occur exactly `count` times (any number >= 1 with None): a changed chart
    fails here instead of running a file that no longer says what the test assumes."""
    found = text.count(old)
    assert (found >= 1) if count is None else (found == count), f"{old!r} found {found} times in the chart's nginx.conf"
    return text.replace(old, new)


def _loopback_conf(conf: str, chart: dict, ports: dict, tls: dict, folder: Path) -> str:
    """The chart's nginx.conf with the pod's ports, addresses and paths moved to loopback and `folder`."""
    conf = _replace(conf, f"listen {chart['fleet']} ssl;", f"listen 127.0.0.1:{ports['fleet']} ssl;")
    conf = _replace(conf, f"listen {chart['control']} ssl;", f"listen 127.0.0.1:{ports['control']} ssl;")
    conf = _replace(conf, f"server 127.0.0.1:{chart['superlink']};", f"server 127.0.0.1:{ports['superlink']};")
    conf = _replace(conf, "/etc/flower/tls/tls.crt", str(tls["cert"]))
    conf = _replace(conf, "/etc/flower/tls/tls.key", str(tls["key"]))
    conf = _replace(conf, "/etc/flower/tls/ca.crt", str(tls["ca"]))
    conf = _replace(conf, "/tmp/nginx/", f"{folder}/", count=None)
    assert "/etc/" not in conf and "/tmp/nginx" not in conf
    return conf


def _superlink_argv(args: list[str], tls: dict, folder: Path, ports: dict) -> list[str]:
    """The chart's flower-superlink arguments, with its certificate, database and ports moved here."""
    moved = {"--ssl-ca-certfile": str(tls["ca"]), "--ssl-certfile": str(tls["cert"]), "--ssl-keyfile": str(tls["key"]),
             "--database": str(folder / "state.db"), "--port": str(ports["superlink"]),
             "--health-server-address": f"127.0.0.1:{ports['health']}"}
    argv = list(args)
    for flag, value in moved.items():
        argv[argv.index(flag) + 1] = value
    assert _after(argv, "--host") == "127.0.0.1"  # the chart's own: the SuperLink never listens beyond loopback
    return [str(BIN / "flower-superlink"), *argv]


def _write_connection(home: Path, port: int, ca: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "k8s"\n\n[superlink.k8s]\naddress = "127.0.0.1:{port}"\n'
                                      f'root-certificates = "{ca}"\n')
    return home


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, timeout=90,
                          env={**os.environ, "FLWR_HOME": str(home)})


def _flwr_json(proc: subprocess.CompletedProcess) -> dict:
    assert "{" in proc.stdout, proc.stdout + proc.stderr
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _nodes(home: Path) -> dict[str, str]:
    """node id -> status, as the SuperLink lists them (`flwr supernode ls`)."""
    listed = _flwr_json(_flwr(home, "supernode", "ls", "k8s", "--format", "json"))
    return {n["node-id"]: n["status"] for n in listed.get("nodes", [])}


def _register(home: Path, pub: Path) -> subprocess.CompletedProcess:
    return _flwr(home, "supernode", "register", str(pub), "k8s")


def _wait(what: str, ready, timeout: float, procs=(), logs=()) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in logs if log.exists())
            pytest.fail(f"{what}: {'exited: ' + ', '.join(dead) if dead else f'not within {timeout:.0f} s'}\n{tails}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def stack(helm, tmp_path_factory):
    """The chart's SuperLink and nginx sidecar on loopback, two SuperNodes on the Fleet port (their keys
    registered through the Control port), and a third, registered too, pointed at the Control port."""
    nginx = _nginx()
    docs = _template(helm, *SECRETS)
    link = _container(_one(docs, "Deployment", f"{FULLNAME}-superlink"), "superlink")
    proxy = _container(_one(docs, "Deployment", f"{FULLNAME}-superlink"), "proxy")
    proxy_ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    chart = {"fleet": proxy_ports["fleet"], "control": proxy_ports["control"], "superlink": int(_after(link["args"], "--port"))}
    conf_text = _one(docs, "ConfigMap", f"{FULLNAME}-superlink-proxy")["data"]["nginx.conf"]

    folder = tmp_path_factory.mktemp("proxy")
    ports = dict(zip(("superlink", "health", "fleet", "control", "node0", "node1", "node2"), free_ports(7)))
    tls = make_tls(folder / "tls")
    keys = [make_supernode_key(folder / f"supernode-{i}") for i in range(3)]
    (folder / "nginx").mkdir()  # the chart's emptyDir at /tmp/nginx
    conf = folder / "nginx.conf"
    conf.write_text(_loopback_conf(conf_text, chart, ports, tls, folder / "nginx"))
    control_home = _write_connection(folder / "flwr-control", ports["control"], tls["ca"])
    fleet_home = _write_connection(folder / "flwr-fleet", ports["fleet"], tls["ca"])

    record = {"boot_id": boot_id(), "since_ticks": read_proc(os.getpid()).start, "pgids": [], "processes": [],
              "temp_dir": str(folder)}
    env = {**{k: v for k, v in os.environ.items() if k not in CLEARED}, **GRPC_APIS_OFF,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(folder / "flwr-home")}

    def spawn(name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        log = folder / f"{name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=folder, start_new_session=True)
        record["pgids"].append(proc.pid)
        return proc, log

    def supernode(i: int, port: int) -> tuple[subprocess.Popen, Path]:
        return spawn(f"supernode-{i}", [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                                        "--root-certificates", str(tls["ca"]), "--auth-supernode-private-key", str(keys[i][0]),
                                        "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(ports[f"node{i}"]),
                                        "--node-config", f"partition-id={i % 2} num-partitions=2"])

    t0 = time.monotonic()
    try:
        superlink, link_log = spawn("superlink", _superlink_argv(link["args"], tls, folder, ports))
        server, nginx_log = spawn("nginx", [nginx, "-c", str(conf), "-e", "stderr", "-p", str(folder / "nginx")])
        logs = [link_log, nginx_log]
        _wait("SuperLink and nginx listening", lambda: all(port_open(ports[k]) for k in ("superlink", "fleet", "control")),
              60, [superlink, server], logs)
        ids = {}
        for i, (_, pub) in enumerate(keys):
            reg = _register(control_home, pub)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
            ids[i] = reg.stdout.split("SuperNode ")[1].split()[0]
        nodes = [supernode(0, ports["fleet"]), supernode(1, ports["fleet"]), supernode(2, ports["control"])]
        _wait("2 SuperNodes online through the Fleet port",
              lambda: [_nodes(control_home).get(ids[i]) for i in (0, 1)] == ["online", "online"], 90,
              [superlink, server, nodes[0][0], nodes[1][0]], [*logs, nodes[0][1], nodes[1][1]])
        yield SimpleNamespace(folder=folder, ports=ports, tls=tls, keys=keys, ids=ids, nodes=nodes, conf=conf,
                              control_home=control_home, fleet_home=fleet_home, link_log=link_log, nginx_log=nginx_log,
                              chart=chart, started=time.monotonic() - t0)
    finally:
        _, _, survivors = stop_processes(record, timeout=15)
        assert not survivors, [p.cmd for p in survivors]


# ---------------------------------------------------------------- the Control port: drivers' `flwr`

def test_flwr_works_through_the_control_port_and_not_through_the_fleet_port(stack, tmp_path):
    print(f"\nSuperLink, nginx and 2 SuperNodes up in {stack.started:.0f} s")
    listed = _flwr_json(_flwr(stack.control_home, "ls", "k8s", "--format", "json"))
    assert listed.get("success") is True and "runs" in listed, listed
    refused = _flwr_json(_flwr(stack.fleet_home, "ls", "k8s", "--format", "json"))
    assert refused.get("success") is False and "403 Forbidden" in refused["error-message"], refused
    # a SuperNode key cannot be registered through the Fleet port either
    _, pub = make_supernode_key(tmp_path / "late")
    reg = _register(stack.fleet_home, pub)
    assert "registered successfully" not in reg.stdout and "403" in reg.stdout + reg.stderr, reg.stdout + reg.stderr
    assert len(_nodes(stack.control_home)) == 3  # the three of the fixture, not this one
    # without the CA the TLS handshake fails: the ports speak only TLS with the chart's certificate
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.toml").write_text(f'[superlink]\ndefault = "k8s"\n\n[superlink.k8s]\n'
                                       f'address = "127.0.0.1:{stack.ports["control"]}"\ninsecure = true\n')
    assert _flwr_json(_flwr(plain, "ls", "k8s", "--format", "json")).get("success") is not True


# ---------------------------------------------------------------- what each port lets through

def _https(port: int, ca: Path, method: str, path: str, body: bytes = b"") -> int:
    """The status of one request, the path sent exactly as given (http.client neither resolves `..` nor
    re-escapes)."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_each_port_passes_only_its_own_api(stack):
    fleet, control, ca = stack.ports["fleet"], stack.ports["control"], stack.tls["ca"]
    # the probe's path, through the Fleet port to the SuperLink
    assert _https(fleet, ca, "GET", "/health") == 200
    # the Runtime API (the ServerApp's; only the SuperLink's own subprocesses may use it), the docs, the
    # other port's API, and tricks that a path check on the decoded URI would let through
    for port, method, path in [
        (fleet, "POST", "/v1/control/list-runs"), (fleet, "POST", "/v1/control/start-run"),
        (fleet, "POST", "/v1/runtime/get-nodes"), (fleet, "GET", "/docs"), (fleet, "GET", "/openapi.json"),
        (fleet, "POST", "/v1/fleet/../control/list-runs"), (fleet, "POST", "/v1/fleet/%2e%2e/control/list-runs"),
        (fleet, "POST", "/v1/fleet/%2E%2E%2Fcontrol%2Flist-runs"), (fleet, "POST", "//v1/control/list-runs"),
        (fleet, "POST", "/v1/fleet/get-run?x=1"), (fleet, "GET", "/v1/fleet/get-run"),
        (control, "POST", "/v1/fleet/pull-messages"), (control, "POST", "/v1/fleet/activate-node"),
        (control, "POST", "/v1/runtime/get-nodes"), (control, "GET", "/health"), (control, "GET", "/docs"),
        (control, "POST", "/v1/control/../runtime/get-nodes"), (control, "POST", "/v1/control/%2e%2e/fleet/get-run"),
    ]:
        assert _https(port, ca, method, path) == 403, (port == fleet and "fleet" or "control", method, path)
    # a body larger than nginx's 1 MB default gets through to Flower (which refuses it for its own reasons:
    # no SuperNode signature, not a protobuf message), so model chunks of 5 MB pass
    status = _https(fleet, ca, "POST", "/v1/fleet/push-object", body=os.urandom(6 * 1024 * 1024))
    assert status not in (403, 413) and 400 <= status < 500, status
    # plain HTTP to a TLS port: refused by nginx
    conn = http.client.HTTPConnection("127.0.0.1", control, timeout=30)
    try:
        conn.request("POST", "/v1/control/list-runs")
        assert conn.getresponse().status == 400
    finally:
        conn.close()


# ---------------------------------------------------------------- the Fleet port: SuperNodes

def test_a_supernode_on_the_control_port_gets_nowhere(stack):
    """The third SuperNode's key is registered, but it dials the Control port: activate-node is refused
    (403) and it never comes online, while the two on the Fleet port are online."""
    log = stack.folder / "supernode-2.log"
    _wait("the SuperNode on the Control port refused", lambda: "403 Forbidden" in log.read_text(), 60, logs=[log])
    assert "/v1/fleet/activate-node" in log.read_text(), log.read_text()[-3000:]
    status = _nodes(stack.control_home)
    assert status[stack.ids[0]] == status[stack.ids[1]] == "online", status
    assert status[stack.ids[2]] == "registered", status  # registered, never activated


def test_deployment_run_submitted_on_the_control_port_trains_on_supernodes_of_the_fleet_port(stack, tmp_path):
    """`raybloom run` in deployment mode, with the CA, through the Control port (flwr run, then `flwr log
    --stream` and `flwr ls` until the end): the two SuperNodes of the Fleet port train one round, the run is
    FINISHED in MLflow with both clients counted, and the ServerApp's round line reached the driver through
    the log stream."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**{k: v for k, v in os.environ.items() if k not in CLEARED}, "COLUMNS": "200", "MLFLOW_TRACKING_URI": uri,
           "RAYBLOOM_SUPERLINK": f"127.0.0.1:{stack.ports['control']}", "RAYBLOOM_SUPERLINK_CA": str(stack.tls["ca"]),
           "FLWR_HOME": str(tmp_path / "flwr-driver")}
    t0 = time.monotonic()
    proc = subprocess.Popen([RAYBLOOM, "run", "jobs/fedavg_cnn_digits_iid.yaml", "federated.mode=deployment",
                             "federated.clients=2", "federated.rounds=1", "federated.local_epochs=1",
                             "tracking.log_model=false", "tracking.explain=false", "experiment=proxy-deploy"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:  # the driver and its `flwr` children, by pid, if it overran
        stop_processes({"boot_id": boot_id(), "since_ticks": read_proc(os.getpid()).start, "pgids": [proc.pid],
                        "processes": [], "temp_dir": str(tmp_path)})
        proc.wait()
    took = time.monotonic() - t0
    assert proc.returncode == 0, output[-4000:]
    assert f"to the SuperLink at 127.0.0.1:{stack.ports['control']}" in output, output[-3000:]
    assert "round 1/1: server val loss" in output, output[-3000:]  # the ServerApp's log, streamed through nginx
    client = MlflowClient(uri)
    run = client.get_run(run_id_from(output))
    assert run.info.status == "FINISHED" and run.data.tags["raybloom.mode"] == "deployment"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "clients_ok")] == [(1, 2.0)]
    access = stack.nginx_log.read_text()
    for call in ("/v1/control/start-run", "/v1/control/stream-logs", "/v1/control/list-runs", "/v1/fleet/pull-messages",
                 "/v1/fleet/push-messages"):
        assert f'"POST {call} HTTP/1.1" 200' in access, call
    print(f"\ndeployment run through the proxy (1 round, 2 SuperNodes): {took:.0f} s")
