"""The demo: federated training on scikit-learn's bundled handwritten digits, no download.

1,797 8x8 digit images; 20% held out for evaluation; the rest split non-IID across
10 participants with a seeded Dirichlet(alpha=0.5) over labels; a small MLP.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from securefed.errors import ConfigurationError
from securefed.privacy import CentralDP, DistributedDP
from securefed.protocols.base import AggregationProtocol
from securefed.protocols.plain import Plain

__all__ = ["DemoResult", "demo_privacy", "digits_federation", "make_model", "make_protocol", "run_demo"]

PROTOCOLS = ("plain", "secagg", "secagg+", "ckks", "bfv")


def make_protocol(name: str) -> AggregationProtocol:
    """The demo's configuration of protocol `name` (one of ``PROTOCOLS``)."""
    if name == "plain":
        return Plain()
    if name == "ckks":
        from securefed.protocols.he import CKKS

        return CKKS()  # a separate decryptor holds the key; inputs within +-100
    if name in ("secagg", "secagg+"):
        from securefed.protocols.secagg import SecAgg, SecAggPlus

        # Threat model: the defaults (10% corrupt, 10% dropouts); updates within +-4 at 20 bits
        # (the MLP's updates stay within +-1, and the appended weight is at most 1).
        return (SecAgg if name == "secagg" else SecAggPlus)(value_range=4.0, value_bits=20)
    if name == "bfv":
        from securefed.protocols.he import BFV

        # Updates of the demo's MLP stay within +-1 (the appended weight is at most 1).
        return BFV(value_range=4.0, value_bits=20)
    if name not in PROTOCOLS:
        raise ConfigurationError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    raise ConfigurationError(f"protocol {name!r} is not available in this version of securefed")


#: The demo's DP-FedAvg: every update clipped to L2 norm DP_CLIP; the noised sum of all participants
#: carries noise of std DP_NOISE x DP_CLIP per coordinate; the server steps DP_SERVER_LR x the mean.
DP_CLIP, DP_NOISE, DP_SERVER_LR = 0.3, 1.0, 3.0


def demo_privacy(protocol: AggregationProtocol, clients: int) -> CentralDP | DistributedDP:
    """The demo's client-level DP: distributed discrete Gaussian inside SecAgg/SecAgg+, central Gaussian otherwise.

    Inside masking protocols each client's noise share is provisioned for the protocol's threshold
    t of `clients` (a finished round sums at least t shares); the multiplier DP_NOISE * sqrt(t / clients)
    gives the sum of all participants the central configuration's noise. The accountant counts the
    shares actually summed, so a round with dropouts reports the larger epsilon it costs.
    """
    if protocol.name in ("secagg", "secagg+"):
        t = protocol.min_survivors(clients)
        return DistributedDP(noise_multiplier=DP_NOISE * math.sqrt(t / clients), clipping=DP_CLIP)
    return CentralDP(noise_multiplier=DP_NOISE, clipping=DP_CLIP)


def dirichlet_split(labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 10) -> list[np.ndarray]:
    """Indices per client: for each label, Dirichlet(alpha) proportions over clients (seeded; not secret)."""
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * idx.size).astype(int)[:-1]
            for c, piece in enumerate(np.split(idx, cuts)):
                parts[c].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p)) for p in parts]
    raise ConfigurationError(f"could not split into {clients} clients of >= {min_size} examples")


def digits_federation(clients: int = 10, alpha: float = 0.5, seed: int = 0) -> tuple[list[Dataset], Dataset]:
    """(participant datasets, held-out test set) from sklearn's bundled digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigurationError("the demo needs scikit-learn: pip install 'securefed[demo]'") from e
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    parts = dirichlet_split(digits.target[train], clients, alpha, seed)
    datasets: list[Dataset] = [TensorDataset(x[train[p]], y[train[p]]) for p in parts]
    return datasets, TensorDataset(x[test], y[test])


def make_model(seed: int = 0) -> nn.Module:
    """A 64-64-10 MLP with a fixed initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """Summary of a demo run."""

    accuracy: float
    protocol: str
    rounds: int
    upload_bytes_per_client: float
    epsilon: float | None
    seconds: float
    #: With DP: the delta of ``epsilon`` and the mechanism, e.g. "client-level, central Gaussian".
    delta: float | None = None
    privacy: str = ""


def run_demo(
    rounds: int = 20,
    protocol: str = "secagg+",
    dp: bool = True,
    seed: int = 0,
    *,
    progress: bool = True,
    on_round: Callable[[object], None] | None = None,
    clients: int = 10,
    audit_log: str | os.PathLike[str] | None = None,
    reproducible_secrets: bool = False,
) -> DemoResult:
    """Train the demo federation and return its summary; `audit_log` writes a signed audit log there.

    `seed` fixes the data split, the model's initialisation and local shuffling; the noise, the
    sampling and the protocol's keys and masks come from the OS unless `reproducible_secrets`
    (simulation only: the epsilon is then void, see :class:`~securefed.training.Trainer`).
    """
    from securefed.training import Trainer

    proto = make_protocol(protocol)
    privacy = demo_privacy(proto, clients) if dp else None
    datasets, test = digits_federation(clients=clients, seed=seed)
    trainer = Trainer(
        make_model(seed), datasets, protocol=proto, local_epochs=2, batch_size=16, lr=0.1,
        eval_dataset=test, seed=seed, reproducible_secrets=reproducible_secrets, progress=progress, on_round=on_round,
        audit_log=audit_log,
        privacy=privacy, server_lr=DP_SERVER_LR if dp else 1.0,
    )
    t0 = time.perf_counter()
    try:
        history = trainer.fit(rounds=rounds)
    finally:
        if trainer.audit is not None:
            trainer.audit.close()
    final = history.final
    return DemoResult(
        accuracy=final.metrics["eval_accuracy"],
        protocol=proto.name,
        rounds=rounds,
        upload_bytes_per_client=float(np.mean([r.metrics["upload_bytes_per_client"] for r in history.rounds])),
        epsilon=final.epsilon,
        seconds=time.perf_counter() - t0,
        delta=None if privacy is None else privacy.delta,
        privacy="" if privacy is None else "client-level, " + (
            "central Gaussian" if isinstance(privacy, CentralDP) else f"distributed discrete Gaussian in {proto.name}"),
    )

