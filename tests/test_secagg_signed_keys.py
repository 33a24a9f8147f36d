"""Signed round keys: a malicious server that shows a node keys of its own making.

The attack (key substitution): the server answers a victim's round with peers it
controls under genuine peers' ids; their keys are the server's, so the victim's shares
and pairwise masks all go to the server, which unmasks the victim's upload. Without a
trusted list the attack works (the control below reads the victim's update exactly);
with one the victim refuses the round at share-keys, naming the peer. Each way a server
could reuse a genuine signature (another round, another run, another node's id, one key
for two nodes) is refused on its own.
"""

import base64
import hashlib
import logging
import subprocess

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lepton_flwr.strategies import HEFedAvg

from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.apps.recording import message_bytes
from lepton_flwr.deploy import make_node_key
from lepton_flwr.he import CKKSParams, decrypt_arrays, write_keys
from lepton_flwr.he.ring_masks import add_mod, sub_mod
from lepton_flwr.mods import make_he_mod
from lepton_flwr.mods.common import ModError
from lepton_flwr.mods.secagg_stages import SIGNING_KEY, TRUSTED_KEYS, node_client
from lepton_flwr.node_check import check_node
from lepton_flwr.secagg import ClientState, SecAggClient, SecAggParams, SecAggRefusal
from lepton_flwr.secagg.server import PublicKeyBook, SecAggServerRound
from lepton_flwr.secagg.signatures import RoundKeySigner, SignatureError, TrustedKeys, key_id

PRIMES = [1099511390209, 1099511480321]
DEGREE = 64
RUN = 7
ROUND = 3
VICTIM, PEERS = 10, [11, 12, 13, 14, 15]


@pytest.fixture(scope="module")
def node_keys(tmp_path_factory):
    """Signing keys for nodes 10-15 and an outsider 99, and the trusted file of 10-15."""
    folder = tmp_path_factory.mktemp("node-keys")
    for node in [VICTIM, *PEERS, 99]:
        make_node_key(folder, f"node-{node}")
    trusted = folder / "trusted.pub"
    trusted.write_bytes(
        b"# the federation's nodes\n"
        + b"".join((folder / f"node-{n}.pub").read_bytes() for n in [VICTIM, *PEERS])
    )
    return folder, trusted


def _signer(node_keys, node):
    return RoundKeySigner.from_file(node_keys[0] / f"node-{node}.key")


def _client(node, node_keys=None, trusted=True, run=RUN, signer_node=None):
    """A node; with ``node_keys`` it signs (as ``signer_node``) and trusts the list."""
    if node_keys is None:
        return SecAggClient(node, ClientState.new(), run_id=run)
    return SecAggClient(
        node,
        ClientState.new(),
        run_id=run,
        signer=_signer(node_keys, node if signer_node is None else signer_node),
        trusted=TrustedKeys.from_file(node_keys[1]) if trusted else None,
    )


def _round(clients, server_round=ROUND):
    book = PublicKeyBook()
    request = book.advertise_request(server_round, 1)
    for node, client in clients.items():
        book.record_advertised(node, request, client.advertise(request))
    ids = sorted(clients)
    return SecAggServerRound(
        server_round,
        book.round_keys(ids, server_round),
        signatures=book.signatures(ids, server_round),
    )


def _run_round(clients, inputs, server_round=ROUND):
    """One honest round of ``clients`` on chunk 0; the unmasked sum of ``inputs``."""
    server = _round(clients, server_round)
    requests = server.share_keys_requests()
    server.receive_share_keys({u: clients[u].share_keys(requests[u]) for u in clients})
    total = np.zeros((len(PRIMES), DEGREE), np.uint64)
    for u, request in server.masked_input_requests().items():
        mask = clients[u].masked_input(request, PRIMES, DEGREE)
        total = add_mod(total, add_mod(inputs[u], mask(0), PRIMES), PRIMES)
    server.set_survivors(sorted(clients))
    requests = server.unmask_requests()
    server.receive_unmask({u: clients[u].unmask(requests[u]) for u in requests})
    return sub_mod(total, server.correction(PRIMES, DEGREE)(0), PRIMES)


