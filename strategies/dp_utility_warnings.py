"""Warnings at the start of a client-level DP run whose settings leave little to learn.

Client-level DP divides the noisy sum of clipped updates by a fixed d, the clients a
round is expected to count (q·N for Poisson sampling, m for fixed size), so two
settings decide whether a model can learn at all, and both are known once the first
round has counted the nodes (N) and seen the model (P weights):

- **Too few clients per round**: d below :data:`MIN_EXPECTED_CLIENTS`. A Poisson round
  then samples nobody with probability (1 − q)^N, and such a round releases nothing.
- **Noise that dwarfs any update**: the noise on the released mean is N(0, (z C / d)²)
  per weight, a vector of norm about z C √P / d, while the mean of updates clipped to C
  has norm at most C. When z √P / d exceeds :data:`MAX_NOISE_RATIO`, the noise of one
  round is that many times the largest update the clients can make together.

Each is logged as a warning naming the figures and what to change; neither stops the run
(a user may study exactly such a setting).
"""

from __future__ import annotations

import math
from logging import WARNING

from flwr.common.logger import log

MIN_EXPECTED_CLIENTS = 5.0
MAX_NOISE_RATIO = 10.0


def utility_warnings(
    name: str,
    *,
    expected_clients: float,
    nobody_sampled: float,
    noise_multiplier: float,
    num_weights: int,
) -> list[str]:
    """Log (and return) a warning for each rule the settings break; [] when none.

    Parameters
    ----------
    name : str
        The strategy, for the log lines.
    expected_clients : float
        d, the fixed denominator: q·N (Poisson) or m (fixed size).
    nobody_sampled : float
        The probability that a round samples nobody ((1 − q)^N; 0 for fixed size).
    noise_multiplier : float
        z of the update's noise (with adaptive clipping, the update's share of it).
    num_weights : int
        P, the number of values in the model.
    """
    found = []
    if expected_clients < MIN_EXPECTED_CLIENTS:
        found.append(
            f"{name}: a round is expected to count {expected_clients:.3g} clients "
            f"(fewer than {MIN_EXPECTED_CLIENTS:g}); a round samples nobody with probability "
            f"{nobody_sampled:.3g} and then releases nothing. Raise sample_rate, or connect "
            f"more nodes"
        )
    ratio = noise_multiplier * math.sqrt(num_weights) / expected_clients
    if ratio > MAX_NOISE_RATIO:
        found.append(
            f"{name}: the noise on each round's mean has norm about {ratio:.3g} times the "
            f"largest mean update (z sqrt(P) / d = {noise_multiplier:.3g} x "
            f"sqrt({num_weights}) / {expected_clients:.3g}, over {MAX_NOISE_RATIO:g}): the "
            f"model will learn little if anything. Sample more clients per round (d), use "
            f"a model with fewer weights, or accept a larger epsilon (smaller z)"
        )
    for message in found:
        log(WARNING, "%s", message)
    return found
