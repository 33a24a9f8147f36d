"""Audit what a configured run leaks: attack surface, ε lower bound, membership, inversion.

``python -m simulations.audit <overrides>`` takes the same overrides as
``simulations.run`` (``strategy=he_dp_fedavg privacy.noise_multiplier=1.0 ...``) and
attacks that configuration, on its dataset, with its model, its clients' training, its
strategy and its client mods (the ``audit.rounds`` rounds replace ``num_rounds``, so a
noise calibrated to ``target_epsilon`` is calibrated for the audited run):

- client-level membership inference (LiRA over whole client datasets): ``audit.shadows
  + 1`` federations of half of a pool of ``audit.clients`` clients with
  ``audit.examples`` examples each (:mod:`lepton_flwr.audit.federations`); the released
  models' test accuracy;
- the one-run lower bound on the client-level ε with ``audit.canaries`` canary clients
  among ``audit.others`` ordinary ones (:mod:`lepton_flwr.audit.canaries`), beside the ε
  the strategy claims and the bound's ceiling (what it would be were every guess right:
  a claim at or above it cannot be refuted, and the report says so);
- record-level membership inference (LiRA, ``audit.shadows + 1`` models trained as the
  clients train, ``audit.epochs`` epochs on halves of ``audit.pool`` examples) and, under
  DP-SGD, the one-run bound with ``audit.record_canaries`` canary examples against
  DP-SGD's claimed ε (and its ceiling);
- update inversion by the server on one client's reply (one example, one step): closed
  form where the first layer is linear, gradient matching otherwise
  (``audit.steps``); PSNR, or why there is none (ciphertexts);
- the attack surface: what the server read in every training reply of those
  federations (per client, per round, counted from the real messages).

The report (``audit.json``, ``audit.md``, ``audit_roc.png``, ``audit_inversion.png``)
goes to ``output_dir`` (default ``outputs/<date>/<time>-audit-<strategy>``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from lepton_flwr.apps.build import build_client_mods
from lepton_flwr.audit.canaries import audit_client_level, audit_record_level
from lepton_flwr.audit.epsilon import comparison_can_fail
from lepton_flwr.audit.federations import client_membership, strategy_for
from lepton_flwr.audit.inversion import attack_one_client, inversion_method, psnr
from lepton_flwr.audit.lira import lira_attack
from lepton_flwr.audit.scenarios import audit_pool, fit_as_configured
from lepton_flwr.config import load_config
from lepton_flwr.data import load_dataset
from lepton_flwr.he import decrypt_arrays


def inversion(cfg: dict, out: Path, steps: int) -> dict:
    """The server's reconstruction of one client's single example."""
    outcome, example, reply = attack_one_client(cfg, steps)
    if isinstance(outcome, str):
        return {"inversion_psnr": None, "inversion": outcome}
    _save_images(example, outcome, out / "audit_inversion.png")
    (view,) = reply.content.array_records.values()
    data = load_dataset(cfg["dataset"], cfg["seed"])
    return {
        "inversion_psnr": psnr(outcome, example),
        "inversion": inversion_method(view, example.shape),
        # what a guess that knows no client scores: the mean of 1,000 training inputs
        "inversion_baseline_psnr": psnr(data.x_train[:1000].mean(axis=0), example),
    }


def _save_images(truth: np.ndarray, reconstruction: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(4, 2.2))
    for ax, picture, title in zip(
        axes, (truth, reconstruction), ("client's image", "server's reconstruction"), strict=True
    ):
        ax.imshow(np.asarray(picture).reshape(truth.shape[-2:]), cmap="gray")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def canaries(cfg: dict, curves: dict, count: int, others: int, rounds: int) -> dict:
    """The canary federation under the configured strategy and mods (its ROC in ``curves``)."""
    strategy = strategy_for(cfg, count + others)
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
    curves["canary clients"] = (audit.pop("scores"), audit.pop("members"))
    return {
        "claimed_epsilon": audit["claimed_epsilon"],
        "epsilon_lower_bound": audit["epsilon_lower_bound"],
        "epsilon_ceiling": audit["epsilon_ceiling"],
        "bound_below_claim_can_fail": comparison_can_fail(
            audit["claimed_epsilon"], audit["epsilon_ceiling"]
        ),
        "canaries": count,
        **{f"canary_{key}": audit[key] for key in ("auc", "tpr_at_0.1%_fpr", "tpr_at_1%_fpr")},
    }


def clients(cfg: dict, curves: dict, settings: dict) -> dict:
    """Client-level LiRA with shadow federations, and the released models' accuracy."""
    secret = cfg["he"].get("secret_context_path")
    figures = client_membership(
        cfg,
        clients=settings["clients"],
        examples=settings["examples"],
        shadows=settings["shadows"],
        rounds=settings["rounds"],
        decrypt=(lambda arrays, like: decrypt_arrays(arrays, secret, like)) if secret else None,
    )
    curves["client LiRA"] = (figures.pop("scores"), figures.pop("members"))
    accuracy, surface = figures.pop("test_accuracy"), figures.pop("surface")
    figures.pop("claimed_epsilon")  # the same mechanism and rounds as the canaries' run
    return {
        "test_accuracy": accuracy,
        "surface": surface,
        **{f"client_{k}": v for k, v in figures.items()},
    }