def _inputs(nodes, rng):
    """A ring element (reduced mod each prime) per node."""
    return {
        u: np.stack([rng.integers(0, q, size=DEGREE, dtype=np.uint64) for q in PRIMES])
        for u in nodes
    }


def _sum(elements):
    total = np.zeros((len(PRIMES), DEGREE), np.uint64)
    for element in elements:
        total = add_mod(total, element, PRIMES)
    return total


def test_without_trusted_keys_a_server_with_its_own_peers_reads_the_victims_upload():
    """The control: the server plays every peer itself, with keys it made."""
    rng = np.random.default_rng(0)
    clients = {VICTIM: _client(VICTIM), **{p: _client(p) for p in PEERS}}  # PEERS: the server's
    inputs = _inputs(clients, rng)
    total = _run_round(clients, inputs)
    read = sub_mod(total, _sum(inputs[p] for p in PEERS), PRIMES)
    assert np.array_equal(read, inputs[VICTIM])


def test_signed_keys_run_the_round_and_the_sum_is_exact(node_keys):
    rng = np.random.default_rng(1)
    clients = {u: _client(u, node_keys) for u in [VICTIM, *PEERS]}
    inputs = _inputs(clients, rng)
    assert np.array_equal(_run_round(clients, inputs), _sum(inputs.values()))


def test_with_trusted_keys_the_victim_refuses_peers_the_server_made(node_keys):
    victim = _client(VICTIM, node_keys)
    for fakes in (
        {p: _client(p) for p in PEERS},  # unsigned
        {p: _client(p, node_keys, signer_node=99) for p in PEERS},  # signed, not trusted
    ):
        server = _round({VICTIM: victim, **fakes})
        with pytest.raises(SecAggRefusal, match="signatures: node 11"):
            victim.share_keys(server.share_keys_requests()[VICTIM])
    assert ROUND not in victim.state.rounds  # refused before anything was shared


def _genuine_request(node_keys, server_round=ROUND, run=RUN):
    clients = {u: _client(u, node_keys, run=run) for u in [VICTIM, *PEERS]}
    return _round(clients, server_round).share_keys_requests()[VICTIM]


@pytest.mark.parametrize(
    "replay",
    [
        "another round",
        "another run",
        "another node's id",
        "one key for two nodes",
        "the victim's own key",
        "a cut signature",
        "a long signer",
    ],
)
def test_no_genuine_signature_can_be_reused(node_keys, replay):
    """Each reuse of a genuine signature a server holds is refused at share-keys."""
    victim = _client(VICTIM, node_keys)
    request = _genuine_request(node_keys)
    if replay == "another round":  # a key the server learnt in round 4 shown in round 3
        later = _genuine_request(node_keys, server_round=ROUND + 1)
        for field in ("encryption_keys", "mask_keys", "signers", "signatures"):
            request[field][0] = later[field][0]
    elif replay == "another run":
        other = _genuine_request(node_keys, run=RUN + 1)
        for field in ("encryption_keys", "mask_keys", "signers", "signatures"):
            request[field][0] = other[field][0]
    elif replay == "another node's id":  # peers 11 and 12 swapped: each id gets the other's
        for field in ("encryption_keys", "mask_keys", "signers", "signatures"):
            request[field][0], request[field][1] = request[field][1], request[field][0]
    elif replay == "one key for two nodes":  # node 11 signs for node 12's (real) id too
        signer = _signer(node_keys, 11)
        enc, mask = request["encryption_keys"][1], request["mask_keys"][1]
        request["signers"][1] = signer.key_id
        request["signatures"][1] = signer.sign(RUN, 12, ROUND, enc, mask)
    elif replay == "the victim's own key":
        signer = _signer(node_keys, VICTIM)
        enc, mask = request["encryption_keys"][0], request["mask_keys"][0]
        request["signers"][0] = signer.key_id
        request["signatures"][0] = signer.sign(RUN, 11, ROUND, enc, mask)
    elif replay == "a cut signature":
        request["signatures"][0] = request["signatures"][0][:-1]
    else:
        request["signers"][0] = request["signers"][0] + b"x"
    with pytest.raises(SecAggRefusal, match="signatures|signers"):
        victim.share_keys(request)
    assert ROUND not in victim.state.rounds


