"""Run a federated training in Flower's simulation engine from Hydra overrides.

Examples
--------
``python -m simulations.run``                                  Fashion-MNIST CNN, 10 clients
``python -m simulations.run +experiment=main``                 the main job: HE + DP, 1,000 clients
``python -m simulations.run +experiment=digits_smoke``         seconds-long smoke run
``python -m simulations.run partition=dirichlet partition.alpha=0.5``
``python -m simulations.run -m partition=iid,dirichlet``       a Hydra sweep
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Ray pre-starts an idle worker for the driver; at start-up it can die with "Fatal Python
# error: Aborted" and a stack dump that reads like a crash (the run is unaffected).
# Workers are started when actors need them instead.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


def backend_config(cfg: dict) -> dict:
    """Flower's Ray backend settings from the ``simulation`` config group."""
    sim = cfg["simulation"]
    init_args: dict = {"logging_level": logging.ERROR, "log_to_driver": True}
    if sim["ray_num_cpus"] is not None:
        init_args["num_cpus"] = sim["ray_num_cpus"]
    return {
        "client_resources": {
            "num_cpus": sim["client_resources"]["num_cpus"],
            "num_gpus": sim["client_resources"]["num_gpus"],
        },
        "init_args": init_args,
    }


def actor_threads(cfg: dict) -> dict[str, str]:
    """Thread counts for the ClientApp actors: the cores each one reserves.

    Ray workers inherit the driver's environment, and Ray keeps an ``OMP_NUM_THREADS``
    it finds there: exported as 2 on a 2-core machine, each of the two actors runs 2
    threads and they fight for the cores (the main job's rounds took 60-96 s instead
    of 8-10 s). The actors start after this is set; the driver keeps its own threads.
    """
    threads = str(max(1, int(cfg["simulation"]["client_resources"]["num_cpus"])))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


@contextmanager
def fixed_features_stored(cfg: dict, data) -> Iterator[None]:
    """Within: the model's fixed features of the whole dataset, computed once, for every process.

    Only for a model with a fixed stage (the ScatterNet's scattering). The store is the
    folder ``LEPTON_FLWR_FEATURE_CACHE`` names, set here, for the block only, to
    :func:`lepton_flwr.models.feature_store.default_folder` unless it is set already
    (empty: no store). The Ray actors started within inherit it, so that every client's
    partition and the global test set are looked up, not computed, in every round and
    every later run; it holds the features of this dataset only, which this process
    holds already. Afterwards the process's environment is as it was (a test that runs
    the runner leaves no store behind for the next).
    """
    from lepton_flwr.models import feature_store

    variable = feature_store.FEATURE_CACHE_ENV
    before = os.environ.get(variable)
    os.environ.setdefault(variable, str(feature_store.default_folder()))
    try:
        store_fixed_features(cfg, data)
        yield
    finally:
        if before is None:
            os.environ.pop(variable, None)


def store_fixed_features(cfg: dict, data) -> None:
    """Put the fixed features of ``data``'s training pool and test set in the store, if any.

    Nothing without a store (``LEPTON_FLWR_FEATURE_CACHE`` unset or empty) or for a model
    without a fixed stage; prints how many were computed and where they are.
    """
    from lepton_flwr.models import feature_store

    if feature_store.configured_folder() is None:
        return
    from lepton_flwr.apps.common import model_for
    from lepton_flwr.models.training import resolve_device
    from lepton_flwr.models.training import store_fixed_features as store

    model = model_for(cfg, data)
    if getattr(model, "fixed_features_shape", None) is None:
        return
    started = time.perf_counter()
    device = resolve_device(cfg["device"])
    computed = sum(store(model, x, device) for x in (data.x_train, data.x_test))
    print(
        f"Fixed features ({type(model).__name__}) of {len(data.x_train) + len(data.x_test):,} "
        f"examples: {computed:,} computed in {time.perf_counter() - started:.1f} s, the rest "
        f"found in {feature_store.configured_folder()}",
        file=sys.stderr,
    )


