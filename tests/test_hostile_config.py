"""A run's config is data, not code (issue 18, item 2).

Whoever launches a run (``flwr run``) chooses its ``hydra-overrides``; the ServerApp and
every ClientApp compose their config from them. Before, a filter looked at the raw
string (``"${" in overrides``, ``token.split("=")``) while Hydra received the shell-split
tokens: quoting or escaping hid ``${`` and key names, so a launcher could read a node's
environment back in an error reply (``${oc.env:VAR}``), choose ``dataset.root`` or the
key path, or add ``hydra.searchpath``. Now each token is parsed by Hydra's own parser and
checked against an allow-list, nothing is resolved, and refusals name keys, not values.
"""

import re
import shlex
import shutil

import numpy as np
import pytest
from conftest import client_message
from flwr.app import Array, ArrayRecord, Context, RecordDict
from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor
from omegaconf import OmegaConf

from lepton_flwr import config as config_module
from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.common import config_from_context
from lepton_flwr.config import (
    NODE_KEYS,
    RUN_KEYS,
    SERVER_KEYS,
    ConfigError,
    config_dir,
    config_groups,
    load_config,
    load_run_config,
)

SECRET = "node-secret-4711"  # the content of LEPTON_NODE_SECRET on the node
ENV = "oc.env:LEPTON_NODE_SECRET"
CHOSEN = "/srv/launcher-chosen"  # a path the launcher picks
# What no refusal may contain: the value sent, or anything read on the node.
NEVER_ECHOED = (SECRET, "LEPTON_NODE_SECRET", "oc.env", "launcher-chosen")


def _context(overrides, node_config=None):
    return Context(
        run_id=1,
        node_id=1,
        node_config=dict(node_config or {}),
        state=RecordDict(),
        run_config={"hydra-overrides": overrides},
    )


def _refusal(overrides, on_server=False):
    with pytest.raises(ConfigError) as err:
        config_from_context(_context(f"+experiment=digits_smoke {overrides}"), on_server)
    message = str(err.value)
    assert message.startswith("'hydra-overrides' refused:"), message
    assert not any(text in message for text in NEVER_ECHOED), message
    return message


# (the overrides as a launcher would type them in a shell, what the refusal names)
INTERPOLATIONS = [
    # Every form a shell accepts for ${...}, as shlex.split reads it.
    pytest.param(f"dataset.natural_id=${{{ENV}}}", "dataset.natural_id", id="bare"),
    pytest.param(f"dataset.natural_id='${{{ENV}}}'", "dataset.natural_id", id="shell-single"),
    pytest.param(f'dataset.natural_id="${{{ENV}}}"', "dataset.natural_id", id="shell-double"),
    pytest.param(f"\"dataset.natural_id='${{{ENV}}}'\"", "dataset.natural_id", id="hydra-single"),
    pytest.param(f"'dataset.natural_id=\"${{{ENV}}}\"'", "dataset.natural_id", id="hydra-double"),
    pytest.param(f"dataset.natural_id=$\\{{{ENV}\\}}", "dataset.natural_id", id="shell-escaped"),
    pytest.param(
        f"dataset.natural_id=\\$\\{{{ENV}\\}}", "dataset.natural_id", id="shell-escaped-dollar"
    ),
    pytest.param(f"'dataset.natural_id=\\${{{ENV}}}'", "dataset.natural_id", id="hydra-escaped"),
    pytest.param(
        f"'dataset.natural_id=$\\{{{ENV}\\}}'", "dataset.natural_id", id="hydra-escaped-braces"
    ),
    pytest.param(f"dataset.natural_id=a\"$\"'{{'{ENV}}}b", "dataset.natural_id", id="mixed-quotes"),
    pytest.param(f"d\"ataset.natu\"ral_id='${{{ENV}}}'", "dataset.natural_id", id="quoted-key"),
    pytest.param(f"'dataset.natural_id'=${{{ENV}}}", "dataset.natural_id", id="quoted-key-part"),
    pytest.param(f"train.lr=${{{ENV},0.1}}", "train.lr", id="with-default"),
    pytest.param(f"\"train.lr='${{oc.decode:${{{ENV}}}}}'\"", "train.lr", id="nested"),
    pytest.param("seed=${num_rounds}", "seed", id="config-reference"),
    pytest.param(f"'model.channels=[16,\"${{{ENV}}}\"]'", "model.channels.1", id="in-list"),
    pytest.param(f"'model.channels=[16,[${{{ENV}}}]]'", "model.channels.1.0", id="nested-list"),
    pytest.param(f"'model.channels={{a:\"${{{ENV}}}\"}}'", "model.channels.a", id="in-dict"),
    pytest.param(f"strategy=${{{ENV}}}", "strategy", id="group-choice"),
    pytest.param(f"output_dir=${{{ENV}}}", "output_dir", id="server-key"),
]