def test_the_unchanged_request_passes(node_keys):
    """The control of the reuse test: the genuine request, untouched, is answered."""
    reply = _client(VICTIM, node_keys).share_keys(_genuine_request(node_keys))
    assert reply["recipients"] == PEERS


def test_advertised_signatures_verify_and_name_the_key(node_keys):
    client = _client(VICTIM, node_keys)
    reply = client.advertise({"first_round": 5, "rounds": 3})
    pub = (node_keys[0] / f"node-{VICTIM}.pub").read_bytes()
    # The fingerprint is OpenSSH's: ssh-keygen -l prints it in unpadded base64.
    assert reply["signer"] == hashlib.sha256(base64.b64decode(pub.split()[1])).digest()
    trusted = TrustedKeys.from_file(node_keys[1])
    for offset, (enc, mask, signature) in enumerate(
        zip(reply["encryption_keys"], reply["mask_keys"], reply["signatures"], strict=True)
    ):
        trusted.verify(reply["signer"], signature, RUN, VICTIM, 5 + offset, enc, mask)
        with pytest.raises(SignatureError, match="does not verify"):
            trusted.verify(reply["signer"], signature, RUN, VICTIM, 6 + offset, enc, mask)


def test_the_fingerprint_is_what_ssh_keygen_prints(node_keys):
    """If ssh-keygen is on the machine, the key id is its SHA256 fingerprint."""
    path = node_keys[0] / f"node-{VICTIM}.pub"
    try:
        out = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("ssh-keygen is not installed")
    printed = out.split()[1].removeprefix("SHA256:")
    signer = _signer(node_keys, VICTIM)
    assert base64.b64encode(signer.key_id).decode().rstrip("=") == printed
    assert key_id(signer._private_key.public_key()) == signer.key_id


def test_the_server_refuses_a_malformed_signed_advertisement(node_keys):
    book = PublicKeyBook()
    request = book.advertise_request(1, 2)
    reply = _client(VICTIM, node_keys).advertise(request)
    for bad in (
        {"signer": b"short"},
        {"signatures": reply["signatures"][:1]},
        {"signatures": [b"", b""]},
        {"signatures": [bytes(161), bytes(161)]},
        {"signer": b"", "signatures": reply["signatures"]},
        {"signer": reply["signer"], "signatures": []},
    ):
        with pytest.raises(ValueError, match=f"node {VICTIM}: signer|signatures"):
            book.record_advertised(VICTIM, request, reply | bad)
    assert book.keys(VICTIM, 1) is None
    book.record_advertised(VICTIM, request, reply)
    assert book.signatures([VICTIM], 2)[VICTIM] == (reply["signer"], reply["signatures"][1])


def test_key_files_are_checked(node_keys, tmp_path):
    folder, trusted = node_keys
    with pytest.raises(SignatureError, match="relative path"):
        RoundKeySigner.from_file(f"node-{VICTIM}.key")
    with pytest.raises(SignatureError, match="relative path"):
        TrustedKeys.from_file("trusted.pub")
    loose = tmp_path / "loose.key"
    loose.write_bytes((folder / f"node-{VICTIM}.key").read_bytes())
    loose.chmod(0o644)
    with pytest.raises(SignatureError, match="mode 644"):
        RoundKeySigner.from_file(loose)
    bad = tmp_path / "bad.pub"
    bad.write_bytes(trusted.read_bytes() + b"ssh-ed25519 AAAA not-a-key\n")
    with pytest.raises(SignatureError, match="line 8"):
        TrustedKeys.from_file(bad)
    empty = tmp_path / "empty.pub"
    empty.write_bytes(b"# nobody yet\n\n")
    with pytest.raises(SignatureError, match="no public key"):
        TrustedKeys.from_file(empty)
    assert len(TrustedKeys.from_file(trusted)) == 1 + len(PEERS)


