"""Central DP releases in exact integers (issue 19, items 3 and 6).

The released model must be a post-processing of the Gaussian mechanism on an exact
integer sum of sensitivity C/g; the integer noise must be the rounded Gaussian to within
the stated total variation; nothing released or logged may depend on whether an update
held NaN or how large it was.
"""

import importlib
import logging
import math

import mpmath
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from lepton_flwr.strategies import DPFedAvg
from scipy import stats
from scipy.special import ndtri

from lepton_flwr import protocol
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.dp import grid as dp_grid
from lepton_flwr.dp import noise
from lepton_flwr.dp.clipping import adapt_clip_norm
from lepton_flwr.dp.noise import rounded_gaussian, rounded_gaussian_tv_bound

SIZE = 4096


def _exact_norm_squared(integers):
    return sum(int(v) * int(v) for array in integers for v in array.ravel())


def _client(shifts, nan_nodes=()):
    """Clients that move the model by ``shifts[node]`` (NaN on ``nan_nodes``)."""

    def client_fn(msg, context):
        arrays = msg.content["arrays"]
        node = context.node_id
        new = {}
        for k, v in arrays.items():
            values = v.numpy() + shifts[node]
            if node in nan_nodes:
                values[::7] = np.nan
            new[k] = Array(values.astype(np.float32))
        metrics = MetricRecord({"num-examples": 5})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    return client_fn


def _strategy(**overrides):
    settings = dict(
        noise_multiplier=1.0,
        clip_norm=1.0,
        sample_rate=1.0,
        sampling="fixed",
        delta=1e-3,
        seed=5,
        min_available_nodes=4,
    )
    return DPFedAvg(**{**settings, **overrides})


def _round(strategy, client_fn, drop=None, start=None):
    grid = InProcessGrid(client_fn, num_nodes=4)
    start = start or ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
    replies = grid.send_and_receive(strategy.configure_train(1, start, ConfigRecord(), grid))
    replies = [r for r in replies if r.metadata.src_node_id != drop]
    return strategy.aggregate_train(1, replies)


@pytest.fixture
def captured(monkeypatch):
    """The exact integer sums and noisy sums DPFedAvg hands to the grid module."""
    seen = {"sums": [], "noisy": [], "spacing": []}
    add_noise, spacing = dp_grid.add_noise, dp_grid.spacing

    def recording_add_noise(total, scale, random_bytes):
        seen["sums"].append([t.copy() for t in total])
        noisy = add_noise(total, scale, random_bytes)
        seen["noisy"].append([n.copy() for n in noisy])
        return noisy

    def recording_spacing(*args):
        seen["spacing"].append(spacing(*args))
        return seen["spacing"][-1]

    monkeypatch.setattr(dp_grid, "add_noise", recording_add_noise)
    monkeypatch.setattr(dp_grid, "spacing", recording_spacing)
    return seen


def test_the_release_is_a_function_of_the_model_and_the_noisy_integers(captured):
    """float32(θ + g (S + K) / d), recomputed from θ and the integers, bit for bit."""
    rng = np.random.default_rng(0)
    theta = rng.normal(0, 0.1, SIZE).astype(np.float32)
    start = ArrayRecord({"w": Array(theta)})
    shifts = {100: 0.003, 101: -0.01, 102: 0.5, 103: 0.0}
    arrays, _ = _round(_strategy(), _client(shifts), start=start)
    (noisy,), (step,) = captured["noisy"][0], captured["spacing"]
    assert noisy.dtype == np.int64
    assert step == dp_grid.power_of_two_at_or_below(step)  # a power of two
    assert step <= 1.0 * 2**-26  # far below the noise std zC = 1
    expected = (theta.astype(np.float64) + noisy.astype(np.float64) * step / 4).astype(np.float32)
    np.testing.assert_array_equal(arrays["w"].numpy(), expected)


def test_neighbouring_rounds_differ_in_the_integer_sum_by_at_most_c_over_g(captured):
    """Node 103's update (norm 10 C, clipped) there or not: ‖S − S'‖₂ ≤ C/g, exactly."""
    shifts = {100: 0.01, 101: -0.02, 102: 3.0, 103: 10 / np.sqrt(SIZE)}
    _round(_strategy(), _client(shifts))
    _round(_strategy(), _client(shifts), drop=103)
    (with_103,), (without_103,) = captured["sums"]
    step = captured["spacing"][0]
    assert step == captured["spacing"][1]
    difference = [with_103 - without_103]
    assert _exact_norm_squared(difference) <= (1.0 / step) ** 2
    assert _exact_norm_squared(difference) >= (0.999 / step) ** 2  # it was clipped, not lost


