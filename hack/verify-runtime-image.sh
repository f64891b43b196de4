#!/usr/bin/env bash
# Checks the Dockerfile's runtime image without a container engine:
#
#   1. builds the release binary with the Dockerfile's build command (verbatim);
#   2. checks that it needs nothing gcr.io/distroless/cc-debian12 lacks: only
#      glibc/libgcc shared libraries, and glibc symbols no newer than Debian 12's 2.36;
#   3. assembles a root filesystem with only the binary, the shared libraries ldd
#      finds, the dynamic loader and the CA bundle (what the image provides and the
#      binary uses), plus the base image's users, /tmp and the nonroot home,
#      under target/runtime-image/rootfs, and the image's configuration (user,
#      entrypoint, ports, environment, labels) in target/runtime-image/config.json:
#      the e2e node (`make e2e`) runs the chart with this image, and
#      tests/e2e.rs checks both against the Dockerfile;
#   4. runs `--help`, `--version`, `crd` and `import` in it with chroot as uid/gid
#      65532 (the image's USER), and prints the size.
#
# With BUILD_CONTEXT=DIR (a build context as Docker would send it, made by
# hack/docker-context.sh; .ci/run does this), every file the Dockerfile COPYs
# must be in it and step 1 builds from it, so a Dockerfile or .dockerignore that
# leaves out what the build needs fails here, not at `docker build`.
#
# Needs root (chroot), cargo, ldd, objdump. Usage: hack/verify-runtime-image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

# The Dockerfile's build command, character for character; keep them identical
# (checked below: the dependency layer and the final build both use it).
BUILD_COMMAND='cargo build --release --locked --bin dropbox-operator'
BINARY=target/release/dropbox-operator
RUNTIME_UID=65532
ROOTFS=target/runtime-image/rootfs
# Shared libraries gcr.io/distroless/cc-debian12 ships (libc6, libgcc-s1,
# libstdc++6, libgomp1, libssl3) plus the loader.
PROVIDED_LIBS='^(ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1|libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|libutil\.so\.1|libresolv\.so\.2|libgcc_s\.so\.1|libstdc\+\+\.so\.6|libgomp\.so\.1|libssl\.so\.3|libcrypto\.so\.3)$'
MAX_GLIBC=2.36
# The runtime image's configuration: the Dockerfile's USER, ENTRYPOINT, CMD,
# EXPOSE and LABEL, and what gcr.io/distroless/cc-debian12:nonroot sets (Env,
# WorkingDir). tests/e2e.rs compares it with the Dockerfile.
IMAGE_CONFIG='{
  "User": "65532:65532",
  "Entrypoint": ["/dropbox-operator"],
  "Cmd": ["--help"],
  "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
  "WorkingDir": "/home/nonroot",
  "ExposedPorts": {"8080/tcp": {}, "8081/tcp": {}},
  "Labels": {
    "org.opencontainers.image.title": "dropbox-operator",
    "org.opencontainers.image.description": "Kubernetes operator for Dropbox element instances: OAuth lifecycle and signed file-change events",
    "org.opencontainers.image.licenses": "Apache-2.0"
  }
}'

step() { printf '\n== %s\n' "$*"; }
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || fail "run as root: chroot needs CAP_SYS_CHROOT"
uses=$(grep -cF -- "$BUILD_COMMAND" Dockerfile || true)
[[ $uses -eq 2 ]] || fail "the Dockerfile must use '$BUILD_COMMAND' twice (dependency layer, final build); found $uses"

if [[ -n ${BUILD_CONTEXT:-} ]]; then
    step "build context: $BUILD_CONTEXT"
    # The sources of every COPY without --from (the build stage's COPY of the context).
    mapfile -t sources < <(awk 'toupper($1) == "COPY" && $2 !~ /^--from/ {for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i}' Dockerfile)
    for source in "${sources[@]}"; do
        [[ -e $BUILD_CONTEXT/$source ]] || fail "the Dockerfile copies $source, which is not in the build context (.dockerignore?)"
        echo "COPY $source: present"
    done
fi

step "build: $BUILD_COMMAND${BUILD_CONTEXT:+ (in $BUILD_CONTEXT)}"
if [[ -n ${BUILD_CONTEXT:-} ]]; then
    # Offline, with this checkout's target directory as the cache.
    (cd "$BUILD_CONTEXT" && CARGO_NET_OFFLINE=true CARGO_TARGET_DIR="$REPO/target" $BUILD_COMMAND)
else
    $BUILD_COMMAND
fi
echo "binary: $BINARY ($(stat -c %s "$BINARY") bytes)"

