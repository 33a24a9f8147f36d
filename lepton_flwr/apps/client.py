"""The ClientApp: local training and evaluation on the node's own partition.

A SuperNode starts a fresh process for every message, so this module imports what
every message needs (Flower, the config, the mods) and each handler imports the rest
when it runs: torch with the model, Opacus and the DP-SGD history with DP-SGD. Training
steps go through :class:`~lepton_flwr.models.sgd.EagerSGD` (``torch.optim.SGD``'s update
without the ``torch._dynamo`` import), and scikit-learn's datasets are read split from a
disk cache (:mod:`lepton_flwr.data.dataset_cache`) once a process has written it. A
secure-aggregation stage is answered by ``he_mod`` before any handler: it loads no data
and no model, and imports torch only where checking the run's config does (a noise
multiplier calibrated from a target epsilon: Opacus' accountants).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from logging import ERROR
from pathlib import Path

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from lepton_flwr import protocol
from lepton_flwr.apps.build import build_client_mods
from lepton_flwr.apps.common import config_from_context, model_for
from lepton_flwr.config import ConfigError
from lepton_flwr.data import ClientData, load_client_data, load_dataset
from lepton_flwr.dp.floor import BelowPrivacyFloorError, check_dpsgd_request, require_dpsgd
from lepton_flwr.mods.common import is_train

PARTITION_ID_KEY = protocol.PARTITION_ID
NUM_PARTITIONS_KEY = protocol.NUM_PARTITIONS

DataSource = Callable[[dict, int, int], ClientData]
"""(config, partition id, number of partitions) -> that client's data."""


def _node_partition(context: Context) -> tuple[int, int]:
    """Read this node's partition from its node config (set per SuperNode)."""
    node = context.node_config
    try:
        return int(node[PARTITION_ID_KEY]), int(node[NUM_PARTITIONS_KEY])
    except (KeyError, TypeError, ValueError) as err:
        reason = (
            f"the node config needs whole numbers {PARTITION_ID_KEY} and {NUM_PARTITIONS_KEY}: "
            f"start the SuperNode with --node-config 'partition-id=<i> num-partitions=<n>'"
        )
        raise ConfigError(reason, reason) from err


def node_device(context: Context, cfg: dict):
    """The torch device: the node config's ``device`` (cpu, cuda, auto), else the run's."""
    from lepton_flwr.models import resolve_device

    return resolve_device(str(context.node_config.get(protocol.DEVICE) or cfg["device"]))


def with_node_data_root(cfg: dict, context: Context) -> dict:
    """The config with the dataset's folder from the node config (``data-root``), if set.

    Where a node's data lies is the node's business: run-config overrides may not set
    it (see :func:`lepton_flwr.apps.common.config_from_context`).
    """
    root = context.node_config.get(protocol.DATA_ROOT)
    if not root or "root" not in cfg["dataset"]:
        return cfg
    return {**cfg, "dataset": {**cfg["dataset"], "root": str(root)}}


def _received_model(
    msg: Message, context: Context, cfg: dict, client_data: DataSource = load_client_data
):
    """Return the node's partition id and data, the dataset spec, and the received model."""
    partition_id, num_partitions = _node_partition(context)
    cfg = with_node_data_root(cfg, context)
    data = client_data(cfg, partition_id, num_partitions)
    spec = load_dataset(cfg["dataset"], cfg["seed"])
    model = model_for(cfg, spec)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return partition_id, data, spec, model


def _round_seed(cfg: dict, partition_id: int, server_round: int) -> int:
    """A seed per (run seed, client, round): reproducible, different across clients."""
    return (cfg["seed"] * 1_000_003 + partition_id * 10_007 + server_round) % (2**31)


