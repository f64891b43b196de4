#!/usr/bin/env bash
# The ingress side by side with Knative's GitHubSource receive adapter
# (knative-extensions/eventing-github, cmd/receive_adapter): builds the adapter
# when it is missing, then runs the ignored test tests/bench_peer.rs in release
# mode against the real test control plane. Results: target/bench/peer.json and
# target/bench/peer.txt. A documented manual step (docs/performance.md, "Side by side with
# Knative's GitHubSource adapter"), not part of CI.
#
# The adapter's source is not part of this repository and this script never
# downloads or commits it. Bring it yourself, e.g.
#
#   git clone https://github.com/knative-extensions/eventing-github target/peer/src
#
# or point PEER_SRC at a checkout (a directory with go.mod) or at a bare git
# directory (its HEAD is extracted to target/peer/src with `git archive`).
# Building needs Go (the checkout vendors its modules; GOFLAGS=-mod=mod uses the
# Go module proxy instead when vendor/ is missing).
#
# Environment:
#   PEER_SRC             the adapter's source (default: target/peer/src)
#   PEER_BIN             a prebuilt adapter (default: target/peer/bin/receive_adapter)
#   CONTROLPLANE_BIN     the test control plane's binaries (see tests/controlplane)
#   BENCH_PEER_WEBHOOKS  webhooks per round and side (default 2000)
#   BENCH_PEER_ROUNDS    alternating rounds per row (default 5)
#
# Usage: hack/bench-peer.sh   (or: make bench-peer)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PEER_DIR=$ROOT/target/peer
PEER_BIN=${PEER_BIN:-$PEER_DIR/bin/receive_adapter}
[[ $PEER_BIN == /* ]] || PEER_BIN=$ROOT/$PEER_BIN
mkdir -p "$PEER_DIR"

if [[ ! -x $PEER_BIN ]]; then
    src=${PEER_SRC:-$PEER_DIR/src}
    if [[ -d $src && ! -f $src/go.mod && -f $src/HEAD && -d $src/objects ]]; then
        # A bare git directory (a mirror): extract its HEAD.
        echo "== extracting $(git --git-dir="$src" rev-parse HEAD) from $src to $PEER_DIR/src"
        rm -rf "$PEER_DIR/src"
        mkdir -p "$PEER_DIR/src"
        git --git-dir="$src" rev-parse HEAD > "$PEER_DIR/VERSION"
        git --git-dir="$src" archive HEAD | tar -x -C "$PEER_DIR/src"
        src=$PEER_DIR/src
    elif [[ -f $src/go.mod ]]; then
        # Its commit, when it is a git checkout of its own (target/peer/src is
        # inside this repository's work tree: its HEAD is not the adapter's).
        top=$(git -C "$src" rev-parse --show-toplevel 2>/dev/null || true)
        if [[ -n $top && $top -ef $src ]]; then
            git -C "$src" rev-parse HEAD > "$PEER_DIR/VERSION"
        elif ! [[ $src -ef $PEER_DIR/src && -s $PEER_DIR/VERSION ]]; then
            echo "unknown (not a git checkout: $src)" > "$PEER_DIR/VERSION"
        fi
    else
        cat >&2 <<EOF
The receive adapter is not built and its source is missing. Bring it with

    git clone https://github.com/knative-extensions/eventing-github target/peer/src

(or set PEER_SRC to a checkout or a bare git directory), then run this again.
EOF
        exit 1
    fi
    command -v go > /dev/null || { echo "Go is needed to build the receive adapter" >&2; exit 1; }
    if [[ ! -d $src/vendor && -z ${GOFLAGS:-} ]]; then
        export GOFLAGS=-mod=mod
    fi
    build=(go build -o "$PEER_BIN" ./cmd/receive_adapter)
    echo "== building the receive adapter: (cd $src && GOFLAGS=${GOFLAGS:-} ${build[*]})"
    mkdir -p "$(dirname "$PEER_BIN")"
    if ! (cd "$src" && "${build[@]}") > "$PEER_DIR/build.log" 2>&1; then
        {
            echo "building the receive adapter failed:"
            echo "  (cd $src && GOFLAGS=${GOFLAGS:-} ${build[*]})"
            cat "$PEER_DIR/build.log"
        } >&2
        exit 1
    fi
fi

export PEER_BIN
PEER_VERSION=$(cat "$PEER_DIR/VERSION" 2>/dev/null || echo unknown)
export PEER_VERSION
echo "== receive adapter: $PEER_BIN (eventing-github $PEER_VERSION)"

CARGO=${CARGO:-cargo}
"$CARGO" test --release --test bench_peer -- --ignored --nocapture --test-threads=1
