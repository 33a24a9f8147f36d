"""Audit what a configured strategy leaks: attack surface, canaries, membership, inversion.

``python -m simulations.audit <overrides>`` takes the same overrides as
``simulations.run`` (``strategy=he_dp_fedavg privacy.noise_multiplier=1.0 ...``) and runs,
with that strategy, its privacy settings and its client mods:

- record-level membership inference with shadow models (LiRA) on 400 digits, the
  models trained as the config's clients train (SGD, or DP-SGD with its noise);
- a client-level canary federation (``lepton_flwr.audit.canaries``): the one-run lower
  bound on ε next to the ε the strategy claims, and the canary scores as a client-level
  membership attack (ROC AUC, TPR at 0.1 % and 1 % FPR, ROC curve);
- update inversion by the server on one client's reply (one example, one step): PSNR of
  the reconstruction, or why there is none (ciphertexts);
- the attack surface: what that reply let the server read.

The report (``audit.json``, ``audit.md``, ``audit_roc.png``, ``audit_inversion.png``) goes
to ``output_dir`` (default ``outputs/<date>/<time>-audit-<strategy>``). What it audits is
the mechanism the config chooses, on synthetic canaries and one digits image, not the
configured dataset (LiRA on the configured dataset and model is not part of it yet).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from lepton_flwr.apps.build import build_client_mods, build_strategy
from lepton_flwr.audit.canaries import audit_client_level
from lepton_flwr.audit.inversion import invert_reply, one_client_reply, psnr
from lepton_flwr.audit.lira import lira_attack
from lepton_flwr.audit.scenarios import digits, one_example_client, shadow_training, small_mlp
from lepton_flwr.audit.surface import attack_surface
from lepton_flwr.config import load_config
from lepton_flwr.he import decrypt_arrays


def _with(cfg: dict, nodes: int, sampling_all: bool = False) -> dict:
    strategy = {**cfg["strategy"], "min_available_nodes": nodes}
    for key in ("min_train_nodes", "min_evaluate_nodes"):
        if key in strategy:
            strategy[key] = min(strategy[key], nodes)
    strategy["fraction_evaluate"] = 0.0
    privacy = dict(cfg["privacy"])
    if sampling_all:
        privacy.update(sampling="fixed", sample_rate=1.0)
    if cfg["strategy"]["name"] == "he_dp_fedavg" and sampling_all:
        strategy["tolerated_colluders"] = 0
    return {**cfg, "strategy": strategy, "privacy": privacy}


def inversion(cfg: dict, out: Path) -> dict:
    """The server's reconstruction of one client's single image, and what it saw."""
    strategy = build_strategy(_with(cfg, 1, sampling_all=True))
    arrays = ArrayRecord(small_mlp().state_dict())
    app_mods, train_mods = build_client_mods(cfg)
    privacy = cfg["privacy"]
    noise = float(privacy["noise_multiplier"] or 1.0) if privacy["name"] == "dpsgd" else None
    app, image = one_example_client(
        app_mods + train_mods, noise, float(privacy.get("max_grad_norm") or 1.0)
    )
    reply = one_client_reply(strategy, app, arrays)  # one reply serves both attacks
    surface = attack_surface([reply])
    (view,) = reply.content.array_records.values()
    outcome = invert_reply(view, arrays)
    if isinstance(outcome, str):
        return {"inversion_psnr": None, "inversion": outcome, "surface": surface}
    _save_images(image, outcome, out / "audit_inversion.png")
    return {"inversion_psnr": psnr(outcome, image), "inversion": "ran", "surface": surface}


def _save_images(truth: np.ndarray, reconstruction: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(4, 2.2))
    for ax, picture, title in zip(
        axes, (truth, reconstruction), ("client's image", "server's reconstruction"), strict=True
    ):
        ax.imshow(np.asarray(picture).reshape(8, 8), cmap="gray")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def canaries(cfg: dict, out: Path, count: int, others: int, rounds: int) -> dict:
    """The canary federation under the configured strategy and mods."""
    strategy = build_strategy(_with(cfg, count + others))
    app_mods, train_mods = build_client_mods(cfg)
    secret = cfg["he"].get("secret_context_path")
    dp = hasattr(strategy, "epsilon")
    audit = audit_client_level(
        strategy,
        strategy.epsilon if dp else (lambda: math.inf),
        float(cfg["privacy"].get("delta") or 1e-5),  # no DP claimed: bound stated at 1e-5
        float(cfg["privacy"].get("clip_norm") or 1.0),
        rounds,
        canaries=count,
        others=others,
        dim=2048 if secret else 4096,
        mods=app_mods + train_mods,
        decrypt=(lambda arrays: decrypt_arrays(arrays, secret)) if secret else None,
    )
    _save_roc(np.array(audit.pop("scores")), np.array(audit.pop("members")), out)
    return audit


def _save_roc(scores: np.ndarray, members: np.ndarray, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(members, scores)
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.loglog(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label="canary clients")
    ax.plot([1e-4, 1], [1e-4, 1], "k:", linewidth=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "audit_roc.png", dpi=120)
    plt.close(fig)


def record_level(cfg: dict, shadows: int = 8) -> dict:
    """LiRA on 400 digits: the target and shadows trained as the config's clients train."""
    privacy = cfg["privacy"]
    noise = float(privacy["noise_multiplier"] or 1.0) if privacy["name"] == "dpsgd" else None
    fit = shadow_training(noise, float(privacy.get("max_grad_norm") or 1.0))
    x, y = digits(400)
    figures = lira_attack(fit, x, y, shadows=shadows)
    report = {f"record_{key}": value for key, value in figures.items()}
    if noise is not None:  # DP-SGD claims a record-level ε: audit it with canary examples
        report |= record_canaries(noise, float(privacy.get("max_grad_norm") or 1.0), x, y)
    return report


