"""Sample-level DP on a client: DP-SGD with Opacus, one accountant across rounds.

Each round a client trains with Opacus (per-sample clipping, Gaussian noise, Poisson
batches). The client's accountant history is kept between rounds (``context.state``,
and a state file with ``state-dir``: :mod:`lepton_flwr.dp.client_state`), so the ε it
reports covers every step it took on its data.

Neighbouring datasets (:data:`DPSGD_NEIGHBOURING`) differ in one example being replaced
by a null example, one whose gradient is zero: the number of examples N is the same in
both. Everything a client releases besides its noisy weights is a function of N and the
run's public settings (``num-examples``, the HE header's weight, the ``ceil(N / B)``
Poisson steps, ``client-epsilon``, ``dpsgd-noise-multiplier``), so it is the same on both
datasets, and Opacus' analysis of the Poisson-sampled Gaussian mechanism (written for
adding or removing an example) holds as it is: a null example adds nothing to any batch's
clipped sum. Adding or removing an example is *not* covered: it changes ``num-examples``,
which leaves the client in the clear.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.common.logger import log
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lepton_flwr.dp.accounting import PrivacyConfigError, check_delta
from lepton_flwr.dp.noise import secure_gaussian
from lepton_flwr.dp.quiet_opacus import import_opacus
from lepton_flwr.models.training import learning_part, loss_fn, prepare_sgd, run_epochs

MODES = ("ghost", "hooks", "functorch", "ew")
DPSGD_NEIGHBOURING = (
    "zero-out one example (replaced by a null example whose gradient is zero; "
    "the client's example count and its Poisson steps public)"
)
"""The neighbouring relation of every DP-SGD ε (``summary.json``, the clients' logs)."""


def poisson_schedule(num_examples: int, batch_size: int) -> tuple[float, int]:
    """DP-SGD's sample rate and steps per epoch: ``1 / ceil(N / B)`` and ``ceil(N / B)``.

    Opacus' ``DPDataLoader.from_data_loader`` samples each example with probability one
    over the number of batches of the plain loader, ``ceil(N / B)``. :func:`train_dpsgd`
    takes exactly ``ceil(N / B)`` steps per epoch and has Opacus' accountant record each
    at this rate; the calibration (:func:`dpsgd_noise_multiplier`) and the prediction
    (:func:`epsilon_after_round`) use the same two numbers.

    Raises
    ------
    ValueError
        If there is no example to train on.
    """
    if num_examples < 1:
        raise ValueError(
            f"DP-SGD needs at least one training example, this node has {num_examples}"
        )
    steps = -(-num_examples // batch_size)
    return 1 / steps, steps


def dpsgd_settings(privacy: dict) -> dict:
    """The ``privacy=dpsgd`` config's options for :func:`train_dpsgd`, noise aside."""
    return {
        key: privacy[key]
        for key in ("max_grad_norm", "delta", "accountant", "mode", "reproducible")
    }


def dpsgd_noise_multiplier(
    privacy: dict, num_examples: int, batch_size: int, total_epochs: int
) -> float:
    """Z from the config, or the smallest z that keeps ε within ``target_epsilon`` for the run.

    Raises
    ------
    PrivacyConfigError
        If the target cannot be reached.
    """
    if privacy["noise_multiplier"] is not None:
        return float(privacy["noise_multiplier"])
    import_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    sample_rate, steps_per_epoch = poisson_schedule(num_examples, batch_size)
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=privacy["target_epsilon"],
                target_delta=privacy["delta"],
                sample_rate=sample_rate,
                steps=total_epochs * steps_per_epoch,
                accountant=privacy["accountant"],
            )
        )
    except ValueError as err:
        raise PrivacyConfigError(
            f"privacy.target_epsilon={privacy['target_epsilon']} cannot be reached with "
            f"{num_examples} examples, batch {batch_size}, {total_epochs} epochs: {err}"
        ) from err