def test_rounding_toward_zero_keeps_an_adversarial_update_within_c():
    """Coordinates just over half a grid step above a multiple: rounding to nearest would
    add almost g √D / 2 = 2^-19 C to the norm (more than the 2^-20 margin), rounding toward
    zero nothing."""
    size = 2**16
    clip_norm = (2**18 + 0.9) / 2**18  # C/(g √D) = 2^18 + 0.9 grid steps per coordinate
    step = dp_grid.spacing(1.0, clip_norm, 10)
    assert step == 2.0**-26
    per_coordinate = clip_norm * (1 - 2**-20) / math.sqrt(size) * (1 - 1e-9)
    update = [np.full(size, (np.floor(per_coordinate / step) + 0.51) * step)]
    assert np.sqrt(np.sum(update[0] ** 2)) < clip_norm * (1 - 2**-20)  # no clipping needed
    nearest = [np.rint(update[0] / step).astype(np.int64)]
    assert _exact_norm_squared(nearest) > (clip_norm / step) ** 2  # the bug this avoids
    assert _exact_norm_squared(dp_grid.to_grid(update, clip_norm, step)) <= (clip_norm / step) ** 2
    rng = np.random.default_rng(1)
    for scale in (1e-3, 1.0, 1e6, 1e300):  # below, near and far above C
        update = [rng.normal(0, scale, 1000), rng.normal(0, scale, (30, 7))]
        integers = dp_grid.to_grid(update, clip_norm, step)
        assert _exact_norm_squared(integers) <= (clip_norm / step) ** 2


def test_the_spacing_keeps_every_sum_inside_int64():
    """A population of 10^9 and an enormous noise: every integer stays below 2^62."""
    for noise_std, clip_norm, population in ((1.0, 1.0, 10**9), (1e6, 1e-3, 10**9), (1e-9, 5.0, 7)):
        step = dp_grid.spacing(noise_std, clip_norm, population)
        largest = population * clip_norm / step + (noise.TAIL_REACH * noise_std / step + 1)
        assert largest < 2**62
        assert noise_std / step <= noise.MAX_SCALE


def _bytes_for(indices, negative=False):
    """The 16 bytes that make rounded_gaussian's uniform v = (k + 1/2) / 2^127, per k."""
    words = []
    for k in indices:
        high, low = k >> 64, k & (2**64 - 1)
        words += [high | (2**63 if negative else 0), low]
    return np.array(words, dtype="<u8").tobytes()


def _edge_index(m, scale):
    """The largest k whose v still reaches bin m: v ≤ erfc((m − 1/2) / (scale √2))."""
    with mpmath.workprec(400):
        edge = mpmath.erfc((m - mpmath.mpf(0.5)) / (mpmath.mpf(scale) * mpmath.sqrt(2)))
        return int(mpmath.floor(edge * 2**127 - mpmath.mpf(0.5)))


@pytest.mark.parametrize("scale", [3.7, 2.0**26 + 12345.5])
def test_draws_one_grid_point_apart_fall_on_either_side_of_a_bin_edge(scale):
    """The float64 proposal cannot tell v's 2^-127 apart: mpmath must decide them, else
    a bin's probability would be off by far more than one grid point."""
    for m in (1, 2, 7, round(0.3 * scale) or 3, round(2.5 * scale), round(8 * scale)):
        k = _edge_index(m, scale)
        draws = rounded_gaussian(2, scale, lambda n, k=k: _bytes_for([k, k + 1]))
        assert draws.tolist() == [m, m - 1], (m, draws)
        negative = rounded_gaussian(2, scale, lambda n, k=k: _bytes_for([k, k + 1], True))
        assert negative.tolist() == [-m, -(m - 1)]


def test_random_draws_are_the_exact_inverse_cdf_bins():
    """300 draws at the grid's scale against the bin mpmath computes from the same bits."""
    scale = 2.0**26 * 1.37
    rng = np.random.default_rng(3)
    raw = rng.bytes(16 * 300)
    draws = rounded_gaussian(300, scale, lambda n: raw)
    words = np.frombuffer(raw, dtype="<u8").reshape(300, 2)
    for (high, low), draw in zip(words, draws, strict=True):
        k = ((int(high) & (2**63 - 1)) << 64) | int(low)
        with mpmath.workprec(300):
            v = (mpmath.mpf(k) + mpmath.mpf(0.5)) / 2**127
            z = -mpmath.sqrt(2) * mpmath.erfinv(v - 1)  # P(|Z| ≥ z) = v
            exact = int(mpmath.floor(z * scale + mpmath.mpf(0.5)))
        assert abs(int(draw)) == exact
        assert (int(draw) < 0) == bool(int(high) >> 63) or exact == 0


