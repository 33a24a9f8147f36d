#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication (only registered nodes join).
# The same as `lepton-flwr superlink <certs folder> <state folder> --port <port>`, which
# `pip install lepton-flwr` installs; this script is kept for existing setups.
# Usage: deploy/superlink.sh <certs folder> <state folder> [port]
#   <certs folder>: the --out folder of `lepton-flwr certs` (ca.crt, superlink.crt,
#                   superlink.key); the CA's key stays in the CA folder (--ca-dir), offline
#   <state folder>: the SuperLink's database (runs, nodes, registrations survive restarts)
# ServerApps run in this process's working folder: relative output paths land there.
set -euo pipefail
certs=${1:?certs folder}; state=${2:?state folder}; port=${3:-9092}
exec lepton-flwr superlink "$certs" "$state" --port "$port"
