"""Differential privacy: clipping, noise (central, distributed inside secure aggregation, DP-SGD), accounting.

==============================  =============================================================
``compute_epsilon``             epsilon of one mechanism's releases (dp-accounting for Gaussian)
``Accountant``                  composes events; ``.ledger`` is what an auditor recomputes from
``CentralDP``                   trainer config: client level, server adds Gaussian noise
``DistributedDP``               trainer config: client level, clients add DDG/Skellam noise in SecAgg
``SampleLevelDP``               trainer config: DP-SGD in local training
``FlatClipping`` & co.          clipping modules (flat, per layer, adaptive)
``CentralGaussian`` & co.       noise modules (central, distributed encoders, DP-SGD)
==============================  =============================================================

See ``protocols/dp.md`` (where noise enters each protocol) and ``proofs/dp.md``.
"""

from securefed.privacy.accountant import Accountant, compute_epsilon, rdp_orders
from securefed.privacy.clipping import AdaptiveClipping, Clipping, FlatClipping, PerLayerClipping, l2_norm
from securefed.privacy.config import CentralDP, DistributedDP, PrivacyConfig, SampleLevelDP
from securefed.privacy.distributed import DistributedDiscreteGaussian, DistributedSkellam, default_granularity
from securefed.privacy.dpsgd import DPSGD
from securefed.privacy.events import DDGEvent, GaussianEvent, PrivacyEvent, SkellamEvent, event_from_dict
from securefed.privacy.noise import CentralGaussian, NoiseModule
from securefed.privacy.rotation import HadamardRotation
from securefed.privacy.session import PrivacySession

__all__ = [
    "DPSGD",
    "Accountant",
    "AdaptiveClipping",
    "CentralDP",
    "CentralGaussian",
    "Clipping",
    "DDGEvent",
    "DistributedDP",
    "DistributedDiscreteGaussian",
    "DistributedSkellam",
    "FlatClipping",
    "GaussianEvent",
    "HadamardRotation",
    "NoiseModule",
    "PerLayerClipping",
    "PrivacyConfig",
    "PrivacyEvent",
    "PrivacySession",
    "SampleLevelDP",
    "SkellamEvent",
    "compute_epsilon",
    "default_granularity",
    "event_from_dict",
    "l2_norm",
    "rdp_orders",
]
