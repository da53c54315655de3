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

clean:
	rm -rf out model_store/*.mar
