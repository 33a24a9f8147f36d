"""Fall back to the last global model clients accepted, and find the node that made them refuse.

Clients check every global model they decrypt (the wrap detector): values that are not
finite or pass the bound the server's sum allows mean an upload encrypted dishonestly
(past its public bound, or under another key with the server's fingerprint). Such a
client replies with an error saying it refused the global model. Honest clients decrypt
the same ciphertexts with the same key, so they agree. :class:`LastGoodModel` counts the
refusals of each round's replies:

- more than ``refusal_share`` of the replies, and at least two, refuse: the model is
  refused, and the strategy goes back to the last model clients accepted (logged);
- fewer than half refuse: the model is accepted, and the round goes on (logged);
- anything between (half of two replies, say): the round adds nothing and keeps the
  model. One node alone never makes the strategy fall back. The server cannot tell who
  lies when half the replies refuse, so after ``MAX_DISPUTED_ROUNDS`` such rounds in a
  row it goes back to the last good model and training stops
  (:class:`TrainingHeldBackError`).

A refusal is believed only of a model that holds uploads clients have not accepted yet:
a model sent in the clear (the initial one) or the last good one cannot be refused, and
such refusals change nothing.

Who made the model be refused: a refused model is the sum of the uploads of the nodes
that reported in the round that made it (its contributors); with one dishonest node it
is among them. The server cannot tell which one without asking clients to decrypt
partial sums, a question about honest uploads that clients must not answer. Instead
:class:`Suspects` changes only who is sampled: while there are suspects, every round
leaves half of them out (the other half each round), so the next refused model holds at
most half of them, and the suspects become the ones it holds. One node left is excluded
from training for the rest of the run. One dishonest node therefore makes at most
1 + ⌈log2 m⌉ models be refused (m: the contributors of the first), each round's sum is
still a sum of fresh uploads, and no client decrypts anything but global models. When
refused models cannot be explained by one node (the next one holds no suspect: two or
more nodes upload dishonestly, or a majority lied; or it holds them all because the
round could not leave any out and still train), training stops with
:class:`TrainingHeldBackError`, which names the suspects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from lepton_flwr import protocol
from lepton_flwr.he.records import is_encrypted
from lepton_flwr.numbers import is_int

MAX_DISPUTED_ROUNDS = 3  # disputed rounds in a row after which training stops


class TrainingHeldBackError(RuntimeError):
    """Refused models that one dishonest node cannot explain: training stops."""


class Verdict(Enum):
    """What the refusals of a round's replies decide about the model sent that round."""

    ACCEPTED = "accepted"  # no refusal, or a minority: the round goes on
    DISPUTED = "disputed"  # half or more, but not a majority of two or more: nothing added
    REFUSED = "refused"  # a majority of two or more: back to the last good model


def refused_the_model(msg: Message) -> bool:
    """Whether a reply is a client's refusal of the global model it decrypted."""
    return msg.has_error() and protocol.MODEL_REFUSED in str(msg.error.reason)


def _node_ids(values: Iterable, field: str) -> frozenset[int]:
    """Node ids read back from a checkpoint's state (a list of whole numbers)."""
    if not isinstance(values, list) or not all(is_int(v) for v in values):
        raise ValueError(f"'{field}' must be a list of node ids, got {str(values)[:60]}")
    return frozenset(values)


class Suspects:
    """The nodes that may have made a model be refused, narrowed by leaving nodes out.

    Parameters
    ----------
    name : str
        The strategy's name, for log lines.
    """

    def __init__(self, name: str):
        self.name = name
        self.nodes: frozenset[int] = frozenset()  # every refused model since held one of them
        self.excluded: set[int] = set()  # found alone: never trained again

    def left_out(self, server_round: int) -> set[int]:
        """Excluded nodes, and half of the suspects (the other half each round)."""
        return self.excluded | set(sorted(self.nodes)[server_round % 2 :: 2])

    def narrow(self, server_round: int, contributors: frozenset[int]) -> str | None:
        """A model whose sum holds the uploads of ``contributors`` was refused.

        Returns why training must stop, if one dishonest node cannot explain it.
        """
        narrowed = contributors & self.nodes if self.nodes else contributors
        if not narrowed or narrowed == self.nodes:
            why = "holds none of them" if not narrowed else "holds them all"
            return (
                f"{self.name} round {server_round}: the refused model {why}; the suspects "
                f"were nodes {sorted(self.nodes)}, its uploads came from nodes "
                f"{sorted(contributors)}. One dishonest node cannot explain this: two or "
                f"more upload values past their bound or under another key (or a majority "
                f"refused a good model), or the federation is too small to leave half the "
                f"suspects out of a round. Training stops; remove the nodes at fault"
            )
        if len(narrowed) == 1:
            (node,) = narrowed
            self.excluded.add(node)
            self.nodes = frozenset()
            log(
                ERROR,
                "%s round %d: node %d's upload is in every refused model, while the other "
                "suspects were left out in turn: it uploads values past its bound or under "
                "another key. Node %d is excluded from training for the rest of the run",
                self.name,
                server_round,
                node,
                node,
            )
            return None
        self.nodes = narrowed
        log(
            WARNING,
            "%s round %d: one of nodes %s uploaded values past its bound or under another "
            "key; each round now leaves half of them out, until a refused model holds one",
            self.name,
            server_round,
            sorted(narrowed),
        )
        return None

    def state(self) -> dict:
        """For checkpoints."""
        return {"suspects": sorted(self.nodes), "excluded": sorted(self.excluded)}

    def load_state(self, state: dict) -> None:
        """Take back what :meth:`state` returned (resume)."""
        self.nodes = _node_ids(state.get("suspects", []), "suspects")
        self.excluded = set(_node_ids(state.get("excluded", []), "excluded"))


