"""A small labelled federation and model shared by the trainer tests (fast on one core)."""

import torch
from torch.utils.data import TensorDataset


def federation(sizes=(30, 50, 20, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, generator=g)
    out = []
    for n in sizes:
        x = torch.randn(n, 5, generator=g)
        out.append(TensorDataset(x, (x @ w).argmax(dim=1)))
    return out


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
