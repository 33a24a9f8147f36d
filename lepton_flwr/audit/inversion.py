"""Update inversion by an honest-but-curious server, on what actually reaches it.

A client that trains on one example for one SGD step changes its first fully connected
layer y = Wx + b by ΔW = −η δ xᵀ and Δb = −η δ (δ the gradient at y): every row i with
Δbᵢ ≠ 0 gives the input back exactly, x = ΔWᵢ / Δbᵢ (Phong et al., "Privacy-preserving
deep learning via additively homomorphic encryption", 2018; the closed-form case of the
gradient inversion of Zhu et al. 2019 and Geiping et al. 2020). Larger batches and more
steps blur it into a mixture, noise destroys it, and a ciphertext leaves nothing to
invert: :func:`invert_reply` says so rather than guess. Models whose first layer is not
linear (a CNN, the ScatterNet) are attacked by gradient matching instead
(:mod:`lepton_flwr.audit.matching`).

The attack runs on the server's own view: the reply a client sends (through its mods)
and the global model the server sent.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from lepton_flwr.audit.matching import invert_by_matching
from lepton_flwr.he.records import is_encrypted


def closed_form_layer(
    arrays: ArrayRecord, example_shape: tuple[int, ...]
) -> tuple[str, str] | None:
    """Names of the model's first weight and bias if they form a linear layer on the input."""
    names = list(arrays.keys())
    if len(names) < 2:
        return None
    weight, bias = arrays[names[0]].numpy(), arrays[names[1]].numpy()
    if (
        weight.ndim == 2
        and weight.shape[1] == math.prod(example_shape)
        and bias.shape == (weight.shape[0],)
    ):
        return names[0], names[1]
    return None


def invert_update(delta_weight: np.ndarray, delta_bias: np.ndarray) -> np.ndarray:
    """X from a one-example update of y = Wx + b: the row whose bias moved most."""
    row = int(np.argmax(np.abs(delta_bias)))
    if delta_bias[row] == 0:
        raise ValueError("the layer did not move: nothing to invert")
    return delta_weight[row] / delta_bias[row]


def inversion_method(global_arrays: ArrayRecord, example_shape: tuple[int, ...]) -> str:
    """The attack that applies: closed form (first layer linear) or gradient matching."""
    return "closed form" if closed_form_layer(global_arrays, example_shape) else "gradient matching"


def invert_reply(
    reply_arrays: ArrayRecord,
    global_arrays: ArrayRecord,
    model: torch.nn.Module,
    example_shape: tuple[int, ...],
    value_range: tuple[float, float],
    steps: int = 400,
) -> np.ndarray | str:
    """The input the server reconstructs from one client's reply, or why it cannot.

    Exact where the first layer is linear on the input (closed form), otherwise by
    gradient matching (:mod:`lepton_flwr.audit.matching`) on ``model``'s architecture.

    Returns
    -------
    np.ndarray | str
        The reconstruction (shape ``example_shape``), or the reason there is none.
    """
    if is_encrypted(reply_arrays):
        return "the server holds only ciphertexts of this update: nothing to invert"
    layer = closed_form_layer(global_arrays, example_shape)
    if layer is None:
        return invert_by_matching(
            model, global_arrays, reply_arrays, example_shape, value_range, steps=steps
        )
    before_w, before_b = (global_arrays[k].numpy().astype(np.float64) for k in layer)
    after_w, after_b = (reply_arrays[k].numpy().astype(np.float64) for k in layer)
    return invert_update(after_w - before_w, after_b - before_b).reshape(example_shape)


def psnr(reconstruction: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the truth's range (capped at 100 for exact)."""
    truth = np.asarray(truth, dtype=np.float64).ravel()
    error = float(np.mean((np.asarray(reconstruction, dtype=np.float64).ravel() - truth) ** 2))
    span = float(truth.max() - truth.min()) or 1.0
    return 100.0 if error <= span**2 * 1e-10 else 10 * math.log10(span**2 / error)


def attack_one_client(cfg: dict, steps: int = 400) -> tuple[np.ndarray | str, np.ndarray, Message]:
    """The server's attack on one client of the config that trains one step on one example.

    The config's strategy (all clients every round) configures round 1 for the global
    model it starts from; the config's own ClientApp and mods answer
    (:func:`lepton_flwr.audit.scenarios.one_example_client`); the server inverts what it
    received (:func:`invert_reply`).

    Returns
    -------
    tuple[np.ndarray | str, np.ndarray, Message]
        The reconstruction (or why there is none), the client's true example, and the
        reply as the server received it.
    """
    from lepton_flwr.apps.common import model_for
    from lepton_flwr.audit.federations import strategy_for
    from lepton_flwr.audit.scenarios import one_example_client
    from lepton_flwr.data import load_dataset

    strategy = strategy_for(cfg, 1, every_client_every_round=True)
    app, example = one_example_client(cfg)
    data = load_dataset(cfg["dataset"], cfg["seed"])
    torch.manual_seed(cfg["seed"])
    arrays = ArrayRecord(model_for(cfg, data).state_dict())
    reply = one_client_reply(strategy, app, arrays)
    (view,) = reply.content.array_records.values()
    value_range = (float(data.x_train.min()), float(data.x_train.max()))
    outcome = invert_reply(view, arrays, model_for(cfg, data), example.shape, value_range, steps)
    return outcome, example, reply


def one_client_reply(strategy, client_app, arrays: ArrayRecord) -> Message:
    """The reply the server receives from one client in round 1, as it receives it.

    The strategy configures the round as in a run (its config, its key), the client's
    own app (with its mods) answers; nothing is read from the client's side.
    """
    from flwr.app import ConfigRecord

    from lepton_flwr.apps.inprocess import InProcessGrid

    grid = InProcessGrid(client_app, 1)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    if not messages:
        raise ValueError("the strategy sampled no client")
    (reply,) = grid.send_and_receive(messages[:1])
    if reply.has_error():
        raise ValueError(f"the client failed: {reply.error.reason}")
    return reply
