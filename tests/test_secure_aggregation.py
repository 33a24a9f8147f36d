"""Secure aggregation in Flower's round loop: HEFedAvg and HEDPFedAvg with masked uploads.

The protocol's own rules (stages once per round, one kind of secret per peer, the
thresholds) are tested in ``tests/test_secagg_protocol.py``, the ring masks in
``tests/test_masked_uploads.py``; here the strategies and ``he_mod`` run it end to end.
"""

import logging

import numpy as np
import pytest
from conftest import flooding_atol
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from lepton_flwr.strategies import HEDPFedAvg, HEFedAvg
from lepton_flwr.strategies.secure_aggregation import SecureAggregation

from lepton_flwr import protocol
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.he import CKKSParams, EncryptedModel, decrypt_arrays, write_keys
from lepton_flwr.he.keyholder import encoder_for
from lepton_flwr.mods import make_he_dp_mod, make_he_mod
from lepton_flwr.secagg.shamir import PRIME, decode_share, encode_share
from lepton_flwr.secagg.wire import FIELD_PREFIX, REPLY_KEY

NODES, SIZE = 6, 40


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def _start():
    return ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})


def _shift(node_id):
    """Node 100 + i moves every weight by (i + 1) / 100."""
    return (node_id - 99) / 100


def _app(mods):
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg, context):
        new = {
            k: Array(v.numpy() + np.float32(_shift(context.node_id)))
            for k, v in msg.content["arrays"].items()
        }
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    return app


def _he_fedavg(keys, secure=True, **kwargs):
    settings = dict(min_available_nodes=NODES, workers=1, weight_scale=1.0)
    return HEFedAvg(keys[1], secure_aggregation=secure, **(settings | kwargs))


def _failing(node, stage):
    """A mod outside he_mod: ``node`` fails the given stage (or training: "train")."""

    def mod(msg, context, call_next):
        config = next(iter(msg.content.config_records.values()), {})
        asked = config.get(protocol.SECAGG_STAGE, "train").split(",")
        if context.node_id == node and stage in asked:
            raise RuntimeError(f"node {node} is gone ({stage})")
        return call_next(msg, context)

    return mod


def _mean_shift(nodes):
    return float(np.mean([_shift(n) for n in nodes]))


def test_masked_rounds_release_the_unmasked_mean(keys, caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1)]), NODES)
    result = _he_fedavg(keys).start(grid, _start(), num_rounds=2)
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    every = range(100, 100 + NODES)
    assert np.allclose(model, 2 * _mean_shift(every), atol=flooding_atol(result.arrays, 2))
    exchanges = [
        next(iter(m.content.config_records.values())).get(protocol.SECAGG_STAGE)
        for m in grid.received
        if not m.has_error() and m.content.config_records
    ]
    # Keys advertised once for many rounds; round 1's keys shared alone, round 2's in
    # round 1's unmask exchange: one extra exchange a round after the first.
    assert exchanges.count("advertise") == exchanges.count("share-keys") == NODES
    assert exchanges.count("unmask,share-keys") == NODES
    assert exchanges.count("unmask") == NODES  # the last round's


def test_one_upload_decrypts_to_noise_without_the_others(keys):
    """The shared key opens no single upload: its exact decryption is uniform garbage."""
    for secure in (False, True):
        grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1)]), NODES)
        _he_fedavg(keys, secure=secure).start(grid, _start(), num_rounds=1)
        uploads = [
            m
            for m in grid.received
            if not m.has_error() and m.content.array_records and m.metadata.src_node_id == 103
        ]
        encoder, _ = encoder_for(keys[0], workers=1, seeded=True)
        upload = EncryptedModel.from_record(uploads[0].content["arrays"])
        values = encoder._decrypt_exact(upload.chunks, upload.num_values) / upload.weight
        if secure:  # about Q / Δ · sqrt(N): nothing of the update (0.04) is left
            assert np.median(np.abs(values)) > 1e6
        else:  # the control: without masks the key reads the update
            assert np.allclose(values, _shift(103), atol=1e-6)


@pytest.mark.parametrize("stage", ["share-keys", "train", "unmask"])
def test_a_node_that_drops_after_sharing_keys_leaves_the_others_sum(keys, caplog, stage):
    caplog.set_level(logging.WARNING, logger="flwr")
    gone = 102
    mods = [_failing(gone, stage), make_he_mod(keys[0], workers=1)]
    grid = InProcessGrid(_app(mods), NODES)
    result = _he_fedavg(keys).start(grid, _start(), num_rounds=1)
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    counted = [n for n in range(100, 100 + NODES) if stage == "unmask" or n != gone]
    assert np.allclose(model, _mean_shift(counted), atol=flooding_atol(result.arrays))
    assert f"node {gone}" in caplog.text


