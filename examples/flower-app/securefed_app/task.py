"""What server and nodes share: the protocol, the model, the data split and local training.

The settings that protect a node (``seed``, ``dp``, ``num-nodes``) are the node's own: a node
reads them from its ``node_config`` (:func:`node_settings`), never from the run config, which
the server side chooses; the server reads its copy from the run config, and nodes refuse a
round whose settings differ from theirs.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import securefed as sf

#: A node's settings when its ``--node-config`` leaves them out: no seed, DP on, a federation of 5 (of
#: ``num-partitions`` nodes when it sets that).
NODE_DEFAULTS: dict[str, Any] = {"seed": -1, "dp": True, "num-nodes": 5}


def node_settings(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """This node's ``seed``, ``dp`` and ``num-nodes``: from its node_config, else :data:`NODE_DEFAULTS`; without
    ``num-nodes``, its ``num-partitions`` (the federation size its data split assumes, also the node's own
    setting: a virtual SuperNode of the Simulation Engine has only ``partition-id`` and ``num-partitions``)."""
    defaults = dict(NODE_DEFAULTS)
    if "num-partitions" in node_config:
        defaults["num-nodes"] = node_config["num-partitions"]
    out = {k: node_config.get(k, v) for k, v in defaults.items()}
    if type(out["seed"]) is not int or type(out["dp"]) is not bool or type(out["num-nodes"]) is not int \
            or out["num-nodes"] < 1:
        raise sf.errors.ConfigurationError(
            f"node settings seed={out['seed']!r} dp={out['dp']!r} num-nodes={out['num-nodes']!r}: seed must be an "
            "int (-1: none), dp true or false, num-nodes a positive int (flower-supernode --node-config)")
    return out


def seed(config: Mapping[str, Any]) -> int | None:
    """The seed in `config` (a node's :func:`node_settings`, or the server's run config), or None (``seed = -1``):
    seeds are for tests and simulation only."""
    value = int(config["seed"])
    return None if value < 0 else value


#: The demo's DP-FedAvg (``securefed.demo``: DP_CLIP, DP_NOISE, DP_SERVER_LR), restated here so that
#: the nodes' protocol messages need not import torch: updates clipped to L2 norm CLIP, the noise in a
#: round's sum of ``num-nodes`` shares of std NOISE x CLIP, the server stepping SERVER_LR x the mean.
CLIP, NOISE, SERVER_LR = 0.3, 1.0, 3.0


def protocol(config: Mapping[str, Any]) -> sf.protocols.AggregationProtocol:
    """SecAgg+ (semi-honest server, up to 10% corrupt nodes, 10% dropouts); server and nodes build the same."""
    return sf.protocols.SecAggPlus()


PHASES = sf.protocols.SecAggPlus.phases


#: Federated evaluation's metrics and the bounds their values must keep (a node refuses one over its bound).
EVALUATE_METRICS = {"loss": 50.0, "accuracy": 1.0}


def privacy(config: Mapping[str, Any]) -> sf.privacy.DistributedDP | None:
    """Distributed discrete Gaussian noise added by the nodes inside SecAgg+ (None with ``dp = false``).

    Each node's share is provisioned for the threshold t of ``num-nodes``, as in the demo: a finished
    round sums at least t shares; the accountant counts the shares actually summed.
    """
    if not config["dp"]:
        return None
    n = int(config["num-nodes"])
    t = protocol(config).min_survivors(n)
    return sf.privacy.DistributedDP(noise_multiplier=NOISE * math.sqrt(t / n), clipping=CLIP)


def model():  # type: ignore[no-untyped-def]
    """The demo's 64-64-10 MLP, same initialisation everywhere."""
    from securefed.demo import make_model

    return make_model(0)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, read from its CSV without importing scikit-learn.

    Each message runs in a fresh process on a node; importing scikit-learn would add ~2 s to each.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the example needs scikit-learn's bundled digits: pip install scikit-learn")
    with gzip.open(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz") as f:
        raw = np.loadtxt(f, delimiter=",")
    return raw[:, :-1], raw[:, -1].astype(int)


def data(partition: int, partitions: int):  # type: ignore[no-untyped-def]
    """(this node's training set, the held-out test set): the demo's split of digits
    (``securefed.demo.digits_federation``: 20% held out, Dirichlet(0.5) over labels, seed 0)."""
    import torch
    from torch.utils.data import TensorDataset

    from securefed.demo import dirichlet_split

    pixels, labels = _digits()
    x = torch.tensor(pixels / 16.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    perm = np.random.default_rng(0).permutation(len(y))  # the data split is public, not secret
    test, rest = perm[: len(y) // 5], perm[len(y) // 5 :]
    part = rest[dirichlet_split(labels[rest], partitions, 0.5, 0)[partition]]
    return TensorDataset(x[part], y[part]), TensorDataset(x[test], y[test])


def test_set():  # type: ignore[no-untyped-def]
    """The held-out 20% of digits (the same for any number of partitions)."""
    return data(0, 2)[1]


def train_seed(config: Mapping[str, Any], server_round: int, partition: int) -> int | None:
    """Seed for a node's local shuffling in a round (None: unseeded run)."""
    s = seed(config)
    if s is None:
        return None
    from securefed.crypto.random import derive_key

    return int.from_bytes(derive_key(s.to_bytes(8, "big"), f"train/{server_round}/{partition}")[:8], "big") >> 1


def train(net, dataset, *, epochs: int, batch_size: int, lr: float, seed: int | None) -> float:  # type: ignore[no-untyped-def]
    """Local SGD on `dataset`; returns the mean training loss.

    Plain SGD written out: ``torch.optim`` imports ``torch._dynamo`` on first use (~2 s per
    process, and each message runs in a fresh process). One torch thread: bit-identical
    results in every process.
    """
    import torch
    from torch.utils.data import DataLoader

    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)
    params = [p for p in net.parameters() if p.requires_grad]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    total, count = 0.0, 0
    try:
        net.train()
        for _ in range(epochs):
            for xb, yb in loader:
                net.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(xb), yb)
                loss.backward()
                with torch.no_grad():
                    for p in params:
                        p.add_(p.grad, alpha=-lr)
                total += loss.item() * len(yb)
                count += len(yb)
    finally:
        torch.set_num_threads(threads)
    return total / max(count, 1)


def evaluate(net, dataset) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Loss and accuracy of `net` on `dataset`."""
    import torch

    net.eval()
    with torch.no_grad():
        xs, ys = dataset.tensors
        out = net(xs)
        return {"loss": float(torch.nn.functional.cross_entropy(out, ys)),
                "accuracy": float((out.argmax(dim=1) == ys).float().mean())}
