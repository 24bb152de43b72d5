# authz-sidecar: every target creates the virtualenv it needs (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
RUN_ARGS ?=
DEMO_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv run demo scenario test lint typecheck pytest bench bench-quick profile bench-deps protos check-protos clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py authz_sidecar/fronts/_checklane.c authz_sidecar/model/_fold.c authz_sidecar/documents/_granttext.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv with the sidecar, Envoy, etcd and the test tools

run: $(STAMP) ## a two-region mesh on loopback: etcd, the controller, us-east and eu-west (Ctrl-C stops it)
	$(BIN)/authz-sidecar mesh up $(RUN_ARGS)

demo: $(STAMP) ## the story of a change on the running mesh (make run in another terminal; else its own) (~20 s)
	$(BIN)/authz-sidecar mesh demo $(DEMO_ARGS)

scenario: $(STAMP) ## the controller on a live mesh: an accident rolled back unaided, the intended change promoted (~90 s)
	$(BIN)/python -m authz_sidecar.local.scenario

test: lint typecheck bench-quick pytest ## everything CI runs: ruff, the import contract, mypy, the benchmark's quick mode, the test suite

lint: $(STAMP) ## ruff lint and format check; the import contract (layers, one-way dependencies)
	$(BIN)/ruff check authz_sidecar tests tools examples
	$(BIN)/ruff format --check authz_sidecar tests tools examples
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP) ## mypy --strict on authz_sidecar/
	$(BIN)/mypy

pytest: $(STAMP) test-deps ## the test suite (unit, gRPC, real Envoy, the deploy/ files)
	$(BIN)/pytest $(PYTEST_ARGS)

bench-deps: ## install h2load and nghttpd (Debian's nghttp2-client, nghttp2-server) if missing
	@{ command -v h2load && { command -v nghttpd || test -x /usr/sbin/nghttpd; }; } >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client nghttp2-server >/dev/null; \
	  else echo "bench: h2load/nghttpd missing; install nghttp2-client and nghttp2-server (Debian/Ubuntu)" >&2; exit 2; fi; }

.PHONY: test-deps deploy-configs
test-deps: ## install what the tests run beside Python if missing: docker-compose (validates deploy/docker-compose.yml, no engine needed), curl (docs/getting-started.md's requests)
	@{ command -v docker-compose && command -v curl; } >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose curl >/dev/null \
	    && command -v docker-compose >/dev/null && command -v curl >/dev/null \
	    || { echo "test-deps: installing docker-compose and curl failed" >&2; exit 2; }; \
	  else echo "test-deps: docker-compose or curl missing; install Debian's docker-compose and curl (their tests skip, or fail under CI=true)" >&2; fi; }

deploy-configs: $(STAMP) ## regenerate deploy/'s Envoy configs and Kubernetes ConfigMaps from the catalog
	$(BIN)/python tools/gen_deploy.py

bench: $(STAMP) bench-deps ## the benchmark: Envoy's floor, RBAC, bare servers, the sidecar, scale, propagation, Checks during a big rebuild (~16 min)
	$(BIN)/python -m authz_sidecar.bench

profile: $(STAMP) bench-deps ## py-spy on the sidecar and the bare gRPC server under load: where the CPU goes
	$(BIN)/python -m authz_sidecar.bench.profile

bench-quick: $(STAMP) bench-deps ## the benchmark in quick mode (1 s per point): checks every row ran and answered right
	$(BIN)/python -m authz_sidecar.bench --quick

protos: $(STAMP) ## regenerate the modules compiled from protos/
	$(BIN)/python tools/gen_protos.py

check-protos: $(STAMP) ## fail if a generated module is stale
	$(BIN)/python tools/gen_protos.py --check

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