def run_simulation_from_config(cfg: dict, output_dir: str | Path) -> Path:
    """Validate ``cfg``, split the data, then run the simulation; return the output folder.

    Every config error (names, ranges, more clients than samples, a missing dataset)
    is raised here, before Ray starts.
    """
    from flwr.simulation import run_simulation

    from lepton_flwr.apps.client import make_client_app
    from lepton_flwr.apps.common import resumed_config
    from lepton_flwr.apps.server import ENCRYPTED_MODEL_FILE, make_server_app
    from lepton_flwr.config import validate_config
    from lepton_flwr.data import load_dataset, partition_indices, resolve_num_partitions
    from lepton_flwr.results import SUMMARY_FILE
    from lepton_flwr.sim_linkstate import population_flat_engine

    cfg = resumed_config(cfg, take_saved=True)
    cfg = {**cfg, "output_dir": str(Path(cfg["output_dir"] or output_dir).resolve())}
    validate_config(cfg)
    if cfg["he"]["name"] == "ckks":
        cfg["he"] = with_run_keys(cfg["he"], Path(cfg["output_dir"]) / "keys")
    num_nodes = resolve_num_partitions(cfg)
    cfg["simulation"] = {**cfg["simulation"], "num_supernodes": num_nodes}
    data = load_dataset(cfg["dataset"], cfg["seed"])
    partition_indices(data, cfg["partition"], num_nodes, cfg["seed"])

    os.environ.update(actor_threads(cfg))
    # Flower's link state, indexed by destination node: rounds stop growing with the
    # number of nodes (lepton_flwr.sim_linkstate says which Flower versions it covers).
    with fixed_features_stored(cfg, data):
        with population_flat_engine():
            run_simulation(
                # Every party is this machine: the runner also plays the key holder and
                # tests each decrypted model on the global test set (a deployment's server
                # cannot).
                server_app=make_server_app(
                    cfg, keyholder_secret=cfg["he"].get("secret_context_path")
                ),
                client_app=make_client_app(cfg),
                num_supernodes=num_nodes,
                backend_config=backend_config(cfg),
            )
        out = Path(cfg["output_dir"])
        if not (out / SUMMARY_FILE).is_file():
            raise RuntimeError(
                f"The run did not finish: no {SUMMARY_FILE} in {out}; see the log above."
            )
        if (out / ENCRYPTED_MODEL_FILE).is_file():
            add_keyholder_evaluation(cfg, out)
    return out


def add_keyholder_evaluation(cfg: dict, out: Path) -> None:
    """As the key holder, test the encrypted final model on the global test set.

    The metrics go into ``summary.json`` as ``keyholder_*`` (the server could not
    compute them) and are printed.
    """
    from lepton_flwr.apps.keyholder import evaluate_encrypted_model
    from lepton_flwr.apps.server import ENCRYPTED_MODEL_FILE
    from lepton_flwr.files import read_file, write_atomically
    from lepton_flwr.results import FILE_MODE, SUMMARY_FILE

    secret = cfg["he"]["secret_context_path"]
    metrics = evaluate_encrypted_model(cfg, out / ENCRYPTED_MODEL_FILE, secret)
    summary = json.loads(read_file(out / SUMMARY_FILE, 1 << 20))  # never through a link
    summary.update({f"keyholder_{k}": v for k, v in metrics.items()})
    write_atomically(out / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode(), FILE_MODE)
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    print(f"Key holder's test of the final model on the global test set: {shown}", file=sys.stderr)


def with_run_keys(he_cfg: dict, folder: Path) -> dict:
    """Fill in missing key paths with a key pair made for this run (simulation only).

    In a simulation every party runs on this machine, so the secret context lies in
    the run folder beside the public one; in a deployment only clients get it.
    """
    if he_cfg["secret_context_path"] and he_cfg["public_context_path"]:
        return he_cfg
    from lepton_flwr.he import CKKSParams, write_keys

    secret, public = write_keys(CKKSParams.from_config(he_cfg), folder)
    return {**he_cfg, "secret_context_path": str(secret), "public_context_path": str(public)}


@hydra.main(version_base="1.3", config_path="pkg://lepton_flwr.conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    """Hydra entry point: compose, then run one simulation per (multi)run job."""
    # Hydra gives the root logger a handler; Flower's logger has its own, so without this
    # every Flower line would be printed twice.
    logging.getLogger("flwr").propagate = False
    cfg = OmegaConf.to_container(dcfg, resolve=True)
    out = run_simulation_from_config(cfg, HydraConfig.get().runtime.output_dir)
    print(f"Results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
