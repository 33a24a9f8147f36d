"""Update inversion by gradient matching, for models whose first layer is not linear.

A client that trains on one example for one SGD step sends θ − η∇L(x, y): the server
knows θ, so it holds the gradient up to the factor η. The attack of Geiping et al.
("Inverting gradients: how easy is it to break privacy in federated learning?", NeurIPS
2020) searches for the input whose gradient points the same way: it minimises one minus
the cosine similarity between the candidate's gradient and the observed update, plus a
small total-variation prior, with Adam on signed gradients, inside the data's value box.
The label comes first and for free from the last layer's bias (Zhao et al., "iDLG",
2020): under cross-entropy its gradient is softmax − one-hot, so the true class is the
only entry the step moved up.

This is the attack a curious server runs on a CNN or the ScatterNet, where the closed
form of :mod:`lepton_flwr.audit.inversion` (first layer linear) does not apply.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord


def observed_step(
    model: torch.nn.Module, global_arrays: ArrayRecord, reply_arrays: ArrayRecord
) -> list[torch.Tensor]:
    """The reply minus the global model, per trainable parameter (−η∇L for one step)."""
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in reply_arrays or name not in global_arrays]
    if missing:
        raise ValueError(f"the reply lacks the model's parameters {missing[:3]}")
    return [
        torch.from_numpy(
            reply_arrays[name].numpy().astype(np.float32)
            - global_arrays[name].numpy().astype(np.float32)
        )
        for name in names
    ]


def infer_label(step: list[torch.Tensor]) -> int:
    """The class whose output bias the step raised most (iDLG).

    Raises
    ------
    ValueError
        If the model's last parameter is not an output bias.
    """
    last = step[-1]
    if last.ndim != 1 or len(last) < 2:
        raise ValueError("the model's last layer has no bias per class: no label to read")
    return int(torch.argmax(last))


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


def invert_by_matching(
    model: torch.nn.Module,
    global_arrays: ArrayRecord,
    reply_arrays: ArrayRecord,
    example_shape: tuple[int, ...],
    value_range: tuple[float, float],
    steps: int = 400,
    lr: float = 0.1,
    tv_weight: float = 1e-2,
    seed: int = 0,
) -> np.ndarray:
    """The input whose one-step gradient best matches the client's update.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture (its weights are replaced by the global model's).
    global_arrays, reply_arrays : ArrayRecord
        What the server sent and what the client sent back (plaintext).
    example_shape : tuple[int, ...]
        One input's shape, e.g. (1, 28, 28).
    value_range : tuple[float, float]
        The box the inputs live in (the dataset's smallest and largest value).
    steps, lr, tv_weight, seed
        Adam steps (learning rate decayed tenfold at 3/8, 5/8 and 7/8 of them), the
        total-variation weight, and the starting point's seed.

    Returns
    -------
    np.ndarray
        The reconstruction, shape ``example_shape``.
    """
    model.load_state_dict(global_arrays.to_torch_state_dict())
    model.eval()
    parameters = [parameter for _, parameter in model.named_parameters()]
    target = [-tensor for tensor in observed_step(model, global_arrays, reply_arrays)]  # ∝ ∇L
    target_norm = torch.sqrt(sum((t**2).sum() for t in target))
    if target_norm == 0:
        raise ValueError("the update is zero: nothing to invert")
    label = torch.tensor([infer_label([-t for t in target])])
    low, high = value_range
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand((1, *example_shape), generator=generator) * (high - low) + low).requires_grad_()
    optimizer = torch.optim.Adam([x], lr=lr)
    milestones = [steps * 3 // 8, steps * 5 // 8, steps * 7 // 8]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    criterion = torch.nn.CrossEntropyLoss()
    for _ in range(steps):
        optimizer.zero_grad()
        gradient = torch.autograd.grad(criterion(model(x), label), parameters, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(gradient, target, strict=True))
        norm = torch.sqrt(sum((g**2).sum() for g in gradient)) + 1e-12
        loss = 1 - dot / (norm * target_norm) + tv_weight * _total_variation(x)
        (x.grad,) = torch.autograd.grad(loss, [x])
        x.grad.sign_()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(low, high)
    return x.detach()[0].numpy()
