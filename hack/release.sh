#!/usr/bin/env bash
# `make release`: every release artifact under target/release-artifacts/, each
# checked by its own ecosystem's tool.
#
#   dropbox-operator-<v>.tgz                      the Helm chart          helm lint --strict (on the package)
#   dropbox-operator-<v>-image.oci.tar            the runtime image       umoci build, skopeo inspect, run as 65532
#   kubectl-dropbox_v<v>_linux_<arch>.tar.gz      the kubectl plugin      validate-krew-manifest (with each archive)
#   dropbox.yaml                                  krew plugin manifest      "
#   dropbox-operator-<v>.cdx.json                 CycloneDX SBOM          cyclonedx-python-lib's strict JSON schema
#   RELEASE_NOTES.md                              from CHANGELOG.md       the version has a section
#   SHA256SUMS                                    sha256 of the above     sha256sum -c
#
# Settings (environment or make variables):
#   RELEASE_ARCHES   "amd64 arm64" (default) or "amd64": linux targets of the plugin
#                    archives and the image. arm64 is cross-built (rustup target
#                    aarch64-unknown-linux-gnu and Debian's gcc-aarch64-linux-gnu).
#   IMAGE_REPOSITORY where the image is published; the packaged chart's
#                    image.repository (default: the chart's own default).
#   RELEASE_URL      base URL the plugin archives are downloaded from, for the
#                    krew manifest (default: the GitHub release of the tag).
#
# Tools: helm from tests/controlplane/build.sh, validate-krew-manifest from
# hack/tools/krew (hack/build-tools.sh), cargo-cyclonedx from crates.io, umoci and
# skopeo from Debian (hack/release-deps.sh installs what is missing).
# Needs root for chroot (the image check). A Docker engine is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
ARCHES=${RELEASE_ARCHES:-amd64 arm64}
CHART_DEFAULT_REPOSITORY=$(sed -n '/^image:/,/^[a-z]/s/^  repository: *//p' charts/dropbox-operator/values.yaml)
IMAGE_REPOSITORY=${IMAGE_REPOSITORY:-$CHART_DEFAULT_REPOSITORY}
GITHUB_REPOSITORY=${GITHUB_REPOSITORY:-dropbox-operator/dropbox-operator}
RELEASE_URL=${RELEASE_URL:-https://github.com/$GITHUB_REPOSITORY/releases/download/v$VERSION}
OUT=target/release-artifacts
WORK=target/release-work
BIN=${CONTROLPLANE_BIN:-$REPO/target/controlplane/bin}
TOOLS=$REPO/target/tools/bin
# Reproducible archives: every timestamp is the last commit's. Not exported:
# a build script reruns when SOURCE_DATE_EPOCH changes, and the release binary
# must stay the one hack/verify-runtime-image.sh built and checked.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

last_step=$SECONDS
step() {
    printf '(%ss)\n\n== %s\n' "$((SECONDS - last_step))" "$*"
    last_step=$SECONDS
}
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
rust_target() {
    case $1 in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    *) fail "unknown arch $1 (amd64, arm64)" ;;
    esac
}

[[ -n $VERSION ]] || fail "no version in Cargo.toml"
[[ -x $BIN/helm ]] || fail "$BIN/helm missing: run make controlplane"
for tool in validate-krew-manifest kubectl-krew cargo-cyclonedx; do
    [[ -x $TOOLS/$tool ]] || fail "$TOOLS/$tool missing: run make release-deps"
done
for tool in umoci skopeo; do
    command -v $tool >/dev/null || fail "$tool missing: run make release-deps"
done
rm -rf "$OUT" "$WORK"
mkdir -p "$OUT" "$WORK"
echo "dropbox-operator $VERSION; arches: $ARCHES; image: $IMAGE_REPOSITORY:$VERSION"

# ---------------------------------------------------------------------------
step "release notes from CHANGELOG.md"
# The section `## [<version>] ...` up to the next `## `.
awk -v v="$VERSION" '
    /^## / { if (found) exit; if (index($0, "[" v "]")) { found = 1 } }
    found { print }
    END { if (!found) exit 1 }
