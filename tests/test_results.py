import csv
import json

import torch

from lepton_flwr.results import RunRecorder


def test_recorder_writes_config_metrics_plot_model_and_summary(tmp_path):
    rec = RunRecorder(tmp_path / "run", {"num_rounds": 2, "dataset": {"name": "digits"}})
    base = {"bytes_down": 10, "bytes_up": 5, "train_seconds": 0.5}
    rec.record({"round": 1, "central_loss": 1.0, "round_seconds": 2.0, **base})
    rec.record(
        {"round": 2, "central_loss": 0.5, "central_accuracy": 0.9, "round_seconds": 4.0, **base}
    )
    rec.save_model({"w": torch.ones(2)})
    assert rec.plot().stat().st_size > 1000
    summary = rec.write_summary()
    rec.close()

    out = tmp_path / "run"
    assert "digits" in (out / "config.yaml").read_text()
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert rows[1]["central_accuracy"] == "0.9" and rows[0]["central_accuracy"] == ""
    assert torch.equal(torch.load(out / "model.pt")["w"], torch.ones(2))
    assert summary["median_round_seconds"] == 3.0 and summary["bytes_up_total"] == 10
    assert json.loads((out / "summary.json").read_text())["central_loss"] == 0.5
