"""What the server reads in each training reply, per strategy, from real messages.

The "what the server reads" list (docs/guides/audit.md) is a promise: each strategy's replies carry
exactly these things (our ClientApp and mods, Flower's loop, 3 digits clients).
"""

import logging

import pytest
import torch
from flwr.app import ArrayRecord

from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.common import model_for
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.audit.federations import strategy_for
from lepton_flwr.audit.surface import SurfaceTally
from lepton_flwr.config import load_config
from lepton_flwr.he import CKKSParams, write_keys

PLAIN = "plaintext tensors: 650 values (the client's model or update)"  # logreg on digits
CIPHER = "ciphertexts of 650 values"
HEADER = "in the clear: key fingerprint, weight, bound, tensor names/shapes/dtypes"


def _clear(*keys):
    return {f"metric in the clear: {key}" for key in keys}


CASES = {
    "fedavg": (["strategy=fedavg"], {PLAIN} | _clear("num-examples", "train-loss")),
    "dp_fedavg": (["strategy=dp_fedavg"], {PLAIN} | _clear("num-examples")),
    "dpsgd": (
        ["strategy=fedavg", "privacy=dpsgd", "privacy.noise_multiplier=1.0"],
        {PLAIN} | _clear("num-examples", "client-epsilon", "dpsgd-noise-multiplier"),
    ),
    "he_fedavg": (
        ["strategy=he_fedavg"],
        {CIPHER, HEADER} | _clear("num-examples"),  # train-loss stays on the client
    ),
    "he_dp_fedavg": (
        ["strategy=he_dp_fedavg", "privacy.noise_multiplier=1.0"],
        {CIPHER, HEADER} | _clear("he-weight", "dp-share-std", "he-bound"),
    ),
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


@pytest.mark.parametrize("case", CASES)
def test_each_reply_carries_exactly_what_the_readme_lists(keys, caplog, case):
    caplog.set_level(logging.ERROR, logger="flwr")
    overrides, expected = CASES[case]
    cfg = {**load_config(["+experiment=digits_smoke", *overrides]), "num_rounds": 2}
    cfg["he"] = {
        **cfg["he"],
        "secret_context_path": str(keys[0]),
        "public_context_path": str(keys[1]),
    }
    tally = SurfaceTally()
    grid = InProcessGrid(make_client_app(cfg), 3, keep_replies=False, observe=tally)
    torch.manual_seed(0)
    start = ArrayRecord(model_for(cfg).state_dict())
    strategy_for(cfg, 3, every_client_every_round=True).start(grid, start, num_rounds=2)
    rows = {row["what"]: row for row in tally.rows()}
    assert set(rows) == expected
    assert tally.replies == 6 and all(row["replies"] == 6 for row in rows.values())
