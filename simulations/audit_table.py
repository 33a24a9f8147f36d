"""The audit table of docs/guides/audit.md: every strategy audited on Fashion-MNIST, one row each.

``python -m simulations.audit_table`` runs :mod:`simulations.audit` for each row below
on the same base setup (Fashion-MNIST, a small CNN of 55,000 weights, clients that train
5 local epochs on 50 images each) and writes ``docs/audit_fashion_mnist.md``; extra
arguments (``audit.shadows=4`` ...) go to every row. It takes about half an hour on two
cores; each row's full report stays in ``outputs/audit_table/<row>``.

``--rows he_dp_fedavg_z2,dpsgd_eps3`` reruns only those rows: the others keep the
reports stored in ``docs/audit_fashion_mnist.json`` (each with the commit it ran at),
from which the markdown table is rewritten.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from simulations.audit import TABLE_HEADER, main, table_row

BASE = [
    "dataset=fashion_mnist",
    "model=cnn",
    "model.channels=[16,32]",
    "model.hidden=32",
    "train.local_epochs=5",
    "train.batch_size=16",
    "train.lr=0.01",  # 0.05 (the default) with 5 local epochs: averaged CNNs fall to chance
]
ROWS = {
    "fedavg": ["strategy=fedavg"],
    "he_fedavg": ["strategy=he_fedavg"],
    "dp_fedavg_z0.5": ["strategy=dp_fedavg", "privacy.noise_multiplier=0.5"],
    "dp_fedavg_z1": ["strategy=dp_fedavg", "privacy.noise_multiplier=1.0"],
    "dp_fedavg_z2": ["strategy=dp_fedavg", "privacy.noise_multiplier=2.0"],
    "he_dp_fedavg_z1": ["strategy=he_dp_fedavg", "privacy.noise_multiplier=1.0"],
    # z = 2: a claim (about 3.1) below the bound's ceiling (4.43 with 500 canaries)
    "he_dp_fedavg_z2": ["strategy=he_dp_fedavg", "privacy.noise_multiplier=2.0"],
    "dpsgd_eps3": ["strategy=fedavg", "privacy=dpsgd", "privacy.target_epsilon=3.0"],
}
STORED = Path("docs/audit_fashion_mnist.json")
"""Every row's report (without its ROC scores), keyed by row name."""


def _commit() -> str:
    """The code's commit (``+dirty`` if the working tree differs from it)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True)
    return head.stdout.strip() + ("+dirty" if dirty.returncode else "")


def run(
    extra: list[str], rows: list[str] | None = None, folder: Path = Path("outputs/audit_table")
) -> str:
    """Audit the given rows (all by default); return the markdown table (also in docs/)."""
    rows = list(ROWS) if rows is None else rows
    unknown = [name for name in rows if name not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; the rows are {list(ROWS)}")
    stored = json.loads(STORED.read_text()) if STORED.is_file() else {}
    commit = _commit()  # the code was imported now: later commits by others do not run
    for name in rows:
        report = main([*BASE, *ROWS[name], *extra, f"output_dir={folder / name}"])
        stored[name] = {**report, "commit": commit, "extra": extra}
        STORED.write_text(json.dumps(stored, indent=2) + "\n")
        print(f"done: {name}", file=sys.stderr, flush=True)
    return write_table(stored)


def write_table(stored: dict, path: Path = Path("docs/audit_fashion_mnist.md")) -> str:
    """The stored rows, in :data:`ROWS` order, as markdown at ``path``; return the table."""
    missing = [name for name in ROWS if name not in stored]
    if missing:
        raise SystemExit(f"no report for rows {missing}: run them with --rows")
    table = "\n".join([TABLE_HEADER, *(table_row(stored[name]) for name in ROWS)]) + "\n"
    runs = "\n".join(
        f"- {name}: commit {stored[name]['commit']}"
        + (f", extra `{' '.join(stored[name]['extra'])}`" if stored[name].get("extra") else "")
        for name in ROWS
    )
    path.write_text(
        f"# Privacy audit on Fashion-MNIST\n\n`python -m simulations.audit_table`; setup: "
        f"`{' '.join(BASE)}`. ε ceiling: the bound had every guess been right; where the "
        f"claimed ε is not below it, 'bound < claim' cannot fail. Reports: "
        f"`{STORED}`.\n\n{table}\nEach row ran at:\n\n{runs}\n"
    )
    return table


def _arguments(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(extra overrides, rows to rerun or None for all) from ``--rows a,b`` and the rest."""
    rows, extra = None, []
    arguments = iter(argv)
    for arg in arguments:
        if arg == "--rows":
            rows = next(arguments, "").split(",")
        elif arg.startswith("--rows="):
            rows = arg.removeprefix("--rows=").split(",")
        else:
            extra.append(arg)
    return extra, rows


if __name__ == "__main__":
    extra_arguments, chosen = _arguments(sys.argv[1:])
    print(run(extra_arguments, chosen))
