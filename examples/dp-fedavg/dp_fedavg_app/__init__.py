"""DP-FedAvg example app: a quickstart-style Flower app with lepton-flwr added."""
