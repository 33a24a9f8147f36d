"""Fall back to the last global model clients accepted, when they refuse the current one.

Clients check every global model they decrypt (``he_mod``'s wrap detector): values that
are not finite or pass the bound the server's sum allows mean a CKKS sum that wrapped
around or an upload encrypted dishonestly (under another key, or past its public bound).
Such a client replies with an error saying it refused the global model. All honest
clients decrypt the same ciphertexts with the same key, so they agree; when at least
``refusal_share`` of a round's replies refuse, the strategy goes back to the last model
that clients accepted and says so in its log. Fewer refusals (clients lying about a good
model) are logged and change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import ERROR, WARNING

from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from lepton_flwr import protocol


def refused_the_model(msg: Message) -> bool:
    """Whether a reply is a client's refusal of the global model it decrypted."""
    return msg.has_error() and protocol.MODEL_REFUSED in str(msg.error.reason)


class LastGoodModel:
    """Remembers the last global model that clients accepted.

    Parameters
    ----------
    name : str
        The strategy's name, for log lines.
    refusal_share : float
        Share of a round's replies that must refuse the global model for the fallback.
    """

    def __init__(self, name: str, refusal_share: float = 0.5):
        if not 0 < refusal_share <= 1:
            raise ValueError(f"refusal_share must be in (0, 1], got {refusal_share}.")
        self.name, self.refusal_share = name, refusal_share
        self.model: ArrayRecord | None = None  # the last model clients accepted
        self.model_round = 0  # the round in which it was sent
        self._sent: tuple[int, ArrayRecord] | None = None

    def state(self) -> dict:
        """For checkpoints: the last good model (if any) and the round it was sent in."""
        if self.model is None:
            return {}
        return {"last_good_round": self.model_round, "last_good_model": self.model}

    def load_state(self, state: dict) -> None:
        """Take back what :meth:`state` returned (resume)."""
        if "last_good_model" in state:
            self.model_round = int(state["last_good_round"])
            self.model = state["last_good_model"]

    def sent(self, server_round: int, arrays: ArrayRecord) -> None:
        """Note the global model sent for training this round."""
        self._sent = (server_round, arrays)

    def fall_back(self, server_round: int, replies: Sequence[Message]) -> bool:
        """Whether enough replies refused this round's model to fall back (logged).

        Otherwise the model sent this round becomes the last good one.
        """
        refused = [m for m in replies if refused_the_model(m)]
        if refused and len(refused) >= self.refusal_share * len(replies):
            first = refused[0]
            log(
                ERROR,
                "%s round %d: %d of %d clients refused the global model (node %d: %s); "
                "falling back to the last good global model, sent in round %d",
                self.name,
                server_round,
                len(refused),
                len(replies),
                first.metadata.src_node_id,
                first.error.reason,
                self.model_round,
            )
            return True
        if refused:
            log(
                WARNING,
                "%s round %d: %d of %d clients refused the global model the others "
                "accepted (node %d); kept",
                self.name,
                server_round,
                len(refused),
                len(replies),
                refused[0].metadata.src_node_id,
            )
        if self._sent is not None:
            self.model_round, self.model = self._sent
        return False