' CHANGELOG.md >"$OUT/RELEASE_NOTES.md" || fail "CHANGELOG.md has no section ## [$VERSION]"
[[ $(grep -cv '^\s*$' "$OUT/RELEASE_NOTES.md") -gt 1 ]] || fail "the CHANGELOG.md section of $VERSION is empty"
head -3 "$OUT/RELEASE_NOTES.md"

# ---------------------------------------------------------------------------
step "binaries (cargo build --release --locked)"
for arch in $ARCHES; do
    target=$(rust_target "$arch")
    if [[ $arch == amd64 && $(uname -m) == x86_64 ]]; then
        # The host build: the same command as the Dockerfile's and
        # hack/verify-runtime-image.sh's, so .ci/run builds it only once.
        cargo build --release --locked --bin dropbox-operator
        install -D -m 0755 target/release/dropbox-operator "$WORK/$arch/dropbox-operator"
    else
        linker=$([[ $arch == arm64 ]] && echo aarch64-linux-gnu-gcc)
        command -v "$linker" >/dev/null || fail "$linker missing: run make release-deps (or RELEASE_ARCHES=amd64)"
        rustup target list --installed | grep -qx "$target" ||
            fail "rustup target $target missing: run make release-deps (or RELEASE_ARCHES=amd64)"
        upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
        env "CARGO_TARGET_${upper}_LINKER=$linker" "CC_${target//-/_}=$linker" "AR_${target//-/_}=${linker%-gcc}-ar" \
            cargo build --release --locked --bin dropbox-operator --target "$target"
        install -D -m 0755 "target/$target/release/dropbox-operator" "$WORK/$arch/dropbox-operator"
    fi
    file "$WORK/$arch/dropbox-operator" 2>/dev/null || true
done

# ---------------------------------------------------------------------------
step "kubectl plugin archives (krew's naming guide: kubectl-dropbox, plugin name dropbox)"
for arch in $ARCHES; do
    dir=$WORK/plugin-$arch
    mkdir -p "$dir"
    cp "$WORK/$arch/dropbox-operator" "$dir/kubectl-dropbox"
    cp LICENSE "$dir/LICENSE"
    archive=kubectl-dropbox_v${VERSION}_linux_${arch}.tar.gz
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
        -C "$dir" -cf - kubectl-dropbox LICENSE | gzip -n >"$OUT/$archive"
    echo "$archive: $(stat -c %s "$OUT/$archive") bytes"
done
# Started under the plugin's name it shows the plugin's help (and runs here).
if [[ " $ARCHES " == *" amd64 "* ]]; then
    "$WORK/plugin-amd64/kubectl-dropbox" --help | head -3
fi

