# pgpilot entry points. `make` or `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
DATA_DIR ?= $(shell ./scripts/pick-data-dir.sh)
PGPORT ?= 5432
API_PORT ?= 8008
API_LOOPBACK_PORT ?= 8009
NEXTEST_PROFILE := $(if $(CI),ci,default)
# A CI run builds once from a clean clone: incremental compilation's caches (~6 GB) would
# only take disk.
ifdef CI
export CARGO_INCREMENTAL ?= 0
endif

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: deps-run
deps-run: ## Install what `make run` needs (PostgreSQL), if missing
	@./scripts/install-test-deps.sh --run-only

.PHONY: deps-test
deps-test: ## Install what the tests need (PostgreSQL 14-18, s3s-fs, Azurite), if missing
	@./scripts/install-test-deps.sh

.PHONY: build
build: ## Build the agent and the operator
	$(CARGO) build -p pgpilot-agent -p pgpilot-operator

.PHONY: run
run: deps-run build ## Run the agent standalone on $(DATA_DIR), backups in $(DATA_DIR)/backups (Postgres on PGPORT=$(PGPORT), API on $(API_PORT))
	@mkdir -p $(DATA_DIR) && chmod 755 $(DATA_DIR)
	./target/debug/pgpilot-agent run --data-dir $(DATA_DIR)/pg --postgres-port $(PGPORT) \
	  --api-listen 127.0.0.1:$(API_PORT) --api-loopback-listen 127.0.0.1:$(API_LOOPBACK_PORT) \
	  --backup-store file://$(abspath $(DATA_DIR))/backups

.PHONY: demo
demo: deps-run build ## Backup -> accident (DROP TABLE) -> point-in-time restore, on a standalone agent
	DATA_DIR=$(DATA_DIR) ./scripts/demo.sh

.PHONY: status
status: ## Status of the agent started by `make run`
	@./target/debug/pgpilot-agent status --api-url http://127.0.0.1:$(API_LOOPBACK_PORT)

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: crds
crds: ## Generate the CRDs from common/src/crd.rs into charts/pgpilot/crds (CI fails when they are stale)
	$(CARGO) run -q -p pgpilot-operator -- crds --dir charts/pgpilot/crds

.PHONY: chart
chart: deps-test ## Lint and render the Helm chart (defaults and every option), validate it against the Kubernetes schemas, promtool-test its alerts
	$(CARGO) build -q -p pgpilot-operator
	./scripts/chart.sh check

.PHONY: images-check
images-check: ## Validate the container images' Dockerfiles and what they copy (no registry is reachable here; images/README.md)
	$(CARGO) build -q -p pgpilot-agent -p pgpilot-operator
	./scripts/images-check.sh

.PHONY: lint
lint: ## rustfmt check, clippy with warnings as errors, the operator's build of common stays light
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	CARGO=$(CARGO) ./scripts/check-light-contract.sh

.PHONY: deny
deny: ## cargo-deny: licences, bans, sources (offline) and RustSec advisories (needs the advisory DB; docs/security.md#dependencies)
	@./scripts/deny.sh

.PHONY: test
test: deps-test deny lint chart images-check ## Everything CI runs: install test deps, cargo-deny, lint, the chart's checks, all tests against real servers, the trials' short mode
	$(CARGO) nextest run --workspace --profile $(NEXTEST_PROFILE)
	$(CARGO) test --workspace --doc
	./scripts/chaos.sh --quick

.PHONY: chaos
chaos: deps-test ## Reliability trials R1-R5, disk full and the Kubernetes failover trial R6, full run counts (~40 min); prints the table (docs/chaos.md)
	./scripts/chaos.sh --kubernetes

.PHONY: chaos-quick
chaos-quick: deps-test ## The trials' short mode (part of make test): a few runs of each, the same checkers
	./scripts/chaos.sh --quick

.PHONY: bench
bench: bench-codec bench-side-by-side ## All benchmarks: codec pipeline + side-by-side vs pgBackRest/barman-cloud/pg_basebackup

.PHONY: bench-side-by-side
bench-side-by-side: ## Full side-by-side suite P1-P4, P6 (+P5 codec) in the background (~1 h): log target/bench/side-by-side.log
	./benches/side-by-side.sh --background

.PHONY: bench-p1 bench-p2 bench-p3 bench-p4 bench-p6
bench-p1 bench-p2 bench-p3 bench-p4 bench-p6: ## One side-by-side scenario in the foreground (p2 and p4 take ~20 min)
	./benches/side-by-side.sh $(subst bench-,,$@)

.PHONY: bench-switchover
bench-switchover: build ## P7: write unavailability of 20 switchovers, pgpilot and Patroni side by side (~10 min)
	./benches/switchover.sh

.PHONY: bench-failover
bench-failover: ## Unplanned failover: write unavailability over 10 frozen primaries (three agent pods; ~5 min)
	./benches/failover.sh

.PHONY: bench-failover-side-by-side
bench-failover-side-by-side: ## The same next to Patroni (3 nodes + etcd, defaults, primary frozen the same way), one run (~15 min, root)
	./benches/failover.sh --side-by-side

.PHONY: bench-drain
bench-drain: ## Planned drain of the primary: write gap over 10 drains (three agent pods; ~3 min)
	./benches/drain.sh

.PHONY: bench-operator
bench-operator: ## The operator: time to Ready for 2x2, RSS idle and reconciling 50 clusters (~4 min, first run builds the test API server in release)
	./benches/operator.sh

.PHONY: bench-quick
bench-quick: ## Side-by-side suite, few repetitions and a small database (a few minutes)
	./benches/side-by-side.sh --quick

.PHONY: bench-codec
bench-codec: ## Archive codec pipeline vs this machine's C tools (zstd, lz4, openssl)
	./benches/codec-reference.sh

.PHONY: clean-data
clean-data: ## Remove the standalone agent's data ($(DATA_DIR)); stop the agent first
	rm -rf $(DATA_DIR)
