#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication (only registered nodes join).
# Usage: deploy/superlink.sh <certs folder> <state folder> [port]
#   <certs folder>: the --out folder of `lepton-flwr certs` (ca.crt, superlink.crt,
#                   superlink.key); the CA's key stays in the CA folder (--ca-dir), offline
#   <state folder>: the SuperLink's database (runs, nodes, registrations survive restarts)
set -euo pipefail
certs=${1:?certs folder}; state=${2:?state folder}; port=${3:-9092}
# Whoever holds the CA key can issue certificates that SuperNodes trust: not on this machine.
if [[ -e "$certs/ca.key" || -L "$certs/ca.key" ]]; then
  echo "superlink.sh: $certs/ca.key is the CA's private key; it must not be on the SuperLink:" \
    "move it to the CA folder (lepton-flwr certs --ca-dir), kept offline" >&2
  exit 1
fi
mkdir -p "$state"
exec flower-superlink \
  --ssl-ca-certfile "$certs/ca.crt" \
  --ssl-certfile "$certs/superlink.crt" \
  --ssl-keyfile "$certs/superlink.key" \
  --enable-supernode-auth \
  --database "$state/superlink.db" \
  --host 0.0.0.0 --port "$port" \
  --disable-runtime-dependency-installation
