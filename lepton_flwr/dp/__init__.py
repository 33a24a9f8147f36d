"""Differential privacy: accounting of the rounds that happened, noise calibration."""

from lepton_flwr.dp.accounting import (
    ACCOUNTANTS,
    SAMPLINGS,
    ClientLevelAccountant,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    calibrate_noise_multiplier,
)

__all__ = [
    "ACCOUNTANTS",
    "SAMPLINGS",
    "ClientLevelAccountant",
    "PrivacyBudgetExhausted",
    "PrivacyConfigError",
    "calibrate_noise_multiplier",
]
