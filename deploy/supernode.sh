#!/usr/bin/env bash
# Start one SuperNode: TLS to the SuperLink, authenticated with this node's own key.
# The same as `lepton-flwr supernode --superlink ... --root-certificates ... --auth-key ...
# --node-config ... --port ...`, which `pip install lepton-flwr` installs.
# Usage: deploy/supernode.sh <superlink host:port> <ca.crt> <node.key> <node config> [port]
#   <node config>: this node's own settings, for any Flower app, e.g. for ours
#     "partition-id=0 num-partitions=3 he-secret-context='/keys/secret.ctx'
#      data-root='/data/fashion-mnist' dp-max-clip-norm=1.0 dp-min-share-noise-multiplier=0.1
#      dpsgd-max-epsilon=8 device='auto' state-dir='/var/lib/lepton'"
#   [port]: this SuperNode's own port (Flower's default 9094); one per SuperNode on a host
# It refuses to start on a wrong key path, certificate, lepton-flwr setting or a port in
# use, naming it (lepton-flwr check-node); another app's own keys are left to that app.
set -euo pipefail
superlink=${1:?superlink address}; ca=${2:?ca.crt}; key=${3:?node key}; config=${4:?node config}
port=${5:-9094}
exec lepton-flwr supernode --superlink "$superlink" --root-certificates "$ca" \
  --auth-key "$key" --node-config "$config" --port "$port"