def _save_roc(curves: dict, out: Path) -> None:
    """Each attack's ROC curve (log-log, where low false-positive rates show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    for label, (scores, members) in curves.items():
        fpr, tpr, _ = roc_curve(members, scores)
        ax.loglog(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=label)
    ax.plot([1e-4, 1], [1e-4, 1], "k:", linewidth=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "audit_roc.png", dpi=120)
    plt.close(fig)


def record_level(cfg: dict, settings: dict) -> dict:
    """LiRA on examples of the configured dataset, models trained as the clients train."""
    x, y, data = audit_pool(cfg, settings["pool"], seed=1)
    fit = fit_as_configured(cfg, settings["epochs"])
    figures = lira_attack(fit, x, y, shadows=settings["shadows"])
    figures.pop("claimed_epsilon")
    report = {f"record_{key}": value for key, value in figures.items()}
    if cfg["privacy"]["name"] == "dpsgd":  # a record-level ε is claimed: audit it
        audit = audit_record_level(
            fit, x, y, data, float(cfg["privacy"]["delta"]), canaries=settings["record_canaries"]
        )
        report["record_claimed_epsilon"] = audit["claimed_epsilon"]
        report["record_epsilon_lower_bound"] = audit["epsilon_lower_bound"]
        report["record_epsilon_ceiling"] = audit["epsilon_ceiling"]
        report["record_bound_below_claim_can_fail"] = comparison_can_fail(
            audit["claimed_epsilon"], audit["epsilon_ceiling"]
        )
        report["record_canaries"] = settings["record_canaries"]
    return report


SETTINGS = {
    "canaries": 500,
    "others": 100,
    "rounds": 5,
    "clients": 40,
    "examples": 50,
    "shadows": 8,
    "pool": 500,
    "epochs": 20,
    "steps": 400,
    "record_canaries": 500,
}
"""The audit's own settings (``audit.<name>=<int>`` on the command line)."""


