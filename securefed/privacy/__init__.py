"""Differential privacy: clipping, noise (central, distributed inside secure aggregation, DP-SGD), accounting.

==============================  =============================================================
``compute_epsilon``             epsilon of one mechanism's releases (dp-accounting for Gaussian)
``Accountant``                  composes events; ``.ledger`` is what an auditor recomputes from
``CentralDP``                   trainer config: client level, server adds Gaussian noise
``DistributedDP``               trainer config: client level, clients add DDG/Skellam noise in SecAgg
``SampleLevelDP``               trainer config: DP-SGD in local training
``Privacy``                     what any config implements: budget, ``session_mechanism(...)``
``CentralMechanism`` & co.      per-round mechanisms a config builds (``RoundMechanism``)
``FlatClipping`` & co.          clipping modules (flat, per layer, adaptive)
``CentralGaussian`` & co.       noise modules (central, distributed encoders, DP-SGD)
==============================  =============================================================

See ``protocols/dp.md`` (where noise enters each protocol) and ``proofs/dp.md``.
``DPSGD`` needs torch and loads on first use: importing this package does not import torch
(a Flower node's process per message with DP would otherwise pay seconds for it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from securefed.privacy.accountant import Accountant, compute_epsilon, rdp_orders
from securefed.privacy.clipping import AdaptiveClipping, Clipping, FlatClipping, PerLayerClipping, l2_norm
from securefed.privacy.config import CentralDP, DistributedDP, PrivacyConfig, SampleLevelDP
from securefed.privacy.distributed import DistributedDiscreteGaussian, DistributedSkellam, default_granularity
from securefed.privacy.events import DDGEvent, GaussianEvent, PrivacyEvent, SkellamEvent, event_from_dict
from securefed.privacy.mechanisms import (
    CentralMechanism,
    DistributedMechanism,
    Privacy,
    RoundMechanism,
    SampleLevelMechanism,
)
from securefed.privacy.noise import CentralGaussian, NoiseModule
from securefed.privacy.rotation import HadamardRotation
from securefed.privacy.session import PrivacySession

if TYPE_CHECKING:
    from securefed.privacy.dpsgd import DPSGD

__all__ = [
    "DPSGD",
    "Accountant",
    "AdaptiveClipping",
    "CentralDP",
    "CentralGaussian",
    "CentralMechanism",
    "Clipping",
    "DDGEvent",
    "DistributedDP",
    "DistributedDiscreteGaussian",
    "DistributedMechanism",
    "DistributedSkellam",
    "FlatClipping",
    "GaussianEvent",
    "HadamardRotation",
    "NoiseModule",
    "PerLayerClipping",
    "Privacy",
    "PrivacyConfig",
    "PrivacyEvent",
    "PrivacySession",
    "RoundMechanism",
    "SampleLevelDP",
    "SampleLevelMechanism",
    "SkellamEvent",
    "compute_epsilon",
    "default_granularity",
    "event_from_dict",
    "l2_norm",
    "rdp_orders",
]

#: Public names whose modules need torch, loaded on first access.
_LAZY = {"DPSGD": "securefed.privacy.dpsgd"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'securefed.privacy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
