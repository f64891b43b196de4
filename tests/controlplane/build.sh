#!/usr/bin/env bash
# Builds the test control plane from Go modules: kube-apiserver,
# kube-controller-manager, kubectl, etcd and helm, with real version ldflags.
# `build.sh node` also builds the e2e node (`make e2e`): kube-scheduler, kubelet
# and kube-proxy (same Kubernetes module), containerd, containerd-shim-runc-v2
# and ctr (containerd/), runc with seccomp (runc/, cgo and Debian's
# libseccomp-dev: tests/controlplane/node-packages.sh installs it) and the
# static pause binary of the sandbox image (Kubernetes' own build/pause/linux/pause.c
# from the module cache).
#
# Output goes to $CONTROLPLANE_BIN (default: <repo>/target/controlplane/bin).
# A binary is rebuilt only when it is missing or was built from another pinned
# version (recorded in <binary>.version), so a warm run costs nothing.
# The Go module and build caches (GOMODCACHE, GOCACHE) are Go's own and are
# reused between clones.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${CONTROLPLANE_BIN:-$repo/target/controlplane/bin}
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod

modver() { (cd "$here/$1" && go list -m -f '{{.Version}}' "$2"); }
k8s=$(modver kubernetes k8s.io/kubernetes)
etcd=$(modver etcd go.etcd.io/etcd/server/v3)
helm=$(modver helm helm.sh/helm/v3)
staging=$(cd "$here/kubernetes" && go list -m -f '{{.Replace.Version}}' k8s.io/client-go)
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# build NAME MODULE_DIR VERSION PACKAGE LDFLAGS
# With CONTROLPLANE_ONLY="helm ..." only the binaries named there are built
# (the release workflow needs helm alone).
build() {
  local name=$1 dir=$2 version=$3 pkg=$4 ldflags=$5
  if [ -n "${CONTROLPLANE_ONLY:-}" ] && [[ " $CONTROLPLANE_ONLY " != *" $name "* ]]; then
    return 0
  fi
  if [ -x "$bin/$name" ] && [ "$(cat "$bin/$name.version" 2>/dev/null)" = "$version" ]; then
    return 0
  fi
  echo "building $name $version ..." >&2
  local start=$SECONDS
  # A cold build takes minutes: say that it is still going.
  ( while sleep 30; do echo "  still building $name ($((SECONDS - start))s)" >&2; done ) &
  local ticker=$! status=0
  (cd "$here/$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$name.tmp" "$pkg") || status=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  [ "$status" -eq 0 ] || return "$status"
  mv "$bin/$name.tmp" "$bin/$name"
  echo "$version" > "$bin/$name.version"
  echo "built $name in $((SECONDS - start))s" >&2
}

minor=${k8s#v1.}; minor=${minor%%.*}
k8s_ldflags="-X k8s.io/component-base/version.gitVersion=$k8s \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/component-base/version.buildDate=$build_date \
 -X k8s.io/component-base/version.gitCommit=module-$k8s \
 -X k8s.io/client-go/pkg/version.gitVersion=$k8s -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.buildDate=$build_date"
build etcd etcd "$etcd" go.etcd.io/etcd/server/v3 "-X go.etcd.io/etcd/api/v3/version.GitSHA=module-$etcd"
build kube-apiserver kubernetes "$k8s" k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
build kube-controller-manager kubernetes "$k8s" k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_ldflags"
build kubectl kubernetes "$k8s" k8s.io/kubernetes/cmd/kubectl "$k8s_ldflags"

helm_k8s=$(cd "$here/helm" && go list -m -f '{{.Version}}' k8s.io/client-go)
hmajor=1; hminor=${helm_k8s#v0.}; hminor=${hminor%%.*}
build helm helm "$helm" helm.sh/helm/v3/cmd/helm \
 "-X helm.sh/helm/v3/internal/version.version=$helm -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
 -X helm.sh/helm/v3/internal/version.gitCommit=module-$helm \
 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$hmajor -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$hminor \
 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$hmajor -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$hminor"
echo "$staging" > /dev/null

if [ "${1:-}" = node ]; then
  build kube-scheduler kubernetes "$k8s" k8s.io/kubernetes/cmd/kube-scheduler "$k8s_ldflags"
  build kubelet kubernetes "$k8s" k8s.io/kubernetes/cmd/kubelet "$k8s_ldflags"
  build kube-proxy kubernetes "$k8s" k8s.io/kubernetes/cmd/kube-proxy "$k8s_ldflags"
  containerd=$(modver containerd github.com/containerd/containerd/v2)
  # btrfs support needs cgo and headers; the node uses the overlayfs snapshotter.
  ctr_flags="-X github.com/containerd/containerd/v2/version.Version=$containerd \
 -X github.com/containerd/containerd/v2/version.Revision=module-$containerd"
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    GOFLAGS="$GOFLAGS -tags=no_btrfs" build "$cmd" containerd "$containerd" \
      "github.com/containerd/containerd/v2/cmd/$cmd" "$ctr_flags"
  done
  runc=$(modver runc github.com/opencontainers/runc)
  # Debian's runc 1.1.5 cannot start containers on this kernel ("can't get final
  # child's PID from pipe"); runc needs cgo for its nsexec and libseccomp.
  CGO_ENABLED=1 GOFLAGS="$GOFLAGS -tags=seccomp" build runc runc "$runc" github.com/opencontainers/runc \
    "-X main.version=${runc#v} -X main.gitCommit=module-$runc"
  pause_src=$(cd "$here/kubernetes" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
  pause_tag=$(sed -n 's/^TAG ?= //p' "$(dirname "$(dirname "$pause_src")")/Makefile")
  if ! [ -x "$bin/pause" ] || [ "$(cat "$bin/pause.version" 2>/dev/null)" != "$pause_tag" ]; then
    gcc -Os -Wall -Werror -static -DVERSION="v$pause_tag-module-$k8s" -o "$bin/pause" "$pause_src"
    echo "$pause_tag" > "$bin/pause.version"
    echo "built pause $pause_tag" >&2
  fi
fi
echo "$bin"
