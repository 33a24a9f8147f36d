"""Local training and evaluation loops shared by clients and the server."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lepton_flwr.models.sgd import EagerSGD


def resolve_device(name: str) -> torch.device:
    """Map ``cpu`` / ``cuda`` / ``auto`` to a torch device.

    Raises
    ------
    ValueError
        If ``cuda`` is asked for and no CUDA device is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device=cuda was asked for but torch sees no CUDA device; use cpu or auto."
        )
    return torch.device(name)


def loss_fn(num_outputs: int) -> nn.Module:
    """Mean squared error for regression (one output), cross-entropy for classes."""
    return nn.MSELoss() if num_outputs == 1 else nn.CrossEntropyLoss()


# Fixed features of recently used datasets (clients' partitions, the test set), so that a
# weightless front (ScatterNet's scattering) runs once per dataset, not once per round.
# Least recently used first out beyond 2 GiB (Fashion-MNIST's 70,000 images: 1.1 GB).
# Behind it, where LEPTON_FLWR_FEATURE_CACHE names a folder, the disk store that every
# process shares (lepton_flwr.models.feature_store).
_FEATURES: OrderedDict[tuple, np.ndarray] = OrderedDict()
_FEATURES_MAX_BYTES = 2 << 30


def learning_part(
    model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[nn.Module, np.ndarray]:
    """The part of ``model`` that learns, and its inputs for the examples ``x``.

    A model whose first stage is fixed (it defines ``fixed_features``, the options that
    determine them as ``fixed_features_options``, and ``head``) is trained and tested as
    its ``head`` on the precomputed features: the same function, the same per-example
    gradients, the fixed stage computed once per dataset (kept in this process) and, where
    ``LEPTON_FLWR_FEATURE_CACHE`` names a folder and the model declares
    ``fixed_features_shape``, once per image for every process
    (:mod:`lepton_flwr.models.feature_store`). Any other model is returned with ``x`` as is.
    """
    fixed = getattr(model, "fixed_features", None)
    if fixed is None:
        return model, x
    from lepton_flwr.models import feature_store

    x = np.ascontiguousarray(x)
    digest = hashlib.blake2b(x.data, digest_size=16).hexdigest()
    key = (
        type(model).__name__,
        model.fixed_features_options,
        x.shape,
        x.dtype.str,
        torch.device(device).type,  # as the disk store's key: another device, other bits
        digest,
    )
    if key not in _FEATURES:
        store = feature_store.store_for(model, x, str(device))
        compute = partial(_compute_fixed, fixed, device=device)
        if store is None:
            _FEATURES[key] = compute(x)
        else:  # each image by its own digest
            digests = feature_store.image_digests(x)
            _FEATURES[key] = feature_store.features_through(store, x, digests, compute)
        while (
            len(_FEATURES) > 1 and sum(f.nbytes for f in _FEATURES.values()) > _FEATURES_MAX_BYTES
        ):
            _FEATURES.popitem(last=False)
    _FEATURES.move_to_end(key)
    return model.head, _FEATURES[key]


def _compute_fixed(fixed: Callable, x: np.ndarray, *, device: torch.device | str) -> np.ndarray:
    """``fixed`` applied to ``x`` in batches of 1,000 examples, as a numpy array."""
    with torch.no_grad():
        parts = [
            fixed(torch.from_numpy(x[i : i + 1000]).to(device)).cpu().numpy()
            for i in range(0, len(x), 1000)
        ]
    return np.concatenate(parts) if parts else np.empty((0,), np.float32)


def store_fixed_features(
    model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu", chunk: int = 10_000
) -> int | None:
    """Put ``model``'s fixed features of every example of ``x`` in the shared disk store.

    What :func:`learning_part` would compute for any subset of ``x``, computed once for
    all of it, ``chunk`` examples a shard, and not kept in this process. Examples a shard
    holds already are left as they are (a damaged row is computed afresh when it is read).

    Returns
    -------
    int | None
        How many examples were computed (0: all were stored already); None when there is
        no store (``LEPTON_FLWR_FEATURE_CACHE`` unset or empty, or no fixed stage whose
        ``fixed_features_shape`` the model declares).
    """
    from lepton_flwr.models import feature_store

    fixed = getattr(model, "fixed_features", None)
    store = None if fixed is None else feature_store.store_for(model, x, str(device))
    if store is None:
        return None
    computed = 0
    for start in range(0, len(x), chunk):
        part = np.ascontiguousarray(x[start : start + chunk])
        digests = feature_store.image_digests(part)
        missing = store.lacking(digests)
        if len(missing):
            fresh = _compute_fixed(fixed, part[missing], device=device)
            store.add([digests[i] for i in missing], fresh)
            computed += len(missing)
    return computed


class _BatchedTensors(TensorDataset):
    """A TensorDataset that gives the loader a whole batch at once: one indexing per tensor.

    The loader's sampler, and so its batches and their order, are the DataLoader's own;
    only the fetch changes (``x[batch]`` rather than stacking the batch's examples one by
    one: the same values). :func:`_whole_batch` is its collate function.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        batch = torch.as_tensor(indices, dtype=torch.long)
        return tuple(tensor[batch] for tensor in self.tensors)


def _whole_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch


def make_loader(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    fetch_batches: bool = False,
) -> DataLoader:
    """Wrap numpy arrays in a DataLoader (seeded shuffling).

    With ``fetch_batches``, each batch is taken from the arrays in one indexing rather than
    example by example: the same batches, in the same order, with less work per step
    (training and evaluation; DP-SGD's loader, which Opacus rebuilds, keeps the default).
    """
    tensors = (torch.from_numpy(x), torch.from_numpy(y))
    generator = torch.Generator().manual_seed(seed)
    if fetch_batches:
        return DataLoader(
            _BatchedTensors(*tensors),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=_whole_batch,
        )
    dataset = TensorDataset(*tensors)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def seed_torch(seed: int, device: torch.device | str) -> None:
    """``torch.manual_seed(seed)``; on the CPU, the CPU generator's alone.

    ``torch.manual_seed`` also queues a seeding of every accelerator torch knows for when
    one starts, recording the caller's stack each time (about 1.4 ms a call on a CPU
    run); on the CPU the generator it seeds, the only one a CPU run draws from, is seeded
    the same.
    """
    if torch.device(device).type == "cpu":
        torch.random.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_outputs: int,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Train ``model`` in place with SGD; return the mean training loss of the last epoch."""
    model, x = learning_part(model, x, device)
    loader, optimizer = prepare_sgd(
        model,
        x,
        y,
        batch_size,
        lr,
        momentum,
        weight_decay,
        device=device,
        seed=seed,
        fetch_batches=True,
        eager=True,
    )
    return run_epochs(model, loader, optimizer, loss_fn(num_outputs), epochs, device)


def prepare_sgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    *,
    device: torch.device | str,
    seed: int,
    fetch_batches: bool = False,
    eager: bool = False,
) -> tuple[DataLoader, torch.optim.SGD | EagerSGD]:
    """Seed torch, move ``model`` to ``device`` in train mode; its shuffled loader and SGD.

    What plain training and DP-SGD (before Opacus wraps them) both start from;
    ``fetch_batches`` as in :func:`make_loader`. With ``eager``, the optimizer is
    :class:`~lepton_flwr.models.sgd.EagerSGD` (the same updates, bit for bit, without the
    ``torch._dynamo`` import that a fresh process pays per message); DP-SGD keeps
    ``torch.optim.SGD``, which Opacus wraps.
    """
    seed_torch(seed, device)
    model.to(device).train()
    loader = make_loader(x, y, batch_size, shuffle=True, seed=seed, fetch_batches=fetch_batches)
    optimizer_class = EagerSGD if eager else torch.optim.SGD
    optimizer = optimizer_class(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    return loader, optimizer


def run_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer | EagerSGD,
    criterion: nn.Module,
    epochs: int,
    device: torch.device | str,
    empty_step: Callable[[], None] | None = None,
) -> float:
    """The SGD loop (plain or Opacus' private one); return the last epoch's mean loss.

    An empty batch (possible with Poisson sampling) is skipped; with ``empty_step``, that
    function is called for it instead (after ``optimizer.zero_grad()``), as DP-SGD must
    still take its step.
    """
    epoch_loss = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            optimizer.zero_grad()
            if len(yb) == 0:
                if empty_step is not None:
                    empty_step()
                continue
            xb, yb = xb.to(device), yb.to(device)
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            count += len(yb)
        epoch_loss = total / max(count, 1)
    return epoch_loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_outputs: int,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Evaluate ``model`` on a dataset.

    Returns
    -------
    dict[str, float]
        ``loss`` plus ``accuracy`` (classification) or ``r2`` (regression).
    """
    model, x = learning_part(model, x, device)
    model.to(device).eval()
    if len(y) == 0:
        return {"loss": float("nan"), "accuracy" if num_outputs > 1 else "r2": float("nan")}
    criterion = loss_fn(num_outputs)
    outputs = []
    for xb, _ in make_loader(x, y, batch_size, shuffle=False, fetch_batches=True):
        outputs.append(model(xb.to(device)).cpu())
    pred = torch.cat(outputs)
    target = torch.from_numpy(y)
    loss = float(criterion(pred, target))
    if num_outputs == 1:
        residual = float(((target - pred) ** 2).sum())
        spread = float(((target - target.mean()) ** 2).sum())
        return {"loss": loss, "r2": 1.0 - residual / spread if spread > 0 else float("nan")}
    return {"loss": loss, "accuracy": float((pred.argmax(1) == target).float().mean())}
