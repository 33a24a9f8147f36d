"""Configuration mistakes: reply failures that every node repeats and no retry can fix.

A missing key, a missing or misplaced mod, a reply without its example count: each
makes every reply of every round fail the same way, so running the remaining rounds
only repeats it (and, without ``he_mod``, sends the clients' updates in the clear each
time). The code that refuses for such a reason (a client mod's error reply, a server's
check of a reply) writes the mistake's ``phrase`` in its reason; the phrase is defined
here once and used there, and :func:`mistake_in` finds it again on the server, where
:mod:`lepton_flwr.strategies.config_stop` decides whether a round's failures stop the run.

A phrase is text: any node can write it in an error reply. Recognising one says nothing
about who is at fault; the stopping rule is what keeps a hostile node from ending a run
with it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mistake:
    """One kind of configuration mistake.

    Attributes
    ----------
    name : str
        Short name, for log lines and tests.
    phrase : str
        Text that every failure reason of this kind holds, and no other reason of ours.
    """

    name: str
    phrase: str


NO_SECRET_CONTEXT = Mistake("no secret context", "no CKKS secret context given")
SECRET_CONTEXT_NOT_FOUND = Mistake("secret context not found", "CKKS secret context not found")
SECRET_CONTEXT_UNLOADABLE = Mistake(
    "run-config secret context cannot be loaded", "cannot load a CKKS secret context from"
)
RELATIVE_KEY_PATH = Mistake("relative key path", "is a relative path")
NO_HE_MOD = Mistake("no he_mod on the clients", "no he_mod on the client")
NO_DP_SHARE_MOD = Mistake("he_mod without dp_share_mod", "but no dp_share_mod ran")
MODS_IN_WRONG_ORDER = Mistake("mods in the wrong order", "mods are in the wrong order")
NO_WEIGHT = Mistake("no example count in the reply", "in the reply's metrics")
OTHER_WEIGHT = Mistake("another weight key", "the server asks for updates weighted by")
MOD_OF_ANOTHER_STRATEGY = Mistake("mod of another strategy", "which this mod does not pair with")
ENCRYPTED_TO_DPFEDAVG = Mistake(
    "encrypted reply to DPFedAvg", "the reply is encrypted: DPFedAvg adds plaintext updates"
)

MISTAKES = (
    NO_SECRET_CONTEXT,
    SECRET_CONTEXT_NOT_FOUND,
    SECRET_CONTEXT_UNLOADABLE,
    RELATIVE_KEY_PATH,
    NO_HE_MOD,
    NO_DP_SHARE_MOD,
    MODS_IN_WRONG_ORDER,
    NO_WEIGHT,
    OTHER_WEIGHT,
    MOD_OF_ANOTHER_STRATEGY,
    ENCRYPTED_TO_DPFEDAVG,
)


def mistake_in(reason: str) -> Mistake | None:
    """The configuration mistake a failure reason names, or None for any other failure."""
    for mistake in MISTAKES:
        if mistake.phrase in reason:
            return mistake
    return None