def _tampering(node, fields, change):
    """A mod outside he_mod: ``node`` rewrites each item of these stage reply fields."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id != node or reply.has_error() or REPLY_KEY not in reply.content:
            return reply
        answers = reply.content.config_records[REPLY_KEY]
        for field in fields:
            key = f"{FIELD_PREFIX}{field}"
            if key in answers:
                answers[key] = [change(item) for item in answers[key]]
        return reply

    return mod


def _lying_shares(node):
    """``node`` changes every share of its unmask replies (still field elements at its x)."""

    def lie(share):
        x, value = decode_share(share)
        return encode_share(x, (value + 1) % PRIME)

    return _tampering(node, ["unmask.self_mask_shares", "unmask.mask_key_shares"], lie)


def test_a_node_lying_in_its_unmask_shares_is_outvoted_and_named(keys, caplog):
    """Before, one holder's wrong shares voided the round; now its shares are corrected
    by the spare ones (6 nodes, t = 4: each secret has 5 holders) and it is named."""
    caplog.set_level(logging.WARNING, logger="flwr")
    mods = [_lying_shares(101), make_he_mod(keys[0], workers=1)]
    grid = InProcessGrid(_app(mods), NODES)
    result = _he_fedavg(keys).start(grid, _start(), num_rounds=2)
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    every = range(100, 100 + NODES)
    assert np.allclose(model, 2 * _mean_shift(every), atol=flooding_atol(result.arrays, 2))
    named = [r for r in caplog.records if "node 101 sent unmask shares that disagree" in r.message]
    assert len(named) == 2  # once a round
    assert "cannot be unmasked" not in caplog.text


def _bad_tokens(node):
    """``node`` sends share tokens that do not open (M1)."""
    return _tampering(node, ["share-keys.tokens"], lambda token: token[:-4] + b"AAAA")


@pytest.mark.parametrize("block", [True, False])
def test_a_node_sending_bad_tokens_voids_one_round_then_is_left_out(
    keys, caplog, monkeypatch, block
):
    """M1 of the attack review: node 103's tokens do not open, so every peer stops round
    1 naming it. Five accusers, more than c = 1: its keys are forgotten (it advertises
    again), round 2 fails the same way and it is left out from round 3 on, which releases
    the others' mean. The control (no accusations) voids every round."""
    caplog.set_level(logging.WARNING, logger="flwr")
    if not block:
        monkeypatch.setattr(SecureAggregation, "_accuse", lambda *args: None)
    mods = [_bad_tokens(103), make_he_mod(keys[0], workers=1)]
    grid = InProcessGrid(_app(mods), NODES)
    strategy = _he_fedavg(keys, min_available_nodes=5)
    if not block:
        with pytest.raises(Exception, match="no round produced a model|NoModelTrained|produced"):
            strategy.start(grid, _start(), num_rounds=4)
        return
    result = strategy.start(grid, _start(), num_rounds=4)
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    others = [n for n in range(100, 100 + NODES) if n != 103]
    # Rounds 1 and 2 released nothing; rounds 3 and 4 each the mean over the other five.
    assert np.allclose(model, 2 * _mean_shift(others), atol=flooding_atol(result.arrays, 2))
    assert "its keys are forgotten and it will be asked to advertise again" in caplog.text
    assert "node 103 is left out of secure aggregation for the rest of the run" in caplog.text
    assert strategy.secure_aggregation.blocked == {103: 2}


def test_one_false_accuser_cannot_have_an_honest_node_left_out(keys, caplog):
    """Node 101 claims node 104's tokens do not open: one accuser, not more than c = 1."""
    caplog.set_level(logging.WARNING, logger="flwr")

    def accuse(msg, context, call_next):
        config = next(iter(msg.content.config_records.values()), {})
        if context.node_id == 101 and config.get(protocol.SECAGG_MASKED):
            reason = (
                "he_mod: secure aggregation, masked input: tokens: the token from 104 does not open"
            )
            return Message(
                Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg
            )
        return call_next(msg, context)

    grid = InProcessGrid(_app([accuse, make_he_mod(keys[0], workers=1)]), NODES)
    strategy = _he_fedavg(keys, min_available_nodes=5)
    result = strategy.start(grid, _start(), num_rounds=2)
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    others = [n for n in range(100, 100 + NODES) if n != 101]
    assert np.allclose(model, 2 * _mean_shift(others), atol=flooding_atol(result.arrays, 2))
    assert strategy.secure_aggregation.blocked == {}


