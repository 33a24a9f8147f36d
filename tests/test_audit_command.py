"""`python -m simulations.audit` writes a report that states the attack surface and results."""

import json

import pytest


@pytest.mark.parametrize(
    ("overrides", "surface", "inverted"),
    [
        (["strategy=fedavg"], "plaintext tensors", True),
        # q = 1: the 6 clients of a federation at the preset's q = 0.1 all stay unsampled
        # in both rounds with probability 0.28, and a federation that trains nothing fails
        (
            ["strategy=he_dp_fedavg", "privacy.noise_multiplier=1.0", "privacy.sample_rate=1.0"],
            "ciphertexts of",
            False,
        ),
    ],
)
def test_the_audit_command_reports_surface_bound_membership_and_inversion(
    tmp_path, overrides, surface, inverted
):
    from simulations.audit import main, table_row

    small = [
        "dataset=digits",
        "model=mlp",
        "audit.canaries=100",
        "audit.others=20",
        "audit.rounds=2",
        "audit.clients=12",
        "audit.examples=10",
        "audit.shadows=3",
        "audit.pool=100",
        "audit.epochs=3",
    ]
    report = main([*overrides, *small, f"output_dir={tmp_path}"])
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["strategy"] == report["strategy"]
    # counted over every reply of the 4 federations: each update in that form
    (row,) = [row for row in saved["surface"] if surface in row["what"]]
    assert row["replies"] == row["of"] > 0
    if not inverted:
        assert not any("plaintext" in row["what"] for row in saved["surface"])
    else:  # FedAvg samples all 6 clients of each federation in both rounds
        assert row["of"] == 4 * 6 * 2
    assert 0.0 <= saved["canary_auc"] <= 1.0 and (tmp_path / "audit_roc.png").is_file()
    assert 0.0 <= saved["client_auc"] <= 1.0 and saved["client_federations"] == 4
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    # The bound never passes its ceiling, and the report says whether "bound below the
    # claim" could fail at all (only where the claim is below the ceiling).
    assert saved["epsilon_lower_bound"] <= saved["epsilon_ceiling"]
    can_fail = saved["claimed_epsilon"] < saved["epsilon_ceiling"]
    assert saved["bound_below_claim_can_fail"] == can_fail
    if inverted:  # FedAvg: the server sees the update, the image comes back
        assert saved["inversion_psnr"] > 60 and (tmp_path / "audit_inversion.png").is_file()
        assert saved["inversion"] == "closed form"  # the MLP's first layer is linear
        assert saved["inversion_psnr"] > saved["inversion_baseline_psnr"] + 20
        assert saved["canary_auc"] > 0.9  # canaries without DP are plain to see
    else:  # HE + DP: ciphertexts only, and the canaries hide in the noise
        assert saved["inversion_psnr"] is None and "only ciphertexts" in saved["inversion"]
    assert 0.0 <= saved["record_auc"] <= 1.0  # LiRA ran on the clients' kind of training
    assert "| claimed ε |" in (tmp_path / "audit.md").read_text()
    assert table_row(saved) in (tmp_path / "audit.md").read_text()


def test_the_audit_command_refuses_a_regression_dataset_with_a_reason(tmp_path):
    from simulations.audit import main

    with pytest.raises(SystemExit, match="needs a classification dataset"):
        main(["+experiment=loans_linreg", f"output_dir={tmp_path}"])
