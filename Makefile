# dropbox-operator — developer entry points. See README.md.
SHELL := /bin/bash
CONTROLPLANE_BIN ?= $(CURDIR)/target/controlplane/bin
export CONTROLPLANE_BIN
CARGO ?= cargo

.PHONY: dev test lint controlplane crd build

## dev: start a local control plane with the CRD and the operator; Ctrl-C stops it
dev: controlplane
	$(CARGO) build --bins
	$(CARGO) run --quiet --example dev-cluster

## test: build what is missing, then run every test against a real control plane
test: controlplane
	$(CARGO) test --all-targets --no-fail-fast

## lint: formatting and clippy, as CI checks them
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings

## controlplane: build etcd, kube-apiserver, kube-controller-manager, kubectl and helm (only when missing)
controlplane:
	tests/controlplane/build.sh

## crd: regenerate the checked-in CRD from the Rust types
crd:
	$(CARGO) run --quiet -- crd > crds/dropboxelementinstances.elements.dropbox-operator.dev.yaml

build:
	$(CARGO) build --release
