# The two commands a user needs: `make demo` and `make test`. Both install first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.explainserve-installed

.PHONY: install demo test test-unit image-test mutation bench bench-quick bench-large bench-core bench-ood bench-ood-video bench-suppression load clean

$(STAMP): pyproject.toml scripts/setup.sh scripts/gen_protos.py $(wildcard protos/explainserve/v1/*.proto protos/inference/*.proto)
	./scripts/setup.sh
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m explainserve.cli demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

# The library, handlers and gateway logic without starting TorchServe, the gateway or Prometheus;
# the unit tests marked slow (the architecture zoos, the demo stores' held-out checks) run in `make test`.
test-unit: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 -m "not slow" tests/unit

# Builds deploy/Dockerfile with podman (--isolation=chroot) on a Debian bookworm base made by
# mmdebstrap, then runs tests/image/smoke.py inside the image as uid 10001 (scripts/image_test.sh;
# root, 12-14 minutes from nothing on 2 loaded cores, 4 when only the sources changed). Not part
# of `make test`: run it after changing deploy/Dockerfile, scripts/setup.sh or the dependencies.
image-test:
	./scripts/image_test.sh

# Mutation testing of the core (scripts/mutation.py): each module against a fast selection of its
# own unit tests, at the lowest priority; prints mutation_score[module]=X with its counts and
# seconds, then mutation_score=X and mutation_seconds=N. MODULES="swag cam" runs only those.
mutation: install
	nice -n 19 $(PY) scripts/mutation.py $(MODULES)

bench-core: install
	$(PY) bench/core_timing.py

# Tables 1-8 of bench/REPORT.md on the 64 px demo image model and the video model at full power
# (Tables 1-2 on 500 images, Table 3 on 200 clips, paired bootstrap intervals for the pre-registered
# orderings; the run prints its own estimate, bench_full_estimate_min); bench-quick: development
# sizes; bench-large: the same on the 112 px, 512-filter image model, into bench/large/.
# bench-ood reruns only Table 7, OOD detection on images and on clips (needs the dev extra's pytorch-ood; the clip
# part alone is bench-ood-video, ~10 min), bench-suppression only Table 8.
bench: install
	$(PY) bench/evaluate.py

bench-quick: install
	$(PY) bench/evaluate.py --quick

bench-large: install
	$(PY) bench/evaluate.py --model image_large --out bench/large

bench-ood: install
	$(PY) bench/eval_ood.py
	$(PY) bench/eval_ood_video.py

bench-ood-video: install
	$(PY) bench/eval_ood_video.py

bench-suppression: install
	$(PY) bench/eval_suppression.py

# The steady locust scenario for 2 minutes against a locally started server; results in out/load/.
load: install
	$(PY) -m load_tests.run steady --duration 120 --users 4

clean:
	rm -rf out model_store/*.mar
