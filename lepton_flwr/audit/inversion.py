"""Update inversion by an honest-but-curious server, on what actually reaches it.

A client that trains on one example for one SGD step changes its first fully connected
layer y = Wx + b by ΔW = −η δ xᵀ and Δb = −η δ (δ the gradient at y): every row i with
Δbᵢ ≠ 0 gives the input back exactly, x = ΔWᵢ / Δbᵢ (Phong et al., "Privacy-preserving
deep learning via additively homomorphic encryption", 2018; the closed-form case of the
gradient inversion of Zhu et al. 2019 and Geiping et al. 2020). Larger batches and more
steps blur it into a mixture, noise destroys it, and a ciphertext leaves nothing to
invert: :func:`invert_reply` says so rather than guess.

The attack runs on the server's own view: the reply a client sends (through its mods)
and the global model the server sent.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message

from lepton_flwr.he.records import is_encrypted


def first_linear_layer(arrays: ArrayRecord) -> tuple[str, str]:
    """Names of the first 2-D weight and the bias that follows it."""
    names = list(arrays.keys())
    for index, name in enumerate(names[:-1]):
        weight, bias = arrays[name].numpy(), arrays[names[index + 1]].numpy()
        if weight.ndim == 2 and bias.ndim == 1 and bias.shape[0] == weight.shape[0]:
            return name, names[index + 1]
    raise ValueError("the model has no fully connected layer (weight, bias) to invert")


def invert_update(delta_weight: np.ndarray, delta_bias: np.ndarray) -> np.ndarray:
    """X from a one-example update of y = Wx + b: the row whose bias moved most."""
    row = int(np.argmax(np.abs(delta_bias)))
    if delta_bias[row] == 0:
        raise ValueError("the layer did not move: nothing to invert")
    return delta_weight[row] / delta_bias[row]


def invert_reply(reply_arrays: ArrayRecord, global_arrays: ArrayRecord) -> np.ndarray | str:
    """The input the server reconstructs from one client's reply, or why it cannot.

    Returns
    -------
    np.ndarray | str
        The flattened reconstruction, or the reason there is none (a ciphertext).
    """
    if is_encrypted(reply_arrays):
        return "the server holds only ciphertexts of this update: nothing to invert"
    weight, bias = first_linear_layer(global_arrays)
    before_w, before_b = (global_arrays[k].numpy().astype(np.float64) for k in (weight, bias))
    after_w, after_b = (reply_arrays[k].numpy().astype(np.float64) for k in (weight, bias))
    return invert_update(after_w - before_w, after_b - before_b)


def psnr(reconstruction: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the truth's range (capped at 100 for exact)."""
    truth = np.asarray(truth, dtype=np.float64).ravel()
    error = float(np.mean((np.asarray(reconstruction, dtype=np.float64).ravel() - truth) ** 2))
    span = float(truth.max() - truth.min()) or 1.0
    return 100.0 if error <= span**2 * 1e-10 else 10 * math.log10(span**2 / error)


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


def one_client_view(strategy, client_app, arrays: ArrayRecord) -> ArrayRecord:
    """The arrays of :func:`one_client_reply`: what the server could try to invert."""
    (record,) = one_client_reply(strategy, client_app, arrays).content.array_records.values()
    return record
