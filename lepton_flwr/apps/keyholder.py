"""A key holder's view of an encrypted run: decrypt the final model, test it centrally.

The server of an HE run cannot evaluate on the global test set; a party holding the
secret key can. The simulation runner plays that party after the run.
"""

from __future__ import annotations

from pathlib import Path

from lepton_flwr.apps.common import model_for
from lepton_flwr.data import load_dataset
from lepton_flwr.he.keyholder import decrypt_arrays
from lepton_flwr.models import evaluate


def evaluate_encrypted_model(
    cfg: dict,
    model_path: str | Path,
    secret_context: str | Path,
    count_in: str | Path | None = None,
) -> dict:
    """Decrypt a saved encrypted model and evaluate it on the global test set.

    The decryption is flooded and counted under the key like every other the key holder
    makes (:func:`lepton_flwr.he.keyholder.decrypt_arrays`: in ``count_in``, by default
    the secret context's folder; refused past the budget).
    """
    record = decrypt_arrays(model_path, secret_context, count_in=count_in)
    data = load_dataset(cfg["dataset"], cfg["seed"])
    model = model_for(cfg, data)
    model.load_state_dict(record.to_torch_state_dict())
    return evaluate(model, data.x_test, data.y_test, num_outputs=data.num_outputs)
