#!/usr/bin/env bash
# Make sure Fashion-MNIST (Debian package dataset-fashion-mnist) is installed.
# As root it installs the package; otherwise it prints the one command that does.
# Usage: ensure-fashion-mnist.sh [--required]   (--required: exit 1 when missing)
set -euo pipefail
ROOT=/usr/share/datasets/fashion-mnist
PKG=dataset-fashion-mnist
if [ -f "$ROOT/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing Fashion-MNIST (Debian package $PKG)..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PKG" >/dev/null
  exit 0
fi
echo "Fashion-MNIST is missing. Install it with:  sudo apt-get update && sudo apt-get install -y $PKG" >&2
if [ "${1:-}" = "--required" ]; then
  exit 1
fi
echo "(Tests that need it will be skipped.)" >&2
