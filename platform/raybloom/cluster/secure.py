"""The secrets and the PostgreSQL of `raybloom cluster up --secure`, made on the spot.

- `make_tls`: a self-signed CA and a SuperLink certificate it signs (SANs IP:127.0.0.1, DNS:localhost);
- `make_supernode_key`: an OpenSSH EC P-384 key pair, the form `flower-supernode
  --auth-supernode-private-key` and `flwr supernode register` take in Flower 1.42;
- `Postgres`: a throwaway PostgreSQL 15 cluster (initdb as the `postgres` user when run as root, which
  initdb refuses), on 127.0.0.1 only, password (scram-sha-256) authentication over TCP, a role and two
  databases for MLflow (the tracking store and the basic-auth user store);
- `write_mlflow_auth_ini`: the basic-auth config (admin password, default permission READ).

Every secret comes from `secrets`; every file holding one is created mode 600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Optional

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")


def write_private(path: Path, data: str | bytes) -> Path:
    """Create (or replace) `path` with mode 600 from the start: the secret is never world-readable."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return path


def password(nbytes: int = 24) -> str:
    return secrets.token_urlsafe(nbytes)  # URL- and shell-safe, well over MLflow's 12 characters


# ---------------------------------------------------------------------------------------------- TLS
def make_tls(folder: Path, days: int = 30) -> dict[str, Path]:
    """ca.crt, server.crt (signed by the CA, SANs IP:127.0.0.1 and DNS:localhost), server.key (600).
    The CA's private key is never written: nothing else will ever be signed with it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raybloom local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raybloom-superlink")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    write_private(paths["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def make_supernode_key(path: Path) -> tuple[Path, Path]:
    """An OpenSSH EC P-384 key pair: `path` (private, 600) and `path`.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return path, pub


# ------------------------------------------------------------------------------------------- MLflow
def write_mlflow_auth_ini(path: Path, database_uri: str, admin_password: str, admin: str = "admin") -> Path:
    """The basic-auth config (MLFLOW_AUTH_CONFIG_PATH): users and permissions live in `database_uri`."""
    return write_private(path, "[mlflow]\ndefault_permission = READ\n"
                               f"database_uri = {database_uri.replace('%', '%%')}\n"
                               f"admin_username = {admin}\nadmin_password = {admin_password}\n"
                               "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")


# ------------------------------------------------------------------------------------------ Postgres
def pg_bin() -> Path:
    for folder in PG_BIN_CANDIDATES:
        if (Path(folder) / "initdb").is_file():
            return Path(folder)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql "
                       f"(looked in {', '.join(PG_BIN_CANDIDATES)} and PATH)")


class Postgres:
    """A throwaway PostgreSQL cluster in `folder` (data/, the unix socket, pg.log), on 127.0.0.1:`port`."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.data = folder / "data"
        self.bin = pg_bin()
        self.as_postgres = os.geteuid() == 0  # initdb and postgres refuse to run as root

    def _run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1500:]}")
        return proc

    def start(self, superuser_password: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        pwfile = write_private(self.folder / "pw", superuser_password + "\n")
        self.folder.chmod(0o700)
        if self.as_postgres:  # the folder becomes the postgres user's (it sits in /tmp: no parent to open up)
            shutil.chown(self.folder, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            self._run(["initdb", "-D", str(self.data), "-U", "postgres", f"--pwfile={pwfile}", "-E", "UTF8",
                       "--no-locale", "--auth-host=scram-sha-256", "--auth-local=peer"])
        finally:
            pwfile.unlink(missing_ok=True)
        opts = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=40"
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.folder / "pg.log"), "-o", opts, "-w", "-t", "60", "start"])

    def create_databases(self, superuser_password: str, role: str, role_password: str, *databases: str) -> None:
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", password=superuser_password,
                                dbname="postgres", connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)), [role_password])
                for db in databases:
                    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(role)))
        finally:
            conn.close()

    def uri(self, role: str, role_password: str, database: str) -> str:
        return f"postgresql+psycopg2://{role}:{role_password}@127.0.0.1:{self.port}/{database}"

    @classmethod
    def stop(cls, folder: Optional[str], timeout: float = 30) -> None:
        """`pg_ctl stop -m fast` if a server runs on `folder`/data (no error when none does)."""
        if not folder or not (Path(folder) / "data" / "postmaster.pid").is_file():
            return
        pg = cls(Path(folder), port=0)  # the port is the running server's own; stopping needs only the folder
        try:
            pg._run(["pg_ctl", "-D", str(pg.data), "-m", "fast", "-w", "-t", str(int(timeout)), "stop"], timeout=timeout + 10)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # `down` then signals whatever is left, like every other process of the cluster
