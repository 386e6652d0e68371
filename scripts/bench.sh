#!/bin/sh
# berth beside containerd: installs what is missing (the test prerequisites;
# containerd, runc and the CNI plugins from Debian; gcc for the pause image;
# iptables, which the CNI plugins run), then runs the CRI benchmark, which
# builds berthd in release mode and prints one table. Needs root.
#   scripts/bench.sh [--samples N] [--pods N] [--rounds N] [--many N]
#                    [--net-samples N] [--keep-logs DIR] [FILTER]
# FILTER: busybox, big (image pulls), pods, network, exec (the sequential pod
# lives alone); none runs everything.
set -eu
cd "$(dirname "$0")/.."

# registry, skopeo and busybox for the fixture images
scripts/install-deps.sh test

need=""
for p in containerd runc containernetworking-plugins gcc libc6-dev iptables; do
  dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
if [ -n "$need" ]; then
  echo "installing:$need"
  apt-get update -qq
  # On a systemd host the package also starts its own containerd service;
  # the benchmark does not use it: it runs containerd with its own config.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi

exec ${CARGO:-cargo} bench --bench cri -- "$@"
