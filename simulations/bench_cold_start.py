"""Cold start of our ClientApp, against torch's own import, in fresh processes.

A SuperNode starts a fresh ``flwr-clientapp`` process for every message it receives, so
every message pays the interpreter's start, the imports and the first handling. This
benchmark times, side by side in one run (each case in turn, repeated, median):

- ``torch``: ``python -c "import torch"``, the floor any training process pays;
- ``torch+optim``: torch and one ``torch.optim.SGD``, whose construction imports
  ``torch._dynamo`` (about as long again): what any training with torch.optim pays;
- ``flwr``: ``python -c "import flwr.app, flwr.clientapp"``, what Flower's process pays
  before it loads an app;
- ``flwr+torch+optim``: both, the floor of any Flower ClientApp training with torch.optim;
- ``flwr+torch``: Flower and torch, the floor of a ClientApp training without torch.optim;
- ``import``: ``python -c "import lepton_flwr.apps.client"``, our ClientApp's module;
- ``train``: import, then one training message of the digits / logistic-regression
  config (``+experiment=digits_smoke model=logreg``, config read from the run config as
  under ``flwr run``), handled to its reply, its digits split read from a dataset cache
  (:mod:`lepton_flwr.data.dataset_cache`) that a warm-up message filled;
- ``train-before``: the same message the way it was handled before: no dataset cache
  (``LEPTON_FLWR_DATA_CACHE`` empty: scikit-learn loads and splits the digits) and
  ``torch.optim.SGD`` in place of :class:`~lepton_flwr.models.sgd.EagerSGD` (patched in
  the process), which imports ``torch._dynamo``;
- ``stage``: import, then one secure-aggregation ``advertise`` message of the CI
  deployment's HE + DP config (``strategy=he_dp_fedavg he.secure_aggregation=true``),
  handled to its reply.

Each process's wall time is measured from outside (start to exit); the handling cases
also report, from inside, how long the import and the handling took and which
libraries that only some configs need (``ON_DEMAND``) they imported. Ratios and seconds
are given against ``torch``.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m simulations.bench_cold_start [repeats]``
(default 7; at least 5).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN_OVERRIDES = "+experiment=digits_smoke model=logreg"
STAGE_OVERRIDES = (
    "+experiment=digits_smoke model=logreg strategy=he_dp_fedavg privacy.sampling=fixed "
    "privacy.sample_rate=1.0 privacy.delta=1e-3 strategy.min_available_nodes=3 "
    "he.secure_aggregation=true"
)
NODE_CONFIG = {"partition-id": 0, "num-partitions": 3}
ADVERTISE = {
    "lepton-secagg-stage": "advertise",
    "server-round": 1,
    "lepton-secagg.advertise.first_round": 1,
    "lepton-secagg.advertise.rounds": 64,
}
REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_CACHE_ENV = "LEPTON_FLWR_DATA_CACHE"  # lepton_flwr.data.dataset_cache.DATA_CACHE_ENV
ONE_OPTIMIZER = "torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)"
# Libraries that only some configs need: each handled message reports which it imported.
ON_DEMAND = (
    "torch",
    "torch._dynamo",
    "opacus",
    "kymatio",
    "sklearn",
    "scipy.stats",
    "dp_accounting",
    "datasets",
    "flwr_datasets",
    "pandas",
    "matplotlib",
)


def write_train_message(folder: Path) -> None:
    """The first round's training message of the digits config: the initial model."""
    import numpy as np

    from lepton_flwr.apps.common import model_for
    from lepton_flwr.config import load_config

    cfg = load_config(TRAIN_OVERRIDES)
    state = model_for(cfg).state_dict()
    np.savez(folder / "arrays.npz", **{k: v.numpy() for k, v in state.items()})
    message = {
        "config": {"server-round": 1},
        "node_config": NODE_CONFIG,
        "run_config": {"hydra-overrides": TRAIN_OVERRIDES},
    }
    (folder / "message.json").write_text(json.dumps(message))


def write_stage_message(folder: Path, secret_context: Path) -> None:
    """An ``advertise`` stage message (no model) to a node of the HE + DP config."""
    node_config = {**NODE_CONFIG, "he-secret-context": str(secret_context)}
    message = {
        "config": ADVERTISE,
        "node_config": node_config,
        "run_config": {"hydra-overrides": STAGE_OVERRIDES},
    }
    (folder / "message.json").write_text(json.dumps(message))


def write_stage_keys(folder: Path) -> Path:
    """The CKKS keys of the stage config, as a SuperNode holds them."""
    from lepton_flwr.config import load_config
    from lepton_flwr.he.keys import write_keys
    from lepton_flwr.he.params import CKKSParams

    cfg = load_config(STAGE_OVERRIDES)
    secret, _ = write_keys(CKKSParams.from_config(cfg["he"]), folder)
    return secret


def handle(folder: Path, before: bool = False) -> dict:
    """In a fresh process: import our ClientApp and handle the message in ``folder``.

    Returns the seconds the import and the handling took, which of ``ON_DEMAND`` the
    process imported, the reply's record names, whether training went through
    ``EagerSGD``, and a digest of the reply's arrays (if any); raises if the reply is an
    error (a benchmark of an error path is no benchmark). ``before``: train with
    ``torch.optim.SGD`` (the dataset cache is turned off by the caller's environment).
    """
    start = time.perf_counter()
    from lepton_flwr.apps.client import app

    imported = time.perf_counter()
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    spec = json.loads((folder / "message.json").read_text())
    content = {"config": ConfigRecord(spec["config"])}
    if (folder / "arrays.npz").exists():
        import numpy as np

        with np.load(folder / "arrays.npz") as arrays:
            content["arrays"] = ArrayRecord({k: Array(arrays[k]) for k in arrays.files})
    # Messages are built inside a running app; pretend to be one (as Flower's process is).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    msg = Message(RecordDict(content), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"
    context = Context(
        run_id=1,
        node_id=1,
        node_config=spec["node_config"],
        state=RecordDict(),
        run_config=spec["run_config"],
    )
    built = time.perf_counter()
    if before:
        _train_with_torch_optim()
    reply = app(msg, context)
    handled = time.perf_counter()
    if reply.has_error():
        raise RuntimeError(f"the reply is an error: {reply.error.reason}")
    return {
        "import_s": imported - start,
        "handle_s": handled - built,
        "imported": [name for name in ON_DEMAND if name in sys.modules],
        "reply": sorted(reply.content.keys()),
        "eager_sgd": not before and _trains_with_eager_sgd(),
        "arrays_digest": _digest(reply.content["arrays"]) if "arrays" in reply.content else None,
    }


