#!/bin/sh
# Installs what building, running and testing berth needs on Debian, when missing.
# Idempotent; needs root. Prints nothing when everything is already there.
#   scripts/install-deps.sh build   what `make run` needs
#   scripts/install-deps.sh test    that, plus what the tests need
set -eu
what=${1:-test}

packages="protobuf-compiler gcc libc6-dev pkg-config libseccomp-dev"
if [ "$what" = test ]; then
  # registry and image tools for fixtures, kernel tools the tests inspect with
  packages="$packages docker-registry skopeo umoci busybox-static nftables iproute2 curl apache2-utils openssl attr containernetworking-plugins iptables"
fi

need=""
for p in $packages; do
  dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
if [ -n "$need" ]; then
  echo "installing:$need"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi

if [ "$what" = test ]; then
  # Debian's dynamic busybox, unpacked and not installed (it conflicts with
  # busybox-static): its shell execs applets as real programs, as the images
  # of critest do, so fixture images built from it exercise exec and masking.
  dir=/var/cache/berth/busybox-deb
  if [ ! -x "$dir/root/bin/busybox" ]; then
    mkdir -p "$dir" && cd "$dir"
    apt-get download busybox >/dev/null 2>&1 || { apt-get update -qq && apt-get download busybox >/dev/null; }
    dpkg -x busybox_*.deb root
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
