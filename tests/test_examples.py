"""The example apps in ``examples/`` stay runnable Flower apps (issue 21, "Examples to copy").

Cheap checks, for every example: its ``pyproject.toml`` is a valid Flower app config whose
components name its own package, its ServerApp and ClientApp import, every run-config key
the apps read is declared, and its README shows each of the pack's lines verbatim.

The slow test runs each example under ``flwr run`` (Flower's simulation, one detached
local SuperLink shared by all five, stopped at the end) and checks what the run left: the
decrypted or saved model beats chance on the held-out digits, ε grows round by round, and
the deployment example, started again on its checkpoint folder, returns its finished run
instead of training again.
"""

import importlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_end_to_end import _env, _free_port, _stop_processes

EXAMPLES_ROOT = REPO_ROOT / "examples"
# example folder -> (its package, simulated SuperNodes for `flwr run`, uses CKKS keys)
EXAMPLES = {
    "he-fedavg": ("he_fedavg_app", 5, True),
    "dp-fedavg": ("dp_fedavg_app", 20, False),
    "he-dp": ("he_dp_app", 20, True),
    "dp-sgd": ("dp_sgd_app", 5, False),
    "deployment": ("deployment_app", 3, True),
}
CHANCE = 0.1  # ten digits
# A run-config read in an app: ``context.run_config["x"]`` or ``config["x"]`` with
# ``config = context.run_config`` (not ``node_config``, not the message's "config"), or
# the key an output folder is read from (``output_folder(config, "x", ...)``).
RUN_CONFIG_READ = re.compile(
    r'(?<![\w.])(?:context\.run_config|config)\["([\w-]+)"\]'
    r'|output_folder\([\w.]+, "([\w-]+)"'
)


def _pyproject(name: str) -> dict:
    return tomllib.loads((EXAMPLES_ROOT / name / "pyproject.toml").read_text())


def test_the_examples_folder_holds_exactly_these_examples():
    found = {p.parent.name for p in EXAMPLES_ROOT.glob("*/pyproject.toml")}
    assert found == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_example_is_a_valid_flower_app_of_its_own_package(name):
    from flwr.cli.config_utils import load_and_validate

    # Raises on an invalid config; checks that the components' modules can be found.
    config, warnings = load_and_validate(EXAMPLES_ROOT / name / "pyproject.toml")
    assert not warnings, warnings
    package = EXAMPLES[name][0]
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": f"{package}.server_app:app",
        "clientapp": f"{package}.client_app:app",
    }
    for module in ("__init__", "task", "client_app", "server_app"):
        assert (EXAMPLES_ROOT / name / package / f"{module}.py").is_file(), module
    assert "lepton-flwr" in config["project"]["dependencies"]
    assert (EXAMPLES_ROOT / name / "README.md").is_file()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_example_imports_its_server_and_client_app(name, monkeypatch):
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    package = EXAMPLES[name][0]
    monkeypatch.syspath_prepend(str(EXAMPLES_ROOT / name))
    assert isinstance(importlib.import_module(f"{package}.server_app").app, ServerApp)
    assert isinstance(importlib.import_module(f"{package}.client_app").app, ClientApp)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_run_config_key_an_example_reads_is_declared(name):
    """A key read but not declared is a KeyError at the first round (an example that rots)."""
    package = EXAMPLES[name][0]
    declared = set(_pyproject(name)["tool"]["flwr"]["app"]["config"])
    read = set()
    for module in ("client_app", "server_app"):
        text = (EXAMPLES_ROOT / name / package / f"{module}.py").read_text()
        read |= {a or b for a, b in RUN_CONFIG_READ.findall(text)}
    assert {"out-dir", "checkpoint-dir"} & read, "the output folder's key was not found"
    assert read <= declared, read - declared


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_example_refuses_a_relative_output_folder(name, tmp_path, monkeypatch):
    """A relative path would put the files in the detached SuperLink's working folder."""
    package = EXAMPLES[name][0]
    monkeypatch.syspath_prepend(str(EXAMPLES_ROOT / name))
    output_folder = importlib.import_module(f"{package}.server_app").output_folder
    with pytest.raises(ValueError, match="out must be an absolute path, got 'run-1'"):
        output_folder({"out": "run-1"}, "out", name)
    assert output_folder({"out": str(tmp_path / "a")}, "out", name) == tmp_path / "a"
    assert (tmp_path / "a").is_dir()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert output_folder({"out": ""}, "out", name) == tmp_path / "lepton-flwr-examples" / name


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_example_readme_shows_the_packs_lines(name):
    """Every import from lepton_flwr, and the lines that use the pack, appear in the README."""
    package = EXAMPLES[name][0]
    readme = (EXAMPLES_ROOT / name / "README.md").read_text()
    for module in ("client_app", "server_app"):
        for line in (EXAMPLES_ROOT / name / package / f"{module}.py").read_text().splitlines():
            code = line.split("  #")[0].strip()
            if code.startswith("from lepton_flwr") or code.startswith("app = ClientApp(mods="):
                assert code in readme, f"{module}.py: {code}"


# ---- the examples under `flwr run` -----------------------------------------------------


