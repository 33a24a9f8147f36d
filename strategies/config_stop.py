"""Stop a run after the first round that shows its configuration is wrong.

A configuration mistake (:mod:`lepton_flwr.mistakes`: a missing key, a missing or
misplaced mod, no example count in the replies) fails every reply of every round the
same way. Running the remaining rounds only repeats it before ``NoModelTrainedError``,
and without ``he_mod`` each round brings the clients' updates to the server in the
clear again (refused there, never kept or added, but sent). :class:`ConfigurationStop`
ends the run after the round that shows the mistake, naming it.

Any node can write a mistake's phrase in an error reply, so the rule asks for evidence
that one node cannot make up alone, and that a working federation never shows:

- no reply of the run has passed the strategy's checks so far (once one has, the
  configuration works, and later failures are a node's or the network's);
- every node the round's training messages went to replied, and every reply failed
  for the same mistake (a missing reply, an accepted one, or any other failure in the
  round decides nothing);
- the nodes that reported that mistake in such rounds are at least two, or every node
  the grid knows when there is only one (a federation of one node is that node).

So a hostile node cannot end a run that has an honest node in its first rounds, nor
one in which any reply was accepted; a round whose only replies come from one node
never ends a run of several nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.common.constant import ErrorCode

from lepton_flwr.mistakes import NO_HE_MOD, Mistake, mistake_in

# Flower's own error code for a ClientApp that cannot be loaded: every node fails the
# same way (an import error in the app, say), and no retry loads it.
CLIENT_APP_NOT_LOADED = Mistake("the ClientApp cannot be loaded", "")

Failure = tuple[str, Mistake | None]  # a failed reply's reason, and the mistake it shows


def reply_failure(msg: Message, rejected: dict[int, str]) -> Failure | None:
    """Why a training reply failed and the configuration mistake that shows; None if it passed.

    Parameters
    ----------
    msg : Message
        The reply.
    rejected : dict[int, str]
        The strategy's reasons for the replies it rejected this round, by node.
    """
    if msg.has_error():
        reason = msg.error.reason
        if msg.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION:
            return reason, CLIENT_APP_NOT_LOADED
        return reason, mistake_in(reason)
    reason = rejected.get(msg.metadata.src_node_id)
    return None if reason is None else (reason, mistake_in(reason))


@dataclass
class ConfigurationStop:
    """Decides after each round whether the run's configuration is wrong beyond doubt.

    Attributes
    ----------
    worked : bool
        Whether any reply of the run has passed the strategy's checks.
    mistake : Mistake | None
        The mistake of the rounds in which every reply failed for one mistake.
    nodes : set[int]
        The nodes that reported it in those rounds.
    example : str
        One of those failures, with its node.
    """

    worked: bool = False
    mistake: Mistake | None = None
    nodes: set[int] = field(default_factory=set)
    example: str = ""

    def after_round(
        self,
        sent_to: set[int],
        outcomes: dict[int, Failure | None],
        known_nodes: Callable[[], int],
    ) -> Mistake | None:
        """Take a round's outcome; the mistake if the run should stop now, else None.

        Parameters
        ----------
        sent_to : set[int]
            The nodes the round's training messages went to.
        outcomes : dict[int, Failure | None]
            Each replying node's :func:`reply_failure`.
        known_nodes : Callable[[], int]
            How many nodes the grid knows (asked only when one node alone shows a mistake).
        """
        if any(outcome is None for outcome in outcomes.values()):
            self.worked = True
        if self.worked or not outcomes or not sent_to <= set(outcomes):
            return None
        found = {mistake for _, mistake in outcomes.values()}
        if len(found) != 1 or None in found:
            return None
        (mistake,) = found
        if mistake != self.mistake:
            self.mistake, self.nodes = mistake, set()
        self.nodes |= set(outcomes)
        node = min(outcomes)
        self.example = f"node {node}: {outcomes[node][0]}"
        if len(self.nodes) >= 2 or known_nodes() <= len(self.nodes):
            return mistake
        return None

    def reason(self, name: str, server_round: int) -> str:
        """The message the run stops with: the mistake, how many nodes, one failure."""
        text = (
            f"{name}: stopped after round {server_round}: every reply failed for the same "
            f"configuration mistake ({self.mistake.name}; {len(self.nodes)} nodes), which "
            f"every later round would repeat. Fix it and start the run again."
        )
        if self.mistake == NO_HE_MOD:
            text += (
                " The server refused those plaintext updates (none was kept or added) and "
                "sends no further round."
            )
        return f"{text} The failure, {self.example}"
