#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication (only registered nodes join).
# Usage: deploy/superlink.sh <certs folder> <state folder> [port]
#   <certs folder>: from `lepton-flwr certs` (ca.crt, superlink.crt, superlink.key)
#   <state folder>: the SuperLink's database (runs, nodes, registrations survive restarts)
set -euo pipefail
certs=${1:?certs folder}; state=${2:?state folder}; port=${3:-9092}
mkdir -p "$state"
exec flower-superlink \
  --ssl-ca-certfile "$certs/ca.crt" \
  --ssl-certfile "$certs/superlink.crt" \
  --ssl-keyfile "$certs/superlink.key" \
  --enable-supernode-auth \
  --database "$state/superlink.db" \
  --host 0.0.0.0 --port "$port" \
  --disable-runtime-dependency-installation
