#!/usr/bin/env bash
# Packs a root filesystem into an OCI image archive (an image layout in a tar)
# that `ctr images import` takes, without a container engine or registry:
#
#   hack/image-archive.sh ROOTFS CONFIG_JSON NAME OUT
#
# ROOTFS becomes the image's one layer (an uncompressed tar; owners, modes and
# names as they are in ROOTFS, times set to 0, so the same tree gives the same
# digest). CONFIG_JSON is a file with the image's `config` object (User,
# Entrypoint, Cmd, Env, ExposedPorts, WorkingDir, Labels). NAME is the full
# image reference the runtime lists it under (e.g.
# ghcr.io/dropbox-operator/dropbox-operator:0.1.0, the image the chart's
# default values name). The e2e node (`make e2e`) imports the
# operator's image from target/runtime-image/rootfs this way
# (hack/verify-runtime-image.sh assembles it) and its pause image.
set -euo pipefail
[[ $# -eq 4 ]] || { echo "usage: $0 ROOTFS CONFIG_JSON NAME OUT" >&2; exit 2; }
rootfs=$1 config_json=$2 name=$3 out=$4
[[ -d $rootfs ]] || { echo "no root filesystem at $rootfs" >&2; exit 1; }
case $(uname -m) in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/blobs/sha256"

# blob FILE MEDIATYPE: moves FILE into blobs/ and prints its descriptor.
blob() {
  local digest size
  digest=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  mv "$1" "$work/blobs/sha256/$digest"
  printf '{"mediaType":"%s","digest":"sha256:%s","size":%s}' "$2" "$digest" "$size"
}

(cd "$rootfs" && tar --sort=name --mtime=@0 --numeric-owner --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -cf "$work/layer" .)
diff_id=sha256:$(sha256sum "$work/layer" | cut -d' ' -f1)
layer=$(blob "$work/layer" application/vnd.oci.image.layer.v1.tar)

printf '{"architecture":"%s","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["%s"]},"history":[{"created_by":"hack/image-archive.sh"}]}' \
  "$arch" "$(tr -d '\n' < "$config_json")" "$diff_id" > "$work/config"
config=$(blob "$work/config" application/vnd.oci.image.config.v1+json)

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":%s,"layers":[%s]}' \
  "$config" "$layer" > "$work/manifest"
manifest=$(blob "$work/manifest" application/vnd.oci.image.manifest.v1+json)

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[%s]}' \
  "${manifest%\}},\"annotations\":{\"io.containerd.image.name\":\"$name\",\"org.opencontainers.image.ref.name\":\"${name##*:}\"}}" > "$work/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$work/oci-layout"

mkdir -p "$(dirname "$out")"
(cd "$work" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$out.tmp" oci-layout index.json blobs)
mv "$out.tmp" "$out"
echo "$out: $name ($(stat -c %s "$out") bytes)"
