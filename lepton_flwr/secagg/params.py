"""How many shares open a secret, and how many clients may collude or drop (issue 20).

The round's n participants (those sent a share-keys request: |neighbours| + 1 on the
complete graph) each Shamir-share two secrets t-of-(n − 1) among the others: the seed
b_u of their self-mask and their round's mask-agreement private key sk_u. This module
fixes t from n, the tolerated fraction γ of colluding clients and the fraction δ of
dropouts, and says what each guarantees. Fractions are read as decimals (``Fraction(str(
x))``), so that 0.1 × 30 is 3, not 4.

Adversary. The server, and c = ceil(γ n) of the round's participants colluding with it
(they hand it every share they hold). The server may be malicious: it may send any
request it likes, claim that a live client dropped, and send different survivor and
dropout sets, and different dropout lists before the masked input, to different
clients. Each honest client enforces, on its own (:mod:`lepton_flwr.secagg.client`):
it answers each stage once per round, ever; in the unmask stage it reveals, for each
peer, either a share of its self-mask seed (peer among the survivors S) or a share of
its mask key (peer among the dropped D), never both; it answers only with itself in S,
|S| ≥ t, and at most d = ceil(δ n) peers in D; it masks only after at most d of its
neighbours were declared dropped before the masked input.

Views are bound. The server may also show different nodes different neighbour lists
(of genuine nodes and keys) and thresholds. But a node answers share-keys once per
round, so it has one view of each round, and its share tokens carry a digest of that
view: SHA-256 of the round, t, and the id and two public keys of every participant it
was shown, itself included (:func:`~lepton_flwr.secagg.keys.view_digest`). A node takes
a token only if the digest in it is its own; at the first that is not, it refuses
naming the sender and stops the round. So every holder of u's shares that answers an
unmask (it took u's token) and every peer u masks with (u took its token) saw exactly
u's round: the same n participants with the same keys, and the same t, and the rules
below count within that one view. (Without the digest, the attack review's server read
one upload of 26 honest nodes with no colluder: it showed the victim five peers, each
peer the victim and four nodes the victim never saw, and collected the victim's seed
from its peers and each peer's mask key from that peer's own holders.)

Rule 1 (the victim's own secrets). To read an upload x_u + b_u + Σ ±s_uv, the server
needs b_u and either sk_u or the key of every honest peer u masked with. For b_u and
sk_u together it needs t shares of each; the c colluders give both, each honest holder
(n − 1 − c of them) gives one kind, so it fails while 2(t − c) > n − 1 − c, i.e.

    t ≥ floor((n − 1 + c) / 2) + 1,

which also covers the honest-but-curious server's t ≥ c + 1. (Against a malicious
server Bonawitz et al., CCS 2017, add a round in which survivors sign the survivor set;
this protocol has none: the caps below bound what the server gains without it.)

Rule 2 (the peers' keys). Otherwise it needs sk_v for every honest v that u masked
with: at least n − 1 − d − c of them (u masks with all but at most d neighbours), each
needing t − c shares from honest holders, who give at most d mask-key shares each (n − c
honest holders, u included). It fails while

    (n − 1 − c − d)(t − c) > (n − c) d.

t is the smallest value meeting both rules. With the defaults (γ = 0.05, δ = 0.1)
rule 2 raises t only at n = 5 (3 to 4), where rule 1 alone lets a server read one
upload: it tells the victim that one honest neighbour dropped before the masked input,
and asks each honest holder to reveal a different peer's key.

The same count bounds sums: a set L of honest survivors has at least
n − c − d − |L| honest peers outside it whose keys must all be revealed, so the server
cannot unmask any sum over fewer than :func:`smallest_exposed_sum` honest uploads
(the honest-but-curious server unmasks only the sum over all survivors).

Dropouts. A survivor's b_u has n − 1 holders; with k clients dropped, at any stage,
n − 1 − k holders answer the unmask, so the round needs n − 1 − k ≥ t; the caps stop
it past d dropouts at one stage. :func:`tolerated_dropouts` is the smaller of the two.

Not covered: a server that substitutes public keys (it needs keys signed by each
node's authentication key, a later step); a server that fills a round with its own
Sybil clients beyond c (the node's ``min_neighbours`` only bounds how small a round it
joins); a server that presents a node with a neighbourhood holding more than c
colluders; a client that uploads garbage (it spoils the sum; clients refuse a corrupted
model). Timing and sizes of messages, and who answered each stage, are the server's
to see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from lepton_flwr.numbers import is_int


class SecAggParamsError(ValueError):
    """Secure aggregation's parameters cannot hold for the round's size."""


@dataclass(frozen=True)
class SecAggParams:
    """Fractions of colluding and dropped clients, and the smallest round a node joins.

    Parameters
    ----------
    colluding_fraction
        γ: the round's participants that may collude with the server, as a fraction of n
        (c = ceil(γ n)), in [0, 0.5).
    dropout_fraction
        δ: the participants that may drop out, as a fraction of n (d = ceil(δ n)), in
        [0, 0.5). A client refuses an unmask with more than d dropped peers and a masked
        input after more than d of its neighbours dropped.
    min_neighbours
        The fewest neighbours a node shares keys with (a node setting).
    """

    colluding_fraction: float = 0.05
    dropout_fraction: float = 0.1
    min_neighbours: int = 4

    def __post_init__(self) -> None:
        for name in ("colluding_fraction", "dropout_fraction"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not 0 <= value < 0.5
            ):
                raise SecAggParamsError(f"{name} must be a number in [0, 0.5), not {value!r}")
        if not is_int(self.min_neighbours) or self.min_neighbours < 2:
            raise SecAggParamsError(
                f"min_neighbours must be an integer of at least 2, not {self.min_neighbours!r}"
            )

    def validate(self, expected_n: int) -> int:
        """Check the parameters for rounds of ``expected_n`` participants; return t.

        Raises
        ------
        SecAggParamsError
            If no threshold meets both rules, or if ceil(δ n) dropouts exceed the
            n − 1 − t the threshold leaves, or if n − 1 is below ``min_neighbours``;
            the message names the numbers.
        """
        _check_n(expected_n)
        if expected_n - 1 < self.min_neighbours:
            raise SecAggParamsError(
                f"a round of {expected_n} clients gives each {expected_n - 1} neighbours, "
                f"below min_neighbours = {self.min_neighbours}"
            )
        t = threshold(expected_n, self)
        dropouts = max_dropouts(expected_n, self)
        if dropouts > expected_n - 1 - t:
            raise SecAggParamsError(
                f"dropout_fraction = {self.dropout_fraction} allows ceil(δ n) = {dropouts} "
                f"dropouts in a round of {expected_n}, but the threshold t = {t} leaves "
                f"n − 1 − t = {expected_n - 1 - t}"
            )
        return t


def _check_n(n: object) -> None:
    if not is_int(n) or n < 2:
        raise SecAggParamsError(f"a round has at least 2 participants, not {n!r}")


def _ceil_fraction(fraction: float, n: int) -> int:
    return math.ceil(Fraction(str(fraction)) * n)


def colluders(n: int, params: SecAggParams) -> int:
    """C = ceil(γ n): the colluding participants tolerated in a round of n."""
    _check_n(n)
    return _ceil_fraction(params.colluding_fraction, n)


def max_dropouts(n: int, params: SecAggParams) -> int:
    """D = ceil(δ n): the most dropped peers a client accepts at one stage."""
    _check_n(n)
    return _ceil_fraction(params.dropout_fraction, n)


def _peer_keys_safe(n: int, t: int, c: int, d: int) -> bool:
    """Rule 2: the server cannot collect the keys of every honest peer of one client."""
    return (n - 1 - c - d) * (t - c) > (n - c) * d


def threshold(n: int, params: SecAggParams) -> int:
    """The smallest t meeting rules 1 and 2 of the module docstring for a round of n.

    Raises
    ------
    SecAggParamsError
        If no t ≤ n − 1 meets them (too few participants for γ and δ).
    """
    c = colluders(n, params)
    d = max_dropouts(n, params)
    t = (n - 1 + c) // 2 + 1
    while t <= n - 1 and not _peer_keys_safe(n, t, c, d):
        t += 1
    if t > n - 1:
        raise SecAggParamsError(
            f"no threshold t ≤ n − 1 = {n - 1} keeps a round of {n} safe with c = {c} "
            f"colluders and d = {d} dropouts per stage"
        )
    return t


def tolerated_dropouts(n: int, params: SecAggParams) -> int:
    """How many of n participants may drop, at any stages, with the round still unmasked.

    min(n − 1 − t, d): every secret needs t of its n − 1 holders, and clients stop past
    d dropped peers at one stage.
    """
    return max(0, min(n - 1 - threshold(n, params), max_dropouts(n, params)))


def smallest_exposed_sum(n: int, params: SecAggParams) -> int:
    """The fewest honest uploads whose sum a malicious server could unmask (count bound).

    A set L of honest survivors has at least n − c − d − |L| honest peers outside it
    whose mask keys the server needs, t − c honest shares each, out of at most (n − c) d:
    below the returned size the count rules the sum out. A bound from counting shares,
    not an attack shown to reach it.
    """
    t = threshold(n, params)
    c = colluders(n, params)
    d = max_dropouts(n, params)
    size = 1
    while (n - c - d - size) * (t - c) > (n - c) * d:
        size += 1
    return size
