"""Write a run's outputs: resolved config, per-round metrics (CSV, JSON lines), plot, model."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from lepton_flwr.config import to_yaml
from lepton_flwr.files import open_for_append, read_file, write_atomically

CONFIG_FILE = "config.yaml"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
PLOT_FILE = "metrics.png"
MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"
LOG_FILE = "run.log"
SERVER_ONLY_JSONL = "server_only.jsonl"  # client-level DP: the operator's columns
# Columns that show how many clients a round sampled or heard from (counts, bytes, time):
# under client-level DP they stay out of the publishable files (the accountant's analysis
# does not cover a released |S|) and go to the operator's SERVER_ONLY_JSONL.
SERVER_ONLY_COLUMNS = (
    "clients_sampled",
    "train_failures",
    "bytes_down",
    "bytes_up",
    "train_seconds",
    "server_eval_seconds",
    "round_seconds",
)
PRIVATE_MODE = 0o600
CLIENT_EPSILON = "client_epsilon"  # the metrics column of the clients' DP-SGD ε


MAX_METRICS_BYTES = 1 << 28  # 256 MiB of rows read back on resume
FILE_MODE = 0o644


class RunRecorder:
    """Keep a run's outputs up to date on disk, round by round.

    Each round is written to ``metrics.jsonl`` and ``metrics.csv`` as soon as it ends,
    so a run that stops early (budget exhausted, crash, Ctrl-C) keeps what it did. No
    file of the run folder is written, or read back, through a symbolic link planted
    there: each is written to a new file renamed over the old one, the log is opened
    with ``O_NOFOLLOW`` (:mod:`lepton_flwr.files`).

    Parameters
    ----------
    out_dir : str | Path
        The run's output folder; created if missing.
    cfg : dict
        The resolved config, written to ``config.yaml``.
    resume_after : int | None
        Continue a run stopped after this round: its rows up to that round are kept
        (later ones, written after the checkpoint, are dropped), the rest appended.
    server_only : bool
        Client-level DP: the columns of :data:`SERVER_ONLY_COLUMNS` (how many clients
        each round sampled or heard from, bytes, seconds) leave ``metrics.*`` and
        ``summary.json`` for ``server_only.jsonl``, and that file and ``run.log`` (which
        holds the server's count lines and Flower's) are readable by the owner only.

    Raises
    ------
    ValueError
        If ``resume_after`` is given and ``metrics.jsonl`` is not rows this recorder
        wrote (naming the file and line).
    OSError
        If a file of the run folder is a link (``UnsafeFileError``) or cannot be written.
    """

    def __init__(
        self,
        out_dir: str | Path,
        cfg: dict[str, Any],
        resume_after: int | None = None,
        server_only: bool = False,
    ):
        self.out_dir = Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.out_dir / CONFIG_FILE, to_yaml(cfg).encode(), FILE_MODE)
        self._run_delta = (cfg.get("privacy") or {}).get("delta")  # the clients' ε's δ
        self.server_only = server_only
        self.rows: list[dict[str, Any]] = []  # every column; see _write_rows
        rows_file = self.out_dir / (SERVER_ONLY_JSONL if server_only else METRICS_JSONL)
        if resume_after is not None and rows_file.exists():
            rows = _read_rows(rows_file)
            self.rows = [row for row in rows if row["round"] <= resume_after]
        self._write_rows()
        log_mode = PRIVATE_MODE if server_only else FILE_MODE
        self._log_handler = logging.StreamHandler(
            open_for_append(self.out_dir / LOG_FILE, log_mode)
        )
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("flwr").addHandler(self._log_handler)

    def close(self) -> None:
        """Stop copying Flower's log into the run folder."""
        logging.getLogger("flwr").removeHandler(self._log_handler)
        self._log_handler.close()
        self._log_handler.stream.close()

    def record(self, row: dict[str, Any]) -> None:
        """Add one round's metrics to the JSON lines and the CSV (columns may grow)."""
        self.rows.append(row)
        self._write_rows()

    @property
    def public_rows(self) -> list[dict[str, Any]]:
        """The rows as ``metrics.*`` show them (without the operator's columns under DP)."""
        if not self.server_only:
            return self.rows
        return [{k: v for k, v in r.items() if k not in SERVER_ONLY_COLUMNS} for r in self.rows]

    def _write_rows(self) -> None:
        if self.server_only:
            lines = "".join(json.dumps(r) + "\n" for r in self.rows)
            write_atomically(self.out_dir / SERVER_ONLY_JSONL, lines.encode(), PRIVATE_MODE)
        rows = self.public_rows
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        write_atomically(self.out_dir / METRICS_JSONL, lines.encode(), FILE_MODE)
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_atomically(self.out_dir / METRICS_CSV, table.getvalue().encode(), FILE_MODE)

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> Path:
        """Save the final global model as a torch state dict."""
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        return write_atomically(self.out_dir / MODEL_FILE, buffer.getvalue(), FILE_MODE)

    def plot(self) -> Path | None:
        """Plot loss and accuracy (or R²) per round, central and federated, to a PNG."""
        if not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [
            ("loss", ["central_loss", "federated_loss", "train_loss"]),
            ("accuracy", ["central_accuracy", "federated_accuracy"]),
            ("R²", ["central_r2", "federated_r2"]),
            ("ε spent", ["epsilon", "client_epsilon"]),
        ]
        panels = [(t, [k for k in keys if self._has(k)]) for t, keys in panels]
        panels = [(t, keys) for t, keys in panels if keys]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        for ax, (title, keys) in zip(axes[0], panels, strict=True):
            for key in keys:
                points = [(r["round"], r[key]) for r in self.rows if _finite(r.get(key))]
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key)
            ax.set_xlabel("round")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, format="png", dpi=120)
        plt.close(fig)
        return write_atomically(self.out_dir / PLOT_FILE, image.getvalue(), FILE_MODE)

    def write_summary(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json``: last round's metrics, median round time, total bytes.

        Its presence marks a run that finished. ``extra`` entries are added as they are.
        The last round's ``epsilon`` and ``delta`` (client-level DP); under DP-SGD,
        ``client_epsilon`` is the largest ε any client reported in the run (each client's
        is cumulative; a client absent from the last round may hold the largest), at
        ``client_delta``, the run's δ.
        """
        summary: dict[str, Any] = {"rounds": len(self.rows), **(extra or {})}
        if self.rows:
            last = self.rows[-1]
            summary.update(
                {
                    k: v
                    for k, v in last.items()
                    if k.startswith(("central_", "federated_", "epsilon")) or k == "delta"
                }
            )
            if not self.server_only:  # under DP they show |S|: server_only.jsonl has them
                summary["median_round_seconds"] = statistics.median(
                    r["round_seconds"] for r in self.rows
                )
                summary["bytes_down_total"] = sum(r["bytes_down"] for r in self.rows)
                summary["bytes_up_total"] = sum(r["bytes_up"] for r in self.rows)
            clients = [r[CLIENT_EPSILON] for r in self.rows if _number(r.get(CLIENT_EPSILON))]
            if clients:
                summary[CLIENT_EPSILON] = max(clients)
                summary["client_delta"] = self._run_delta
        text = json.dumps(summary, indent=2) + "\n"
        write_atomically(self.out_dir / SUMMARY_FILE, text.encode(), FILE_MODE)
        return summary

    def _has(self, key: str) -> bool:
        return any(_finite(r.get(key)) for r in self.rows)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _number(value: Any) -> bool:
    """A number (+inf included: an unreadable client ε counts as +inf), not NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``, each an object with a whole ``round``.

    Raises
    ------
    ValueError
        Naming the file and line of the first that is not.
    """
    text = read_file(path, MAX_METRICS_BYTES).decode("utf-8", errors="replace")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict) or type(row.get("round")) is not int:
            raise ValueError(f"{path}, line {number}: not a row of this run's metrics")
        rows.append(row)
    return rows
