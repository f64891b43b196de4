#!/usr/bin/env bash
# What the distroless base image (gcr.io/distroless/cc-debian12:nonroot) adds
# that a process may notice, written into the root filesystem $1: its users and
# groups (the runtime looks up HOME for uid 65532), /tmp and the nonroot home.
# Used for every image built from a root filesystem: hack/verify-runtime-image.sh
# (the e2e image) and hack/release.sh (each platform of the release image).
set -euo pipefail
rootfs=${1:?usage: hack/image-base-files.sh ROOTFS}
install -d -m 0755 "$rootfs/etc"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$rootfs/etc/passwd"
printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$rootfs/etc/group"
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
install -d -m 1777 "$rootfs/tmp"
install -d -m 0700 "$rootfs/root"
install -d -m 0700 -o 65532 -g 65532 "$rootfs/home/nonroot"
