#!/usr/bin/env bash
# Builds the Go tools the release and observability checks use, from the Go
# modules pinned in hack/tools/ (go.mod/go.sum), into target/tools/bin:
#
#   promtool, promql-names            hack/tools/prometheus (Prometheus's promtool; its PromQL parser)
#   validate-krew-manifest, kubectl-krew   hack/tools/krew (krew's validator; krew itself)
#
# Usage: hack/build-tools.sh [NAME...] (default: all). A tool is rebuilt only
# when it is missing or was built from another pinned version (recorded in
# <tool>.version), as tests/controlplane/build.sh does; Go's module and build
# caches are shared between clones, so a new clone of a machine that built them
# once only links them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bin=$repo/target/tools/bin
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod

# name: module dir, module whose version pins it, package, build tags
declare -A dir=([promtool]=prometheus [promql-names]=prometheus [validate-krew-manifest]=krew [kubectl-krew]=krew)
declare -A module=([promtool]=github.com/prometheus/prometheus [promql-names]=github.com/prometheus/prometheus
    [validate-krew-manifest]=sigs.k8s.io/krew [kubectl-krew]=sigs.k8s.io/krew)
declare -A package=([promtool]=github.com/prometheus/prometheus/cmd/promtool [promql-names]=./promql-names
    [validate-krew-manifest]=sigs.k8s.io/krew/cmd/validate-krew-manifest [kubectl-krew]=sigs.k8s.io/krew/cmd/krew)
# Without service discovery (remove_all_sd): promtool's rule tests need none of
# the cloud SDKs, and the build is minutes shorter.
declare -A tags=([promtool]=remove_all_sd)

names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(promtool promql-names validate-krew-manifest kubectl-krew)
for name in "${names[@]}"; do
    [[ -n ${dir[$name]:-} ]] || {
        echo "unknown tool $name" >&2
        exit 1
    }
    src=$here/tools/${dir[$name]}
    version=$(cd "$src" && go list -m -f '{{.Version}}' "${module[$name]}")
    # promql-names is this repository's own source: its hash is part of the version.
    [[ $name == promql-names ]] && version="$version+$(sha256sum "$src/promql-names/main.go" | cut -c1-12)"
    if [[ -x $bin/$name && "$(cat "$bin/$name.version" 2>/dev/null)" == "$version" ]]; then
        continue
    fi
    echo "building $name $version ..." >&2
    start=$SECONDS
    (cd "$src" && go build -trimpath -tags "${tags[$name]:-}" -ldflags "-s -w" -o "$bin/$name.tmp" "${package[$name]}")
    mv "$bin/$name.tmp" "$bin/$name"
    echo "$version" >"$bin/$name.version"
    echo "built $name in $((SECONDS - start))s" >&2
done
