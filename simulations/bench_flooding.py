"""What flooding published decryptions costs: the same final model, exact and flooded.

``python -m simulations.bench_flooding <run folder> [--draws 5]`` takes an HE run's
output (``model.ckks.zip``, ``keys/secret.ctx``, ``config.yaml``), decrypts the final
model once exactly (for this measurement only: an exact decryption must never be
published) and ``--draws`` times as every decryption in the pack does
(``lepton_flwr.he.publish``), and prints the global-test accuracy of each, side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import yaml
from flwr.app import Array, ArrayRecord

from lepton_flwr.apps.common import model_for
from lepton_flwr.data import load_dataset
from lepton_flwr.he import decrypt_arrays, load_encrypted, unflatten
from lepton_flwr.he.keyholder import encoder_for
from lepton_flwr.he.publish import flooding_std
from lepton_flwr.models import evaluate


def main() -> None:
    """Print exact and flooded accuracies of a run's final model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="output folder of an HE run")
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    secret = args.run / "keys" / "secret.ctx"
    encrypted = load_encrypted(args.run / "model.ckks.zip")
    data = load_dataset(cfg["dataset"], cfg["seed"])
    model = model_for(cfg, data)

    def accuracy(record: ArrayRecord) -> float:
        model.load_state_dict(record.to_torch_state_dict())
        return evaluate(model, data.x_test, data.y_test, num_outputs=data.num_outputs)["accuracy"]

    encoder, _ = encoder_for(secret, workers=1)
    exact_vector = encoder._decrypt_exact(encrypted.chunks, encrypted.num_values) / encrypted.weight
    exact = ArrayRecord(
        {k: Array(v) for k, v in unflatten(exact_vector, encrypted.manifest).items()}
    )
    flooded = [accuracy(decrypt_arrays(encrypted.to_record(), secret)) for _ in range(args.draws)]
    exact_accuracy = accuracy(exact)
    std = (
        flooding_std(encoder.poly_modulus_degree, encoder.scale, encrypted.num_values)
        / encrypted.weight
    )
    print(
        json.dumps(
            {
                "flooding_std_per_value": std,
                "exact_accuracy": exact_accuracy,
                "flooded_accuracy_median": statistics.median(flooded),
                "flooded_accuracies": flooded,
                "largest_difference": float(np.max(np.abs(np.array(flooded) - exact_accuracy))),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
