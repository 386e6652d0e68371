#!/bin/sh
# berth beside containerd: installs what is missing (the test prerequisites,
# and containerd and runc from Debian), then runs the CRI benchmark, which
# builds berthd in release mode and prints one table. Needs root.
#   scripts/bench.sh [--samples N] [--keep-logs DIR] [FILTER]
set -eu
cd "$(dirname "$0")/.."

# registry, skopeo and busybox for the fixture images
scripts/install-deps.sh test

need=""
for p in containerd runc; do
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