class Federation:
    """`flwr run` of the examples on one detached local SuperLink, with one CKKS key pair."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.bin = Path(sys.executable).parent
        keys = folder / "keys"
        subprocess.run([str(self.bin / "lepton-flwr"), "keygen", "--out", str(keys)], check=True)
        self.secret, self.public = keys / "secret.ctx", keys / "public.ctx"
        self.http_port, control_port = _free_port(), _free_port()
        self.env = _env(
            FLWR_HOME=str(folder / "flwr-home"),
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(self.http_port),
            FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # this virtualenv, no `uv sync`
            OMP_NUM_THREADS="1",
        )

    def run(self, name: str, **settings: Path) -> str:
        """`flwr run examples/<name> --stream` with these run-config paths; its log.

        The keys join the run config of the examples that use them. Fails unless the run
        exited 0 and its log reports no failed run (`flwr run --stream` exits 0 for one).
        """
        config = {key.replace("_", "-"): value for key, value in settings.items()}
        if EXAMPLES[name][2]:
            config |= {"he-secret-context": self.secret, "he-public-context": self.public}
        proc = subprocess.run(
            [
                str(self.bin / "flwr"),
                "run",
                str(EXAMPLES_ROOT / name),
                "--stream",
                "--run-config",
                " ".join(f"{key}='{value}'" for key, value in config.items()),
                "--federation-config",
                f"num-supernodes={EXAMPLES[name][1]} client-resources-num-cpus=1",
            ],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,  # a hang guard only: a run takes well under a minute
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "Exit Code: 700" not in log, log[-4000:]
        return log

    def stop(self) -> None:
        """Stop the SuperLink this federation started (its command line names its port)."""
        _stop_processes(f"flower-superlink.*--port {self.http_port}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One SuperLink for every example run in this module, stopped at its end."""
    federation = Federation(tmp_path_factory.mktemp("examples"))
    added = [str(EXAMPLES_ROOT / name) for name in EXAMPLES]  # the examples' task modules
    sys.path[:0] = added
    try:
        yield federation
    finally:
        federation.stop()
        for path in added:
            sys.path.remove(path)


def _accuracy(name: str, state_dict) -> float:
    """The example's own test accuracy of a model state dict (held-out digits)."""
    module = importlib.import_module(f"{EXAMPLES[name][0]}.task")
    model = module.Net()
    model.load_state_dict(state_dict)
    return module.test(model, *module.load_data())[1]


def _increasing_epsilons(metrics: dict, key: str = "epsilon") -> list[float]:
    """The ε of rounds 1, 2, 3: each above the last, finite, under 100."""
    assert sorted(metrics, key=int) == ["1", "2", "3"], metrics
    epsilons = [metrics[r][key] for r in ("1", "2", "3")]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] < 100, epsilons
    return epsilons


def _check_he_fedavg(federation: Federation, out: Path) -> None:
    import torch  # noqa: F401  (Flower's to_torch_state_dict needs torch imported)

    from lepton_flwr.he import decrypt_arrays

    federation.run("he-fedavg", out_dir=out)
    model = decrypt_arrays(out / "model.ckks.zip", federation.secret).to_torch_state_dict()
    assert _accuracy("he-fedavg", model) > 0.8  # 0.85-0.9 measured


def _check_dp_fedavg(federation: Federation, out: Path) -> None:
    import torch

    federation.run("dp-fedavg", out_dir=out)
    results = json.loads((out / "results.json").read_text())
    _increasing_epsilons(results["train"])
    assert all(1e-3 <= m["delta"] < 1 for m in results["train"].values()), results
    assert _accuracy("dp-fedavg", torch.load(out / "model.pt")) > 2 * CHANCE


def _check_he_dp(federation: Federation, out: Path) -> None:
    import torch  # noqa: F401  (Flower's to_torch_state_dict needs torch imported)

    from lepton_flwr.he import decrypt_arrays

    federation.run("he-dp", out_dir=out)
    _increasing_epsilons(json.loads((out / "train_metrics.json").read_text()))
    model = decrypt_arrays(out / "model.ckks.zip", federation.secret).to_torch_state_dict()
    assert _accuracy("he-dp", model) > 2 * CHANCE


def _check_dp_sgd(federation: Federation, out: Path) -> None:
    import torch

    federation.run("dp-sgd", out_dir=out)
    results = json.loads((out / "results.json").read_text())
    # Each node's accountant continues across rounds: its ε grows with every round.
    _increasing_epsilons(results["train"], "client-epsilon")
    assert _accuracy("dp-sgd", torch.load(out / "model.pt")) > 0.5


def _check_deployment(federation: Federation, out: Path) -> None:
    import torch

    from lepton_flwr.he import decrypt_arrays

    settings = dict(checkpoint_dir=out, checkpoint_key=out.parent / f"{out.name}-key" / "ck.key")
    federation.run("deployment", **settings)
    assert (out / "checkpoint.zip").is_file()
    first = json.loads((out / "train_metrics.json").read_text())
    _increasing_epsilons(first)
    model = decrypt_arrays(out / "model.ckks.zip", federation.secret).to_torch_state_dict()
    # Started again on the same folder: the finished run is returned, not trained again
    # (a new run would draw new noise: a model far from this one).
    log = federation.run("deployment", **settings)
    assert "HEDPFedAvg round 1:" not in log, log[-4000:]
    assert json.loads((out / "train_metrics.json").read_text()) == first
    again = decrypt_arrays(out / "model.ckks.zip", federation.secret).to_torch_state_dict()
    for key, values in model.items():
        assert torch.allclose(values, again[key], atol=1e-2), key


CHECKS = {
    "he-fedavg": _check_he_fedavg,
    "dp-fedavg": _check_dp_fedavg,
    "he-dp": _check_he_dp,
    "dp-sgd": _check_dp_sgd,
    "deployment": _check_deployment,
}


def test_every_example_has_a_run_check():
    assert set(CHECKS) == set(EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs_under_flwr_run_and_its_result_holds(name, federation, tmp_path):
    CHECKS[name](federation, tmp_path / name)
