"""Torch's SGD step without the ``torch.optim.Optimizer`` class: no ``torch._dynamo`` import.

Constructing any ``torch.optim`` optimizer, and each of its steps, goes through a
``torch.compile`` guard that imports ``torch._dynamo`` (about a second). A long-lived
process pays that once; a SuperNode's ``flwr-clientapp`` process, started afresh for
each message, pays it on every message. :class:`EagerSGD` calls the same update that
``torch.optim.SGD.step`` calls, torch's public functional ``torch.optim.sgd.sgd``, with the
same arguments (the single-tensor or foreach kernel chosen by torch as the class would),
so its parameters after any number of steps are those of ``torch.optim.SGD``, bit for bit
(``tests/test_eager_sgd.py`` checks it on the CPU; a CUDA run, with torch's foreach
kernels, is checked there where a GPU is present). It does not support what it does not
need: closures, hooks, state dicts, parameter groups, sparse gradients,
``torch.compile``; DP-SGD keeps ``torch.optim.SGD``, which Opacus wraps.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.sgd import sgd


class EagerSGD:
    """SGD with momentum and weight decay, as ``torch.optim.SGD`` with its defaults.

    Parameters
    ----------
    params : Iterable[torch.Tensor]
        The tensors to optimise (a model's ``parameters()``).
    lr : float
        Learning rate, >= 0.
    momentum : float
        Momentum factor, >= 0 (dampening 0, no Nesterov, as torch's defaults).
    weight_decay : float
        L2 penalty, >= 0.

    Raises
    ------
    ValueError
        For a negative setting, or no parameters, as ``torch.optim.SGD``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if value < 0.0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.params = list(params)
        if not self.params:
            raise ValueError("EagerSGD got an empty parameter list")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.momentum_buffers: dict[int, torch.Tensor] = {}  # by position in params

    def zero_grad(self) -> None:
        """Drop the gradients (``torch.optim``'s default, ``set_to_none=True``)."""
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One SGD update of every parameter that has a gradient."""
        positions = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in positions]
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise ValueError("EagerSGD does not take sparse gradients; use torch.optim.SGD")
        buffers = [self.momentum_buffers.get(i) for i in positions]
        sgd(
            params,
            grads,
            buffers,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0,
            nesterov=False,
            maximize=False,
        )
        if self.momentum != 0:
            self.momentum_buffers.update(zip(positions, buffers, strict=True))
