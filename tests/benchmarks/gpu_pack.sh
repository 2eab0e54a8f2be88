#!/usr/bin/env bash
# Packs into .whl/ what `tests/benchmarks/gpu_check.py --ray` needs on the lent GPU machine, which has
# torch (Python 3.12) but no Ray, MLflow or pydantic, no network, and takes at most 64 MiB a call.
# Ray's 74 MB wheel goes without Java jars, RLlib, Serve, LLM and the dashboard client, xz-compressed
# (~26 MB); the other wheels (~20 MB) are the versions that ran there on 2026-11-27. Then, on the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   tar xJf .whl/ray_site.tar.xz -C /tmp/site && PYTHONPATH=/tmp/site:$PWD/platform \
#   python3 tests/benchmarks/gpu_check.py --ray
# (.whl/ must be git-ignored: `echo /.whl/ >> .git/info/exclude`; carry it with the call.)
set -euo pipefail
cd "$(dirname "$0")/../.."
plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf .whl && mkdir .whl
python3 -m pip download -q "${plat[@]}" -d "$tmp" ray==2.55.1
python3 -m pip download -q "${plat[@]}" -d .whl alembic==1.20.1 annotated_types==0.8.0 cachetools==7.3.3 cffi==2.1.1 \
  cryptography==50.0.2 databricks_sdk==0.162.0 fastapi==0.165.0 gitdb==4.0.12 gitpython==3.2.1 google_auth==2.63.0 \
  importlib_metadata==9.1.0 jsonschema==4.26.0 jsonschema_specifications==2025.9.1 mako==1.4.3 mlflow_skinny==3.17.2 \
  opentelemetry_api==1.45.2 opentelemetry_proto==1.45.2 opentelemetry_sdk==1.45.2 \
  opentelemetry_semantic_conventions==0.66b2 pyasn1==0.6.5 pyasn1_modules==0.4.2 pycparser==3.12 pydantic==2.14.4 \
  pydantic_core==2.50.5 python_dotenv==1.2.4 referencing==0.37.0 rpds_py==2026.9.1 smmap==5.0.3 sqlalchemy==2.1.9 \
  sqlparse==0.6.1 starlette==1.10.0 typing_inspection==0.4.5 uvicorn==0.54.0
mkdir "$tmp/x"
(cd "$tmp/x" && python3 -m zipfile -e "$tmp"/ray-2.55.1-*.whl . && chmod +x ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet \
   && rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client && tar cf - . | xz -T0 -6) > .whl/ray_site.tar.xz
du -sh .whl
