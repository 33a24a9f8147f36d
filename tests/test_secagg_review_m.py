"""Attack review M (issue 20): what the M1 blocklist and the M3 share correction let through.

Each test states a property the review expects; both were marked ``xfail(strict=True)``
while the attack worked and pass with the fixes (two strikes, keys forgotten at the
first; each secret corrected on its own shares). The attacks:

- an honest node that restarts without ``state-dir`` answers share-keys with keys of a
  new master while the server still holds its old ones: every peer refuses its token and
  it is left out for the rest of the run (fix: forget the accused node's keys, so that it
  advertises again, and leave it out only if its fresh keys' tokens are refused too);
- a colluding owner deals one honest holder a share off its polynomial and lies in its
  own share of another owner's seed: the correction names the honest holder, leaves its
  shares out of the later secrets, and the round is void (fix: correct each secret on
  its own, from its own shares, without carrying "liars" over to the round's other
  secrets).
"""

import pytest
from test_secagg_protocol import DEGREE, PRIMES, Round, assert_exact
from test_secure_aggregation import NODES, _app, _he_fedavg, _start

import lepton_flwr.secagg.client as client_module
from lepton_flwr import protocol
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.he import CKKSParams, write_keys
from lepton_flwr.mods import make_he_mod
from lepton_flwr.secagg.shamir import PRIME, decode_share, encode_share, holder_indices


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def test_an_honest_node_restarting_without_state_dir_is_not_left_out(keys):
    restarted, done = 102, []

    def restart(msg, context, call_next):
        config = next(iter(msg.content.config_records.values()), {})
        stages = str(config.get(protocol.SECAGG_STAGE, ""))
        if context.node_id == restarted and "unmask" in stages and not done:
            done.append(1)
            context.state.config_records.pop(protocol.SECAGG_STATE, None)
        return call_next(msg, context)

    grid = InProcessGrid(_app([restart, make_he_mod(keys[0], workers=1)]), NODES)
    strategy = _he_fedavg(keys, min_available_nodes=5)
    strategy.start(grid, _start(), num_rounds=3)
    assert done
    assert restarted not in strategy.secure_aggregation.blocked


def _framing_round():
    """n = 6, all survive: the colluder (lowest id) frames the highest id, lies on one seed."""
    round_ = Round(6)
    colluder, framed, victim = round_.ids[0], round_.ids[-1], round_.ids[1]
    x_framed = holder_indices(round_.ids)[framed]
    real_split, calls = client_module.split, []

    def split(secret, t, xs):
        shares = real_split(secret, t, xs)
        calls.append(1)
        if len(calls) == 1:  # the self-mask seed: one share off the polynomial
            i = xs.index(x_framed)
            x, value = decode_share(shares[i])
            shares[i] = encode_share(x, (value + 12345) % PRIME)
        return shares

    replies = {}
    for u, request in round_.server.share_keys_requests().items():
        if u == colluder:
            client_module.split = split
            try:
                replies[u] = round_.clients[u].share_keys(request)
            finally:
                client_module.split = real_split
        else:
            replies[u] = round_.clients[u].share_keys(request)
    round_.server.receive_share_keys(replies)
    round_.masked_input()
    unmask = {u: round_.clients[u].unmask(r) for u, r in round_.server.unmask_requests().items()}
    reply = unmask[colluder]
    i = reply["self_mask_owners"].index(victim)
    x, value = decode_share(reply["self_mask_shares"][i])
    reply["self_mask_shares"][i] = encode_share(x, (value + 1) % PRIME)
    round_.server.receive_unmask(unmask)
    return round_


def test_an_owner_framing_an_honest_holder_cannot_void_the_round():
    round_ = _framing_round()
    correction = round_.server.correction(PRIMES, DEGREE)  # RoundNotUnmaskedError today
    assert_exact(round_, correction)