def test_the_float_proposal_is_far_more_accurate_than_its_margin():
    """ndtri plus the float conversion of v: error at most 2^-47 (1 + z) standard
    deviations, 8 times inside the 2^-44 margin below which mpmath decides."""
    rng = np.random.default_rng(4)
    uniforms = np.concatenate([rng.random(1500), 10.0 ** rng.uniform(-38, 0, 1500)])
    worst = 0.0
    with mpmath.workprec(200):
        for v in uniforms:
            z = -ndtri(v / 2)
            exact = -mpmath.sqrt(2) * mpmath.erfinv(mpmath.mpf(v) - 1)
            worst = max(worst, float(abs(z - exact)) / (1 + z))
    assert worst * (1 + 2.0**-52 * 2) < 2.0**-47


def test_the_extreme_draws_reach_the_stated_tail():
    """All-zero bits: the smallest v, 2^-128, reaches 13.1 standard deviations."""
    scale = 1000.0
    draw = rounded_gaussian(1, scale, lambda n: bytes(n))[0]
    assert draw == round(-ndtri(2.0**-129) * scale)
    assert -ndtri(2.0**-129) < noise.TAIL_REACH


def test_the_total_variation_bound_holds_exactly_at_a_small_scale():
    """Every bin's grid points counted exactly against the ideal rounded Gaussian."""
    scale = 2.3
    with mpmath.workprec(400):
        width = mpmath.mpf(scale) * mpmath.sqrt(2)
        edges = [mpmath.mpf(1)] + [
            mpmath.erfc((m - mpmath.mpf(0.5)) / width) for m in range(1, 40)
        ]  # edges[m] = P(|Z| ≥ (m − 1/2)/scale); bin m is (edges[m + 1], edges[m]]
        points = [int(mpmath.floor(e * 2**127 - mpmath.mpf(0.5))) + 1 for e in edges]
        total = mpmath.mpf(0)
        for m in range(len(edges) - 1):
            sampled = mpmath.mpf(points[m] - points[m + 1]) / 2**127
            total += abs(sampled - (edges[m] - edges[m + 1]))
        total += edges[-1]  # bins beyond: no grid point, their ideal mass
    assert 0 < float(total / 2) <= rounded_gaussian_tv_bound(scale)
    assert rounded_gaussian_tv_bound(2.0**27) < 5.3e-30


def test_rounded_gaussian_has_the_distribution_of_a_rounded_gaussian():
    scale = 3.7
    draws = rounded_gaussian(200_000, scale)
    assert draws.dtype == np.int64
    values, counts = np.unique(np.clip(draws, -12, 12), return_counts=True)
    edges = np.arange(-12, 12) + 0.5
    cdf = stats.norm.cdf(edges / scale)
    expected = np.diff(np.concatenate([[0.0], cdf, [1.0]])) * len(draws)
    assert values.tolist() == list(range(-12, 13))
    assert stats.chisquare(counts, expected).pvalue > 1e-4
    assert not np.array_equal(rounded_gaussian(100, scale), rounded_gaussian(100, scale))


def test_the_next_clip_norm_is_a_function_of_the_snapped_count(monkeypatch):
    """The count's noise is an integer in units of a power of two that divides 1/2; C
    follows from that released value alone."""
    from lepton_flwr.strategies import dp_fedavg

    draws = []

    def fixed_noise(shape, scale, random_bytes):
        draws.append(scale)
        return np.full(shape, 12345, dtype=np.int64)

    monkeypatch.setattr(dp_fedavg, "rounded_gaussian", fixed_noise)
    count_std, lr, target = 2.0, 0.2, 0.5
    strategy = _strategy(adaptive=True, count_stddev=count_std, clip_lr=lr, sample_rate=1.0)
    shifts = {100: 0.1 / np.sqrt(SIZE), 101: 0.1 / np.sqrt(SIZE), 102: 5.0, 103: 5.0}
    monkeypatch.setattr(dp_grid, "add_noise", lambda total, scale, random_bytes: total)
    _round(strategy, _client(shifts))
    unit = dp_grid.count_spacing(count_std)
    assert unit == 2.0**-25 and 0.5 / unit == int(0.5 / unit)
    assert draws == [count_std / unit]
    released = (0 + 12345) * unit  # two unclipped (+1/2 each), two clipped (−1/2 each)
    assert strategy.clip_norm == adapt_clip_norm(1.0, 0.5 + released / 4, target, lr)


