"""The ServerApp: builds the strategy from the config and runs Flower's ``Strategy.start``."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from lepton_flwr.apps.build import build_strategy
from lepton_flwr.apps.common import config_from_context, model_for, resumed_config
from lepton_flwr.apps.recording import RecordingGrid, RoundRows, timed_evaluation
from lepton_flwr.config import ConfigError
from lepton_flwr.data import load_dataset
from lepton_flwr.dp.accounting import NEIGHBOURING
from lepton_flwr.dp.dpsgd import DPSGD_NEIGHBOURING
from lepton_flwr.he.keyholder import keyholder_evaluate_fn, save_encrypted_arrays
from lepton_flwr.he.records import is_encrypted
from lepton_flwr.models import evaluate, resolve_device
from lepton_flwr.results import RunRecorder
from lepton_flwr.strategies import DPFedAvg, HEDPFedAvg
from lepton_flwr.strategies.checkpoint import CHECKPOINT_FILE, load_checkpoint
from lepton_flwr.strategies.round_loop import NoModelTrainedError, RoundObserver

ENCRYPTED_MODEL_FILE = "model.ckks.zip"


def default_output_dir(cfg: dict) -> Path:
    """``outputs/<date>/<time>-<strategy>-<dataset>`` under the current folder."""
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    return Path("outputs") / f"{stamp}-{cfg['strategy']['name']}-{cfg['dataset']['name']}"


# What a client-level ε is stated for, and what in the run folder it does not cover.
EPSILON_COVERS = (
    "whoever sees the released models and the run folder's public files (metrics.*, "
    "summary.json, the plot), not the server (it samples); not covered: server_only.jsonl, "
    "run.log and checkpoint.zip (owner-only files), keys/, client-state/ and the console, "
    "which show how many clients each round sampled"
)


def guarantee(cfg: dict) -> dict[str, str]:
    """What the run's ε means: the unit protected and the neighbouring relation."""
    privacy = cfg["privacy"]
    if privacy["name"] == "client_dp":
        return {
            "epsilon_unit": "client",
            "epsilon_neighbouring": NEIGHBOURING[privacy["sampling"]],
            "epsilon_covers": EPSILON_COVERS,
        }
    if privacy["name"] == "dpsgd":
        return {
            "epsilon_unit": "example (client_epsilon: each client's own data)",
            "epsilon_neighbouring": DPSGD_NEIGHBOURING,
        }
    return {}


def epsilon_side_by_side(strategy, cfg: dict) -> dict[str, float]:
    """ε of the run's releases by RDP and by PLD (Poisson sampling), whichever accounted."""
    if not isinstance(strategy, DPFedAvg | HEDPFedAvg) or strategy.accountant is None:
        return {}
    if cfg["privacy"]["sampling"] != "poisson":
        return {}
    delta = cfg["privacy"]["delta"]
    return {
        f"epsilon_{name}": strategy.accountant.epsilon_by(name, delta) for name in ("rdp", "pld")
    }


def withheld(strategy) -> dict[str, float]:
    """What rounds withheld for their counts add to δ ((1 + e^ε)·p; 0 when none can be)."""
    if not isinstance(strategy, DPFedAvg | HEDPFedAvg) or strategy.accountant is None:
        return {}
    return {"delta_withheld": strategy.delta_addition()}