def handle_train(
    msg: Message,
    context: Context,
    cfg: dict,
    client_data: DataSource = load_client_data,
    state_dir: Path | None = None,
) -> Message:
    """Train the received global model on the local split; reply with the new weights.

    ``state_dir``: where DP-SGD histories go when the node config has no ``state-dir``
    (the simulation runner's nodes; see :func:`make_client_app`).
    """
    from lepton_flwr.models import train

    partition_id, data, spec, model = _received_model(msg, context, cfg, client_data)
    server_round = int(msg.content["config"].get(protocol.SERVER_ROUND, 0))
    t = cfg["train"]
    device = node_device(context, cfg)
    seed = _round_seed(cfg, partition_id, server_round)
    options = dict(
        num_outputs=spec.num_outputs,
        epochs=t["local_epochs"],
        batch_size=t["batch_size"],
        lr=t["lr"],
        momentum=t["momentum"],
        weight_decay=t["weight_decay"],
        device=device,
        seed=seed,
    )
    metrics: dict = {}
    refusals = _node_refusals(cfg["privacy"])
    try:
        if cfg["privacy"]["name"] == "dpsgd":
            train_config = msg.content["config"]
            loss, metrics = _train_dpsgd(
                model, data, context, cfg, options, train_config, state_dir
            )
        else:
            require_dpsgd(context.node_config, cfg["privacy"])  # refuses under a DP-SGD floor
            loss = train(model, data.x_train, data.y_train, **options)
    except refusals as err:
        # Both depend on the node's state, never on the model: marked so that he_mod sends them.
        marker = "" if isinstance(err, BelowPrivacyFloorError) else protocol.FLOOR_REFUSAL
        reason = f"dpsgd: {marker}{err}"
        log(ERROR, reason)
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
        return Message(error, reply_to=msg)
    model.cpu()
    # Under DP the loss on the client's own data is outside ε: it stays on the client.
    if cfg["privacy"]["name"] == "none":
        metrics[protocol.TRAIN_LOSS] = loss
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({protocol.NUM_EXAMPLES: len(data.y_train), **metrics}),
        }
    )
    return Message(content, reply_to=msg)


def _node_refusals(privacy: dict) -> tuple[type[Exception], ...]:
    """The errors by which a node refuses to train for its own state, not the model's.

    Its privacy floor; under DP-SGD also a history it cannot read (imported here:
    :mod:`lepton_flwr.dp.client_state` brings SciPy, which other runs do not need).
    """
    if privacy["name"] != "dpsgd":
        return (BelowPrivacyFloorError,)
    from lepton_flwr.dp.client_state import LostHistoryError

    return (BelowPrivacyFloorError, LostHistoryError)


def train_dpsgd(*args, **kwargs):
    """:func:`lepton_flwr.dp.dpsgd.train_dpsgd`, imported at the first DP-SGD round (Opacus)."""
    from lepton_flwr.dp.dpsgd import train_dpsgd as dpsgd

    return dpsgd(*args, **kwargs)


def _train_dpsgd(
    model, data, context: Context, cfg: dict, options: dict, train_config, state_dir=None
) -> tuple[float, dict]:
    """DP-SGD for this round, continuing the node's accountant (``dp.client_state``).

    The node's history is kept by node and data (its ``state-dir`` and partition), not by
    run: the reply's ``client-epsilon`` and the node's privacy floor, checked before any
    training, are both the ε of the node's data over every run it keeps a history of,
    this round included. The node's lock on that data is held from reading the
    histories to saving the new one.
    """
    from lepton_flwr.dp.client_state import DPSGDHistory
    from lepton_flwr.dp.dpsgd import dpsgd_noise_multiplier, dpsgd_settings, epsilon_after_round

    privacy = cfg["privacy"]
    node_delta = require_dpsgd(context.node_config, privacy)  # default deny, the node's δ
    if (
        node_delta is not None
        and state_dir is None
        and not context.node_config.get(protocol.STATE_DIR)
    ):
        # Without a folder the history lives in one Flower run's context.state: a server
        # that starts another run would find the node's ε back at zero (attacker review).
        raise BelowPrivacyFloorError(
            f"this node sets a DP-SGD floor but no {protocol.STATE_DIR}: its ε would restart "
            f"with every Flower run the server starts; set {protocol.STATE_DIR} in the node "
            f"config (a folder that survives restarts)"
        )
    histories = DPSGDHistory(context, train_config, state_dir)
    with histories.locked():
        history = histories.this_run()
        others = histories.other_runs()
        z = dpsgd_noise_multiplier(
            privacy,
            len(data.y_train),
            options["batch_size"],
            cfg["num_rounds"] * options["epochs"],
        )
        if node_delta is not None:  # the node's floor, before training
            # RDP: a proven upper bound, quick at any z; the server chooses the run's
            # accountant, and Opacus' PRV took minutes for an extreme z.
            predicted = epsilon_after_round(
                others + history,
                z,
                len(data.y_train),
                options["batch_size"],
                options["epochs"],
                node_delta,
                "rdp",
            )
            check_dpsgd_request(context.node_config, z, predicted)
        loss, epsilon, history = train_dpsgd(
            model,
            data.x_train,
            data.y_train,
            noise_multiplier=z,
            history=history,
            earlier=others,
            **dpsgd_settings(privacy),
            **options,
        )
        histories.save(history)
    return loss, {protocol.CLIENT_EPSILON: epsilon, protocol.DPSGD_NOISE_MULTIPLIER: z}