def record_canaries(noise: float, max_grad_norm: float, x: np.ndarray, y: np.ndarray) -> dict:
    """The one-run ε lower bound for DP-SGD from 200 canary examples, beside its claim."""
    from lepton_flwr.audit.canaries import audit_record_level
    from lepton_flwr.dp.dpsgd import train_dpsgd

    def fit(xs, ys):
        model = small_mlp(256, 0)
        _, epsilon, _ = train_dpsgd(
            model, xs, ys, num_outputs=10, epochs=30, batch_size=32, lr=0.5, momentum=0.0,
            weight_decay=0.0, noise_multiplier=noise, max_grad_norm=max_grad_norm, delta=1e-5,
        )  # fmt: skip
        return model, epsilon

    audit = audit_record_level(fit, x, y, 1e-5)
    return {
        "record_claimed_epsilon": audit["claimed_epsilon"],
        "record_epsilon_lower_bound": audit["epsilon_lower_bound"],
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the audit for the configured strategy and write the report."""
    args = list(sys.argv[1:] if argv is None else argv)
    settings = {"canaries": 500, "others": 100, "rounds": 5}
    overrides = []
    for arg in args:
        key = arg.split("=", 1)[0].removeprefix("audit.")
        if arg.startswith("audit.") and key in settings:
            settings[key] = int(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = load_config(overrides)
    name = cfg["strategy"]["name"]
    out = Path(cfg["output_dir"] or f"outputs/{time.strftime('%Y-%m-%d/%H-%M-%S')}-audit-{name}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg["he"]["name"] == "ckks":
        from simulations.run import with_run_keys

        cfg["he"] = with_run_keys(cfg["he"], out / "keys")
    report = {"strategy": name, "privacy": cfg["privacy"]["name"]}
    report |= canaries(cfg, out, settings["canaries"], settings["others"], settings["rounds"])
    report |= inversion(cfg, out)
    report |= record_level(cfg)
    (out / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "audit.md").write_text(_markdown(report))
    print(_markdown(report))
    print(f"report: {out}", file=sys.stderr)
    return report


def _markdown(report: dict) -> str:
    psnr_text = (
        f"{report['inversion_psnr']:.1f} dB"
        if report["inversion_psnr"] is not None
        else report["inversion"]
    )
    lines = [
        f"# Privacy audit: {report['strategy']} ({report['privacy']})",
        "",
        "| claimed ε | ε lower bound (95 %) | canary AUC | TPR @ 0.1 % FPR | TPR @ 1 % FPR "
        "| inversion PSNR |",
        "|---|---|---|---|---|---|",
        f"| {report['claimed_epsilon']:.3g} | {report['epsilon_lower_bound']:.3g} "
        f"| {report['auc']:.3f} | {report['tpr_at_0.1%_fpr']:.3f} "
        f"| {report['tpr_at_1%_fpr']:.3f} | {psnr_text} |",
        "",
        f"Record-level membership (LiRA, 8 shadow models, 400 digits, clients' training): "
        f"AUC {report['record_auc']:.3f}, TPR @ 0.1 % FPR {report['record_tpr_at_0.1%_fpr']:.3f}"
        + (
            f"; DP-SGD canary examples: ε lower bound {report['record_epsilon_lower_bound']:.3g} "
            f"against the claimed {report['record_claimed_epsilon']:.3g}"
            if "record_epsilon_lower_bound" in report
            else ""
        ),
        "",
        "What the server can read in one client's training reply:",
        "",
        *[f"- {row['what']}" for row in report["surface"]],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
