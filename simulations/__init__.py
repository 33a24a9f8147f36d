"""Entry points: the Hydra simulation runner, sweeps, plots and benchmarks."""
