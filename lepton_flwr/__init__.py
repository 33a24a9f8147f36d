"""lepton-flwr: privacy-preserving federated learning plugins for Flower."""

__version__ = "0.1.0"