def train_dpsgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_outputs: int,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    accountant: str = "rdp",
    mode: str = "ghost",
    history: list | None = None,
    earlier: list | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    reproducible: bool = False,
) -> tuple[float, float, list]:
    """Train ``model`` in place with DP-SGD.

    The noise and the Poisson batches come from ``os.urandom``, never from ``seed`` nor
    from a torch generator: the noise through :func:`lepton_flwr.dp.noise.secure_gaussian`
    (drawn on the CPU, then moved to ``device``), each example's membership of a batch
    from 53 random bits (:class:`OSPoissonSampler`). Anyone who knows the run's config
    (the server does) could otherwise recompute both possible outputs for neighbouring
    datasets and tell which one happened. Opacus' own ``secure_mode`` needs
    ``torchcsprng``, which has no build for the torch this pack uses.
    ``reproducible=True`` draws both from the global torch generator seeded with ``seed``
    instead: for tests and debugging only, the result is not private (a warning is
    logged).

    Every epoch takes the ``ceil(N / batch_size)`` steps of :func:`poisson_schedule`, and
    the accountant records each. A step whose Poisson batch is empty adds the noise to a
    zero gradient (:func:`_noise_step`), as the sampled Gaussian mechanism's analysis
    assumes: skipping it would leave the weights unchanged, telling without noise that
    the batch was empty.

    ``earlier``: the accountant histories of the node's other runs on the same data,
    counted in the ε returned but not in the history returned.

    Returns
    -------
    tuple[float, float, list]
        Mean training loss of the last epoch, ε spent so far (this call, the ``history``
        before it and ``earlier``), and the accountant's new history to keep.
    """
    import_opacus()
    from opacus import PrivacyEngine

    check_delta(delta, len(y))
    if mode not in MODES:
        raise PrivacyConfigError(f"Unknown mode '{mode}'. Allowed choices: {', '.join(MODES)}.")
    model, x = learning_part(model, x, device)
    loader, optimizer = prepare_sgd(
        model, x, y, batch_size, lr, momentum, weight_decay, device=device, seed=seed
    )
    criterion = loss_fn(num_outputs)
    if reproducible:
        log(
            WARNING,
            "DP-SGD noise and batch sampling follow the run seed (reproducible=True): this "
            "run is NOT differentially private; use it for tests and debugging only",
        )
    with warnings.catch_warnings():
        # Opacus warns that its secure_mode is off (see above) and about hooks on every call.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant=accountant)
        engine.accountant.history = [tuple(h) for h in (history or [])]
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
        )
    if mode == "ghost":
        private_model, optimizer, criterion, loader = made
    else:
        private_model, optimizer, loader = made
    # Opacus derives its number of batches from int(1 / rate) (92 for 93 batches), then
    # accounts at one over that and averages over int(N * that rate) (0 for N = 49 at
    # batch 1: infinite weights). Sampling, accounting and averaging follow the schedule.
    sample_rate, steps_per_epoch = poisson_schedule(len(y), batch_size)
    if reproducible:  # Opacus' sampler, on the global generator that ``seed`` seeded
        loader.batch_sampler.sample_rate = sample_rate
        loader.batch_sampler.steps = steps_per_epoch
    else:
        sampler = OSPoissonSampler(len(y), sample_rate, steps_per_epoch)
        loader = DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn)
        _add_noise_from_os(optimizer)
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    log(
        INFO,
        "dpsgd: noise multiplier %.4g, max_grad_norm %g, %d examples, Poisson rate %.4g, "
        "%d steps per epoch, %d epochs; noise and batches from %s; ε at δ = %g under %s",
        noise_multiplier,
        max_grad_norm,
        len(y),
        sample_rate,
        steps_per_epoch,
        epochs,
        "the seeded torch generator (not private)" if reproducible else "os.urandom",
        delta,
        DPSGD_NEIGHBOURING,
    )
    optimizer.expected_batch_size = len(y) * sample_rate
    with warnings.catch_warnings():
        # Opacus repeats the same UserWarnings every step (backward hooks, RDP orders).
        warnings.simplefilter("ignore", UserWarning)
        epoch_loss = run_epochs(
            private_model,
            loader,
            optimizer,
            criterion,
            epochs,
            device,
            empty_step=lambda: _noise_step(optimizer, ghost=mode == "ghost"),
        )
        epsilon = _epsilon(accountant, [*(earlier or []), *engine.accountant.history], delta)
    return epoch_loss, epsilon, [list(h) for h in engine.accountant.history]


def _epsilon(accountant: str, history: list, delta: float) -> float:
    """ε of an accountant ``history`` (entries ``(z, q, steps)``), by Opacus."""
    from opacus.accountants import create_accountant

    counted = create_accountant(accountant)
    counted.history = [tuple(h) for h in history]
    return float(counted.get_epsilon(delta))


def epsilon_after_round(
    history: list,
    noise_multiplier: float,
    num_examples: int,
    batch_size: int,
    epochs: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The client's cumulative ε once this round's DP-SGD steps are added to ``history``.

    The steps and sample rate of :func:`poisson_schedule`: exactly what :func:`train_dpsgd`
    takes and its accountant records, known before training.
    """
    import_opacus()
    sample_rate, steps_per_epoch = poisson_schedule(num_examples, batch_size)
    this_round = (noise_multiplier, sample_rate, epochs * steps_per_epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _epsilon(accountant, [*history, this_round], delta)


def _noise_step(optimizer, *, ghost: bool) -> None:
    """One DP-SGD step for an empty batch: Opacus' optimizer adds its noise to a zero gradient.

    Not every grad-sample mode runs a model on zero examples (``ew`` refuses a batch of
    size 0, ``functorch`` fails on convolutions), so no forward pass: the step gets zero
    per-example gradients (ghost clipping: a zero clipped sum), and Opacus' own step clips,
    adds the noise, scales and calls the accountant's hook, as for any batch.
    """
    for p in optimizer.params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()


class OSPoissonSampler(Sampler[list[int]]):
    """Poisson batches from ``os.urandom``: each example in each batch with probability q.

    Each example takes 53 random bits per step, a uniform u on the grid of 2⁻⁵³; it is in
    the batch when u < q (the probability is q rounded up to that grid). ``steps`` batches
    per pass, empty ones included.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int):
        self.num_samples, self.sample_rate, self.steps = num_samples, sample_rate, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            bits = np.frombuffer(os.urandom(8 * self.num_samples), dtype=np.uint64)
            uniform = (bits >> np.uint64(11)).astype(np.float64) / 2.0**53
            yield np.flatnonzero(uniform < self.sample_rate).tolist()


def _add_noise_from_os(optimizer) -> None:
    """Make Opacus' ``optimizer`` add noise from ``os.urandom`` (``secure_gaussian``).

    Opacus' optimizers add N(0, (z C)²) to each parameter's clipped sum in ``add_noise``,
    called by every step (an empty batch's included) before the mean and the accountant's
    hook; this one draws that noise from the OS instead of a torch generator.
    """

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            noise = secure_gaussian(tuple(p.summed_grad.shape), std)
            p.grad = (p.summed_grad + torch.from_numpy(noise).to(p.summed_grad)).view_as(p)

    optimizer.add_noise = add_noise