# ---------------------------------------------------------------------------
step "krew plugin manifest"
{
    cat <<EOF
# krew plugin manifest of kubectl-dropbox, written by hack/release.sh.
# Install without the krew index:
#   kubectl krew install --manifest=dropbox.yaml
apiVersion: krew.googlecontainertools.github.com/v1alpha2
kind: Plugin
metadata:
  name: dropbox
spec:
  version: v$VERSION
  homepage: https://github.com/$GITHUB_REPOSITORY
  shortDescription: Connect Dropbox accounts to dropbox-operator instances
  description: |
    Authorizes the Dropbox account of a DropboxElementInstance (dropbox-operator)
    in one command: prints and opens Dropbox's approval link (PKCE, random state),
    receives the redirect on a loopback address, stores the code in the
    instance's code Secret and waits until the instance is Ready.
  caveats: |
    Needs dropbox-operator in the cluster. Register the redirect URI connect
    prints (default http://127.0.0.1:53682/) in your Dropbox app's settings.
  platforms:
EOF
    for arch in $ARCHES; do
        archive=kubectl-dropbox_v${VERSION}_linux_${arch}.tar.gz
        cat <<EOF
    - selector:
        matchLabels:
          os: linux
          arch: $arch
      uri: $RELEASE_URL/$archive
      sha256: $(sha256sum "$OUT/$archive" | cut -d' ' -f1)
      bin: kubectl-dropbox
      files:
        - from: kubectl-dropbox
          to: .
        - from: LICENSE
          to: .
EOF
    done
} >"$OUT/dropbox.yaml"
# krew's own validator (the check krew-index runs): the manifest's schema,
# name, version and platform selectors; then, for each platform, a real
# `kubectl krew install --manifest` (download, sha256, extraction, bin, LICENSE).
# The archives are not published yet: the install reads them from a loopback
# HTTP server, from a copy of the manifest that differs only in the URIs.
"$TOOLS/validate-krew-manifest" -manifest "$OUT/dropbox.yaml" -skip-install
local_manifest=$WORK/krew/dropbox.yaml
mkdir -p "$(dirname "$local_manifest")"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$OUT" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sed "s#uri: $RELEASE_URL/#uri: http://127.0.0.1:$port/#" "$OUT/dropbox.yaml" >"$local_manifest"
for _ in $(seq 50); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
    sleep 0.1
done
PATH="$TOOLS:$BIN:$PATH" "$TOOLS/validate-krew-manifest" -manifest "$local_manifest"
kill $server 2>/dev/null || true
trap - EXIT
echo "krew: the manifest is valid and installs on: $ARCHES"

# ---------------------------------------------------------------------------
step "Helm chart"
chart=$WORK/chart/dropbox-operator
mkdir -p "$(dirname "$chart")"
cp -a charts/dropbox-operator "$chart"
if [[ $IMAGE_REPOSITORY != "$CHART_DEFAULT_REPOSITORY" ]]; then
    # The packaged chart points at the image published with it.
    sed -i "/^image:/,/^[a-z]/s#^  repository: .*#  repository: $IMAGE_REPOSITORY#" "$chart/values.yaml"
    sed -i "s#image: $CHART_DEFAULT_REPOSITORY:#image: $IMAGE_REPOSITORY:#" "$chart/Chart.yaml"
fi
grep -q "^version: $VERSION$" "$chart/Chart.yaml" || fail "Chart.yaml version is not $VERSION"
grep -q "^appVersion: \"$VERSION\"$" "$chart/Chart.yaml" || fail "Chart.yaml appVersion is not $VERSION"
"$BIN/helm" package "$chart" --destination "$OUT" >/dev/null
echo "dropbox-operator-$VERSION.tgz: $(stat -c %s "$OUT/dropbox-operator-$VERSION.tgz") bytes"
"$BIN/helm" lint --strict "$OUT/dropbox-operator-$VERSION.tgz"
"$BIN/helm" show values "$OUT/dropbox-operator-$VERSION.tgz" | grep -q "repository: $IMAGE_REPOSITORY$" ||
    fail "the packaged chart does not point at $IMAGE_REPOSITORY"

# ---------------------------------------------------------------------------
step "runtime image (OCI archive, from the root filesystem hack/verify-runtime-image.sh assembles)"
# The image is what the Dockerfile's runtime stage holds that the binary uses:
# the binary, the dynamic loader and the glibc/libgcc libraries it links, the
# CA bundle, and the base image's users, /tmp and nonroot home
# (hack/image-base-files.sh); the Dockerfile's configuration. For amd64 the
# root filesystem is the one verify-runtime-image.sh assembled and ran the
# binary in (as uid 65532); for arm64 the same files come from Debian's
# cross-toolchain sysroot (/usr/aarch64-linux-gnu).
layout=$WORK/oci
umoci init --layout "$layout"
platforms=()
for arch in $ARCHES; do
    rootfs=$WORK/rootfs-$arch
    if [[ $arch == amd64 ]]; then
        [[ -x target/runtime-image/rootfs/dropbox-operator ]] ||
            fail "target/runtime-image/rootfs missing: run hack/verify-runtime-image.sh first (make release does)"
        cmp -s target/runtime-image/rootfs/dropbox-operator "$WORK/amd64/dropbox-operator" ||
            fail "target/runtime-image/rootfs holds another binary than this release's: run hack/verify-runtime-image.sh again"
        cp -a target/runtime-image/rootfs "$rootfs"
    else
        sysroot=/usr/aarch64-linux-gnu
        mkdir -p "$rootfs/lib" "$rootfs/etc/ssl/certs"
        install -m 0755 "$WORK/$arch/dropbox-operator" "$rootfs/dropbox-operator"
        # The libraries the binary asks for (its NEEDED entries) and the loader.
        for lib in $(objdump -p "$rootfs/dropbox-operator" | awk '$1 == "NEEDED" {print $2}') ld-linux-aarch64.so.1; do
            install -D -m 0755 "$(readlink -f "$sysroot/lib/$lib")" "$rootfs/lib/$lib"
        done
        install -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
        hack/image-base-files.sh "$rootfs"
    fi
    tag=$VERSION-$arch
    umoci new --image "$layout:$tag"
    # The configuration is the one verify-runtime-image.sh wrote from the
    # Dockerfile and the distroless base (tests/e2e.rs compares that with the
    # Dockerfile), plus the release's version and source labels.
    mapfile -d '' image_config < <(python3 - target/runtime-image/config.json <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
args = ["--config.user", c["User"], "--config.workingdir", c["WorkingDir"]]
args += [a for e in c["Entrypoint"] for a in ("--config.entrypoint", e)]
args += [a for e in c["Cmd"] for a in ("--config.cmd", e)]
args += [a for e in c["Env"] for a in ("--config.env", e)]
args += [a for p in c["ExposedPorts"] for a in ("--config.exposedports", p)]
args += [a for k, v in c["Labels"].items() for a in ("--config.label", f"{k}={v}")]
sys.stdout.write("".join(a + "\0" for a in args))
PY
    )
    umoci config --image "$layout:$tag" --os linux --architecture "$arch" \
        "${image_config[@]}" \
        --config.label "org.opencontainers.image.version=$VERSION" \
        --config.label "org.opencontainers.image.source=https://github.com/$GITHUB_REPOSITORY" \
        --created "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)" \
        --author "dropbox-operator maintainers" --no-history
    # Files owned by root, world-readable (the binary runs as 65532), but the
    # nonroot home, which is 65532's.
    chown -R 0:0 "$rootfs"
    chown 65532:65532 "$rootfs/home/nonroot"
    tar --sort=name --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
        -C "$rootfs" -cf "$WORK/layer-$arch.tar" .
    umoci raw add-layer --image "$layout:$tag" "$WORK/layer-$arch.tar" \
        --history.created "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)" \
        --history.created_by "hack/release.sh: the binary, its shared libraries, the CA bundle and the base files"
    platforms+=("$arch")
done
# One tag, $VERSION, for every platform: an OCI image index over the
# per-platform manifests (umoci builds single images only, skopeo copies but
# does not assemble indexes; the index is a small JSON document, checked below
# by skopeo reading and copying it whole).
python3 - "$layout" "$VERSION" <<'PY'
import hashlib, json, os, sys

layout, version = sys.argv[1:3]
index_path = os.path.join(layout, "index.json")
index = json.load(open(index_path))
manifests = []
for m in index["manifests"]:
    ref = m.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
    if ref.startswith(version + "-"):
        arch = ref[len(version) + 1:]
        manifests.append({"mediaType": m["mediaType"], "digest": m["digest"], "size": m["size"],
                          "platform": {"architecture": arch, "os": "linux"}})
image_index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": manifests}
blob = json.dumps(image_index, separators=(",", ":")).encode()
digest = hashlib.sha256(blob).hexdigest()
with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
    f.write(blob)
index["manifests"].append({"mediaType": image_index["mediaType"], "digest": "sha256:" + digest,
                           "size": len(blob), "annotations": {"org.opencontainers.image.ref.name": version}})
with open(index_path, "w") as f:
    json.dump(index, f)
PY
archive=dropbox-operator-$VERSION-image.oci.tar
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
    -C "$layout" -cf "$OUT/$archive" .
echo "$archive: $(stat -c %s "$OUT/$archive") bytes; tags: $VERSION (index), ${platforms[*]/#/$VERSION-}"

step "image check (skopeo inspect and copy, umoci unpack, run as uid 65532)"
check=$WORK/image-check
mkdir -p "$check/layout"
tar -C "$check/layout" -xf "$OUT/$archive"
# The archive as the workflow publishes it: every platform of tag $VERSION,
# each blob's digest verified on the way.
skopeo copy --quiet --all "oci-archive:$OUT/$archive:$VERSION" "oci:$check/copy:$VERSION"
skopeo inspect --raw "oci:$check/copy:$VERSION" | python3 -c '
import json, sys
arches = sorted(m["platform"]["architecture"] for m in json.load(sys.stdin)["manifests"])
wanted = sorted(sys.argv[1].split())
assert arches == wanted, (arches, wanted)
print("index:", ", ".join("linux/" + a for a in arches))
' "${platforms[*]}"
for arch in "${platforms[@]}"; do
    ref="oci:$check/layout:$VERSION-$arch"
    skopeo inspect --config "$ref" >"$check/config-$arch.json"
    skopeo inspect "$ref" >"$check/inspect-$arch.json"
    python3 - "$arch" "$VERSION" "$check/config-$arch.json" "$check/inspect-$arch.json" target/runtime-image/config.json <<'PY' || fail "image $VERSION-$arch: config"
import json, sys
arch, version, config_file, inspect_file, expected_file = sys.argv[1:6]
config = json.load(open(config_file))
inspect = json.load(open(inspect_file))
expected = json.load(open(expected_file))
c = config["config"]
assert config["architecture"] == arch and config["os"] == "linux", config
# Every platform carries the Dockerfile's configuration (as tests/e2e.rs
# checks it for the e2e image): user, entrypoint, cmd, env, working directory,
# ports and labels.
for key in ("User", "Entrypoint", "Cmd", "Env", "WorkingDir"):
    assert c.get(key) == expected[key], (key, c.get(key), expected[key])
assert sorted(c["ExposedPorts"]) == sorted(expected["ExposedPorts"]), c
for key, value in expected["Labels"].items():
    assert c["Labels"].get(key) == value, (key, c["Labels"])
assert c["Labels"]["org.opencontainers.image.version"] == version, c
assert len(inspect["Layers"]) == 1, inspect
print(f"{arch}: user {c['User']}, entrypoint {c['Entrypoint']}, ports {sorted(c['ExposedPorts'])}, "
      f"workdir {c['WorkingDir']}, {len(inspect['Layers'])} layer")
PY
    # Every platform's files: the base image's users, /tmp and the nonroot home.
    umoci unpack --image "$check/layout:$VERSION-$arch" "$check/bundle-$arch" >/dev/null
    rootfs=$check/bundle-$arch/rootfs
    grep -qx 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' "$rootfs/etc/passwd" ||
        fail "image $VERSION-$arch: no nonroot user in /etc/passwd"
    [[ -f $rootfs/etc/group && $(stat -c %a "$rootfs/tmp") == 1777 && $(stat -c %u:%g "$rootfs/home/nonroot") == 65532:65532 ]] ||
        fail "image $VERSION-$arch: /etc/group, /tmp (1777) or /home/nonroot (65532) missing"
    echo "$arch: /etc/passwd and /etc/group, /tmp 1777, /home/nonroot owned by 65532"
    if [[ $arch == amd64 ]]; then
        # The unpacked image runs: as the image's user, from its own files only.
        chroot --userspec=65532:65532 --groups=65532 "$rootfs" /dropbox-operator --version
        chroot --userspec=65532:65532 --groups=65532 "$rootfs" /dropbox-operator crd |
            diff - crds/dropboxelementinstances.elements.dropbox-operator.dev.yaml >/dev/null ||
            fail "the image's crd differs from crds/"
        echo "amd64: the unpacked image runs as 65532 and prints the checked-in CRD"
    fi
done

# ---------------------------------------------------------------------------
step "SBOM (CycloneDX, cargo-cyclonedx)"
# The binary's dependency graph (Cargo.lock, normal dependencies of the release
# build for the host target: no dev-dependencies), as CycloneDX 1.5 JSON.
"$TOOLS/cargo-cyclonedx" cyclonedx --format json --spec-version 1.5 \
    --override-filename "dropbox-operator-$VERSION.cdx" >/dev/null
mv "dropbox-operator-$VERSION.cdx.json" "$OUT/"
"$REPO/target/tools/venv/bin/python" hack/validate-sbom.py "$OUT/dropbox-operator-$VERSION.cdx.json" Cargo.lock

# ---------------------------------------------------------------------------
step "SHA256SUMS"
(cd "$OUT" && sha256sum -- * | grep -v ' SHA256SUMS$' >SHA256SUMS && sha256sum -c --quiet SHA256SUMS && cat SHA256SUMS)
rm -rf "$WORK"
echo "($((SECONDS - last_step))s)"
echo
echo "OK: release $VERSION in $OUT ($SECONDS s)"