def _digest(arrays) -> str:
    """A digest of a reply's arrays (names, dtypes, shapes and bytes): equal iff bit for bit."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name, array in sorted(arrays.items()):
        value = array.numpy()
        digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _trains_with_eager_sgd() -> bool:
    """Whether ``models.train`` (imported by the handled message) builds EagerSGD."""
    training = sys.modules.get("lepton_flwr.models.training")
    return training is not None and "EagerSGD" in vars(training)


def _train_with_torch_optim() -> None:
    """Make ``models.train`` build ``torch.optim.SGD`` again, as before EagerSGD."""
    import torch

    from lepton_flwr.models import training

    if hasattr(training, "EagerSGD"):
        training.EagerSGD = torch.optim.SGD


def _run(argv: list[str], env: dict) -> tuple[float, float, dict]:
    """Wall and CPU seconds of one fresh process, and what it printed (JSON) if anything."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *argv], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = done.stdout.strip().splitlines()
    inside = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return wall, cpu, inside


def main(repeats: int = 7) -> None:
    """Print each case's median wall and CPU time, and its ratio to ``import torch``."""
    if repeats < 5:
        raise ValueError("repeats: at least 5")
    base = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    module = "simulations.bench_cold_start"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "train").mkdir()
        (tmp / "stage").mkdir()
        write_train_message(tmp / "train")
        write_stage_message(tmp / "stage", write_stage_keys(tmp / "keys"))
        env = {**base, DATA_CACHE_ENV: str(tmp / "data-cache")}  # filled by the warm-up
        without_cache = {**base, DATA_CACHE_ENV: ""}
        train = ["-m", module, "--handle", str(tmp / "train")]
        cases = {
            "torch": (["-c", "import torch"], env),
            "torch+optim": (["-c", f"import torch\n{ONE_OPTIMIZER}"], env),
            "flwr": (["-c", "import flwr.app, flwr.clientapp"], env),
            "flwr+torch": (["-c", "import flwr.app, flwr.clientapp, torch"], env),
            "flwr+torch+optim": (
                ["-c", f"import flwr.app, flwr.clientapp, torch\n{ONE_OPTIMIZER}"],
                env,
            ),
            "import": (["-c", "import lepton_flwr.apps.client"], env),
            "train-before": ([*train, "--before"], without_cache),
            "train": (train, env),
            "stage": (["-m", module, "--handle", str(tmp / "stage")], env),
        }
        runs: dict[str, list] = {name: [] for name in cases}
        # Warm the file cache and bytecode; the first train message writes the digits split.
        first = _run(*cases["train"])
        for _ in range(repeats):
            for name, (argv, case_env) in cases.items():  # interleaved: load hits every case
                runs[name].append(_run(argv, case_env))
    print(f"first train message (dataset cache empty, written): {first[0]:.2f} s wall")
    _report(runs, repeats)


def _report(runs: dict[str, list], repeats: int) -> None:
    wall = {n: statistics.median(r[0] for r in rs) for n, rs in runs.items()}
    cpu = {n: statistics.median(r[1] for r in rs) for n, rs in runs.items()}
    print(
        f"Cold start in fresh processes, median of {repeats} ({os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}); beyond = seconds more than import torch"
    )
    print(f"{'case':16} {'wall s':>8} {'x torch':>8} {'beyond':>8} {'cpu s':>8} {'beyond':>8}")
    for name in runs:
        print(
            f"{name:16} {wall[name]:8.2f} {wall[name] / wall['torch']:8.2f} "
            f"{wall[name] - wall['torch']:+8.2f} {cpu[name]:8.2f} {cpu[name] - cpu['torch']:+8.2f}"
        )
    for name in ("train-before", "train", "stage"):
        inside = [r[2] for r in runs[name]]
        print(
            f"{name}: import {statistics.median(i['import_s'] for i in inside):.2f} s, "
            f"handling {statistics.median(i['handle_s'] for i in inside):.2f} s (inside the "
            f"process, median); imported: {', '.join(inside[0]['imported']) or 'none of'} "
            f"({', '.join(ON_DEMAND)})"
        )
    print(
        f"train: {wall['train-before']:.2f} s before -> {wall['train']:.2f} s "
        f"({wall['train-before'] / wall['train']:.2f}x); beyond torch's import "
        f"{wall['train-before'] - wall['torch']:+.2f} s -> {wall['train'] - wall['torch']:+.2f} s "
        f"(goal: at most +1.50 s); trained with EagerSGD: {runs['train'][0][2]['eager_sgd']}"
    )
    for floor in ("flwr+torch", "flwr+torch+optim"):
        print(
            f"train beyond {floor}: {wall['train'] - wall[floor]:+.2f} s wall, "
            f"{cpu['train'] - cpu[floor]:+.2f} s CPU"
        )


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--handle":
        print(json.dumps(handle(Path(sys.argv[2]), before=sys.argv[3:] == ["--before"])))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
