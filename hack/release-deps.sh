#!/usr/bin/env bash
# What `make release` needs beyond the control-plane binaries (helm), each only
# when missing, so a second run costs seconds:
# - umoci and skopeo (Debian): build and inspect the OCI image;
# - for arm64 in RELEASE_ARCHES: rustup's aarch64-unknown-linux-gnu standard
#   library and Debian's gcc-aarch64-linux-gnu (linker and C compiler for ring
#   and jemalloc);
# - validate-krew-manifest and kubectl-krew (hack/build-tools.sh);
# - cargo-cyclonedx (crates.io, pinned) into target/tools/bin; its build
#   directory is kept per machine (~/.cache/dropbox-operator) like Go's cache;
# - CycloneDX's Python library (PyPI, pinned) in target/tools/venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHES=${RELEASE_ARCHES:-amd64 arm64}
CYCLONEDX_VERSION=0.5.9

packages=(umoci skopeo)
[[ " $ARCHES " == *" arm64 "* ]] && packages+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
hack/apt-install.sh "${packages[@]}"
if [[ " $ARCHES " == *" arm64 "* ]] && ! rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
    rustup target add aarch64-unknown-linux-gnu
fi
hack/build-tools.sh validate-krew-manifest kubectl-krew

tools=target/tools
if [[ "$(cat "$tools/bin/cargo-cyclonedx.version" 2>/dev/null)" != "$CYCLONEDX_VERSION" ]]; then
    echo "installing cargo-cyclonedx $CYCLONEDX_VERSION ..." >&2
    start=$SECONDS
    cargo install --quiet --locked --force cargo-cyclonedx --version "$CYCLONEDX_VERSION" --root "$tools" \
        --target-dir "${XDG_CACHE_HOME:-$HOME/.cache}/dropbox-operator/cargo-install"
    echo "$CYCLONEDX_VERSION" >"$tools/bin/cargo-cyclonedx.version"
    echo "installed cargo-cyclonedx in $((SECONDS - start))s" >&2
fi
if [[ ! -f $tools/venv/.installed || hack/release-requirements.txt -nt $tools/venv/.installed ]]; then
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install --quiet --disable-pip-version-check -r hack/release-requirements.txt
    touch "$tools/venv/.installed"
fi
