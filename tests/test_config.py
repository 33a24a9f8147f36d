import pytest
from flwr.app import Context, RecordDict

from lepton_flwr.apps.common import config_from_context
from lepton_flwr.config import ConfigError, load_config


def test_defaults_compose_to_the_main_job():
    cfg = load_config()
    assert cfg["strategy"]["name"] == "fedavg"
    assert cfg["dataset"]["name"] == "fashion_mnist"
    assert cfg["model"]["name"] == "cnn"
    assert cfg["partition"]["name"] == "iid"
    assert cfg["simulation"]["num_supernodes"] == 10
    assert "hydra" not in cfg
    assert {"strategy", "model", "dataset", "partition", "privacy", "he", "simulation"} <= set(cfg)


def test_overrides_as_one_string_or_a_list():
    as_string = load_config("dataset=digits model=logreg num_rounds=3 train.lr=0.2")
    as_list = load_config(["dataset=digits", "model=logreg", "num_rounds=3", "train.lr=0.2"])
    assert as_string == as_list
    assert as_string["num_rounds"] == 3 and as_string["train"]["lr"] == 0.2


def test_experiment_preset_sets_a_consistent_setup():
    cfg = load_config("+experiment=loans_linreg")
    assert (cfg["dataset"]["name"], cfg["model"]["name"], cfg["partition"]["name"]) == (
        "loans",
        "linreg",
        "natural",
    )
    assert cfg["simulation"]["num_supernodes"] is None


def test_main_job_is_he_plus_dp_with_many_clients():
    cfg = load_config("+experiment=main")
    assert (cfg["strategy"]["name"], cfg["he"]["name"], cfg["privacy"]["name"]) == (
        "he_dp_fedavg",
        "ckks",
        "client_dp",
    )
    assert cfg["privacy"]["target_epsilon"] == 3.0 and cfg["privacy"]["sampling"] == "poisson"
    assert cfg["simulation"]["num_supernodes"] == 1000


def test_unknown_strategy_group_choice_lists_the_choices():
    with pytest.raises(ConfigError, match="nope") as err:
        load_config("strategy=nope")
    assert "fedavg" in str(err.value)


@pytest.mark.parametrize(
    ("override", "group", "choice"),
    [
        ("strategy.name=nope", "strategy", "fedavg"),
        ("model.name=resnet", "model", "cnn"),
        ("dataset.name=cifar10", "dataset", "fashion_mnist"),
        ("partition.name=shards", "partition", "dirichlet"),
        ("device=tpu", "device", "cuda"),
    ],
)
def test_unknown_names_name_the_value_and_the_allowed_choices(override, group, choice):
    value = override.split("=")[1]
    with pytest.raises(ConfigError, match=f"Unknown {group} '{value}'") as err:
        load_config(override)
    assert choice in str(err.value)


@pytest.mark.parametrize("alpha", [0, -0.5])
def test_non_positive_dirichlet_alpha_is_refused(alpha):
    with pytest.raises(ConfigError, match=r"partition.alpha must be > 0"):
        load_config(f"partition=dirichlet partition.alpha={alpha}")


def test_model_dataset_mismatch_is_refused():
    with pytest.raises(ConfigError, match="linreg"):
        load_config("dataset=digits model=linreg")
    with pytest.raises(ConfigError, match="cnn"):
        load_config("dataset=loans model=cnn")


def test_bad_cnn_shape_or_activation_is_refused():
    with pytest.raises(ConfigError, match=r"model.activation 'sigmoid'.*relu, tanh"):
        load_config("model.activation=sigmoid")
    with pytest.raises(ConfigError, match=r"model.channels must be two positive ints"):
        load_config("model.channels=[16,0]")


def test_scatnet_options_that_do_not_fit_the_images_are_refused():
    with pytest.raises(ConfigError, match=r"'digits'.*model.J=3: image sides must be multiples"):
        load_config("dataset=digits model=scatnet model.J=3")
    with pytest.raises(ConfigError, match=r"model.groups=10 must divide the 81"):
        load_config("model=scatnet model.groups=10")
    with pytest.raises(ConfigError, match=r"scatnet needs image classification data"):
        load_config("dataset=diabetes model=scatnet")


def test_unknown_top_level_key_is_refused():
    with pytest.raises(ConfigError, match="num_round"):
        load_config("num_round=3")


def test_out_of_range_values_are_refused():
    with pytest.raises(ConfigError, match="num_rounds"):
        load_config("num_rounds=0")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config("train.lr=0")
    with pytest.raises(ConfigError, match="fraction_train"):
        load_config("strategy.fraction_train=1.5")


def _context(run_config):
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)


def test_run_config_overrides_reach_the_apps():
    cfg = config_from_context(_context({"hydra-overrides": "dataset=digits model=mlp"}))
    assert cfg["dataset"]["name"] == "digits" and cfg["model"]["name"] == "mlp"


def test_unknown_run_config_key_is_refused():
    with pytest.raises(KeyError, match="num-server-rounds"):
        config_from_context(_context({"hydra-overrides": "", "num-server-rounds": 3}))


def test_run_config_interpolations_are_never_resolved_on_a_node(monkeypatch):
    """Issue 12: ``${oc.env:VAR}`` in hydra-overrides sent a node's secrets back."""
    from flwr.app import Context, RecordDict

    from lepton_flwr.apps.common import config_from_context

    monkeypatch.setenv("LEPTON_TEST_SECRET", "do-not-leak")
    context = Context(
        run_id=1,
        node_id=1,
        node_config={},
        state=RecordDict(),
        run_config={"hydra-overrides": "dataset=${oc.env:LEPTON_TEST_SECRET}"},
    )
    with pytest.raises(ValueError, match="interpolation") as err:
        config_from_context(context)
    assert "do-not-leak" not in str(err.value)


def test_round_timeout_is_configurable_and_checked():
    assert load_config("round_timeout=120")["round_timeout"] == 120
    with pytest.raises(ConfigError, match="round_timeout must be > 0"):
        load_config("round_timeout=0")


def test_he_max_weight_ratio_reaches_hefedavg_and_is_checked(tmp_path):
    from lepton_flwr.apps.build import build_strategy
    from lepton_flwr.he import CKKSParams, write_keys

    _, public = write_keys(CKKSParams(), tmp_path)
    base = f"strategy=he_fedavg he=ckks he.public_context_path={public}"
    assert build_strategy(load_config(base)).max_weight_ratio == 10.0
    assert build_strategy(load_config(f"{base} he.max_weight_ratio=null")).max_weight_ratio is None
    loans = load_config(f"+experiment=loans_linreg {base}")  # California: 10.4x the median
    assert build_strategy(loans).max_weight_ratio == 20.0
    with pytest.raises(ConfigError, match="he.max_weight_ratio must be"):
        load_config(f"{base} he.max_weight_ratio=0.5")
