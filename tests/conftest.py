"""Shared test settings: no telemetry, no hub, seeded configs."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# A developer's own feature store would make the tests that count computations pass once,
# then fail: the tests start without one (the runner sets its default for its run only).
os.environ.pop("LEPTON_FLWR_FEATURE_CACHE", None)
# and keep the scikit-learn datasets they load in a folder of this session, not the user's.
os.environ.setdefault(
    "LEPTON_FLWR_DATA_CACHE", tempfile.mkdtemp(prefix="lepton-flwr-test-datasets-")
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


def he_dp_fedavg(public_context, nodes: int, **settings):
    """HE + DP for hostile-input tests: every node each round (fixed sampling), z = 0.5,
    C = 1, δ = 1e-3, one worker; ``settings`` override these."""
    from lepton_flwr.strategies import HEDPFedAvg

    defaults = dict(
        clip_norm=1.0,
        noise_multiplier=0.5,
        delta=1e-3,
        sample_rate=1.0,
        sampling="fixed",
        min_available_nodes=nodes,
        workers=1,
    )
    return HEDPFedAvg(public_context, **(defaults | settings))


@pytest.fixture
def digits_cfg():
    """A composed config for the fast digits setup (3 clients, logistic regression)."""
    from lepton_flwr.config import load_config

    return load_config("+experiment=digits_smoke")


@pytest.fixture(scope="module")
def ckks():
    """Fresh keys for a test module: the secret and public contexts, an encoder, an adder.

    A module may define its own ``ckks`` (other parts) instead.
    """
    import tenseal as ts

    from lepton_flwr.he import CKKSParams, create_secret_context, public_context_bytes
    from lepton_flwr.he.codec import CkksAdder, CkksEncoder

    secret = create_secret_context(CKKSParams())
    public = ts.context_from(public_context_bytes(secret))
    return secret, public, CkksEncoder(secret, workers=1), CkksAdder(public)


def client_message(arrays, config=None, number=1, message_type="train"):
    """A message as the server would send it to node 1, built outside a Flower runtime."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config or {})})
    msg = Message(content, dst_node_id=1, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = f"m{number}"
    return msg


def flooding_atol(arrays, decryptions=1, weight=None):
    """How far a published decryption of ``arrays`` may honestly fall from the exact mean.

    Each decryption that fed the values (a client's view of an earlier round's model, the
    final ``decrypt_arrays``) floods them with N(0, σ_f²) / weight and rounds to a
    quantum at most σ_f / weight: the tolerance is 7 standard deviations of the
    ``decryptions`` floodings together plus one quantum each, passed by one value with
    probability below 3e-12. ``weight`` defaults to the encrypted model's own; pass the
    smallest of the rounds' weights where they differ. A fixed tolerance made tests fail
    at random (CI, stop 24: 1e-3 against σ_f / weight = 3.4e-4).
    """
    import math

    from lepton_flwr.he.params import CKKSParams
    from lepton_flwr.he.publish import flooding_std
    from lepton_flwr.he.records import EncryptedModel

    model = EncryptedModel.from_record(arrays)
    params = CKKSParams()
    std = flooding_std(params.poly_modulus_degree, 2.0**params.scale_bits, model.num_values)
    per_value = std / (model.weight if weight is None else weight)
    return 7 * per_value * math.sqrt(decryptions) + decryptions * per_value