@pytest.mark.parametrize("on_server", [False, True], ids=["node", "server"])
@pytest.mark.parametrize(("overrides", "key"), INTERPOLATIONS)
def test_no_interpolation_reaches_the_config_in_any_quoting(overrides, key, on_server, monkeypatch):
    """Before: quoting or escaping hid ``${`` from the filter; the node resolved it."""
    monkeypatch.setenv("LEPTON_NODE_SECRET", SECRET)
    message = _refusal(overrides, on_server)
    assert f"{key} holds an interpolation" in message


def test_ansi_c_quoting_is_no_way_around_it(monkeypatch):
    """``$'...'`` is bash's, not POSIX's: shlex leaves ``$`` and Hydra cannot parse it."""
    monkeypatch.setenv("LEPTON_NODE_SECRET", SECRET)
    message = _refusal(f"dataset.natural_id=$'\\x24{{{ENV}}}'")
    assert "override 2 is not a Hydra override" in message


@pytest.mark.parametrize(
    "overrides",
    [f"'model.channels={{${{{ENV}}}:1}}'", f"train.lr=${{oc.decode:${{{ENV}}}}}"],
    ids=["dict-key", "unquoted-nested"],
)
def test_what_hydra_cannot_parse_is_refused_whole(overrides, monkeypatch):
    monkeypatch.setenv("LEPTON_NODE_SECRET", SECRET)
    assert "override 2 is not a Hydra override" in _refusal(overrides)


NODE_PATHS = [
    pytest.param(f"{prefix}{key}{value}", key, id=f"{prefix or 'set'}{key}")
    for key in NODE_KEYS
    for prefix, value in (("", f"={CHOSEN}"), ("+", f"={CHOSEN}"), ("++", f"={CHOSEN}"), ("~", ""))
] + [
    pytest.param(f"'dataset.root'={CHOSEN}", "dataset.root", id="quoted-key"),
    pytest.param(f"dataset\\.root={CHOSEN}", "dataset.root", id="escaped-dot"),
    pytest.param(f'"he.secret_context_path={CHOSEN}"', "he.secret_context_path", id="quoted"),
]


@pytest.mark.parametrize(("overrides", "key"), NODE_PATHS)
def test_no_run_chooses_a_path_on_the_nodes(overrides, key):
    """Before: ``'dataset.root'=/x`` passed the filter, and the node read from ``/x``."""
    message = _refusal(overrides)
    assert f"{key} is a path on the nodes" in message and "node config only" in message


HYDRA_AND_UNKNOWN = [
    pytest.param(f"hydra.searchpath=[file://{CHOSEN}]", "hydra.searchpath", id="searchpath"),
    pytest.param(f'"+hydra.searchpath=[file://{CHOSEN}]"', "hydra.searchpath", id="+searchpath"),
    pytest.param(f"++hydra.searchpath=[pkg://{CHOSEN}]", "hydra.searchpath", id="++searchpath"),
    pytest.param(f"hydra.run.dir={CHOSEN}", "hydra.run.dir", id="run-dir"),
    pytest.param("hydra.job.chdir=true", "hydra.job.chdir", id="chdir"),
    pytest.param("hydra/launcher=basic", "hydra/launcher", id="hydra-group"),
    pytest.param("+train.extra=1", "train.extra", id="new-key"),
    pytest.param("strategy.name=he_fedavg", "strategy.name", id="name-not-group"),
    pytest.param(
        "simulation.client_resources={num_cpus:1}", "simulation.client_resources", id="map"
    ),
]


@pytest.mark.parametrize("on_server", [False, True], ids=["node", "server"])
@pytest.mark.parametrize(("overrides", "key"), HYDRA_AND_UNKNOWN)
def test_hydra_settings_and_unknown_keys_are_refused(overrides, key, on_server):
    """Before: ``"+hydra.searchpath=[file:///x]"`` made nodes compose groups from ``/x``."""
    assert f"{key} is not a key a run may set" in _refusal(overrides, on_server)