step "shared libraries (ldd)"
ldd "$BINARY"
mapfile -t libs < <(ldd "$BINARY" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
for lib in "${libs[@]}"; do
    [[ $(basename "$lib") =~ $PROVIDED_LIBS ]] || fail "$lib is not in gcr.io/distroless/cc-debian12"
done
newest=$(objdump -T "$BINARY" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
echo "newest glibc symbol version: $newest (Debian 12: $MAX_GLIBC)"
[[ $(printf '%s\n%s\n' "$newest" "$MAX_GLIBC" | sort -V | tail -1) == "$MAX_GLIBC" ]] ||
    fail "the binary needs glibc $newest, newer than Debian 12's $MAX_GLIBC"

step "root filesystem: $ROOTFS"
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
install -m 0755 "$BINARY" "$ROOTFS/dropbox-operator"
for lib in "${libs[@]}"; do
    install -D -m 0755 "$(readlink -f "$lib")" "$ROOTFS$lib"
done
# distroless ships the bundle as this one file (Debian's ca-certificates).
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
else
    echo "note: no /etc/ssl/certs/ca-certificates.crt on this machine; the image has one"
fi
# What the distroless base adds that a process may notice (users, /tmp, the
# nonroot home); the release image gets the same (hack/release.sh).
hack/image-base-files.sh "$ROOTFS"
echo "$IMAGE_CONFIG" >"$(dirname "$ROOTFS")/config.json"
(cd "$ROOTFS" && find . -type f -printf '%s\t%p\n' | sort -k2)

# Like the image: ENTRYPOINT /dropbox-operator, USER 65532:65532, no supplementary groups.
in_image() { chroot --userspec="$RUNTIME_UID:$RUNTIME_UID" --groups="$RUNTIME_UID" "$ROOTFS" /dropbox-operator "$@"; }

step "as uid $RUNTIME_UID: /dropbox-operator --help"
in_image --help

step "as uid $RUNTIME_UID: /dropbox-operator --version"
in_image --version

step "as uid $RUNTIME_UID: /dropbox-operator crd"
crd=$(in_image crd)
echo "$crd" | head -5
echo "... ($(echo "$crd" | wc -l) lines)"
diff <(echo "$crd") crds/dropboxelementinstances.elements.dropbox-operator.dev.yaml >/dev/null ||
    fail "crd output differs from crds/"
echo "identical to crds/dropboxelementinstances.elements.dropbox-operator.dev.yaml"

step "as uid $RUNTIME_UID: /dropbox-operator import - (the Cloud Elements instance JSON of docs/user-guide.md)"
in_image import - <<'JSON' | grep -E '^(#|kind:|---)'
{
  "element": { "key": "dropbox" },
  "providerData": { "code": "Xo0C2mBkUiAAAAAAAAAAFm3pQwz9Lr7Tn5VhY1cD8sK" },
  "configuration": {
    "oauth.api.key": "7q3kz1m9xw2b5vd",
    "oauth.api.secret": "hq04ptz8c1n6yre",
    "oauth.callback.url": "https://www.mycoolapp.com/auth",
    "event.notification.enabled": true,
    "event.notification.callback.url": "https://app.example.com/dropbox-events",
    "event.notification.signature.key": "evt-sig-3b9d0c71f2a8"
  },
  "tags": ["marketing"],
  "name": "Marketing Dropbox"
}
JSON

step "as uid $RUNTIME_UID: a root-only file is unreadable (the process is not root)"
echo '{}' >"$ROOTFS/root-only.json"
chmod 0600 "$ROOTFS/root-only.json"
if in_image import /root-only.json 2>"$ROOTFS/../stderr"; then
    fail "read a root-only file: not running as uid $RUNTIME_UID"
fi
cat "$ROOTFS/../stderr"
rm -f "$ROOTFS/root-only.json" "$ROOTFS/../stderr"

step "size"
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
total=$(du -sb "$ROOTFS" | cut -f1)
binary=$(stat -c %s "$ROOTFS/dropbox-operator")
echo "image-equivalent root filesystem: $total bytes ($(mib "$total"))"
echo "  /dropbox-operator, the image's own layer:     $binary bytes ($(mib "$binary"))"
echo "  loader, libraries, CA bundle (from the base): $((total - binary)) bytes ($(mib $((total - binary))))"
echo "The real image also carries the rest of gcr.io/distroless/cc-debian12 (libstdc++, libssl, tzdata, ...)."
echo
echo "OK: the binary runs as uid $RUNTIME_UID with only glibc, libgcc_s and the CA bundle."