def main(argv: list[str] | None = None) -> dict:
    """Run the audit for the configured strategy and write the report."""
    args = list(sys.argv[1:] if argv is None else argv)
    settings = dict(SETTINGS)
    overrides = []
    for arg in args:
        key = arg.split("=", 1)[0].removeprefix("audit.")
        if arg.startswith("audit.") and key in settings:
            settings[key] = int(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = {**load_config(overrides), "num_rounds": settings["rounds"]}
    if load_dataset(cfg["dataset"], cfg["seed"]).num_outputs < 2:
        raise SystemExit(
            f"dataset={cfg['dataset']['name']}: the audit's attacks score class "
            "confidences; it needs a classification dataset (regression is not audited)."
        )
    name = cfg["strategy"]["name"]
    out = Path(cfg["output_dir"] or f"outputs/{time.strftime('%Y-%m-%d/%H-%M-%S')}-audit-{name}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg["he"]["name"] == "ckks":
        from simulations.run import with_run_keys

        cfg["he"] = with_run_keys(cfg["he"], out / "keys")
    report = {
        "strategy": name,
        "privacy": cfg["privacy"]["name"],
        "privacy_setting": privacy_setting(cfg["privacy"]),
    }
    curves: dict = {}
    report |= canaries(cfg, curves, settings["canaries"], settings["others"], settings["rounds"])
    report |= clients(cfg, curves, settings)
    _save_roc(curves, out)
    report |= inversion(cfg, out, settings["steps"])
    report |= record_level(cfg, settings)
    (out / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "audit.md").write_text(_markdown(report))
    print(_markdown(report))
    print(f"report: {out}", file=sys.stderr)
    return report


TABLE_HEADER = (
    "| strategy | privacy | test accuracy | claimed ε | ε lower bound (95 %) | ε ceiling "
    "| client MIA AUC | TPR @ 0.1 % FPR | TPR @ 1 % FPR | record MIA AUC | inversion PSNR |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def privacy_setting(privacy: dict) -> str:
    """The privacy config in a few words: its name and its noise (or ε target)."""
    if privacy["name"] == "none":
        return "none"
    if privacy.get("noise_multiplier") is not None:
        return f"{privacy['name']}, z = {privacy['noise_multiplier']:g}"
    return f"{privacy['name']}, target ε = {privacy['target_epsilon']:g}"


def table_row(report: dict) -> str:
    """One report as a row under :data:`TABLE_HEADER`.

    Under DP-SGD the ε columns are the record-level ones (its claim, and the bound from
    canary examples): DP-SGD claims nothing about whole clients. The ceiling is the bound
    had every guess been right; "bound below the claim" tests a claim only below it.
    """
    psnr_text = (
        f"{report['inversion_psnr']:.1f} dB ({report['inversion']})"
        if report["inversion_psnr"] is not None
        else "none: ciphertexts only"
    )
    if "record_claimed_epsilon" in report:
        epsilons = (
            f"{report['record_claimed_epsilon']:.3g} (record) "
            f"| {report['record_epsilon_lower_bound']:.3g} (record) "
            f"| {report['record_epsilon_ceiling']:.3g} (record)"
        )
    else:
        epsilons = (
            f"{report['claimed_epsilon']:.3g} | {report['epsilon_lower_bound']:.3g} "
            f"| {report['epsilon_ceiling']:.3g}"
        )
    return (
        f"| {report['strategy']} | {report['privacy_setting']} "
        f"| {report['test_accuracy']:.3f} | {epsilons} "
        f"| {report['client_auc']:.3f} | {report['client_tpr_at_0.1%_fpr']:.3f} "
        f"| {report['client_tpr_at_1%_fpr']:.3f} | {report['record_auc']:.3f} | {psnr_text} |"
    )


def can_fail_line(claimed: float, ceiling: float, canaries: int) -> str:
    """Whether "bound below the claim" tested anything: only a claim below the ceiling."""
    if comparison_can_fail(claimed, ceiling):
        return (
            f"can fail: the claimed {claimed:.3g} is below the ceiling {ceiling:.3g}, so a "
            f"mechanism that leaked more than it claims could be caught"
        )
    return (
        f"cannot fail: the claimed {claimed:.3g} is not below the ceiling {ceiling:.3g} (the "
        f"bound with every guess right, {canaries} canaries), so the bound is below the claim "
        f"whatever the mechanism does; audit a smaller ε or use more canaries"
    )


def _markdown(report: dict) -> str:
    record_bound = (
        f" DP-SGD canary examples ({report['record_canaries']}): record-level ε lower bound "
        f"{report['record_epsilon_lower_bound']:.3g} against the claimed "
        f"{report['record_claimed_epsilon']:.3g}; 'bound < claim' "
        + can_fail_line(
            report["record_claimed_epsilon"],
            report["record_epsilon_ceiling"],
            report["record_canaries"],
        )
        + "."
        if "record_epsilon_lower_bound" in report
        else ""
    )
    lines = [
        f"# Privacy audit: {report['strategy']} ({report['privacy']})",
        "",
        TABLE_HEADER,
        table_row(report),
        "",
        f"- test accuracy: median of the {report['client_federations']} released models of "
        f"the client-level attack (each trained by {report['client_clients'] // 2} clients "
        f"of {report['client_examples_per_client']} examples); claimed ε: what the strategy "
        f"reports for the audited rounds (inf: no DP claimed).",
        f"- ε lower bound: one-run audit with {report['canaries']} canary clients (canary AUC "
        f"{report['canary_auc']:.3f}, TPR @ 0.1 % FPR {report['canary_tpr_at_0.1%_fpr']:.3f}); "
        f"ε ceiling: the bound had every guess been right.",
        "- client level, 'bound < claim' "
        + can_fail_line(report["claimed_epsilon"], report["epsilon_ceiling"], report["canaries"])
        + ".",
        *(
            [
                f"- inversion: the dataset's mean input scores "
                f"{report['inversion_baseline_psnr']:.1f} dB against the same example."
            ]
            if report.get("inversion_baseline_psnr") is not None
            else []
        ),
        "- client MIA: LiRA over whole client datasets, every federation the target of the "
        "others; record MIA: LiRA over examples, models trained as the clients train."
        + record_bound,
        "",
        "What the server read in the training replies of the client-level attack's "
        "federations (every client, every round):",
        "",
        *[
            f"- {row['what']} ({row['replies']} of {row['of']} replies)"
            for row in report["surface"]
        ],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