def test_nothing_logged_or_released_depends_on_a_rejected_or_nan_update(caplog):
    """The same round with other update values (other shifts, NaN in other places, updates
    above C under client-side clipping): the warnings and the figures are the same text."""
    texts, figures = [], []
    for shifts, nan_nodes in (
        ({100: 0.5, 101: 2.0, 102: 1e-3, 103: 7.0}, (101,)),
        ({100: 3.5, 101: -8.0, 102: 40.0, 103: 0.25}, (101, 102)),
    ):
        caplog.clear()
        caplog.set_level(logging.WARNING, logger="flwr")
        strategy = _strategy(clipping_side="client")

        def client_fn(msg, context, shifts=shifts, nan_nodes=nan_nodes):
            if context.node_id == 103:  # a structurally wrong reply: rejected
                arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
                metrics = MetricRecord({"num-examples": 5, protocol.NORM_BIT: 0})
                return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
            nodes = (101,) if context.node_id in nan_nodes else ()
            return _client(shifts, nodes)(msg, context)

        _, metrics = _round(strategy, client_fn)
        texts.append(
            sorted(
                r.getMessage().replace("102", "101")
                for r in caplog.records
                if r.levelno >= logging.WARNING and "round" in r.getMessage()
            )
        )
        figures.append((strategy.server_counts[1]["accepted"], metrics["clip-norm"]))
    assert any("rejected the reply of node 103" in line for line in texts[0])
    assert "holds NaN or Inf" in " ".join(texts[0])
    assert figures[0] == figures[1] == (3, 1.0)
    # The second run has one NaN update more: one line more, each line the same text.
    assert set(texts[0]) == set(texts[1])


def test_dp_share_mod_sends_a_noise_share_of_zero_for_a_nan_update(monkeypatch):
    """Before: a NaN update made dp_share_mod reply an error (the server learnt that
    training diverged). Now it is a zero update plus the noise share, like any other."""
    from conftest import client_message
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    from lepton_flwr.mods import dp_share_mod

    share_module = importlib.import_module("lepton_flwr.mods.dp_share_mod")

    monkeypatch.setattr(
        share_module, "secure_gaussian", lambda shape, std: np.full(shape, 0.25 * std)
    )
    app = ClientApp(mods=[dp_share_mod])

    @app.train()
    def train(msg, context):
        values = msg.content["arrays"]["w"].numpy() + 1.0
        values[2] = np.nan
        new = ArrayRecord({"w": Array(values)})
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    config = {
        protocol.CLIPPING_NORM: 1.0,
        protocol.NOISE_SHARE_STD: 2.0,
        protocol.UPDATE_SCALE: 0.5,
        protocol.SHARE_BOUND: 1e9,
    }
    msg = client_message(ArrayRecord({"w": Array(np.zeros(5, dtype=np.float32))}), config)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = app(msg, context)
    assert not reply.has_error(), reply.error.reason
    np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), np.full(5, 0.25))


def test_dp_clip_mod_sends_no_change_for_a_nan_update():
    from conftest import client_message

    from lepton_flwr.mods import dp_clip_mod

    def handler(msg, context):
        values = msg.content["arrays"]["w"].numpy() + 1.0
        values[0] = np.inf
        new = ArrayRecord({"w": Array(values)})
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    theta = np.arange(5, dtype=np.float32)
    msg = client_message(ArrayRecord({"w": Array(theta)}), {protocol.CLIPPING_NORM: 1.0})
    reply = dp_clip_mod(msg, None, handler)
    np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), theta)
    assert reply.content["metrics"][protocol.NORM_BIT] == 1


def test_unseeded_rounds_draw_the_noise_from_the_operating_system(monkeypatch):
    """128 bits per value from os.urandom; a seed switches to numpy (tests, not private)."""
    import os

    requested, real_urandom = [], os.urandom

    def recording_urandom(n):
        requested.append(n)
        return real_urandom(n)

    monkeypatch.setattr(dp_grid.os, "urandom", recording_urandom)
    _round(_strategy(seed=None), _client({100: 0.0, 101: 0.0, 102: 0.0, 103: 0.0}))
    assert requested == [16 * SIZE]
    requested.clear()
    _round(_strategy(seed=3), _client({100: 0.0, 101: 0.0, 102: 0.0, 103: 0.0}))
    assert requested == []
