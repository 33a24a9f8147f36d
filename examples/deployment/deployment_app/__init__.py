"""Deployment example app: HE + DP with checkpoints, for TLS and SuperNode authentication."""