def handle_evaluate(
    msg: Message, context: Context, cfg: dict, client_data: DataSource = load_client_data
) -> Message:
    """Evaluate the received global model on the local test split.

    A client with an empty test split reports zeros with weight 0, so that it
    leaves the weighted averages untouched.
    """
    from lepton_flwr.models import evaluate

    _, data, spec, model = _received_model(msg, context, cfg, client_data)
    n_test = len(data.y_test)
    metrics = evaluate(
        model,
        data.x_test,
        data.y_test,
        num_outputs=spec.num_outputs,
        device=node_device(context, cfg),
    )
    if n_test == 0:
        metrics = dict.fromkeys(metrics, 0.0)
    record = {f"eval-{k}": v for k, v in metrics.items()}
    record[protocol.NUM_EXAMPLES] = n_test
    return Message(RecordDict({"metrics": MetricRecord(record)}), reply_to=msg)


def replies_without_node_details(mod: Mod) -> Mod:
    """Turn whatever our ClientApp raises into an error reply that names no node detail.

    Flower sends an exception's text back to the server, and ours can name a node's files
    (a dataset folder that lacks a file), its data (a partition's size) or a value of a
    decrypted model. A :class:`ConfigError` sends its ``reason`` (the key and the rule);
    anything else its type only, and the node's log keeps the whole message.
    """

    @wraps(mod)
    def wrapped(msg: Message, context: Context, call_next) -> Message:
        try:
            return mod(msg, context, call_next)
        except ConfigError as err:
            reason = f"ConfigError: {err.reason}"
        except Exception as err:  # noqa: BLE001 - Flower would send its text to the server
            log(ERROR, "the ClientApp failed", exc_info=err)
            reason = (
                f"{type(err).__name__} on this node; its log has the reason (not sent: it may "
                f"name the node's files or data)"
            )
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
        return Message(error, reply_to=msg)

    return wrapped


def make_client_app(
    cfg: dict | None = None, client_data: DataSource = load_client_data
) -> ClientApp:
    """Build the ClientApp: our handlers, wrapped in the public mods the config needs.

    Parameters
    ----------
    cfg : dict | None
        A composed config (the simulation runner passes it); None reads the
        ``hydra-overrides`` run-config key, as under ``flwr run``.
    client_data : DataSource
        Where a node's data comes from: by default the config's partition of its
        dataset; the privacy audit gives clients chosen datasets.
    """

    def config(context: Context) -> dict:
        return cfg if cfg is not None else config_from_context(context)

    def configured_mods(msg: Message, context: Context, call_next) -> Message:
        """Run the config's mods (he_mod / he_dp_mod / dp_clip_mod) around the handler.

        Under ``flwr run`` the config arrives with the run, so the mods are chosen per
        message; they are the public ones a user would attach by hand.
        """
        # A config handed over in-process is a simulation (every party is this machine):
        # its clients evaluate encrypted models; under flwr run each node decides.
        app_mods, train_mods = build_client_mods(
            config(context), evaluate_encrypted=cfg is not None
        )
        mods = app_mods + (train_mods if is_train(msg) else [])
        return make_ffn(call_next, mods)(msg, context)

    client_app = ClientApp(mods=[replies_without_node_details(configured_mods)])
    # The runner's own config (a simulation, every node on its machine): DP-SGD histories
    # go to its run folder, so that a resumed simulation continues them. A config sent
    # with a run never chooses a node's paths.
    state_dir = None
    if cfg is not None and cfg.get("output_dir"):
        state_dir = Path(cfg["output_dir"]) / "client-state"

    @client_app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, config(context), client_data, state_dir)

    @client_app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, config(context), client_data)

    return client_app


app = make_client_app()