def run_server(grid: Grid, cfg: dict, keyholder_secret: str | Path | None = None) -> Path:
    """Run a whole federated training as the config says; return the output folder.

    The strategy runs in Flower's own round loop (``strategy.start``). The held-out
    global test set is evaluated on the server after every round (central evaluation)
    for plaintext models, and for encrypted ones when ``keyholder_secret`` is given (the
    simulation runner, where every party is this machine, also plays the key holder; a
    deployment's server never gets the secret context). Clients evaluate on their own
    test splits (federated) where the strategy asks for it.
    Each round's row (metrics, privacy figures, bytes, seconds) is written as soon as
    the round ends.
    """
    cfg = resumed_config(cfg)
    out_dir = Path(cfg["output_dir"] or default_output_dir(cfg))
    checkpoint_dir = out_dir if cfg["checkpoint"] or cfg["resume"] else None
    resume_after = saved = None
    if cfg["resume"]:
        saved = load_checkpoint(out_dir)
        if saved is None:
            raise ConfigError(f"resume={out_dir}: no {CHECKPOINT_FILE} there to resume from")
        # A round checkpointed before its evaluation ended gets its row again.
        resume_after = saved.server_round - (not saved.evaluated)
        log(INFO, "[lepton] resuming %s after round %d", out_dir, saved.server_round)
    client_dp = cfg["privacy"]["name"] == "client_dp"
    recorder = RunRecorder(out_dir, cfg, resume_after, server_only=client_dp)
    try:
        log(INFO, "[lepton] output folder: %s", recorder.out_dir)
        if guarantee(cfg):
            log(INFO, "[lepton] epsilon is stated for: %s", guarantee(cfg))
        data = load_dataset(cfg["dataset"], cfg["seed"])
        torch.manual_seed(cfg["seed"])
        model = model_for(cfg, data)
        device = resolve_device(cfg["device"])

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            model.load_state_dict(arrays.to_torch_state_dict())
            metrics = evaluate(
                model, data.x_test, data.y_test, num_outputs=data.num_outputs, device=device
            )
            return MetricRecord(metrics)

        evaluate_fn = central_evaluate
        if keyholder_secret is not None:
            log(INFO, "[lepton] simulation: the runner tests each decrypted model as key holder")
            own_model = ArrayRecord(model.state_dict())  # names, shapes, dtypes: the key holder's
            evaluate_fn = keyholder_evaluate_fn(central_evaluate, keyholder_secret, own_model)
        strategy = build_strategy(cfg)
        recording = RecordingGrid(grid)
        failure = None
        with RoundObserver(strategy) as observer:
            rows = RoundRows(recording, observer, recorder.record, cfg["num_rounds"])
            if saved is not None and not saved.evaluated:
                train_metrics = saved.result.train_metrics_clientapp.get(saved.server_round)
                rows.reopen(saved.server_round, train_metrics)
            try:
                result = strategy.start(
                    recording,
                    ArrayRecord(model.state_dict()),
                    num_rounds=cfg["num_rounds"],
                    timeout=cfg["round_timeout"],
                    evaluate_fn=timed_evaluation(evaluate_fn, rows),
                    checkpoint_dir=checkpoint_dir,
                    # resume=<folder> may ask for more rounds (RESUME_MAY_CHANGE): on purpose
                    change_num_rounds=bool(cfg.get("resume")),
                )
            except NoModelTrainedError as err:  # keep the rounds' record, then fail the run
                result, failure = err.result, err
            rows.finish()
        final = result.arrays
        if is_encrypted(final):
            path = save_encrypted_arrays(final, recorder.out_dir / ENCRYPTED_MODEL_FILE)
            log(
                INFO,
                "[lepton] final model saved encrypted: %s (decrypt: lepton-flwr decrypt)",
                path,
            )
        else:
            recorder.save_model(final.to_torch_state_dict())
        recorder.plot()
        if failure is not None:
            raise failure  # no summary.json: the run did not finish
        extra = guarantee(cfg) | epsilon_side_by_side(strategy, cfg) | withheld(strategy)
        log(INFO, "[lepton] done: %s", recorder.write_summary(extra))
        log(INFO, "[lepton] metrics, plot and model in %s", recorder.out_dir)
    finally:
        recorder.close()
    return recorder.out_dir


def make_server_app(
    cfg: dict | None = None, keyholder_secret: str | Path | None = None
) -> ServerApp:
    """Build the ServerApp.

    Parameters
    ----------
    cfg : dict | None
        A composed config (the simulation runner passes it); None reads the
        ``hydra-overrides`` run-config key, as under ``flwr run``.
    keyholder_secret : str | Path | None
        The secret context, for a simulation whose runner also plays the key holder
        (see :func:`run_server`); never set under ``flwr run``.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg if cfg is not None else config_from_context(context, on_server=True)
        run_server(grid, config, keyholder_secret)

    return server_app


app = make_server_app()