def test_too_few_survivors_release_nothing(keys, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    mods = [_failing(n, "unmask") for n in (101, 102, 103)] + [make_he_mod(keys[0], workers=1)]
    grid = InProcessGrid(_app(mods), NODES)
    strategy = _he_fedavg(keys)
    with pytest.raises(Exception, match="no round produced a model|NoModelTrained|produced"):
        strategy.start(grid, _start(), num_rounds=1)
    assert "the sum cannot be unmasked" in caplog.text


def test_he_dp_with_secure_aggregation_spends_the_same_epsilon(keys):
    def run(secure):
        strategy = HEDPFedAvg(
            keys[1],
            clip_norm=1.0,
            noise_multiplier=0.5,
            delta=1e-3,
            sample_rate=1.0,
            min_available_nodes=NODES,
            secure_aggregation=secure,
            workers=1,
        )
        grid = InProcessGrid(_app([make_he_dp_mod(keys[0], workers=1)]), NODES)
        result = strategy.start(grid, _start(), num_rounds=2)
        return result, strategy

    plain, plain_strategy = run(False)
    masked, masked_strategy = run(True)
    assert masked_strategy.epsilon() == pytest.approx(plain_strategy.epsilon(), rel=1e-12)
    assert [masked_strategy.server_counts[r]["reported"] for r in (1, 2)] == [NODES, NODES]
    model = decrypt_arrays(masked.arrays, keys[0])["w"].numpy()
    assert np.all(np.isfinite(model)) and np.abs(model).max() < 10  # a model, not ring noise


def test_a_replayed_upload_spoils_only_its_round_and_reads_nothing(keys, caplog):
    """Node 101 sends round 1's masked upload again in round 2: round 2's masks do not
    remove round 1's, so the sum is ring noise; the clients refuse it in round 3 and the
    server falls back to round 1's model. Nothing of node 101's update is learned."""
    caplog.set_level(logging.WARNING, logger="flwr")
    kept = {}

    def replay(msg, context, call_next):
        reply = call_next(msg, context)
        config = next(iter(msg.content.config_records.values()), {})
        if context.node_id != 101 or not config.get(protocol.SECAGG_MASKED):
            return reply
        if "upload" not in kept:
            kept["upload"] = reply.content
            return reply
        return Message(kept["upload"], reply_to=msg)

    grid = InProcessGrid(_app([replay, make_he_mod(keys[0], workers=1)]), NODES)
    result = _he_fedavg(keys, fraction_evaluate=0.0).start(grid, _start(), num_rounds=3)
    assert "falling back to the last good global model, sent in round" in caplog.text
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    assert np.all(np.isfinite(model)) and np.abs(model).max() < 1.0


class _CrashAtUnmask(InProcessGrid):
    """The server process dies while it sends round ``at``'s unmask requests."""

    def __init__(self, app, num_nodes, at):
        super().__init__(app, num_nodes)
        self.at = at

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            config = next(iter(msg.content.config_records.values()), {})
            stages = str(config.get(protocol.SECAGG_STAGE, "")).split(",")
            if "unmask" in stages and config.get(protocol.SERVER_ROUND) == self.at:
                raise KeyboardInterrupt("the server died mid-protocol")
        return super().send_and_receive(messages, timeout=timeout)


def test_a_crash_mid_protocol_loses_that_round_only(keys, tmp_path):
    """Killed between round 2's uploads and its unmask, then resumed (a new Flower run: the
    nodes' secure-aggregation state is new): round 2 is trained again, and ε is the
    uninterrupted run's: the lost round released nothing and spent nothing."""

    def strategy():
        return HEDPFedAvg(
            keys[1],
            clip_norm=1.0,
            noise_multiplier=0.5,
            delta=1e-3,
            sample_rate=1.0,
            sampling="fixed",
            min_available_nodes=NODES,
            secure_aggregation=True,
            workers=1,
        )

    app = _app([make_he_dp_mod(keys[0], workers=1)])
    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        strategy().start(_CrashAtUnmask(app, NODES, at=2), _start(), 3, checkpoint_dir=folder)
    resumed_strategy = strategy()
    resumed = resumed_strategy.start(InProcessGrid(app, NODES), _start(), 3, checkpoint_dir=folder)
    uninterrupted = strategy()
    uninterrupted.start(InProcessGrid(app, NODES), _start(), 3)
    assert resumed_strategy.epsilon() == pytest.approx(uninterrupted.epsilon(), rel=1e-12)
    assert sorted(resumed.train_metrics_clientapp) == [1, 2, 3]
    model = decrypt_arrays(resumed.arrays, keys[0])["w"].numpy()
    assert np.all(np.isfinite(model)) and np.abs(model).max() < 10


def test_a_node_that_requires_secure_aggregation_never_uploads_unmasked(keys, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1)]), NODES)
    grid.contexts[101].node_config["secure-aggregation"] = "required"
    result = _he_fedavg(keys, secure=False).start(grid, _start(), num_rounds=1)
    refused = [m for m in grid.received if m.has_error() and m.metadata.src_node_id == 101]
    assert refused and "requires secure aggregation" in refused[0].error.reason
    assert not [m for m in grid.received if m.metadata.src_node_id == 101 and not m.has_error()]
    every_other = [n for n in range(100, 100 + NODES) if n != 101]
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    assert np.allclose(model, _mean_shift(every_other), atol=flooding_atol(result.arrays))