class LastGoodModel:
    """Remembers the last global model clients accepted, and who added to the one sent since.

    Parameters
    ----------
    name : str
        The strategy's name, for log lines.
    refusal_share : float
        The model is refused when more than this share of a round's replies, and at
        least two, refuse it; in [0.5, 1).
    """

    def __init__(self, name: str, refusal_share: float = 0.5):
        if not 0.5 <= refusal_share < 1:
            raise ValueError(
                f"refusal_share must be in [0.5, 1) (a minority must not decide), got "
                f"{refusal_share}."
            )
        self.name, self.refusal_share = name, refusal_share
        self.model: ArrayRecord | None = None  # the last model clients accepted
        self.model_round = 0  # the round in which it was sent
        self.contributors: frozenset[int] = frozenset()  # uploads in the model not yet accepted
        self.suspects = Suspects(name)
        self.disputed = 0  # disputed rounds in a row
        self.held_back: str | None = None  # why training must stop, once it must
        self._sent: tuple[int, ArrayRecord] | None = None

    def state(self) -> dict:
        """For checkpoints: the last good model (if any), the round it was sent in, suspects."""
        if self.model is None:
            return {}
        return {
            "last_good_round": self.model_round,
            "last_good_model": self.model,
            "contributors": sorted(self.contributors),
            **self.suspects.state(),
        }

    def load_state(self, state: dict) -> None:
        """Take back what :meth:`state` returned (resume)."""
        if "last_good_model" in state:
            self.model_round = int(state["last_good_round"])
            self.model = state["last_good_model"]
            self.contributors = _node_ids(state.get("contributors", []), "contributors")
            self.suspects.load_state(state)

    def leave_out(
        self, server_round: int, node_ids: Sequence[int], enough: Callable[[int], bool]
    ) -> list[int]:
        """The nodes of ``node_ids`` that train this round (see :class:`Suspects`).

        Excluded nodes never do; half of the suspects are left out as long as
        ``enough(number of nodes kept)`` holds (a round that cannot train leaves none
        out).

        Raises
        ------
        TrainingHeldBackError
            Once refused models cannot be explained by one dishonest node.
        """
        if self.held_back is not None:
            raise TrainingHeldBackError(self.held_back)
        excluded = [n for n in node_ids if n not in self.suspects.excluded]
        kept = [n for n in excluded if n not in self.suspects.left_out(server_round)]
        if not enough(len(kept)):
            kept = excluded
        if len(kept) < len(node_ids):
            log(
                INFO,
                "%s round %d: nodes %s left out (excluded, or suspects in turn)",
                self.name,
                server_round,
                sorted(set(node_ids) - set(kept)),
            )
        return kept

    def sent(self, server_round: int, arrays: ArrayRecord) -> None:
        """Note the global model sent for training this round (in the clear: no upload)."""
        self._sent = (server_round, arrays)
        if not is_encrypted(arrays):
            self.contributors = frozenset()

    def produced(self, node_ids: Iterable[int]) -> None:
        """The round made a new global model, adding the uploads of these nodes."""
        self.contributors = frozenset(node_ids)

    def _accept(self) -> Verdict:
        if self._sent is not None:
            self.model_round, self.model = self._sent
        self.contributors = frozenset()
        self.disputed = 0
        return Verdict.ACCEPTED

    def _refuse(self, held_back: str | None) -> Verdict:
        if held_back is not None:
            log(ERROR, "%s", held_back)
            self.held_back = held_back
        self.contributors = frozenset()
        self.disputed = 0
        return Verdict.REFUSED

    def judge(self, server_round: int, replies: Sequence[Message]) -> Verdict:
        """What this round's refusals decide about the model sent this round (logged).

        REFUSED: more than ``refusal_share`` of the replies, and two or more, refused a
        model holding uploads not accepted yet; the suspects are narrowed and the strategy
        returns :attr:`model`. ACCEPTED: the model sent becomes the last good one.
        DISPUTED: the round adds nothing.
        """
        refused = [m for m in replies if refused_the_model(m)]
        if not refused:
            return self._accept()
        first, share = refused[0].metadata.src_node_id, f"{len(refused)} of {len(replies)}"
        if not self.contributors:
            log(
                WARNING,
                "%s round %d: %s clients say they refused a global model that holds no new "
                "upload (sent in the clear, or one clients accepted before; node %d): not "
                "believed, nothing changes",
                self.name,
                server_round,
                share,
                first,
            )
            return self._accept()
        if len(refused) >= 2 and len(refused) > self.refusal_share * len(replies):
            log(
                ERROR,
                "%s round %d: %s clients refused the global model (node %d: %s); "
                "falling back to the last good global model, sent in round %d",
                self.name,
                server_round,
                share,
                first,
                refused[0].error.reason,
                self.model_round,
            )
            return self._refuse(self.suspects.narrow(server_round, self.contributors))
        if 2 * len(refused) >= len(replies):
            self.disputed += 1
            if self.disputed >= MAX_DISPUTED_ROUNDS:
                return self._refuse(
                    f"{self.name} round {server_round}: in {self.disputed} rounds in a row, "
                    f"half of the replies or more refused the global model and the others "
                    f"accepted it ({share} now): with so few replies the server cannot tell "
                    f"which are dishonest. Back to the last good global model, sent in round "
                    f"{self.model_round}; training stops"
                )
            log(
                WARNING,
                "%s round %d: %s clients refused the global model (node %d), neither a "
                "minority nor a majority of two or more: the round adds nothing and keeps it",
                self.name,
                server_round,
                share,
                first,
            )
            return Verdict.DISPUTED
        log(
            WARNING,
            "%s round %d: %s clients refused the global model the others accepted (node %d); kept",
            self.name,
            server_round,
            share,
            first,
        )
        return self._accept()
