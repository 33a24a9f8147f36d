"""Differential privacy: accounting of the rounds that happened, noise calibration."""

from lepton_flwr.dp.accounting import (
    ACCOUNTANTS,
    SAMPLINGS,
    ClientLevelAccountant,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    calibrate_noise_multiplier,
)
from lepton_flwr.dp.flower_accountant import LeptonAccountant, poisson_config

__all__ = [
    "ACCOUNTANTS",
    "SAMPLINGS",
    "ClientLevelAccountant",
    "LeptonAccountant",
    "PrivacyBudgetExhausted",
    "PrivacyConfigError",
    "calibrate_noise_multiplier",
    "poisson_config",
]
