#!/usr/bin/env bash
# Installs the Debian packages the e2e node needs, only those missing (a warm
# run asks apt nothing):
#   containernetworking-plugins  CNI bridge, host-local and loopback (/usr/lib/cni)
#   iptables                     kube-proxy's Service rules (iptables mode)
#   libseccomp-dev, gcc, libc6-dev  runc's seccomp support (cgo) and the static pause binary
#   util-linux, iproute2         unshare/nsenter and ip (the run's network namespace)
# Needs root (apt-get). Usage: tests/controlplane/node-packages.sh
set -euo pipefail
packages=(containernetworking-plugins iptables libseccomp-dev gcc libc6-dev util-linux iproute2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
[ "$(id -u)" -eq 0 ] || { echo "missing Debian packages ${missing[*]}: run as root to install them" >&2; exit 1; }
echo "installing ${missing[*]} ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
