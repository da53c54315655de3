# The two commands a user needs: `make demo` and `make test`. Both install first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.explainserve-installed

.PHONY: install demo test bench bench-core load clean

$(STAMP): pyproject.toml scripts/setup.sh scripts/gen_protos.py $(wildcard protos/explainserve/v1/*.proto)
	./scripts/setup.sh
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m explainserve.cli demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

bench-core: install
	$(PY) bench/core_timing.py

# Tables 1-6 of bench/REPORT.md on the demo models (about 30 minutes on 2 cores).
bench: install
	$(PY) bench/evaluate.py

# The steady locust scenario for 2 minutes against a locally started server; results in out/load/.
load: install
	$(PY) -m load_tests.run steady --duration 120 --users 4

clean:
	rm -rf out model_store/*.mar
