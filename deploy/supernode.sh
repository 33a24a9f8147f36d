#!/usr/bin/env bash
# Start one SuperNode: TLS to the SuperLink, authenticated with this node's own key.
# Usage: deploy/supernode.sh <superlink host:port> <ca.crt> <node.key> <node config> [port]
#   <node config>: this node's own settings, e.g.
#     "partition-id=0 num-partitions=3 he-secret-context='/keys/secret.ctx'
#      data-root='/data/fashion-mnist' dp-max-clip-norm=1.0 dp-min-share-noise-multiplier=0.1
#      dpsgd-max-epsilon=8 device='auto' state-dir='/var/lib/lepton'"
set -euo pipefail
superlink=${1:?superlink address}; ca=${2:?ca.crt}; key=${3:?node key}; config=${4:?node config}
port=${5:-9094}
# Refuse to start on a wrong key path, certificate or setting, naming it.
lepton-flwr check-node --node-config "$config" --root-certificates "$ca" --auth-key "$key"
exec flower-supernode \
  --superlink "$superlink" \
  --root-certificates "$ca" \
  --auth-supernode-private-key "$key" \
  --node-config "$config" \
  --port "$port"