def test_a_stage_never_reaches_a_handler_through_the_privacy_floor(keys):
    """An app with privacy_floor_mod but no he_mod: a stage message would reach its
    training handler, whose plaintext model must not leave the node."""
    from flwr.app import ConfigRecord, Context

    from lepton_flwr.mods import privacy_floor_mod

    app = _app([privacy_floor_mod])
    stage = ConfigRecord({protocol.SECAGG_STAGE: "advertise"})
    msg = Message(
        RecordDict({"arrays": _start(), "config": stage}), dst_node_id=100, message_type="train"
    )
    msg.metadata.__dict__["_message_id"] = "m1"
    context = Context(run_id=1, node_id=100, node_config={}, state=RecordDict(), run_config={})
    reply = app(msg, context)
    assert reply.has_error() and "reached the training handler" in reply.error.reason
    with_he = _app([privacy_floor_mod, make_he_mod(keys[0], workers=1)])
    answer = with_he(msg, context)
    assert not answer.has_error() and not answer.content.array_records


def test_two_tasks_of_a_node_at_once_never_answer_one_stage_twice(tmp_path, caplog):
    """Flower may run two tasks of a node at once, each with a copy of context.state. With
    state-dir the node answers from one file under a lock: the second unmask, asking for the
    other kind of share of the same peer, is refused. (Second review, H2: without it the
    server rebuilt a victim's mask from both answers.)"""
    import copy

    from flwr.app import ConfigRecord, Context
    from flwr.supercore.task_identity import TaskIdentity
    from test_secagg_protocol import Round

    from lepton_flwr.mods.secagg_stages import answer_stage
    from lepton_flwr.secagg.wire import REPLY_KEY, as_config, fields

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    r = Round(6)
    r.share_keys()
    r.masked_input()
    victim, holder = r.ids[0], r.ids[1]
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "secagg-run-1.state").write_bytes(r.clients[holder].state.to_bytes())
    (folder / "secagg-run-1.state").chmod(0o600)
    context = Context(
        run_id=1,
        node_id=holder,
        node_config={protocol.STATE_DIR: str(folder)},
        state=RecordDict(),
        run_config={},
    )

    def ask(task, survivors, dropped, number):
        config = {protocol.SECAGG_STAGE: "unmask"}
        config |= as_config({"unmask": {"round": r.r, "survivors": survivors, "dropped": dropped}})
        msg = Message(
            RecordDict({"config": ConfigRecord(config)}), dst_node_id=holder, message_type="train"
        )
        msg.metadata.__dict__["_message_id"] = f"m{number}"
        return fields(answer_stage(msg, task).content.config_records[REPLY_KEY], "unmask")

    first = ask(copy.deepcopy(context), r.ids, [], 1)
    others = [x for x in r.ids if x != victim]
    second = ask(copy.deepcopy(context), others, [victim], 2)
    assert "refused" not in first and victim in first["self_mask_owners"]
    assert "answered before" in second["refused"]


@pytest.mark.parametrize(
    ("value", "outcome"),
    [("required", True), ("True", True), ("on", True), ("optional", False), ("false", False)]
    + [("requried", "neither"), ("2", "neither")],
)
def test_the_required_setting_is_read_strictly(value, outcome):
    """Second review, L3: `secure-aggregation=true` was ignored and the node uploaded unmasked."""
    from flwr.app import Context

    from lepton_flwr.mods.common import ModError
    from lepton_flwr.mods.secagg_stages import requires_secure_aggregation

    context = Context(
        run_id=1,
        node_id=1,
        node_config={"secure-aggregation": value},
        state=RecordDict(),
        run_config={},
    )
    if isinstance(outcome, bool):
        assert requires_secure_aggregation(context) is outcome
    else:
        with pytest.raises(ModError, match=outcome):
            requires_secure_aggregation(context)
