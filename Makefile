# raybloom: `make run` sets up .venv and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test bench venv clean docs

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

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

bench: $(STAMP)  # every benchmark, then one table of every figure (tests/benchmarks/results/SUMMARY.md, README)
	@for b in tests/benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
	$(BIN)/python tests/benchmarks/bench_federated.py --local-epochs 20  # the same ratio at a heavier round
	$(BIN)/python tests/benchmarks/summary.py

clean:
	rm -rf $(VENV) .raybloom mlflow.db mlruns tests/_output

docs: $(STAMP)  # regenerate README's job-spec reference from the field descriptions
	$(BIN)/python -c "import re,pathlib; from raybloom import spec; p=pathlib.Path('README.md'); t=p.read_text(); \
	p.write_text(re.sub(r'(<!-- spec-reference[^>]*-->\n).*?(\n<!-- /spec-reference -->)', lambda m: m.group(1)+spec.reference_markdown()+m.group(2), t, flags=re.S))"
