"""Model and data: a small MLP on scikit-learn's bundled digits (offline, 8x8 images)."""

import torch
from sklearn.datasets import load_digits
from torch import nn

TRAIN_ROWS = 1400  # the first 1,400 of 1,797 images train, the rest are the test set


class Net(nn.Module):
    """Logistic regression: 64 pixels to 10 digits (650 weights, quick to encrypt)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        """Logits for a batch of flattened images."""
        return self.fc(x)


def load_data(partition_id=None, num_partitions=None):
    """A client's share of the training images, or the test set when no partition is given."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    if partition_id is None:
        return x[TRAIN_ROWS:], y[TRAIN_ROWS:]
    share = slice(int(partition_id), TRAIN_ROWS, int(num_partitions))
    return x[:TRAIN_ROWS][share], y[:TRAIN_ROWS][share]


def train(model, x, y, epochs, lr, batch_size=32):
    """Plain SGD; the last batch's loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    return loss.item()


def test(model, x, y):
    """Loss and accuracy on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    return loss, float((logits.argmax(1) == y).float().mean())
