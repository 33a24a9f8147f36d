"""Client sampling that the accountant can match: Poisson, or fixed size without replacement."""

from __future__ import annotations

import numpy as np


def poisson_sample(node_ids: list[int], sample_rate: float, rng: np.random.Generator) -> list[int]:
    """Each node independently with probability ``sample_rate`` (the sample may be empty)."""
    keep = rng.random(len(node_ids)) < sample_rate
    return [node for node, chosen in zip(node_ids, keep, strict=True) if chosen]


def fixed_size_sample(node_ids: list[int], size: int, rng: np.random.Generator) -> list[int]:
    """``size`` distinct nodes, uniformly without replacement."""
    if not 1 <= size <= len(node_ids):
        raise ValueError(f"cannot sample {size} of {len(node_ids)} nodes")
    return [node_ids[i] for i in sorted(rng.choice(len(node_ids), size=size, replace=False))]