def _context(node_config):
    return Context(
        run_id=RUN, node_id=VICTIM, node_config=node_config, state=RecordDict(), run_config={}
    )


def test_the_mod_reads_the_node_config_and_names_a_bad_path(node_keys, tmp_path):
    folder, trusted = node_keys
    config = {SIGNING_KEY: str(folder / f"node-{VICTIM}.key"), TRUSTED_KEYS: str(trusted)}
    with node_client(_context(config)) as client:
        assert client.signer.key_id == _signer(node_keys, VICTIM).key_id
        assert client.run_id == RUN and len(client.trusted) == 1 + len(PEERS)
    missing = str(tmp_path / "nowhere.pub")
    with pytest.raises(ModError, match=f"node config: trusted keys {missing}"):
        with node_client(_context({TRUSTED_KEYS: missing})):
            pass


# -- end to end: HEFedAvg over Flower messages ----------------------------------------

SIZE = 24


@pytest.fixture(scope="module")
def he_keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("he-keys"))


def _app(mods):
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg, context):
        shift = np.float32((context.node_id - 99) / 100)
        new = {k: Array(v.numpy() + shift) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    return app


def _signed_grid(he_keys, node_keys, nodes=6):
    """Nodes 100.. each signing with its own key and trusting all of them."""
    folder = node_keys[0] / "grid"
    for i in range(nodes):
        if not (folder / f"n{i}.key").exists():
            make_node_key(folder, f"n{i}")
    trusted = folder / "trusted.pub"
    trusted.write_bytes(b"".join((folder / f"n{i}.pub").read_bytes() for i in range(nodes)))
    grid = InProcessGrid(_app([make_he_mod(he_keys[0], workers=1)]), nodes)
    for i, context in enumerate(grid.contexts.values()):
        context.node_config[SIGNING_KEY] = str(folder / f"n{i}.key")
        context.node_config[TRUSTED_KEYS] = str(trusted)
    return grid


def _strategy(he_keys):
    return HEFedAvg(
        he_keys[1], secure_aggregation=True, min_available_nodes=6, workers=1, weight_scale=1.0
    )


def test_signed_rounds_over_flower_messages_release_the_mean(he_keys, node_keys, caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    grid = _signed_grid(he_keys, node_keys)
    start = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
    result = _strategy(he_keys).start(grid, start, num_rounds=1)
    model = decrypt_arrays(result.arrays, he_keys[0])["w"].numpy()
    assert np.allclose(model, np.mean([(n - 99) / 100 for n in range(100, 106)]), atol=1e-3)
    assert "6 nodes advertised keys for 64 rounds, 6 of them signed" in caplog.text


def test_a_server_substituting_one_nodes_keys_trains_nothing(
    he_keys, node_keys, monkeypatch, caplog
):
    """The server shows everyone its own key pair for node 103: every peer refuses."""
    caplog.set_level(logging.WARNING, logger="flwr")
    made = SecAggClient(103, ClientState.new(), run_id=1).advertise({"first_round": 1, "rounds": 1})
    genuine = PublicKeyBook.round_keys

    def substituted(book, nodes, server_round):
        keys = genuine(book, nodes, server_round)
        keys[103] = (made["encryption_keys"][0], made["mask_keys"][0])
        return keys

    monkeypatch.setattr(PublicKeyBook, "round_keys", substituted)
    grid = _signed_grid(he_keys, node_keys)
    start = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
    with pytest.raises(Exception, match="[Nn]o.*(model|round)"):
        _strategy(he_keys).start(grid, start, num_rounds=1)
    refusals = [r.getMessage() for r in caplog.records if "does not verify" in r.getMessage()]
    assert len(refusals) >= 5 and all("node 103" in text for text in refusals)


def test_params_default_is_unchanged():
    """Signing adds no rule to the thresholds (the counting rules of params.py)."""
    assert SecAggParams() == SecAggParams(colluding_fraction=0.05, dropout_fraction=0.1)


def test_check_node_reads_the_signing_and_trusted_keys(node_keys, tmp_path):
    folder, trusted = node_keys
    signing = str(folder / f"node-{VICTIM}.key")
    good = {SIGNING_KEY: signing, TRUSTED_KEYS: str(trusted)}
    assert check_node(good) == []
    outsider = {SIGNING_KEY: str(folder / "node-99.key"), TRUSTED_KEYS: str(trusted)}
    assert check_node(outsider) == [
        f"{SIGNING_KEY}: its public key is not in {TRUSTED_KEYS}; peers holding the same "
        "list would refuse this node"
    ]
    (problem,) = check_node({TRUSTED_KEYS: str(trusted)})
    assert problem.startswith(f"{TRUSTED_KEYS} without {SIGNING_KEY}")
    (problem,) = check_node({SIGNING_KEY: f"node-{VICTIM}.key"})
    assert problem.startswith(f"{SIGNING_KEY}: signing key: 'node-{VICTIM}.key' is a relative")
    public_only = tmp_path / "public.key"
    public_only.write_bytes(trusted.read_bytes())
    public_only.chmod(0o600)
    (problem,) = check_node({SIGNING_KEY: str(public_only)})
    assert "not an unencrypted private key" in problem


@pytest.mark.parametrize("signing_nodes", [0, 3, 6])
def test_every_stage_message_can_be_counted_by_flower(he_keys, node_keys, signing_nodes):
    """Flower's ``count_bytes`` (``message_size_mod``, our byte counts) refuses an empty
    bytes value: no message of the protocol holds one, signed, unsigned or mixed."""
    counted, sent = [], []
    grid = _signed_grid(he_keys, node_keys)
    grid.observe = lambda reply: reply.has_error() or counted.append(message_bytes(reply))
    deliver = grid.send_and_receive

    def send_and_receive(messages, **kwargs):
        messages = list(messages)
        sent.extend(message_bytes(m) for m in messages)
        return deliver(messages, **kwargs)

    grid.send_and_receive = send_and_receive
    for i, context in enumerate(grid.contexts.values()):
        context.node_config.pop(TRUSTED_KEYS)
        if i >= signing_nodes:
            context.node_config.pop(SIGNING_KEY)
    start = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
    _strategy(he_keys).start(grid, start, num_rounds=2)
    replies = [m for m in grid.received if not m.has_error()]
    assert len(counted) == len(replies) >= 6 * 5 and min(counted) > 0
    assert len(sent) >= 6 * 5 and min(sent) > 0


def test_a_node_without_a_trusted_signature_voids_two_rounds_then_is_left_out(
    he_keys, node_keys, caplog
):
    """Review M, F3: node 103 has no signing key, its five peers trust a list: each
    refuses share-keys naming it. Two strikes (its keys forgotten in between, in case it
    restarted): rounds 1 and 2 release nothing, round 3 the other five's mean."""
    caplog.set_level(logging.WARNING, logger="flwr")
    grid = _signed_grid(he_keys, node_keys)
    grid.contexts[103].node_config.pop(SIGNING_KEY)
    strategy = HEFedAvg(
        he_keys[1], secure_aggregation=True, min_available_nodes=5, workers=1, weight_scale=1.0
    )
    start = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
    result = strategy.start(grid, start, num_rounds=3)
    model = decrypt_arrays(result.arrays, he_keys[0])["w"].numpy()
    others = [(n - 99) / 100 for n in range(100, 106) if n != 103]
    assert np.allclose(model, np.mean(others), atol=1e-3)
    assert strategy.secure_aggregation.blocked == {103: 2}
    assert "refused its unsigned keys" in caplog.text
