"""Flower on the local cluster: a SuperLink and SuperNodes on loopback, FLWR_HOME's connection, the `flwr` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from raybloom.cluster.health import port_open, tail, wait

if TYPE_CHECKING:
    from raybloom.cluster.launch import Launcher


def flower_nodes_registered(home: Path, want: int) -> bool:
    """True when the SuperLink lists `want` online SuperNodes (`flwr supernode ls`)."""
    proc = flwr_cli("supernode", "ls", "raybloom", "--format", "json", home=home)
    try:
        nodes = json.loads(proc.stdout[proc.stdout.index("{"):]).get("nodes", [])
    except ValueError:
        return False
    return sum(str(n.get("status", "online")).lower() == "online" for n in nodes) >= want


def write_flwr_home(home: Path, address: str, ca: Optional[str] = None) -> None:
    """$FLWR_HOME/config.toml with this cluster's SuperLink as the default connection: TLS checked
    against `ca` when given, else plain (loopback). Left as it is when it already says exactly that."""
    home.mkdir(parents=True, exist_ok=True)
    trust = f'root-certificates = "{ca}"' if ca else "insecure = true"
    text = f'[superlink]\ndefault = "raybloom"\n\n[superlink.raybloom]\naddress = "{address}"\n{trust}\n'
    config = home / "config.toml"
    if not config.is_file() or config.read_text() != text:
        config.write_text(text)


def flwr_cli(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """This virtualenv's `flwr` command with FLWR_HOME=home (used here and by federated.deploy)."""
    return subprocess.run([str(Path(sys.executable).with_name("flwr")), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "FLWR_HOME": str(home)})


def start_flower(launcher: "Launcher", record: dict, nodes: int, ports: list[int], timeout: float) -> None:
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
        FLWR_HOME=str(home))
    try:
        wait(f"Flower SuperLink on {record['superlink']}", lambda: port_open(link_port), timeout, [link])
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n{tail(link_log)}") from None
    for i in range(nodes):
        if tls:  # only registered public keys may connect: register before the SuperNode starts
            reg = flwr_cli("supernode", "register", f"{tls['supernode_keys'][i]}.pub", "raybloom", home=home)
            if reg.returncode != 0 or "registered successfully" not in reg.stdout:
                raise RuntimeError(f"flwr supernode register failed: {(reg.stdout + reg.stderr).strip()[-1500:]}")
        security = (["--root-certificates", tls["ca"], "--auth-supernode-private-key", tls["supernode_keys"][i]]
                    if tls else ["--insecure"])
        launcher.spawn(f"flower-supernode-{i}", [
            str(bin_dir / "flower-supernode"), *security, "--superlink", record["superlink"], "--host", "127.0.0.1",
            "--port", str(node_ports[i]), "--node-config", f"partition-id={i} num-partitions={nodes}"], FLWR_HOME=str(home))
    wait(f"Flower: {nodes} SuperNodes online", lambda: flower_nodes_registered(home, nodes), timeout, [link])
