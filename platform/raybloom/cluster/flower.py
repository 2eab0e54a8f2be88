"""Flower on the local cluster: a SuperLink and SuperNodes on loopback (TLS and SuperNode keys with --secure)."""

from __future__ import annotations

import sys
from pathlib import Path

from raybloom.cluster.health import tail, wait
from raybloom.cluster.launcher import Launcher
from raybloom.flwr_config import CONNECTION, flwr_cli, flwr_json, write_flwr_home
from raybloom.net import port_open


# Flower 1.42 serves the Control, Fleet and Runtime APIs over HTTP on --host/--port (127.0.0.1 here). These
# two variables, set to 1 in the environment, would add the legacy gRPC Control API on 0.0.0.0:9093 and
# Fleet API on 0.0.0.0:9092 (CONTROL_API_DEFAULT_SERVER_ADDRESS, FLEET_API_GRPC_RERE_DEFAULT_ADDRESS):
# the SuperLink never inherits them, so nothing of it listens beyond loopback.
GRPC_APIS_OFF = {"FLWR_INTERNAL_GRPC_CONTROL_API": "0", "FLWR_INTERNAL_GRPC_FLEET_API": "0"}


def flower_nodes_registered(home: Path, want: int) -> bool:
    """True when the SuperLink lists `want` online SuperNodes (`flwr supernode ls`)."""
    listed = flwr_json(flwr_cli("supernode", "ls", CONNECTION, "--format", "json", home=home)) or {}
    nodes = listed.get("nodes", [])
    return sum(str(n.get("status", "online")).lower() == "online" for n in nodes) >= want


def start_flower(launcher: Launcher, record: dict, nodes: int, ports: list[int], timeout: float) -> None:
    """A SuperLink and `nodes` SuperNodes on loopback; SuperNode i holds partition i of `nodes`."""
    bin_dir = Path(sys.executable).parent
    link_port, node_ports = ports[0], ports[1:]
    home = Path(record["flwr_home"])
    tls = record.get("flower_tls")  # --secure: {"ca", "cert", "key"} paths and one key pair per SuperNode
    write_flwr_home(home, record["superlink"], tls and tls["ca"])
    security = (["--ssl-ca-certfile", tls["ca"], "--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["key"],
                 "--enable-supernode-auth"] if tls else ["--insecure"])
    link, link_log = launcher.spawn("flower-superlink", [
        str(bin_dir / "flower-superlink"), *security, "--disable-runtime-dependency-installation",
        "--database", f"{record['temp_dir']}/flower-state.db", "--host", "127.0.0.1", "--port", str(link_port)],
        FLWR_HOME=str(home), **GRPC_APIS_OFF)
    try:
        wait(f"Flower SuperLink on {record['superlink']}", lambda: port_open(link_port), timeout, [link])
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n{tail(link_log)}") from None
    for i in range(nodes):
        if tls:  # only registered public keys may connect: register before the SuperNode starts
            reg = flwr_cli("supernode", "register", f"{tls['supernode_keys'][i]}.pub", CONNECTION, home=home)
            if reg.returncode != 0 or "registered successfully" not in reg.stdout:
                raise RuntimeError(f"flwr supernode register failed: {(reg.stdout + reg.stderr).strip()[-1500:]}")
        security = (["--root-certificates", tls["ca"], "--auth-supernode-private-key", tls["supernode_keys"][i]]
                    if tls else ["--insecure"])
        launcher.spawn(f"flower-supernode-{i}", [
            str(bin_dir / "flower-supernode"), *security, "--superlink", record["superlink"], "--host", "127.0.0.1",
            "--port", str(node_ports[i]), "--node-config", f"partition-id={i} num-partitions={nodes}"], FLWR_HOME=str(home))
    wait(f"Flower: {nodes} SuperNodes online", lambda: flower_nodes_registered(home, nodes), timeout, [link])
