"""Empirical privacy audits: what an attacker actually learns from a run."""
