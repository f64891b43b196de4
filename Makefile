# dropbox-operator — developer entry points. See README.md.
SHELL := /bin/bash
CONTROLPLANE_BIN ?= $(CURDIR)/target/controlplane/bin
export CONTROLPLANE_BIN
CARGO ?= cargo

.PHONY: demo dev test lint bench bench-scale bench-readme bench-peer controlplane node image e2e crd build testdeps release release-deps

## demo: the whole story offline: control plane, operator, ingress, Dropbox emulator, a signed event
demo: controlplane
	$(CARGO) build --bins --example demo
	$(CARGO) run --quiet --example demo

## dev: start a local control plane with the CRD and the operator; Ctrl-C stops it
dev: controlplane
	$(CARGO) build --bins --example dev-cluster
	$(CARGO) run --quiet --example dev-cluster

## test: build what is missing, then run every test against a real control plane
test: controlplane testdeps
	$(CARGO) test --all-targets --no-fail-fast

## bench: the benchmarks (release build, real control plane): controller (1,000 instances),
## ingress, long-polls; BENCH_ROUNDS rounds per figure (default 3). Sections in target/bench/,
## collected into docs/benchmarks/results.json (BENCH_KEEP=name,... keeps sections measured
## on another source tree, and says so in results.json)
BENCH_ROUNDS ?= 3
BENCH_RELEASE = $(CARGO) build --release --bins --example bare-webhook --example bench-load --example bench-deliver
BENCH_COLLECT = python3 hack/bench-results.py collect $(if $(BENCH_KEEP),--keep $(BENCH_KEEP))
bench: controlplane
	$(BENCH_RELEASE)
	BENCH_ROUNDS=$(BENCH_ROUNDS) $(CARGO) test --release --test bench -- --ignored --nocapture --test-threads=1
	$(BENCH_COLLECT)

## bench-scale: the controller with BENCH_INSTANCES instances (default 10,000; 30000 works too),
## BENCH_ROUNDS alternating rounds (default 3; about 15 minutes a round at 10,000)
BENCH_INSTANCES ?= 10000
bench-scale: controlplane
	$(BENCH_RELEASE)
	BENCH_INSTANCES=$(BENCH_INSTANCES) BENCH_ROUNDS=$(BENCH_ROUNDS) $(CARGO) test --release --test bench -- --ignored --nocapture bench_controller
	$(BENCH_COLLECT)

## bench-readme: docs/performance.md's table and the plots in docs/benchmarks/ from
## docs/benchmarks/results.json (matplotlib, pinned, in a venv under target/)
bench-readme: target/bench-venv/.installed
	python3 hack/bench-results.py readme
	target/bench-venv/bin/python hack/bench-results.py plots

target/bench-venv/.installed: hack/bench-requirements.txt
	python3 -m venv target/bench-venv
	target/bench-venv/bin/pip install --quiet --disable-pip-version-check -r hack/bench-requirements.txt
	touch $@

## bench-peer: the ingress beside Knative's GitHubSource receive adapter, which you
## bring (docs/performance.md, "Side by side with Knative's GitHubSource adapter"); not in CI
bench-peer: controlplane
	$(BENCH_RELEASE)
	hack/bench-peer.sh
	$(BENCH_COLLECT)

## lint: formatting and clippy, as CI checks them
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings
	python3 hack/bench-results.py check

## testdeps: the pinned Python and Node libraries tests/interop.rs checks deliveries with;
## Argo CD's health code (gitops-engine) that tests/chart_argocd.rs runs; Debian's Chromium
## and playwright-core for tests/connect.rs's browser rows; promtool and Prometheus's
## PromQL parser for tests/observability.rs (each only when missing)
testdeps: target/interop/venv/.installed tests/interop/node_modules/.package-lock.json target/argocd-health/argocd-health tests/browser/node_modules/.package-lock.json
	hack/apt-install.sh chromium
	hack/build-tools.sh promtool promql-names

target/argocd-health/argocd-health: tests/argocd-health/main.go tests/argocd-health/go.mod tests/argocd-health/go.sum
	cd tests/argocd-health && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w' -o $(CURDIR)/$@ .

tests/browser/node_modules/.package-lock.json: tests/browser/package-lock.json
	npm ci --prefix tests/browser --no-audit --no-fund

target/interop/venv/.installed: tests/interop/requirements.txt
	python3 -m venv target/interop/venv
	target/interop/venv/bin/pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt
	touch $@

tests/interop/node_modules/.package-lock.json: tests/interop/package-lock.json
	npm ci --prefix tests/interop --no-audit --no-fund

## controlplane: build etcd, kube-apiserver, kube-controller-manager, kubectl and helm (only when missing)
controlplane:
	tests/controlplane/build.sh

## node: what the e2e node needs: Debian packages (CNI plugins, iptables,
## libseccomp-dev; installed when missing, as root) and kube-scheduler, kubelet,
## kube-proxy, containerd, runc and pause built into target/controlplane/bin
node:
	tests/controlplane/node-packages.sh
	tests/controlplane/build.sh node

## image: the runtime image's root filesystem and configuration, checked
## (hack/verify-runtime-image.sh; as root)
image:
	hack/verify-runtime-image.sh

## e2e: the chart on a one-node cluster in a network namespace of its own, with
## the project's image (as root; README "Try it"). E2E_IMAGE= skips rebuilding
## the image (.ci/run has just checked it from the build context).
E2E_IMAGE ?= image
e2e: node $(E2E_IMAGE)
	$(CARGO) test --test e2e -- --ignored --nocapture --test-threads=1

## crd: regenerate the checked-in CRD from the Rust types
crd:
	$(CARGO) run --quiet -- crd > crds/dropboxelementinstances.elements.dropbox-operator.dev.yaml

build:
	$(CARGO) build --release

## release: every release artifact in target/release-artifacts/ (chart, OCI image archive,
## kubectl-dropbox archives for RELEASE_ARCHES, krew manifest, SBOM, release notes, SHA256SUMS),
## each checked by its ecosystem's own tool (hack/release.sh says which)
release: controlplane release-deps
	hack/verify-runtime-image.sh
	hack/release.sh

## release-deps: umoci, skopeo, the arm64 cross toolchain, krew's validator, cargo-cyclonedx
## and CycloneDX's Python library (only what is missing)
release-deps:
	hack/release-deps.sh
