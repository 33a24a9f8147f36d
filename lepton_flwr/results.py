"""Write a run's outputs: resolved config, per-round metrics (CSV, JSON lines), plot, model."""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from lepton_flwr.config import to_yaml

CONFIG_FILE = "config.yaml"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
PLOT_FILE = "metrics.png"
MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"
LOG_FILE = "run.log"


class RunRecorder:
    """Keep a run's outputs up to date on disk, round by round.

    Each round is appended to ``metrics.jsonl`` and ``metrics.csv`` as soon as it ends,
    so a run that stops early (budget exhausted, crash, Ctrl-C) keeps what it did.

    Parameters
    ----------
    out_dir : str | Path
        The run's output folder; created if missing.
    cfg : dict
        The resolved config, written to ``config.yaml``.
    resume_after : int | None
        Continue a run stopped after this round: its rows up to that round are kept
        (later ones, written after the checkpoint, are dropped), the rest appended.
    """

    def __init__(self, out_dir: str | Path, cfg: dict[str, Any], resume_after: int | None = None):
        self.out_dir = Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / CONFIG_FILE).write_text(to_yaml(cfg))
        self.rows: list[dict[str, Any]] = []
        if resume_after is not None and (self.out_dir / METRICS_JSONL).is_file():
            lines = (self.out_dir / METRICS_JSONL).read_text().splitlines()
            self.rows = [row for row in map(json.loads, lines) if row["round"] <= resume_after]
        (self.out_dir / METRICS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._log_handler = logging.FileHandler(self.out_dir / LOG_FILE)
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("flwr").addHandler(self._log_handler)

    def close(self) -> None:
        """Stop copying Flower's log into the run folder."""
        logging.getLogger("flwr").removeHandler(self._log_handler)
        self._log_handler.close()

    def record(self, row: dict[str, Any]) -> None:
        """Append one round's metrics and rewrite the CSV (columns may grow)."""
        self.rows.append(row)
        with open(self.out_dir / METRICS_JSONL, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        with open(self.out_dir / METRICS_CSV, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> Path:
        """Save the final global model as a torch state dict."""
        path = self.out_dir / MODEL_FILE
        torch.save(state_dict, path)
        return path

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
        path = self.out_dir / PLOT_FILE
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write_summary(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json``: last round's metrics, median round time, total bytes.

        Its presence marks a run that finished. ``extra`` entries are added as they are.
        """
        summary: dict[str, Any] = {"rounds": len(self.rows), **(extra or {})}
        if self.rows:
            last = self.rows[-1]
            summary.update(
                {
                    k: v
                    for k, v in last.items()
                    if k.startswith(("central_", "federated_", "epsilon"))
                }
            )
            summary["median_round_seconds"] = statistics.median(
                r["round_seconds"] for r in self.rows
            )
            summary["bytes_down_total"] = sum(r["bytes_down"] for r in self.rows)
            summary["bytes_up_total"] = sum(r["bytes_up"] for r in self.rows)
        (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _has(self, key: str) -> bool:
        return any(_finite(r.get(key)) for r in self.rows)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