OTHER_FORMS = [
    pytest.param("dataset@_global_=digits", "dataset@...", id="package-global"),
    pytest.param("privacy@_global_.privacy=client_dp", "privacy@...", id="package-other"),
    pytest.param("+dataset@x=digits", "dataset@...", id="package-add"),
    pytest.param(f"dataset=..{CHOSEN}", "dataset takes one of the packaged choices", id="path"),
    pytest.param(f"+experiment={CHOSEN}", "experiment takes one of", id="experiment-path"),
    pytest.param("'model=file:///srv/launcher-chosen'", "model takes one of", id="url"),
    pytest.param("++strategy=he_fedavg", "strategy takes one of", id="force-group"),
    pytest.param("~strategy", "~strategy: a run may not delete", id="delete-group"),
    pytest.param("~train.lr", "~train.lr: a run may not delete", id="delete-key"),
    pytest.param("++num_rounds=3", "num_rounds: a run changes existing keys only", id="++key"),
    pytest.param("num_rounds=1,2", "num_rounds: a run sets one value per key", id="sweep"),
    pytest.param("num_rounds=range(1,3)", "num_rounds: a run sets one value", id="range"),
    pytest.param("train.lr=nan", "train.lr takes a finite number", id="nan"),
    pytest.param("train.lr='0.1x'", "train.lr takes a finite number", id="string-number"),
    pytest.param("num_rounds=2.5", "num_rounds takes an integer", id="float-int"),
    pytest.param("model.channels=[16,true]", "model.channels takes a list of integers", id="bool"),
    pytest.param(f"dataset.natural_id={CHOSEN}", "dataset.natural_id takes a name", id="name"),
    pytest.param(f"output_dir=[{CHOSEN}]", "output_dir takes a path or null", id="server-kind"),
    pytest.param("dataset.natural_id=a=", "override 2 is not a Hydra override", id="unparsable"),
    pytest.param(f"'dataset.natural_id={CHOSEN}", "not a shell-quoted list", id="open-quote"),
]


@pytest.mark.parametrize(("overrides", "reason"), OTHER_FORMS)
def test_packages_group_paths_deletions_sweeps_and_kinds_are_refused(overrides, reason):
    assert reason in _refusal(overrides)


def test_hydras_own_errors_are_not_passed_through():
    """Hydra quotes the override (``To append to your config use +model.J=...``)."""
    message = _refusal("model.J=4711")  # digits_smoke's model, logreg, has no J
    assert "model.J is not a key of the chosen groups" in message and "4711" not in message
    message = _refusal("+model=cnn")  # the group is chosen already
    assert "ConfigCompositionException" in message and "cnn" not in message


def test_a_refused_value_is_not_quoted_back():
    """Locally the value helps; in an error that goes to the server it does not appear."""
    with pytest.raises(ConfigError, match="4711"):
        load_config("+experiment=digits_smoke train.batch_size=-4711")
    message = _refusal("train.batch_size=-4711")
    assert "train.batch_size must be >= 1" in message and "4711" not in message
    message = _refusal("model=scatnet model.J=4711")
    assert "model.J, model.L and model.groups do not fit" in message and "4711" not in message


def test_an_interpolation_in_the_packaged_tree_is_refused_before_resolving(tmp_path, monkeypatch):
    """The second check: whatever the overrides, nothing composed is resolved."""
    monkeypatch.setenv("LEPTON_NODE_SECRET", SECRET)
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    logreg = conf / "model" / "logreg.yaml"
    logreg.write_text(logreg.read_text() + f"hidden: ${{{ENV}}}\n")
    monkeypatch.setattr(config_module, "config_dir", lambda: conf)
    with pytest.raises(ConfigError, match="interpolation at model.hidden") as err:
        load_run_config("+experiment=digits_smoke")
    assert not any(text in str(err.value) for text in NEVER_ECHOED)


def test_a_node_reply_carries_the_reason_not_the_value(monkeypatch):
    """Through the ClientApp as Flower's engine runs it: the reply's reason is the one sent."""
    monkeypatch.setenv("LEPTON_NODE_SECRET", SECRET)
    overrides = f"+experiment=digits_smoke \"dataset.natural_id='${{{ENV}}}'\""
    context = _context(overrides, {"partition-id": 0, "num-partitions": 3})
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    message = client_message(arrays, {"server-round": 1})

    class Engine(VirtualClientEngineActor):
        """Flower's simulation actor, without Ray."""

    _, reply, _ = Engine().run(make_client_app, message, "0", context)
    assert reply.has_error() and "natural_id holds an interpolation" in reply.error.reason
    assert not any(text in reply.error.reason for text in NEVER_ECHOED)


# ---- what a run legitimately sends still composes -----------------------------------

