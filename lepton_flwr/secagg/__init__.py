"""Secure aggregation's protocol core (issue 20): masks no single key holder can remove.

SecAgg (Bonawitz et al., CCS 2017) on the complete graph of a round's participants, its
masks uniform in the CKKS plaintext ring. Plain classes with dict and bytes messages;
the Flower wiring lives elsewhere.

- :mod:`~lepton_flwr.secagg.params`: the threshold t, the colluders and dropouts it
  tolerates, and the adversary it holds against;
- :mod:`~lepton_flwr.secagg.keys`: per-round X25519 keys from a node's master secret,
  the check that a public key is one, share-token keys, pairwise seeds, commitments,
  the digest of a node's view of a round;
- :mod:`~lepton_flwr.secagg.shamir`: Shamir sharing of 32-byte secrets over
  GF(2^521 − 1), each holder at one x-coordinate for the whole round;
- :mod:`~lepton_flwr.secagg.state`: what a node keeps between messages, as bytes;
- :mod:`~lepton_flwr.secagg.client`: a node's answers to the stages;
- :mod:`~lepton_flwr.secagg.server`: the server's round, from key sharing to the
  correction it subtracts from the sum;
- :mod:`~lepton_flwr.secagg.masks`: the ring element a set of seeds adds up to.
"""

from lepton_flwr.secagg.client import SecAggClient, SecAggRefusal
from lepton_flwr.secagg.masks import MaskSum
from lepton_flwr.secagg.params import (
    SecAggParams,
    SecAggParamsError,
    colluders,
    max_dropouts,
    smallest_exposed_sum,
    threshold,
    tolerated_dropouts,
)
from lepton_flwr.secagg.server import (
    PublicKeyBook,
    RoundNotUnmaskedError,
    SecAggReplyError,
    SecAggServerRound,
)
from lepton_flwr.secagg.state import ClientState, SecAggStateError

ADVERTISE = "advertise"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
UNMASK = "unmask"

__all__ = [
    "ADVERTISE",
    "MASKED_INPUT",
    "SHARE_KEYS",
    "UNMASK",
    "ClientState",
    "MaskSum",
    "PublicKeyBook",
    "RoundNotUnmaskedError",
    "SecAggClient",
    "SecAggParams",
    "SecAggParamsError",
    "SecAggRefusal",
    "SecAggReplyError",
    "SecAggServerRound",
    "SecAggStateError",
    "colluders",
    "max_dropouts",
    "smallest_exposed_sum",
    "threshold",
    "tolerated_dropouts",
]
