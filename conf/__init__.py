"""Packaged Hydra configs of lepton-flwr (installed as ``lepton_flwr.conf``)."""
