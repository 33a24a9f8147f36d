"""The Flower ServerApp and ClientApp built from a composed config."""
