#!/usr/bin/env bash
# Regenerates the staging-module replaces of kubernetes/go.mod.
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/client-go, ...)
# at the placeholder version v0.0.0 and resolves them with replace directives that
# point into its own source tree. Outside that tree each placeholder has to be
# replaced by the published tag that matches the Kubernetes release:
# v1.MINOR.PATCH -> v0.MINOR.PATCH. The list is read from the release's own go.mod,
# so it never goes stale when the pinned version changes.
#
# Usage: tests/controlplane/gen-replaces.sh [v1.37.2]
# MODULE_DIR=<dir> edits another module that needs k8s.io/kubernetes (e.g.
# tests/argocd-health, through gitops-engine); name the version then.
set -euo pipefail
cd "${MODULE_DIR:-$(dirname "$0")/kubernetes}"
k8s_version=${1:-$(go list -m -f '{{.Version}}' k8s.io/kubernetes 2>/dev/null || echo v1.37.2)}
staging_version="v0.${k8s_version#v1.}"
gomod=$(go mod download -json "k8s.io/kubernetes@${k8s_version}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -f "$gomod" ] || { echo "could not download k8s.io/kubernetes@${k8s_version}" >&2; exit 1; }
mods=$(awk '/^require \(/{r=1;next} r&&/^\)/{r=0} r&&$2=="v0.0.0"{print $1}' "$gomod" | sort -u)
[ -n "$mods" ] || { echo "no v0.0.0 staging requirements found in $gomod" >&2; exit 1; }
args=()
for m in $mods; do args+=("-replace=${m}=${m}@${staging_version}"); done
go mod edit "${args[@]}"
echo "replaced $(echo "$mods" | wc -l) staging modules with ${staging_version}"