KEYS = "he.public_context_path=/abs/keys/public.ctx"
DEPLOYED = (
    "+experiment=digits_smoke model=logreg num_rounds=3 strategy=he_dp_fedavg "
    "privacy.sampling=fixed privacy.sample_rate=1.0 privacy.delta=1e-3 round_timeout=30 "
    f"strategy.min_available_nodes=2 {KEYS}"
)
LEGITIMATE = [
    "",  # pyproject.toml's [tool.flwr.app.config] default
    "+experiment=digits_smoke num_rounds=5",  # docs/guides/running.md
    f"strategy=he_dp_fedavg {KEYS}",  # docs/guides/deployment.md
    f"{DEPLOYED} output_dir=/abs/runs/fault",  # tests/test_secure_deployment.py
    f"{DEPLOYED} output_dir=/abs/runs/restart checkpoint=true",
    f"{DEPLOYED} resume=/abs/runs/restart",
    "+experiment=digits_smoke output_dir=/abs/out strategy=he_dp_fedavg privacy.sampling=fixed "
    "privacy.sample_rate=1.0 privacy.delta=1e-3 privacy.noise_multiplier=0.5 "
    f"privacy.clip_norm=5 {KEYS}",  # tests/test_end_to_end.py
    "dataset=digits model=mlp model.hidden=[256] train.lr=0.2 seed=3 device=cpu",
    "dataset=digits model=cnn model.channels=[16,32] model.hidden=32 model.activation=tanh",
    "+experiment=main he.workers=2",
    "+experiment=fmnist_dpsgd privacy.target_epsilon=null privacy.noise_multiplier=1.1",
    "+experiment=loans_linreg dataset.natural_id=state",
    "+experiment=fmnist_dirichlet partition.alpha=0.1 'train.weight_decay=1e-4'",
    "strategy=dp_fedavg privacy.clipping=adaptive privacy.max_epsilon=8 privacy.seed=1",
]


@pytest.mark.parametrize("overrides", LEGITIMATE)
def test_legitimate_overrides_compose_as_they_do_locally(overrides):
    """The server's config is the runner's; a node's leaves out the server's settings."""
    assert config_from_context(_context(overrides), on_server=True) == load_config(overrides)
    for_nodes = [o for o in shlex.split(overrides) if o.split("=")[0] not in SERVER_KEYS]
    assert config_from_context(_context(overrides)) == load_config(for_nodes)


def test_a_node_never_holds_the_servers_paths():
    overrides = f"{DEPLOYED} output_dir=/abs/runs/x resume=/abs/runs/x he.workers=64"
    node = config_from_context(_context(overrides))
    assert node["output_dir"] is None and node["resume"] is None
    assert node["he"]["public_context_path"] is None and node["he"]["workers"] is None
    server = config_from_context(_context(overrides), on_server=True)
    assert server["output_dir"] == "/abs/runs/x" and server["he"]["workers"] == 64


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _packaged_settings():
    """Every (key path, value) the packaged YAML files set, ``hydra`` and names aside."""
    for file in sorted(config_dir().rglob("*.yaml")):
        tree = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
        tree.pop("defaults", None)
        tree.pop("hydra", None)
        is_global = file.parent == config_dir() or "@package _global_" in file.read_text()
        prefix = "" if is_global else f"{file.parent.name}."
        for key, value in _leaves(tree, prefix):
            if not key.endswith(".name"):
                yield file.relative_to(config_dir()), key, value


@pytest.mark.parametrize(("file", "key", "value"), list(_packaged_settings()))
def test_every_packaged_setting_is_classified_and_of_its_kind(file, key, value):
    """A key added to conf/ must be put in RUN_KEYS, SERVER_KEYS or NODE_KEYS; none holds ``${``."""
    assert isinstance(value, (int, float, bool, str, list, type(None))), (file, key)
    assert "${" not in str(value), (file, key)
    if key in NODE_KEYS:
        return
    kind = RUN_KEYS.get(key) or SERVER_KEYS.get(key)
    assert kind is not None, f"{file}: {key} is in no allow-list"
    assert kind.accepts(value), f"{file}: {key}={value!r} is not {kind.what}"


def test_every_packaged_choice_may_be_chosen():
    """A run may pick any packaged choice: it composes as locally, or fails its validation."""
    for group, choices in config_groups().items():
        for choice in choices:
            overrides = f"{'+' if group == 'experiment' else ''}{group}={choice}"
            try:
                expected = load_config(overrides)
            except ConfigError as err:
                with pytest.raises(ConfigError, match=re.escape(err.reason)):
                    config_from_context(_context(overrides))
            else:
                assert config_from_context(_context(overrides)) == expected, overrides
